"""Which Parquet encoding for the shards' float32 tensor columns: size and speed, measured.

Writes one shard's worth of generated fields (``pipelines.sample_data``: smooth, seasonal, with
noise in the low bits, as reanalysis has) with each candidate, same process, and reports
compressed size relative to raw float32, encode and decode time. The baseline is PLAIN encoding
with zstd; the shards use the row grouping of ``climax.shards.write_options`` (one time step per
row group).

    python benchmarks/shard_encoding.py [--steps 240] [--resolution 5.625]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402
from climax import shards as S  # noqa: E402
from pipelines import sample_data  # noqa: E402

VARS = ["2m_temperature", "geopotential_500", "temperature_850", "u_component_of_wind_850",
        "specific_humidity_850", "relative_humidity_850"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--resolution", type=float, default=5.625)
    args = ap.parse_args()
    lat, lon = sample_data.grid(args.resolution)
    times = np.arange(np.datetime64("2015-03-01", "ns"), np.datetime64("2015-03-01", "ns")
                      + np.timedelta64(6 * args.steps, "h"), np.timedelta64(6, "h"))
    fields = sample_data.fields(times, lat, lon, VARS)
    table = S.table_from_arrays(times, fields)
    raw = sum(a.nbytes for a in fields.values())
    leaves = [f"{v}.list.element" for v in VARS]
    candidates = {
        "plain + zstd(1)  [baseline]": dict(compression="zstd", compression_level=1),
        "plain + snappy": dict(compression="snappy"),
        "byte_stream_split + zstd(1)": dict(compression="zstd", compression_level=1, use_byte_stream_split=leaves),
        "byte_stream_split + zstd(3)": dict(compression="zstd", compression_level=3, use_byte_stream_split=leaves),
        "byte_stream_split + zstd(9)": dict(compression="zstd", compression_level=9, use_byte_stream_split=leaves),
        "byte_stream_split + lz4": dict(compression="lz4", use_byte_stream_split=leaves),
    }
    print(f"machine: {machine()}")
    print(f"{len(VARS)} variables x {args.steps} steps x {len(lat)}x{len(lon)}: {raw / 2**20:.1f} MiB raw float32; "
          "one time step per row group")
    base = None
    for name, opts in candidates.items():
        buf = io.BytesIO()
        t0 = time.perf_counter()
        pq.write_table(table, buf, row_group_size=1, use_dictionary=False, **opts)
        enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = pq.read_table(io.BytesIO(buf.getvalue()))
        dec = time.perf_counter() - t0
        assert back.equals(table)
        size = buf.tell()
        base = base or size
        print(f"{name:30s} {size / raw:6.3f} of raw  ({size / base:5.2f}x baseline)  "
              f"encode {raw / 2**20 / enc:7.1f} MiB/s  decode {raw / 2**20 / dec:7.1f} MiB/s")


if __name__ == "__main__":
    main()
