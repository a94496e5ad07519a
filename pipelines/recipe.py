"""The preprocessing recipe: one declarative YAML file, validated before any work starts."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.names import parse_variable, physical_range

__all__ = ["Recipe", "SourceSpec", "GridSpec", "TimeSpec"]

log = logging.getLogger("pipelines.recipe")

# an ISO time followed by a zone name ("2015-01-01T00:00 Europe/Paris", "... CET", "...+01:00[Europe/Paris]")
_ZONE_NAME = re.compile(r"^(\d{4}-\d\d-\d\d(?:[T ][\d:.]+)?)([+-]\d\d:?\d\d)?"
                        r"(?:\s+([A-Za-z][A-Za-z0-9_+/-]*)|\[([A-Za-z][A-Za-z0-9_+/-]*)\])$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    """One archive: a local, ``s3://`` or ``gs://`` glob, a WeatherBench root folder or a Zarr store."""

    path: str = Field(description="local, s3:// or gs:// glob, a WeatherBench folder, or a Zarr store")
    format: Literal["auto", "grib", "netcdf", "weatherbench", "climatebench", "zarr"] = "auto"
    member: int | None = Field(None, description="ensemble member to select, for files with several")
    storage_options: dict = Field(default_factory=dict,
                                  description="s3fs or gcsfs options (endpoint_url, key, token, ...)")


class GridSpec(_Strict):
    resolution: float = Field(5.625, description="target equiangular grid spacing in degrees")
    method: Literal["bilinear", "conservative"] = "bilinear"


class TimeSpec(_Strict):
    start: datetime = Field(description="first time step, UTC (a zone offset such as +06:00 is converted to UTC)")
    end: datetime = Field(description="last time step, UTC (included)")
    step: str = Field("1h", description="time step, e.g. 1h, 6h, 1D")
    missing: Literal["error", "allow"] = Field(
        "error", description="time steps the sources lack (a model calendar's absent days are not missing): "
                             "error (stop, naming them) or allow (leave them out; the manifest lists the gaps "
                             "and training skips the samples that need them)")

    @field_validator("start", "end", mode="before")
    @classmethod
    def _no_zone_names(cls, v, info):
        # "2015-01-01T00:00 Europe/Paris" (or "... CET"): a zone name, not an offset. Refused, with
        # the offset it has at that time, because a name's offset changes (summer time) and a
        # wall-clock time can be ambiguous or absent; the shards' times are UTC.
        if not isinstance(v, str):
            return v
        m = _ZONE_NAME.match(v.strip())
        if not m:
            return v
        when, offset, zone = m.group(1), m.group(2), m.group(3) or m.group(4)
        if zone.upper() in ("UTC", "GMT", "Z") and not offset:
            return when  # plain UTC, said in words
        hint = "the time in UTC"
        if offset:  # both: the offset says it all
            raise ValueError(f"{v!r} gives both an offset and a time zone ({zone}); write only the offset: "
                             f"{when.replace(' ', 'T')}{offset}")
        try:
            from zoneinfo import ZoneInfo

            local = datetime.fromisoformat(when).replace(tzinfo=ZoneInfo(zone))
            hint = f"{local.isoformat(timespec='minutes')} (its offset then) or {hint}"
        except Exception:  # noqa: BLE001 - an unknown zone name: no offset to suggest
            pass
        raise ValueError(f"{v!r} names a time zone ({zone}); write a UTC offset instead: "
                         f"{hint}")

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, v: datetime, info) -> datetime:
        # Shards hold naive UTC times. A time with a zone offset names another instant than its
        # wall-clock digits: convert it, never drop the offset (which would shift the data).
        if v.tzinfo is None:
            return v
        utc = v.astimezone(UTC).replace(tzinfo=None)
        if v.utcoffset():
            log.warning("time.%s %s has a zone offset: converted to %s UTC", info.field_name, v.isoformat(),
                        utc.isoformat())
        return utc

    @field_validator("step")
    @classmethod
    def _valid_step(cls, v: str) -> str:
        try:
            td = pd.Timedelta(v)
        except ValueError as e:
            raise ValueError(f"time.step {v!r} is not a duration like '1h' or '6h'") from e
        if td <= pd.Timedelta(0):
            raise ValueError(f"time.step {v!r} must be positive")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> TimeSpec:
        if self.end < self.start:
            raise ValueError(f"time.end {self.end} is before time.start {self.start}")
        return self

    @property
    def step_ns(self) -> int:
        return int(pd.Timedelta(self.step).value)

    def times(self) -> np.ndarray:
        start = np.datetime64(self.start, "ns")  # naive UTC (see _utc)
        end = np.datetime64(self.end, "ns")
        return np.arange(start, end + np.timedelta64(1, "ns"), np.timedelta64(self.step_ns, "ns"))


