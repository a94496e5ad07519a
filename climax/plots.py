"""PNG plots of evaluation results: scores against lead time, and forecast / truth / error maps.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly (no pyplot, no
global backend state), so plotting works headless and from any thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["plot_metric_vs_lead", "plot_maps", "plot_downscaling_maps", "plot_projection_maps", "plot_spectra",
           "figure", "save_figure"]

_STYLE = {
    "direct": dict(color="tab:blue", marker="o"),
    "rollout": dict(color="tab:orange", marker="s"),
    "persistence": dict(color="tab:gray", marker="^", linestyle="--"),
    "climatology": dict(color="tab:green", marker="", linestyle=":"),
}


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_metric_vs_lead(df: pd.DataFrame, metric: str, path: str | os.PathLike, title: str | None = None) -> Path:
    """One panel per variable, the metric against lead time, one line per method."""
    if metric not in ("rmse", "acc"):
        raise ValueError(f"metric must be 'rmse' or 'acc', got {metric!r}")
    if "region" in df.columns and len(df):  # one region per plot: the first (global, or a model's box)
        df = df[df["region"] == df["region"].iloc[0]]
    variables = list(dict.fromkeys(df["variable"]))
    if not variables:
        raise ValueError("no rows to plot")
    ncol = min(3, len(variables))
    nrow = math.ceil(len(variables) / ncol)
    fig = figure(4.2 * ncol, 3.2 * nrow)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, var in zip(axes, variables):
        sub = df[df["variable"] == var]
        for method in dict.fromkeys(sub["method"]):
            rows = sub[sub["method"] == method].sort_values("lead_hours")
            ax.plot(rows["lead_hours"], rows[metric], label=method, **_STYLE.get(method, {}))
        units = sub["units"].iloc[0] if metric == "rmse" and len(sub) else ""
        ax.set_title(var, fontsize=10)
        ax.set_xlabel("lead time (h)")
        ax.set_ylabel(f"RMSE ({units})" if metric == "rmse" else "ACC")
        ax.grid(alpha=0.3)
    for ax in axes[len(variables):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_maps(forecast: np.ndarray, truth: np.ndarray, lat: Sequence[float], lon: Sequence[float],
              path: str | os.PathLike, variable: str, units: str = "", title: str | None = None) -> Path:
    """Three maps side by side: forecast, truth (shared colour scale) and forecast - truth."""
    forecast, truth = np.asarray(forecast, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    if forecast.shape != truth.shape or forecast.shape != (len(lat), len(lon)):
        raise ValueError(f"forecast {forecast.shape}, truth {truth.shape} and grid {(len(lat), len(lon))} differ")
    order = np.argsort(lat)  # draw north up whatever the stored order
    forecast, truth, lat = forecast[order], truth[order], lat[order]
    x = np.unwrap(np.deg2rad(lon)) * 180 / np.pi  # a box across 0 deg stays contiguous
    error = forecast - truth
    lo, hi = np.nanmin([forecast.min(), truth.min()]), np.nanmax([forecast.max(), truth.max()])
    emax = float(np.nanmax(np.abs(error))) or 1.0
    fig = figure(14, 3.6)
    axes = fig.subplots(1, 3)
    panels = [("forecast", forecast, "viridis", lo, hi), ("truth", truth, "viridis", lo, hi),
              ("error (forecast - truth)", error, "RdBu_r", -emax, emax)]
    for ax, (name, field, cmap, vmin, vmax) in zip(axes, panels):
        mesh = ax.pcolormesh(x, lat, field, cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("longitude (deg E)")
        ax.set_ylabel("latitude (deg N)")
        ax.set_aspect("equal")
        fig.colorbar(mesh, ax=ax, shrink=0.8, label=units)
    fig.suptitle(title or variable)
    return save_figure(fig, path)


def plot_downscaling_maps(coarse: np.ndarray | None, coarse_lat: Sequence[float], coarse_lon: Sequence[float],
                          downscaled: np.ndarray, truth: np.ndarray, lat: Sequence[float], lon: Sequence[float],
                          path: str | os.PathLike, variable: str, units: str = "", title: str | None = None) -> Path:
    """Four maps side by side: the coarse input on its grid (blank when the variable is no input),
    the downscaled field, the fine truth (one colour scale for the three) and downscaled - truth."""
    downscaled, truth = np.asarray(downscaled, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    if downscaled.shape != truth.shape or truth.shape != (len(lat), len(lon)):
        raise ValueError(f"downscaled {downscaled.shape}, truth {truth.shape} and grid {(len(lat), len(lon))} differ")
    error = downscaled - truth
    fields = [downscaled, truth] + ([np.asarray(coarse, dtype=np.float64)] if coarse is not None else [])
    lo, hi = min(float(np.nanmin(f)) for f in fields), max(float(np.nanmax(f)) for f in fields)
    emax = float(np.nanmax(np.abs(error))) or 1.0
    fig = figure(18, 3.6)
    axes = fig.subplots(1, 4)
    panels = [("coarse input", coarse, coarse_lat, coarse_lon, "viridis", lo, hi),
              ("downscaled", downscaled, lat, lon, "viridis", lo, hi),
              ("truth", truth, lat, lon, "viridis", lo, hi),
              ("error (downscaled - truth)", error, lat, lon, "RdBu_r", -emax, emax)]
    for ax, (name, field, la, lo_, cmap, vmin, vmax) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("longitude (deg E)")
        ax.set_ylabel("latitude (deg N)")
        if field is None:
            ax.text(0.5, 0.5, f"{variable}\nis no input", ha="center", va="center", transform=ax.transAxes)
            continue
        la, lo_ = np.asarray(la, dtype=np.float64), np.asarray(lo_, dtype=np.float64)
        order = np.argsort(la)  # north up whatever the stored order
        mesh = ax.pcolormesh(np.unwrap(np.deg2rad(lo_)) * 180 / np.pi, la[order], np.asarray(field)[order],
                             cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest")
        ax.set_aspect("equal")
        fig.colorbar(mesh, ax=ax, shrink=0.8, label=units)
    fig.suptitle(title or variable)
    return save_figure(fig, path)


def plot_projection_maps(pred, base, truth, lat, lon, path, variable, units, span):
    """Projection (ClimateBench): the truth's mean and the model's and the linear baseline's mean
    error over the test years ``span`` (one PNG)."""
    order = np.argsort(lat)
    lat = np.asarray(lat)[order]
    pred, base, truth = pred[order], base[order], truth[order]
    fig = figure(14, 3.6)
    axes = fig.subplots(1, 3)
    emax = float(max(np.abs(pred - truth).max(), np.abs(base - truth).max())) or 1.0
    panels = [(f"truth, mean {span}", truth, "viridis", truth.min(), truth.max()),
              ("ClimaX mean error", pred - truth, "RdBu_r", -emax, emax),
              ("linear baseline mean error", base - truth, "RdBu_r", -emax, emax)]
    for ax, (name, field, cmap, vmin, vmax) in zip(axes, panels):
        mesh = ax.pcolormesh(lon, lat, field, cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("longitude (deg E)")
        ax.set_ylabel("latitude (deg N)")
        ax.set_aspect("equal")
        fig.colorbar(mesh, ax=ax, shrink=0.8, label=units)
    fig.suptitle(f"{variable}: ssp245 {span}")
    return save_figure(fig, path)


def plot_spectra(df: pd.DataFrame, path: str | os.PathLike, variable: str, title: str | None = None) -> Path:
    """Log-log zonal energy spectra of one variable (``climax.spectra.spectra_table`` rows): forecast
    (solid) against truth (dashed), one colour per lead time; wavenumber 0 (the zonal mean) left out."""
    sub = df[(df["variable"] == variable) & (df["wavenumber"] > 0)]
    if sub.empty:
        raise ValueError(f"no spectra rows for {variable!r}")
    fig = figure(5.5, 4.0)
    ax = fig.subplots()
    leads = sorted(dict.fromkeys(sub["lead_hours"]))
    colours = [f"C{i % 10}" for i in range(len(leads))]
    for lead, colour in zip(leads, colours):
        rows = sub[sub["lead_hours"] == lead].sort_values("wavenumber")
        ax.loglog(rows["wavenumber"], rows["forecast"], color=colour, label=f"forecast {lead:g} h")
        ax.loglog(rows["wavenumber"], rows["truth"], color=colour, linestyle="--", alpha=0.7, label=f"truth {lead:g} h")
    ax.set_xlabel("zonal wavenumber")
    ax.set_ylabel(f"energy [{sub['units'].iloc[0]}]")
    ax.set_title(title or f"{variable}: zonal energy spectra")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)
