"""cluster.yaml against Ray's own cluster-config schema, its spot-first policy, and the shape every
job shares (``python -m jobs.NAME CONFIG.yaml [key=value ...]``), run as users run them."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from tests.helpers import ROOT

CLUSTER = ROOT / "cluster.yaml"
RAY_PORTS = {6379, 8265, 10001}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(raw)
    validate_config(config)
    return config


# ----------------------------------------------------------------------------------- cluster.yaml
def test_cluster_yaml_passes_rays_schema(raw, prepared):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    # the validator is strict: a misspelt key does not pass
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**raw, "max_worker": 3}))
    bad = yaml.safe_load(CLUSTER.read_text())
    bad["available_node_types"]["g5-spot"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_images_are_the_pinned_ray_for_python_311(prepared):
    import ray

    docker = prepared["docker"]
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py311-gpu", docker["image"]), docker["image"]
    images = [docker["image"], docker["head_image"]] + [
        t["docker"]["worker_image"] for t in prepared["available_node_types"].values() if "docker" in t]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image  # not ray-ml (frozen at 2.30)
    lock = (ROOT / "requirements.lock").read_text()
    assert f"ray=={ray.__version__}" in lock


def test_node_types_gpu_kinds_spot_with_on_demand_twin(prepared):
    types = prepared["available_node_types"]
    head = types["head"]
    assert head["resources"] == {"CPU": 0}  # no Ray work on the head
    assert "InstanceMarketOptions" not in head["node_config"]
    kinds = {name.rsplit("-", 1)[0] for name in types if name != "head"}
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    assert {"g5", "p4d", "p5"} <= kinds
    for kind in kinds:
        spot, ondemand = types[f"{kind}-spot"], types[f"{kind}-ondemand"]
        assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
        assert "InstanceMarketOptions" not in ondemand["node_config"]
        assert instance[f"{kind}-spot"] == instance[f"{kind}-ondemand"]
        for t in (spot, ondemand):
            assert t["min_workers"] == 0 and 0 < t["max_workers"] <= prepared["max_workers"]
        assert spot["priority"] > ondemand["priority"]  # autoscaler v2 reads priority
    assert instance["g5-spot"].startswith("g5.") and instance["p4d-spot"].startswith("p4d.")
    assert instance["p5-spot"].startswith("p5.")


def test_s3_through_instance_profiles_and_no_keys(raw, prepared):
    text = CLUSTER.read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"aws_access_key_id", r"aws_session_token",
                    r"AWS_SECRET", r"AWS_ACCESS_KEY"):
        assert not re.search(pattern, text, re.IGNORECASE), pattern
    assert "aws_credentials" not in raw["provider"]
    for name, t in prepared["available_node_types"].items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), (name, arn)


def _ray_ports_open_to_the_world(rules: list[dict]) -> list[dict]:
    """The inbound rules that open a Ray port (or every port) to 0.0.0.0/0 or ::/0."""
    bad = []
    for rule in rules:
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or \
            any(r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        if world and (rule.get("IpProtocol") == "-1" or lo == -1 or any(lo <= p <= hi for p in RAY_PORTS)):
            bad.append(rule)
    return bad


def _inbound_rules(config: dict) -> list[dict]:
    """The inbound rules `ray up` authorizes on the security group it creates for this config: Ray's
    own defaults (all traffic between the cluster's nodes, SSH from anywhere) then the config's
    ``provider.security_group.IpPermissions`` (ray.autoscaler._private.aws.config: no public API
    lists them; if Ray renames this helper, the test fails loudly rather than checking nothing)."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    extended = config["provider"].get("security_group", {}).get("IpPermissions", [])
    return _create_default_inbound_rules({"sg-climax-ray"}, extended)


def test_no_ray_port_open_to_the_world(prepared):
    assert prepared["provider"].get("security_group", {}).get("IpPermissions") is not None, \
        "cluster.yaml must state the security group's inbound rules"
    rules = _inbound_rules(prepared)
    # something real is checked: Ray's two default rules at least, one of them open to the world
    assert len(rules) >= 2 and any(r.get("IpRanges") == [{"CidrIp": "0.0.0.0/0"}] for r in rules), rules
    assert [r for r in rules if r.get("UserIdGroupPairs")], rules  # node-to-node traffic stays inside the group
    assert _ray_ports_open_to_the_world(rules) == []
    # the check can fail: each of these planted in cluster.yaml (still a valid config) is caught
    from ray.autoscaler._private.util import prepare_config, validate_config

    world = {"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    for planted in ({"IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379, **world},  # the GCS
                    {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, **world},  # the dashboard's range
                    {"IpProtocol": "-1", **world},  # every port
                    {"IpProtocol": "tcp", "FromPort": 10001, "ToPort": 10001, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}):
        bad = yaml.safe_load(CLUSTER.read_text())
        bad["provider"]["security_group"]["IpPermissions"] = [planted]
        config = prepare_config(bad)
        validate_config(config)
        assert _ray_ports_open_to_the_world(_inbound_rules(config)) == [planted], planted
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, **world}
    assert _ray_ports_open_to_the_world([ssh]) == []
    for node_type in prepared["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]  # Ray's group, rules above
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard` (SSH tunnel)
    assert "0.0.0.0" not in head


def test_setup_installs_a_pinned_revision_with_pinned_dependencies(prepared):
    setup = " ".join(prepared["setup_commands"])
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    rev = re.search(r"CLIMAX_REV=(\S+);", setup).group(1)
    assert rev == f"v{version}" or re.fullmatch(r"[0-9a-f]{40}", rev), rev
    assert 'git checkout --quiet --detach "$CLIMAX_REV"' in setup
    # the same pins as `make venv`
    make = (ROOT / "Makefile").read_text()
    torch_pins = re.search(r"pip install .*?(torch==\S+ torchvision==\S+)", make).group(1)
    assert torch_pins in setup
    assert "-r requirements.lock" in setup and "--no-deps -e ." in setup
    assert setup.index("torch==") < setup.index("requirements.lock") < setup.index("--no-deps")
    assert prepared["head_setup_commands"][0] == prepared["setup_commands"][0]  # merged for head and workers


def _scheduler(prepared, monkeypatch):
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler

    head = " ".join(prepared["head_start_ray_commands"])
    scorer = re.search(r"RAY_AUTOSCALER_UTILIZATION_SCORER=(\S+)", head).group(1)
    monkeypatch.setenv("RAY_AUTOSCALER_UTILIZATION_SCORER", scorer)  # as the head's autoscaler loads it
    types = {k: dict(v) for k, v in prepared["available_node_types"].items()}
    detected = {  # what Ray detects from the EC2 instance types at `ray up`
        "m6i.2xlarge": {"CPU": 8}, "m6i.8xlarge": {"CPU": 32},
        "g5.12xlarge": {"CPU": 48, "GPU": 4, "accelerator_type:A10G": 1},
        "p4d.24xlarge": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
        "p5.48xlarge": {"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}}
    for t in types.values():
        t["resources"] = {**detected[t["node_config"]["InstanceType"]], **t["resources"]}
    return ResourceDemandScheduler(None, types, prepared["max_workers"], "head", 1.0)


def _launch(scheduler, demands, unavailable=()):
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilityRecord,
        NodeAvailabilitySummary,
        UnavailableNodeInformation,
    )

    summary = NodeAvailabilitySummary({t: NodeAvailabilityRecord(
        node_type=t, is_available=False, last_checked_timestamp=0,
        unavailable_node_information=UnavailableNodeInformation(
            category="InsufficientInstanceCapacity", description="no spot capacity"))
        for t in unavailable})
    to_launch, _ = scheduler.get_nodes_to_launch([], {}, demands, {}, [], {}, [], summary)
    return {t: n for t, n in to_launch.items() if t != "head"}  # the head exists already


def test_spot_first_then_on_demand_when_spot_fails(prepared, monkeypatch):
    scheduler = _scheduler(prepared, monkeypatch)
    a100 = [{"GPU": 1, "CPU": 1, "accelerator_type:A100": 0.001}] * 16  # ScalingConfig(accelerator_type="A100")
    assert _launch(scheduler, a100) == {"p4d-spot": 2}
    assert _launch(scheduler, a100, unavailable=["p4d-spot"]) == {"p4d-ondemand": 2}
    a10g = [{"GPU": 1, "CPU": 1, "accelerator_type:A10G": 0.001}] * 4
    assert _launch(scheduler, a10g) == {"g5-spot": 1}
    assert _launch(scheduler, a10g, unavailable=["g5-spot"]) == {"g5-ondemand": 1}
    cpu = [{"CPU": 1}] * 32  # preprocessing
    assert _launch(scheduler, cpu) == {"cpu-spot": 1}
    assert _launch(scheduler, cpu, unavailable=["cpu-spot"]) == {"cpu-ondemand": 1}  # never a GPU node
    # both refused: the request still goes somewhere rather than nowhere
    assert _launch(scheduler, cpu, unavailable=["cpu-spot", "cpu-ondemand"]) == {"cpu-spot": 1}


# ----------------------------------------------------------------------------------- job CLI shape
def _models() -> dict:
    from jobs.demo import DemoConfig
    from jobs.evaluate import EvaluateConfig
    from jobs.forecast import ForecastConfig
    from jobs.train import TrainConfig
    from jobs.tune import CampaignConfig
    from pipelines.recipe import Recipe

    return {"preprocess": Recipe, "pretrain": TrainConfig, "finetune": TrainConfig, "evaluate": EvaluateConfig,
            "forecast": ForecastConfig, "tune": CampaignConfig, "demo": DemoConfig}


CONFIGS = {"preprocess": "configs/recipes/demo.yaml", "pretrain": "configs/pretrain.yaml",
           "finetune": "configs/finetune/global.yaml", "evaluate": "configs/evaluate.yaml",
           "forecast": "configs/forecast.yaml", "tune": "configs/tune.yaml", "demo": None}


def test_every_job_module_is_covered():
    not_jobs = {"__init__", "common", "config", "train", "train_config", "autoscaler", "observability", "objective"}
    found = {p.stem for p in (ROOT / "jobs").glob("*.py")} - not_jobs
    assert found == set(CONFIGS), found


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict:
    """Each job three times (--help, a bad key, a missing file), through its ``main(argv)`` in this
    process (what ``python -m jobs.<job>`` calls): the exit status and what it printed. In process,
    because 21 interpreters importing torch and Ray at once took ~50 s of the suite on 2 cores."""
    import contextlib
    import importlib
    import io

    tmp = tmp_path_factory.mktemp("cli")
    out = {}
    for job, config in CONFIGS.items():
        main = importlib.import_module(f"jobs.{job}").main
        cfg = [config] if config else []
        cases = {"help": ["--help"], "bad_key": [*cfg, "no_such_key=1", "train.no_such_sub_key=2"],
                 "missing": [str(tmp / "absent.yaml")]}
        for case, args in cases.items():
            stdout, stderr = io.StringIO(), io.StringIO()
            code = 0
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    main(args)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            out[job, case] = (code, stdout.getvalue(), stderr.getvalue())
    return out


@pytest.mark.parametrize("job", list(CONFIGS))
def test_job_cli_shape(job, cli_runs):
    from jobs.config import describe_keys

    if CONFIGS[job] and not (ROOT / CONFIGS[job]).exists():
        pytest.skip(f"{CONFIGS[job]} is not in this checkout")

    rc, stdout, stderr = cli_runs[job, "help"]
    assert rc == 0, stderr
    assert f"python -m jobs.{job}" in stdout
    for line in describe_keys(_models()[job]):  # every key with its type and default
        assert line.strip() in stdout, (line, stdout)

    rc, stdout, stderr = cli_runs[job, "bad_key"]
    assert rc == 2, (stdout, stderr)
    assert "unknown key 'no_such_key'" in stderr and "allowed keys here:" in stderr, stderr
    assert "Traceback" not in stderr and "effective configuration" not in stdout  # nothing ran

    rc, stdout, stderr = cli_runs[job, "missing"]
    assert rc == 2, (stdout, stderr)
    assert re.search(r"error: configuration file \S*absent\.yaml does not exist", stderr), stderr


def test_shipped_configs_validate():
    """Every YAML under configs/ passes its job's validation (recipes, job configs, model configs)."""
    from jobs.config import apply_overrides, validate

    models = _models()
    for path in sorted((ROOT / "configs" / "recipes").glob("*.yaml")):
        validate(models["preprocess"], yaml.safe_load(path.read_text()), source=str(path))
    for job in ("pretrain", "finetune", "evaluate", "forecast", "tune"):
        if (ROOT / CONFIGS[job]).exists():
            validate(models[job], yaml.safe_load((ROOT / CONFIGS[job]).read_text()), source=CONFIGS[job])
    for path in sorted(ROOT.glob("configs/pretrain-*.yaml")):
        validate(models["pretrain"], yaml.safe_load(path.read_text()), source=str(path))
    for path in sorted((ROOT / "configs" / "model").glob("*.yaml")):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    # overrides as documented in the README apply to the shipped files
    cfg = apply_overrides(yaml.safe_load((ROOT / "configs/pretrain.yaml").read_text()),
                          ["scaling.num_workers=64", "scaling.use_gpu=true", "scaling.accelerator_type=A100"])
    assert validate(models["pretrain"], cfg).scaling.accelerator_type == "A100"
