"""The campaign on Ray Tune: the search space, each trial's driver function, the Tuner (new or
restored), ASHA that replays a resumed campaign's results, the trial-event log, and the freeing of
what stopped trials' Ray Train runs hold."""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jobs.train_config import TrainConfig
from jobs.tuning.campaign import Campaign, planned_epochs, short_config, trial_config

#: what a trial's driver function reserves (it runs no training itself)
DRIVER_MEMORY = 256 * 2**20
#: how often the driver frees what stopped trials' Ray Train runs hold (see reap_stopped_runs)
REAP_EVERY_S = 3.0


def param_space(campaign: Campaign) -> dict:
    from ray import tune

    space = {}
    for key, d in campaign.cfg.search_space.items():
        values = [json.dumps(v) for v in d.values] if key in campaign.encoded else d.values
        if d.type == "loguniform":
            space[key] = tune.loguniform(d.low, d.high)
        elif d.type == "uniform":
            space[key] = tune.uniform(d.low, d.high)
        elif d.type == "randint":
            space[key] = tune.randint(int(d.low), int(d.high))
        elif d.type == "choice" and campaign.cfg.search != "grid":
            space[key] = tune.choice(values)
        else:
            space[key] = tune.grid_search(values)
    return space


def run_trial(config: dict, campaign: dict) -> None:
    """One trial: the finetuning ``TorchTrainer`` of ``config``, its reports forwarded to Tune.

    The Ray Train run is named after the trial, so a retried or resumed trial continues from its
    last checkpoint instead of starting again.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(campaign["base"], config, campaign["model_base"], campaign["encoded"])
    cfg.update(name=trial_id, storage_path=campaign["runs_path"], storage_options=campaign["storage_options"])
    build_trainer(TrainConfig.model_validate(cfg), callbacks=[TuneReportCallback()]).fit()


def max_concurrent(campaign: Campaign) -> int:
    """Trials at once: ``max_concurrent_trials``, or what the cluster's resources hold (auto)."""
    import ray

    n = campaign.cfg.max_concurrent_trials
    if n != "auto":
        return max(int(n), 1)
    sc = campaign.base["scaling"]
    per_worker = dict(sc.get("resources_per_worker") or {})
    per_worker.setdefault("CPU", 1)
    if sc.get("use_gpu"):
        per_worker.setdefault("GPU", 1)
    have = ray.cluster_resources()
    fits = [int(have.get(k, 0) // (v * sc["num_workers"])) for k, v in per_worker.items() if v > 0]
    return max(min(fits or [1]), 1)


# the campaign of this driver process: the log callback below is pickled with the Tune experiment

# and unpickled on resume, so it finds its file and budget here rather than in its own fields
ACTIVE: dict[str, Any] = {}


def campaign_fs(campaign: Campaign):
    import pyarrow.fs

    if campaign.filesystem is not None:
        return campaign.filesystem, campaign.experiment
    if campaign.experiment.startswith("s3://"):
        return pyarrow.fs.FileSystem.from_uri(campaign.experiment)
    return pyarrow.fs.LocalFileSystem(), campaign.experiment


def _ray_callback_base():
    from ray.tune import Callback

    return Callback


class CampaignLog(_ray_callback_base()):
    """One line per trial event, and a record of how often each trial started, its failures and
    why it stopped (the table's ``attempts``, ``failures`` and ``stop_reason``). The record is
    kept in Tune's own experiment checkpoint (``get_state``/``set_state``), so it survives a resume."""

    def __init__(self):
        self.state: dict = {"launches": 0, "trials": {}}

    def get_state(self) -> dict:
        return copy.deepcopy(self.state)

    def set_state(self, state: dict) -> None:
        self.state = copy.deepcopy(state)

    def setup(self, **info):
        ACTIVE["log"] = self
        self.state["launches"] += 1
        self.start = time.time()
        self.total = info.get("total_num_samples") or info.get("num_samples")
        self.last_reap = 0.0

    def _reap(self, *, force: bool = False):
        if force or time.time() - self.last_reap > REAP_EVERY_S:
            self.last_reap = time.time()
            try:
                reap_stopped_runs()
            except Exception as e:  # best effort: never end a campaign over it
                print(f"[tune] could not free the resources of stopped trials: {e}", flush=True)

    def on_step_end(self, iteration, trials, **info):
        self._reap()

    def _rec(self, trial) -> dict:
        return self.state["trials"].setdefault(trial.trial_id, {"starts": 0, "failures": [], "stop_reason": None})

    def on_trial_start(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        rec["starts"] += 1
        rec["stop_reason"] = None
        print(f"[tune] trial {trial.trial_id} started (attempt {rec['starts']}): "
              f"{short_config(trial.config)}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        msg = error_text(trial)
        self._rec(trial)["failures"].append(msg)
        print(f"[tune] trial {trial.trial_id} failed ({msg}); retrying from its last checkpoint", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        msg = error_text(trial)
        rec["failures"].append(msg)
        rec["stop_reason"] = f"error: {msg}"
        print(f"[tune] trial {trial.trial_id} failed for good after {rec['starts']} attempt(s): {msg}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        campaign: Campaign = ACTIVE["campaign"]
        result = trial.last_result or {}
        epoch = int(result.get("epoch") or 0)
        planned = planned_epochs(campaign, trial.config)
        budget = campaign.cfg.time_budget_s
        if epoch >= min(planned, campaign.max_t):
            reason = "completed"
        elif budget and time.time() - self.start >= budget - 1:
            reason = "time budget"
        elif campaign.cfg.scheduler.type == "asha":
            reason = "early stop (asha)"
        else:
            reason = "stopped"
        self._rec(trial)["stop_reason"] = reason
        done = sum(1 for r in self.state["trials"].values() if r["stop_reason"])
        metric = campaign.cfg.metric
        print(f"[tune] trial {trial.trial_id} {reason} at epoch {epoch}/{planned}: {metric} "
              f"{result.get(metric, float('nan')):.4g} ({done}/{self.total or '?'} trials done)", flush=True)


def reap_stopped_runs() -> int:
    """Free what the Ray Train runs of stopped trials still hold; returns the placement groups removed.

    When Tune stops a trial (ASHA, time budget, a failure) it kills the trial's actor, and with it
    the run's controller. Ray keeps a dead actor's placement groups until its job ends, and Ray
    Train's own cleaner (a detached actor per run) finds the controller's death through the
    dashboard's State API, which a minimal Ray install lacks (and which cannot pick a cluster when
    several run on one machine). The workers' CPUs would then stay reserved and the next trials
    wait for ever. So the campaign driver removes the placement groups created by dead Ray Train
    controllers of its own job, and ends their cleaners.
    """
    import ray

    # Private Ray API, kept on purpose while Ray is pinned (2.60): the public state API
    # (ray.util.state.list_placement_groups) does not report which actor created a placement group,
    # and that is how the groups of dead Train controllers of this job are told apart from live
    # ones. tests/test_tune.py's interrupted-and-resumed campaign breaks if Ray changes it.
    from ray._private.state import actors, state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    table = actors()
    dead = {aid: a for aid, a in table.items()
            if a["ActorClassName"] == "TrainController" and a["State"] == "DEAD" and a["JobID"] == job}
    if not dead:
        return 0
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached or \
                pg.creator_actor_id.hex() not in dead:
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    # the detached cleaners of those runs now have nothing left to do; they live on this (the head)
    # node, where the driver of `ray job submit` runs, and exit on SIGTERM
    addresses = {(a["Address"]["IPAddress"], a["Address"]["Port"]) for a in dead.values()}
    node = ray.get_runtime_context().get_node_id()
    for a in table.values():
        if a["ActorClassName"] == "PlacementGroupCleaner" and a["State"] == "ALIVE" and a.get("Pid") and \
                a["Address"]["NodeID"] == node and \
                (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"]) in addresses:
            try:
                os.kill(int(a["Pid"]), signal.SIGTERM)
            except OSError:  # already gone
                pass
    return removed


def _asha_base():
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler


class CampaignASHA(_asha_base()):
    """ASHA that, on a resumed campaign, first replays the results reported before the
    interruption: Tune restores the searcher but not the scheduler, whose rungs would otherwise
    start empty and let the next trials through unchallenged."""

    def on_trial_add(self, tune_controller, trial):
        if not getattr(self, "_replayed", False):
            self._replayed = True
            for trial_id, df in (ACTIVE.get("replay") or {}).items():
                stub = SimpleNamespace(trial_id=trial_id)  # ASHA keys its records by trial id
                super().on_trial_add(tune_controller, stub)
                for result in df[[self._time_attr, self._metric]].to_dict("records"):
                    super().on_trial_result(tune_controller, stub, result)
                super().on_trial_remove(tune_controller, stub)
        super().on_trial_add(tune_controller, trial)


def error_text(trial) -> str:
    """One line for the trial's latest error (the driver's copy first: storage is synced later)."""
    from ray import cloudpickle

    from jobs.common import error_line

    err = None
    local = getattr(trial, "pickled_error_file", None)
    try:
        if local and Path(local).is_file():
            err = cloudpickle.loads(Path(local).read_bytes())
        else:
            err = trial.get_pickled_error()
    except Exception:
        err = None
    if isinstance(err, BaseException):
        return error_line(err)[:300]
    text = ""
    try:
        text = (trial.get_error() or "").strip()
    except Exception:
        pass
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "unknown error"


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(campaign: Campaign):
    """A new ``ray.tune.Tuner`` for the campaign, or the restored one when its state exists."""
    import ray.tune
    from ray.tune.schedulers import FIFOScheduler

    cfg = campaign.cfg
    trainable = ray.tune.with_parameters(run_trial, campaign={
        "base": campaign.base, "model_base": campaign.model_base, "encoded": campaign.encoded,
        "runs_path": campaign.runs_path, "storage_options": cfg.storage_options})
    # the trial's function only drives its TorchTrainer: no CPU (the workers get them all), some memory
    trainable = ray.tune.with_resources(trainable, {"cpu": 0, "memory": DRIVER_MEMORY})
    fs, exp = campaign_fs(campaign)
    if ray.tune.Tuner.can_restore(exp, storage_filesystem=fs):
        print(f"resuming campaign {cfg.name!r} from {campaign.experiment}", flush=True)
        return ray.tune.Tuner.restore(exp, trainable=trainable, resume_errored=True, storage_filesystem=fs), True
    concurrent = campaign.extra["max_concurrent"]
    if cfg.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    else:  # Tune ignores max_concurrent_trials with a BasicVariantGenerator given: it takes its own
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg, concurrent = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent), None
    if cfg.scheduler.type == "asha":
        # max_t one epoch beyond the last: a trial that is not stopped early ends by returning from fit()
        # (its Ray Train run shuts down cleanly) rather than being stopped by ASHA at its last report
        scheduler = CampaignASHA(time_attr="epoch", max_t=campaign.max_t + (cfg.scheduler.max_t is None),
                                  grace_period=cfg.scheduler.grace_period,
                                  reduction_factor=cfg.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    tuner = ray.tune.Tuner(
        trainable, param_space=param_space(campaign),
        tune_config=ray.tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=campaign.num_samples, time_budget_s=cfg.time_budget_s,
            max_concurrent_trials=concurrent, trial_dirname_creator=_trial_dirname),
        run_config=ray.tune.RunConfig(
            name=cfg.name, storage_path=campaign.storage, storage_filesystem=campaign.filesystem,
            failure_config=ray.tune.FailureConfig(max_failures=cfg.trial_max_failures),
            callbacks=[CampaignLog()], verbose=1))
    return tuner, False
