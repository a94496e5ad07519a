"""Regional boxes on the global grid: one home for cropping fields, latitudes and patch positions.

Regional forecasting (ClimaX paper, section 4.1.2) trains and predicts on the patches inside a
lat/lon box only. Everything that is per grid point or per patch is cropped with the same indices:
the fields (inputs, targets, climatology), the latitudes (latitude weights) and the position
embeddings (``Region.patch_ids``). Boxes are snapped outward to whole patches, so the crop is an
exact subset of the global patch grid and a model trained globally keeps its position embeddings.

Latitude order is whatever the grid has (the shards store south to north); a box is given in
degrees and found by value, so orientation is never guessed. A box may cross the 0/360 meridian
(``lon_min > lon_max``, e.g. 330..30): its columns wrap around.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Region", "NAMED_REGIONS"]

#: The boxes of the ClimaX paper's regional experiments (degrees north, degrees east 0..360).
NAMED_REGIONS: dict[str, tuple[float, float, float, float]] = {
    "NorthAmerica": (15, 65, 220, 300),
    "SouthAmerica": (-55, 20, 270, 330),
    "Europe": (30, 65, 0, 40),
    "SouthAsia": (-15, 45, 25, 110),
    "EastAsia": (5, 65, 70, 150),
    "Australia": (-50, 10, 100, 180),
}


@dataclass(frozen=True)
class Region:
    """Grid rows and columns of a patch-aligned box.

    Attributes:
        rows: row indices of the box on the global grid, increasing (lat order of the grid).
        cols: column indices, in eastward order (they wrap when the box crosses 0 deg).
        patch_size: the model's patch side p; ``len(rows)`` and ``len(cols)`` are multiples of it.
        grid_shape: (H, W) of the global grid.
    """

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    patch_size: int
    grid_shape: tuple[int, int]
    name: str = "box"

    @classmethod
    def from_box(cls, lat: np.ndarray, lon: np.ndarray, lat_min: float, lat_max: float,
                 lon_min: float, lon_max: float, patch_size: int, name: str = "box") -> Region:
        """The smallest patch-aligned box holding every grid point inside the given degrees."""
        lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64) % 360
        H, W, p = len(lat), len(lon), patch_size
        if H % p or W % p:
            raise ValueError(f"grid {H}x{W} is not a multiple of patch size {p}")
        if lat_min >= lat_max:
            raise ValueError(f"region {name!r}: lat_min {lat_min} must be below lat_max {lat_max}")
        in_lat = np.flatnonzero((lat >= lat_min) & (lat <= lat_max))
        lo, hi = lon_min % 360, lon_max % 360
        if lon_max - lon_min >= 360:
            lo, hi = 0.0, 360.0
        in_lon = (lon >= lo) & (lon <= hi) if lo <= hi else (lon >= lo) | (lon <= hi)
        if len(in_lat) == 0 or not in_lon.any():
            raise ValueError(f"region {name!r} ({lat_min}..{lat_max} N, {lon_min}..{lon_max} E) holds no "
                             f"grid point of this {H}x{W} grid; widen the box")
        r0, r1 = (in_lat.min() // p) * p, (in_lat.max() // p + 1) * p
        rows = tuple(range(r0, r1))
        # columns, walking east from the box's western edge (lon is ascending 0..360 on our grids:
        # a box crossing 0 deg is the tail lon >= lon_min followed by the head lon <= lon_max)
        idx = np.flatnonzero(in_lon)
        west = np.flatnonzero(lon >= lo) if lo > hi else idx
        start = int(west.min()) if len(west) else int(idx.min())
        count = len(idx) if lo > hi else int(idx.max() - idx.min() + 1)
        c0 = (start // p) * p
        n = int(np.ceil((start - c0 + count) / p)) * p
        cols = tuple(int((c0 + k) % W) for k in range(min(n, W)))
        return cls(rows, cols, p, (H, W), name)

    @classmethod
    def named(cls, name: str, lat: np.ndarray, lon: np.ndarray, patch_size: int) -> Region:
        if name not in NAMED_REGIONS:
            raise ValueError(f"unknown region {name!r}; named regions: {sorted(NAMED_REGIONS)}, or give "
                             "a box as [lat_min, lat_max, lon_min, lon_max]")
        return cls.from_box(lat, lon, *NAMED_REGIONS[name], patch_size=patch_size, name=name)

    @classmethod
    def from_spec(cls, spec: str | Sequence[float] | None, lat: np.ndarray, lon: np.ndarray,
                  patch_size: int) -> Region | None:
        """A configuration's ``region``: None, a name of ``NAMED_REGIONS`` or [lat_min, lat_max, lon_min, lon_max]."""
        if spec is None:
            return None
        if isinstance(spec, str):
            return cls.named(spec, lat, lon, patch_size)
        if len(spec) != 4:
            raise ValueError(f"region {list(spec)} must be a name ({', '.join(NAMED_REGIONS)}) or "
                             "[lat_min, lat_max, lon_min, lon_max]")
        return cls.from_box(lat, lon, *spec, patch_size=patch_size)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    @property
    def patch_grid(self) -> tuple[int, int]:
        return len(self.rows) // self.patch_size, len(self.cols) // self.patch_size

    def patch_ids(self) -> np.ndarray:
        """Indices of the box's patches in the global row-major patch order (for pos_embed)."""
        p, Wp = self.patch_size, self.grid_shape[1] // self.patch_size
        prow = np.asarray(self.rows[::p]) // p
        pcol = np.asarray(self.cols[::p]) // p
        return (prow[:, None] * Wp + pcol[None, :]).reshape(-1)

    def crop(self, a):
        """Crop the last two axes (lat, lon) of a numpy array or torch tensor to the box."""
        r0, r1 = self.rows[0], self.rows[-1] + 1
        out = a[..., r0:r1, :]
        cols = list(self.cols)
        if cols == list(range(cols[0], cols[0] + len(cols))):
            return out[..., cols[0]:cols[0] + len(cols)]
        if isinstance(out, np.ndarray):
            return out[..., cols]
        import torch  # only when a torch tensor is cropped across the 0 deg meridian

        return out.index_select(-1, torch.as_tensor(cols, device=out.device))

    def lat(self, lat: np.ndarray) -> np.ndarray:
        return np.asarray(lat)[list(self.rows)]

    def lon(self, lon: np.ndarray) -> np.ndarray:
        return np.asarray(lon)[list(self.cols)]