class Recipe(_Strict):
    """Raw archives in, training-ready shards out (see README and docs/design.md)."""

    sources: list[SourceSpec] = Field(min_length=1)
    variables: list[str] = Field(min_length=1, description="ClimaX variable names")
    grid: GridSpec = Field(default_factory=GridSpec)
    time: TimeSpec
    splits: dict[Literal["train", "val", "test"], tuple[int, int]] = Field(
        description="split name -> [first year, last year]")
    output: str = Field(description="output folder or s3:// prefix")
    storage_options: dict = Field(default_factory=dict, description="s3fs options for the output")
    shard_bytes: int = Field(16 * 2**20, description="target uncompressed bytes per shard (bounds task memory)")
    compression_level: int = Field(-1, description="zstd level of the shards (-1: fastest, about 1.3x level 1 at the "
                                   "same size on weather fields; 1-9: slower, at most a few % smaller)")
    regrid_cache: str | None = Field(None, description="local folder caching regridding weights")
    max_task_mb: int = Field(
        768, ge=1, description="memory one build task may hold (MiB), decoding and regridding included; "
        "also Ray's memory request per task, so a node runs no more tasks than its memory holds")
    climatology_hours: list[int] | Literal["all"] | None = Field(
        None, description="hours of day (UTC) at which the day-of-year x hour climatology is stored: "
        "null (default) = WeatherBench 2's 0, 6, 12, 18 UTC where the training steps have them (else every "
        "hour they have), 'all' = every hour of the training steps, or a list; other hours use the nearest "
        "stored hour. The time mean always covers every training step")
    valid_range: dict[str, tuple[float, float] | None] = Field(
        default_factory=dict, description="per variable [min, max] replacing its physical range check "
                                          "(pipelines/names.py RANGES), or null to skip it, for unusual data")

    @field_validator("variables")
    @classmethod
    def _known_variables(cls, v: list[str]) -> list[str]:
        for name in v:
            parse_variable(name)  # raises with the list of known names
        if len(set(v)) != len(v):
            raise ValueError(f"variables has duplicates: {v}")
        return v

    @model_validator(mode="after")
    def _ranges_of_variables(self) -> Recipe:
        unknown = [v for v in self.valid_range if v not in self.variables]
        if unknown:
            raise ValueError(f"valid_range names {unknown}, which are not among variables {self.variables}")
        for v, r in self.valid_range.items():
            if r is not None and not r[0] < r[1]:
                raise ValueError(f"valid_range.{v}: [{r[0]}, {r[1]}] is not an interval; give [min, max] or null")
        return self

    @field_validator("climatology_hours")
    @classmethod
    def _hours(cls, v):
        if isinstance(v, list):
            if not v or any(not 0 <= h <= 23 for h in v) or len(set(v)) != len(v):
                raise ValueError(f"climatology_hours {v}: give distinct hours 0..23, 'all' or null")
            return sorted(v)
        return v

    def value_range(self, variable: str) -> tuple[float, float] | None:
        """The [min, max] the build accepts for ``variable``: the recipe's override, else its physical range."""
        if variable in self.valid_range:
            return self.valid_range[variable]
        return physical_range(variable)

    @field_validator("splits")
    @classmethod
    def _years(cls, v: dict) -> dict:
        if "train" not in v:
            raise ValueError("splits needs a 'train' entry: statistics are computed over it")
        seen: dict[int, str] = {}
        for name, (a, b) in v.items():
            if b < a:
                raise ValueError(f"splits.{name}: {a} > {b}")
            for y in range(a, b + 1):
                if y in seen:
                    raise ValueError(f"year {y} is in both splits {seen[y]} and {name}")
                seen[y] = name
        return v

    def split_of(self, year: int) -> str | None:
        for name, (a, b) in self.splits.items():
            if a <= year <= b:
                return name
        return None

    def fingerprint(self) -> str:
        """Hash of everything that changes the shards' content (not where they go)."""
        content = self.model_dump(mode="json", exclude={"output", "storage_options", "regrid_cache", "max_task_mb"})
        for s in content["sources"]:
            s.pop("storage_options", None)
        # keys added later hash only when set, so that existing builds keep their fingerprint
        if not content["valid_range"]:
            content.pop("valid_range")
        if content["climatology_hours"] is None:
            content.pop("climatology_hours")
        if content["time"]["missing"] == "error":
            content["time"].pop("missing")
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
