"""The Ray-free loop (climax/loop.py) on one process with a small task of its own: epochs and steps
counted, a checkpoint per epoch handed to the reporter, and a resumed run that ends with exactly the
weights of an uninterrupted one (same batches, optimiser state and schedule). Also the registry."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.helpers import tiny_model

VARS = ["2m_temperature", "geopotential_500"]


class _Batches:
    """Six fixed batches per pass, their order fixed by the pass number (as the real loaders)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.data = [torch.randn(4, 2, 16, 32, generator=g) for _ in range(6)]
        self.order = list(range(6))

    def __len__(self):
        return 6

    def set_epoch(self, epoch):
        self.order = list(np.random.default_rng(epoch).permutation(6))

    def __iter__(self):
        from climax.data import Batch

        for i in self.order:
            x = self.data[i]
            yield Batch(x, torch.roll(x, 1, dims=-1), torch.full((4,), 6.0), VARS, VARS,
                        np.full(4, np.datetime64("2020-01-01", "ns")), "toy")


def _task(epochs, steps=4):
    from climax.loop import Loaders
    from climax.tasks import Task
    from climax.training import forecast_loss
    from jobs.train import TrainConfig

    cfg = TrainConfig.model_validate({"data": {"datasets": [{"root": "unused"}], "batch_size": 4},
                                      "train": {"epochs": epochs, "steps_per_epoch": steps, "bf16": False},
                                      "optim": {"lr": 1e-3, "warmup_steps": 2}})

    class Toy(Task):
        name = "toy"

        def build_model(self):
            torch.manual_seed(0)
            return tiny_model(VARS)

        def make_loaders(self, model):
            return Loaders(_Batches(), _Batches(), steps)

        def loss(self, model, batch, step):
            return forecast_loss(model, batch, np.linspace(-80, 80, 16), torch.device("cpu"), bf16=False), None

        def validate(self, model, val, train_metrics):
            return {"val_loss": train_metrics["train_loss"] / 2}

    return Toy(cfg)


class _Stop(Exception):
    pass


class _Keep:
    """Keeps each epoch's metrics and checkpoint; ``stop_after``: the run dies after that epoch's report."""

    def __init__(self, folder, stop_after=None):
        self.folder, self.metrics, self.stop_after = folder, [], stop_after

    def report(self, metrics, checkpoint_dir):
        self.metrics.append(metrics)
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.folder / f"epoch{metrics['epoch']}")
        if metrics["epoch"] == self.stop_after:
            raise _Stop


def test_loop_counts_reports_and_resumes_exactly(tmp_path):
    from climax.checkpoint import read_checkpoint
    from climax.loop import train

    whole = _Keep(tmp_path / "whole")
    state = train(_task(3), whole)
    assert [m["step"] for m in whole.metrics] == [4, 8, 12] and state.epoch == 3 and state.samples == 48
    assert all(m["val_loss"] == m["train_loss"] / 2 for m in whole.metrics)
    assert sorted(p.name for p in (tmp_path / "whole" / "epoch1").iterdir()) == ["model.pt", "train_state.pt"]
    _, meta, _ = read_checkpoint(tmp_path / "whole" / "epoch3")
    assert meta["metrics"]["step"] == 12 and meta["train_state"]["epoch"] == 3 and "run_config" in meta

    with pytest.raises(_Stop):  # a run that dies after its second epoch's checkpoint
        train(_task(3), _Keep(tmp_path / "first", stop_after=2))
    resumed = _Keep(tmp_path / "resumed")
    state = train(_task(3), resumed, restore=lambda load: load(tmp_path / "first" / "epoch2"))
    assert [m["step"] for m in resumed.metrics] == [12] and resumed.metrics[0]["restarts"] == 1
    assert state.restarts == 1 and state.epoch == 3
    assert resumed.metrics[0]["train_loss"] == pytest.approx(whole.metrics[-1]["train_loss"], rel=1e-6)
    a, _, _ = read_checkpoint(tmp_path / "whole" / "epoch3")
    b, _, _ = read_checkpoint(tmp_path / "resumed" / "epoch3")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_tasks_are_found_by_name():
    from climax.tasks import get_task, task_names
    from jobs.config import ConfigError, validate
    from jobs.train import TrainConfig

    assert task_names() == ["downscaling", "forecast", "projection"]
    assert all(get_task(n).name == n for n in task_names())
    with pytest.raises(ConfigError, match="unknown task 'nowcast'"):
        validate(TrainConfig, {"task": "nowcast", "data": {"datasets": [{"root": "x"}]}})
