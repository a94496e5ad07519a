"""Climate projection (ClimateBench): the model wrapper, the yearly data, the metrics, the baseline.

Plain PyTorch and numpy, no Ray (``climax/tasks/projection.py`` is the task that trains it).

Model (as ClimaX's ``ClimaXClimateBench``, Nguyen et al. 2023, section 4.3): the pretrained
backbone encodes each of the last ``history`` years of forcing on its own, at lead time 0, with a
learned time embedding (sin-cos initialised, one vector per year of the window) added to its tokens
beside the position embedding; the final tokens are averaged over space; one learned query
cross-attends over the ``history`` year vectors (both in ``climax.neck.TimeNeck``, the module
forecasting's history input uses too); a linear head maps the pooled vector
to every grid point of each target variable. The forcings (CO2, CH4, SO2, BC) are new variables, so
the token and variable embeddings are initialised afresh (never taken from a checkpoint) and the
backbone's forecasting head is dropped; by default the transformer blocks are frozen except their
LayerNorms (the original's ``freeze_encoder``).

Data: every row of a preprocessed ClimateBench scenario (one row per year) is held in memory (a
scenario is ~250 years of a few 32 x 64 fields); a sample is the window of ``history`` consecutive
years of forcing ending at the target year, and the target year's fields.

Metrics (ClimateBench, Watson-Parris et al. 2022, eqs. 1-3; as ClimaX's ``lat_weighted_nrmse``),
over the test years with <.> the latitude-weighted global mean and an overbar the time mean:

* normaliser  N = | < mean_t truth > |
* NRMSE_s = sqrt( < (mean_t pred - mean_t truth)^2 > ) / N       (the time-mean map)
* NRMSE_g = sqrt( mean_t ( <pred_t> - <truth_t> )^2 ) / N        (the global-mean series)
* NRMSE   = NRMSE_s + 5 NRMSE_g
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from climax.config import resolve_model_config
from climax.metrics import lat_weights
from climax.model import ClimaX, get_1d_sincos_embed
from climax.neck import TimeNeck

__all__ = ["ProjectionModel", "freeze_projection", "Scenario", "load_scenario", "window_targets", "windows",
           "climatebench_nrmse", "global_mean", "LinearBaseline", "NRMSE_G_WEIGHT"]

#: ClimateBench's weight of the global term in the total NRMSE.
NRMSE_G_WEIGHT = 5.0


# ----------------------------------------------------------------------------- model
class ProjectionModel(nn.Module):
    """ClimaX backbone + time aggregation + linear head: (B, T, V_in, H, W) -> (B, V_out, H, W).

    Args:
        backbone: a ``ClimaX`` whose ``default_vars`` are the forcing variables (its ``head`` is
            replaced by an identity: the projection head below predicts the fields).
        out_vars: the predicted variables, in output order.
        history: years of forcing per sample (T).
    """

    def __init__(self, backbone: ClimaX, out_vars: Sequence[str], history: int = 10):
        super().__init__()
        if history < 1:
            raise ValueError(f"history must be at least 1 year, got {history}")
        self.backbone = backbone
        self.backbone.head = nn.Identity()  # the forecasting head is not used by this task
        self.out_vars = list(out_vars)
        self.history = int(history)
        D = backbone.embed_dim
        h, w = backbone.img_size
        # the time embedding (sin-cos, one vector per year) and the one-query attention across years:
        # climax.neck.TimeNeck, shared with forecasting's history input
        self.neck = TimeNeck(D, backbone.num_heads, self.history, residual=False)
        self.head = nn.Linear(D, len(self.out_vars) * h * w)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_load_state_dict_pre_hook(_legacy_neck_names)

    @property
    def config(self) -> dict:
        """Recorded in checkpoints (``save_checkpoint`` writes it as ``model_config``)."""
        return {"task": "projection", "backbone": dict(self.backbone.config), "out_vars": self.out_vars,
                "history": self.history}

    @classmethod
    def from_config(cls, config: dict) -> ProjectionModel:
        return cls(ClimaX.from_config(resolve_model_config(config["backbone"])), config["out_vars"],
                   config["history"])

    def reset_embeddings(self) -> None:
        """Fresh token and variable embeddings (the forcings are new variables for a pretrained
        backbone), initialised as ``ClimaX.initialize_weights`` does."""
        bb = self.backbone
        var = get_1d_sincos_embed(bb.embed_dim, np.arange(len(bb.default_vars)))
        bb.var_embed.data.copy_(torch.from_numpy(var).float().unsqueeze(0))
        for emb in bb.token_embeds:
            w = emb.proj.weight.data
            nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
            nn.init.zeros_(emb.proj.bias)

    def forward(self, x: torch.Tensor, in_vars: Sequence[str]) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.history:
            raise ValueError(f"expected (batch, {self.history} years, variables, lat, lon), got {tuple(x.shape)}")
        B, T = x.shape[:2]
        lead = torch.zeros(B * T, device=x.device, dtype=x.dtype)  # the forcing of the year itself
        time_embed = self.neck.embed.expand(B, -1, -1).reshape(B * T, 1, -1)
        tokens = self.backbone.forward_encoder(x.flatten(0, 1), lead, in_vars, extra_embed=time_embed)
        years = tokens.mean(dim=1).unflatten(0, (B, T))  # (B, T, D): average over space
        pooled = self.neck.pool(years)
        h, w = self.backbone.img_size
        return self.head(pooled).reshape(B, len(self.out_vars), h, w)


#: names of the projection model's time tensors before they moved into ``climax.neck.TimeNeck``
_LEGACY_NECK = {"time_pos_embed": "neck.embed", "time_query": "neck.query", "time_agg.": "neck.attn."}


def _legacy_neck_names(module, state_dict, prefix, *args, **kwargs) -> None:
    """Load-state-dict pre-hook: projection checkpoints written before the shared neck load unchanged."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in _LEGACY_NECK.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


