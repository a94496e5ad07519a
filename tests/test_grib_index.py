"""The byte-level GRIB index (pipelines.sources.grib_index) and the GRIB reader built on it,
checked against ecCodes' own per-message keys, cfgrib's decoded arrays and the sample-data truth."""

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipelines import sample_data as sd
from pipelines.sources import SourceError, open_source
from pipelines.sources import grib as G
from pipelines.sources import grib_index as GI

SHARED_GRIB = ["era5/era5-levels-members.grib", "era5/era5-single-level-scalar-time.grib",
               "ecmwf/pl_regular_ll.grib", "ecmwf/multi_param_on_multi_dims.grib",
               "gfs/gfs.t12z.pgrbf120.2p5deg.grib2"]


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("gribidx"))


@pytest.fixture(autouse=True)
def _private_cache(_module_cache, monkeypatch):
    """A disk cache folder private to this module, and a clean memory cache for each test."""
    monkeypatch.setenv("CLIMAX_GRIB_INDEX_DIR", _module_cache)
    GI.clear_memory_cache()
    yield
    GI.clear_memory_cache()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Three days of 6-hourly sample GRIB (GRIB 2, grid_simple 16 bits)."""
    root = tmp_path_factory.mktemp("sample")
    out = sd.generate(root, years=(2015,), max_days=3, formats=("grib",), progress=False)
    return Path(out["grib"])


def _files(shared_data, small):
    return [small / "era5_pl_2015.grib", small / "era5_sfc_2015.grib"] + [
        shared_data / name for name in SHARED_GRIB]


def _eccodes_handles(path, headers_only=False):
    """(message number, handle) for every field of a plain ecCodes pass (multi-field support on)."""
    import eccodes

    with open(path, "rb") as f:
        eccodes.codes_grib_multi_support_on()
        eccodes.codes_grib_multi_support_reset_file(f)
        try:
            n = 0
            while (h := eccodes.codes_grib_new_from_file(f, headers_only=headers_only)) is not None:
                try:
                    yield n, h
                finally:
                    eccodes.codes_release(h)
                n += 1
        finally:
            eccodes.codes_grib_multi_support_off()


def _eccodes_records(path, every=1):
    """(count, {message number: keys}) from a plain ecCodes pass, as the old reader did."""
    import eccodes

    keys = ("shortName", "typeOfLevel", "level", "stepType", "stepRange", "dataDate", "dataTime",
            "validityDate", "validityTime", "gridType", "Ni", "Nj")
    out, count = {}, 0
    for n, h in _eccodes_handles(path, headers_only=True):
        count = n + 1
        if n % every == 0:
            rec = {k: eccodes.codes_get(h, k) for k in keys}
            rec["number"] = eccodes.codes_get(h, "number") if eccodes.codes_is_defined(h, "number") else None
            out[n] = rec
    return count, out


def _cfgrib(path):
    import cfgrib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cfgrib.open_datasets(str(path), backend_kwargs={
            "indexpath": "", "time_dims": ("valid_time",), "squeeze": False})


# ------------------------------------------------------------------------------------------
# The index against ecCodes and cfgrib
# ------------------------------------------------------------------------------------------


def test_index_keys_match_eccodes(shared_data, small):
    for path in _files(shared_data, small):
        idx = GI.get_index(str(path))
        every = max(1, len(idx) // 25)  # ecCodes' shortName is slow on NCEP files: sample
        n, ref = _eccodes_records(path, every)
        assert len(idx) == n, path
        recs = idx.records()
        for i, want in ref.items():
            got = recs[i]
            for k, v in want.items():
                if k in ("Ni", "Nj"):
                    v = v if want["gridType"] in ("regular_ll", "regular_gg") else got[k]
                    got_v = idx.grids[got["grid"]][k]
                else:
                    got_v = got[k]
                assert got_v == v, (path, i, k, got_v, v)
        assert np.all(np.diff(idx.offset) >= 0)
        assert idx.stats["per_message_times"] == 0
        if path.parent == small:  # one ecCodes header decode per kind of field, not per message
            assert idx.stats["ecCodes_header_decodes"] == len(idx.kinds) < len(idx) // 10


def test_gfs_multi_field_messages(shared_data):
    path = shared_data / "gfs/gfs.t12z.pgrbf120.2p5deg.grib2"
    idx = GI.get_index(str(path))
    assert len(idx.parts) > 0  # NCEP packs u and v in one message
    multi = np.flatnonzero(idx.part >= 0)
    shorts = {idx.kinds[int(idx.kind[i])]["shortName"] for i in multi}
    assert {"u", "v"} <= shorts
    # the two fields of one message share its offset and decode to different values
    u = next(i for i in multi if idx.kinds[int(idx.kind[i])]["shortName"] == "u")
    v = next(i for i in multi if idx.offset[i] == idx.offset[u] and i != u)
    assert not np.array_equal(GI.read_entry(idx, u), GI.read_entry(idx, v))


def _match_cfgrib(cand, datasets):
    attrs = cand.data.attrs
    for ds in datasets:
        for da in ds.data_vars.values():
            if (da.attrs.get("GRIB_shortName") == attrs["GRIB_shortName"]
                    and da.attrs.get("GRIB_typeOfLevel") == attrs["GRIB_typeOfLevel"]
                    and da.attrs.get("GRIB_stepType") == attrs["GRIB_stepType"]):
                yield da


def _eccodes_values(path, wanted):
    """{field number: values as (Nj, Ni) in scanning order} for ``wanted`` fields, read by
    ecCodes itself (multi-field support on)."""
    import eccodes

    out = {}
    for n, h in _eccodes_handles(path):
        if n in wanted:
            nj, ni = eccodes.codes_get(h, "Nj"), eccodes.codes_get(h, "Ni")
            v = eccodes.codes_get_values(h)
            if eccodes.codes_get(h, "bitmapPresent"):  # as cfgrib: NaN
                v[v == eccodes.codes_get(h, "missingValue")] = np.nan
            out[n] = v.reshape(nj, ni)
    return out


def test_gfs_values_match_eccodes(shared_data):
    path = shared_data / "gfs/gfs.t12z.pgrbf120.2p5deg.grib2"
    idx = GI.get_index(str(path))
    multi = np.flatnonzero(idx.part >= 0)
    wanted = set(multi[:6].tolist()) | set(range(0, len(idx), 37))
    ref = _eccodes_values(path, wanted)
    for i in sorted(wanted):
        np.testing.assert_array_equal(GI.read_entry(idx, i), ref[i].astype(np.float32),
                                      err_msg=str(i))


@pytest.mark.parametrize("name", SHARED_GRIB[:-1] + ["sample_pl", "sample_sfc"])
def test_fields_match_cfgrib(shared_data, small, name):
    path = {"sample_pl": small / "era5_pl_2015.grib",
            "sample_sfc": small / "era5_sfc_2015.grib"}.get(name) or shared_data / name
    idx = GI.get_index(str(path))
    cands = G._candidates(str(path), idx, None)
    assert cands, path
    datasets = _cfgrib(path)
    for cand in cands:
        mine = cand.data
        tol = mine.attrs["GRIB_typeOfLevel"]
        ref = None
        for da in _match_cfgrib(cand, datasets):
            if tol != "isobaricInhPa" and tol in da.coords:
                # my single-level fields are one level each
                lv = np.atleast_1d(da[tol].values)
                hit = np.flatnonzero(np.isclose(lv, float(mine.attrs["GRIB_level"])))
                if not hit.size:
                    continue
                da = da.isel({tol: int(hit[0])}) if tol in da.dims else da
            ref = da
            break
        assert ref is not None, (path, cand.source_name)
        ref = ref.rename({k: v for k, v in {"valid_time": "time", "latitude": "lat",
                                            "longitude": "lon", "isobaricInhPa": "level"}.items()
                          if k in ref.dims})
        if tol != "isobaricInhPa":
            ref = ref.isel({d: 0 for d in ref.dims if d not in ("number", "time", "lat", "lon")})
        np.testing.assert_array_equal(mine["time"].values,
                                      ref["time"].values.astype("datetime64[ns]"))
        np.testing.assert_array_equal(mine["lat"].values, ref["lat"].values)
        np.testing.assert_array_equal(mine["lon"].values, ref["lon"].values)
        if "level" in mine.dims:
            ref = ref.sel(level=mine["level"].values)
        if "number" in mine.dims:
            np.testing.assert_array_equal(mine["number"].values, ref["number"].values)
            pick = {"number": [0, mine.sizes["number"] - 1]}
            mine, ref = mine.isel(pick), ref.isel(pick)
        else:
            ref = ref.isel(number=0) if "number" in ref.dims else ref
        nt = mine.sizes["time"]
        steps = sorted({0, nt // 2, nt - 1})
        a = mine.isel(time=steps).values
        b = ref.transpose(*mine.dims).isel(time=steps).values
        np.testing.assert_array_equal(a, b.astype(np.float32), err_msg=f"{path} {cand.source_name}")


def test_open_source_matches_sample_truth(small):
    for fname in ("era5_pl_2015.grib", "era5_sfc_2015.grib"):
        ds = open_source(str(small / fname))
        assert ds.sizes["time"] == 12  # 3 days, 6-hourly
        names = list(ds.data_vars)
        lat, lon = sd.grid(5.625)  # the generator's grid: south first; the file is north first
        np.testing.assert_array_equal(ds.lat.values, lat[::-1])
        np.testing.assert_array_equal(ds.lon.values, lon)
        truth = sd.fields(ds.time.values, lat, lon, names, seed=0)
        for n in names:
            t = truth[n][..., ::-1, :]
            got = ds[n].values
            assert got.shape == t.shape and got.dtype == np.float32, n
            # 16-bit packing: error at most (max - min) / 2**17 of a field, plus float32
            tol = (float(t.max()) - float(t.min())) / 2**15 + 1e-6 * float(np.abs(t).max())
            np.testing.assert_allclose(got, t, atol=tol, rtol=0, err_msg=n)
    sfc = open_source(str(small / "era5_sfc_2015.grib"))
    assert sfc["land_sea_mask"].dims == ("lat", "lon") and sfc["orography"].dims == ("lat", "lon")
    assert sfc["orography"].attrs["source_name"] == "z"


# ------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------


def _same(a, b):
    for k in ("offset", "length", "part", "kind", "ref_time", "valid_time"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.kinds == b.kinds and a.parts == b.parts
    for ga, gb in zip(a.grids, b.grids):
        assert {k: v for k, v in ga.items() if k not in ("lat", "lon")} == \
            {k: v for k, v in gb.items() if k not in ("lat", "lon")}
        np.testing.assert_array_equal(ga["lat"], gb["lat"])
        np.testing.assert_array_equal(ga["lon"], gb["lon"])


def test_cache_round_trip_and_rebuild(small, tmp_path, monkeypatch, shared_data):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIMAX_GRIB_INDEX_DIR", str(cache))
    for src in (small / "era5_sfc_2015.grib", shared_data / "gfs/gfs.t12z.pgrbf120.2p5deg.grib2"):
        path = tmp_path / src.name
        shutil.copy(src, path)
        first = GI.get_index(str(path))
        assert GI.get_index(str(path)) is first  # memory cache
        files = list(cache.glob(f"{path.name}*.npz"))
        assert len(files) == 1
        GI.clear_memory_cache()
        built = []
        real = GI.build_index
        monkeypatch.setattr(GI, "build_index", lambda p, built=built, real=real: built.append(p) or real(p))
        again = GI.get_index(str(path))
        assert built == [] and again is not first  # from disk
        _same(first, again)
        if src.parent != small:
            monkeypatch.setattr(GI, "build_index", real)
            continue
        # a corrupt cache file is rebuilt (and rewritten)
        files[0].write_bytes(b"garbage" * 10)
        GI.clear_memory_cache()
        rebuilt = GI.get_index(str(path))
        assert built == [str(path)]
        _same(first, rebuilt)
        GI.clear_memory_cache()
        built.clear()
        _same(first, GI.get_index(str(path)))
        assert built == []
        monkeypatch.setattr(GI, "build_index", real)
    # a changed file gets a new index
    path = tmp_path / "era5_sfc_2015.grib"
    before = GI.get_index(str(path))
    data = path.read_bytes()
    one = int(before.length[0])
    path.write_bytes(data + data[:one])
    after = GI.get_index(str(path))
    assert len(after) == len(before) + 1
    ds = open_source(str(path), variables=["land_sea_mask"])
    assert ds["land_sea_mask"].dims == ("lat", "lon")


def test_cache_in_another_process(small, tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, CLIMAX_GRIB_INDEX_DIR=str(tmp_path / "c"))
    code = ("import sys; from pipelines.sources import grib_index as GI;"
            "GI.build_index = None if sys.argv[2] == 'reuse' else GI.build_index;"
            "i = GI.get_index(sys.argv[1]); print(len(i), i.kinds[0]['shortName'])")
    root = Path(__file__).resolve().parents[1]
    path = str(small / "era5_pl_2015.grib")
    outs = [subprocess.run([sys.executable, "-c", code, path, how], env=env, cwd=root,
                           capture_output=True, text=True, check=True).stdout
            for how in ("build", "reuse")]
    assert outs[0] == outs[1] and outs[0].split()[0] == str(12 * 10)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1


# ------------------------------------------------------------------------------------------
# Corrupt files
# ------------------------------------------------------------------------------------------


def test_truncated_and_corrupt_copies(small, shared_data, tmp_path):
    for src in (small / "era5_pl_2015.grib", shared_data / "era5/era5-levels-members.grib"):
        data = src.read_bytes()
        idx = GI.build_index(str(src))
        second = int(idx.offset[1])
        end = int(idx.offset[-1] + idx.length[-1])  # GRIB 1 from MARS may have padding after
        cuts = {
            "half": data[: len(data) // 2 + 100],
            "sec0": data[: second + 10],  # a header, no body
            "no7777": data[:end - 4],
            "bad7777": data[:end - 4] + b"7778" + data[end:],
            "badlen": (data[:second + 8] + b"\0\0\0\0\xff\xff\xff\xff" + data[second + 16:]
                       if data[second + 7] == 2 else
                       data[:second + 4] + b"\x7f\xff\xff" + data[second + 7:]),
        }
        for tag, content in cuts.items():
            p = tmp_path / f"{tag}_{src.name}"
            p.write_bytes(content)
            with pytest.raises(SourceError) as e:
                open_source(str(p), member=0)
            msg = str(e.value)
            assert str(p) in msg and "truncated or corrupt" in msg, (tag, msg)
    junk = tmp_path / "junk.grib"
    junk.write_bytes(b"no grib here" * 20)
    with pytest.raises(SourceError, match="no GRIB message"):
        GI.build_index(str(junk))


def test_changed_file_after_open_is_refused(small, tmp_path):
    path = tmp_path / "f.grib"
    shutil.copy(small / "era5_sfc_2015.grib", path)
    ds = open_source(str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(OSError, match="changed"):
        ds["2m_temperature"].isel(time=0).load()


# ------------------------------------------------------------------------------------------
# Laziness
# ------------------------------------------------------------------------------------------


def test_isel_decodes_only_those_messages(small, monkeypatch):
    decoded = []
    real = GI.decode_message

    def counting(buf):
        decoded.append(len(buf))
        return real(buf)

    monkeypatch.setattr(GI, "decode_message", counting)
    pl = open_source(str(small / "era5_pl_2015.grib"))
    sfc = open_source(str(small / "era5_sfc_2015.grib"))
    assert decoded == []
    part = pl.isel(time=slice(3, 6)).load()
    assert len(decoded) == 3 * len(pl.data_vars)
    decoded.clear()
    sfc.isel(time=slice(2, 4)).load()
    timed = [n for n, v in sfc.data_vars.items() if "time" in v.dims]
    consts = [n for n, v in sfc.data_vars.items() if "time" not in v.dims]
    assert consts and len(decoded) == 2 * len(timed) + len(consts)
    # any outer indexing: equal to the full load
    full = pl["temperature_850"].values
    decoded.clear()
    got = pl["temperature_850"][[0, 5, 7], 3:20:2, [1, 4, 9]].values
    np.testing.assert_array_equal(got, full[[0, 5, 7]][:, 3:20:2][:, :, [1, 4, 9]])
    assert len(decoded) == 3
    np.testing.assert_array_equal(pl["temperature_850"][4, 2, 3].values, full[4, 2, 3])
    np.testing.assert_array_equal(part["temperature_850"].values, full[3:6])