def freeze_projection(model: ProjectionModel, *, blocks: bool = True, block_norms_trainable: bool = True) -> list[str]:
    """Freeze the backbone's transformer blocks (except their LayerNorms when
    ``block_norms_trainable``, as the original, after arXiv 2103.05247); returns the frozen names."""
    frozen = []
    if not blocks:
        return frozen
    for name, p in model.backbone.blocks.named_parameters():
        if block_norms_trainable and "norm" in name.lower():
            continue
        p.requires_grad_(False)
        frozen.append(f"backbone.blocks.{name}")
    return frozen


# ----------------------------------------------------------------------------- data
@dataclass
class Scenario:
    """All years of one preprocessed scenario: x (T, V_in, H, W) and y (T, V_out, H, W), raw units."""

    name: str
    years: np.ndarray  # (T,) int
    x: np.ndarray
    y: np.ndarray | None
    lat: np.ndarray
    lon: np.ndarray


def load_scenario(dataset, in_vars: Sequence[str], out_vars: Sequence[str] | None) -> Scenario:
    """Every row of every split of a ``climax.data.ShardDataset`` (yearly ClimateBench shards)."""
    years, xs, ys = [], [], []
    for split in dataset.manifest.raw.get("splits", {}):
        axis = dataset.axis(split)
        idx = np.arange(len(axis))
        years.append(axis.times.astype("datetime64[Y]").astype(np.int64) + 1970)
        xs.append(dataset.read(split, idx, in_vars))
        if out_vars:
            ys.append(dataset.read(split, idx, out_vars))
    if not years:
        raise ValueError(f"dataset {dataset.name} ({dataset.root}) has no rows")
    yr = np.concatenate(years)
    order = np.argsort(yr, kind="stable")
    if np.any(np.diff(yr[order]) == 0):
        raise ValueError(f"dataset {dataset.name}: a year appears twice; ClimateBench shards hold one row per year")
    return Scenario(dataset.name, yr[order], np.concatenate(xs)[order],
                    np.concatenate(ys)[order] if out_vars else None, dataset.lat, dataset.lon)


def window_targets(years: np.ndarray, history: int, first: int | None = None, last: int | None = None) -> np.ndarray:
    """Indices t of the target years with ``history`` consecutive years ending at t (t included)
    and first <= year <= last."""
    years = np.asarray(years)
    out = []
    for t in range(history - 1, len(years)):
        if years[t] - years[t - history + 1] != history - 1:
            continue  # a gap in the years: no complete window
        if (first is not None and years[t] < first) or (last is not None and years[t] > last):
            continue
        out.append(t)
    return np.asarray(out, dtype=np.int64)


def windows(x: np.ndarray, targets: np.ndarray, history: int) -> np.ndarray:
    """(N, history, V, H, W) forcing windows ending at ``targets``."""
    return np.stack([x[t - history + 1:t + 1] for t in targets]) if len(targets) else \
        np.empty((0, history, *x.shape[1:]), x.dtype)


# ----------------------------------------------------------------------------- metrics
def _weights(lat: np.ndarray) -> np.ndarray:
    return lat_weights(torch.as_tensor(np.array(lat, dtype=np.float64)), torch.float64).numpy()[:, None]


def global_mean(field: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Latitude-weighted mean over the last two axes (lat, lon)."""
    return (np.asarray(field, np.float64) * _weights(lat)).mean(axis=(-2, -1))


def climatebench_nrmse(pred: np.ndarray, truth: np.ndarray, lat: np.ndarray) -> dict[str, float]:
    """ClimateBench's normalised RMSE of one variable over the test years, with plain RMSE beside.

    pred, truth: (T, H, W) in physical units. Returns nrmse_s, nrmse_g, nrmse (s + 5 g) and rmse
    (latitude-weighted RMSE per year, averaged over the years, as ``climax.metrics.lat_weighted_rmse``).
    """
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must both be (years, lat, lon)")
    w = _weights(lat)
    norm = abs(global_mean(truth.mean(axis=0), lat))
    spatial = np.sqrt(((pred.mean(axis=0) - truth.mean(axis=0)) ** 2 * w).mean()) / norm
    glob = np.sqrt(np.mean((global_mean(pred, lat) - global_mean(truth, lat)) ** 2)) / norm
    rmse = np.sqrt(((pred - truth) ** 2 * w).mean(axis=(-2, -1))).mean()
    return {"nrmse_s": float(spatial), "nrmse_g": float(glob), "nrmse": float(spatial + NRMSE_G_WEIGHT * glob),
            "rmse": float(rmse)}


# ----------------------------------------------------------------------------- baseline
class LinearBaseline:
    """Linear regression of every grid point's value on the global means of the forcings of the
    target year (plus an intercept): the simple baseline the projection model must beat."""

    def __init__(self, lat: np.ndarray):
        self.lat = np.asarray(lat)
        self.coef: np.ndarray | None = None
        self.shape: tuple[int, ...] = ()

    def features(self, x: np.ndarray) -> np.ndarray:
        """(N, V_in, H, W) forcings of the target years -> (N, V_in + 1) with the intercept."""
        f = global_mean(x, self.lat)
        return np.concatenate([f, np.ones((len(f), 1))], axis=1)

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearBaseline:
        f = self.features(x)
        scale = np.abs(f).max(axis=0)
        scale[scale == 0] = 1.0
        self._scale = scale
        self.shape = y.shape[1:]
        self.coef, *_ = np.linalg.lstsq(f / scale, np.asarray(y, np.float64).reshape(len(y), -1), rcond=None)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("fit the baseline first")
        return ((self.features(x) / self._scale) @ self.coef).reshape(len(x), *self.shape).astype(np.float32)
