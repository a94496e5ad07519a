"""Forecasts from a raw analysis (jobs.forecast init_file=): ECMWF's GRIB 2 sample at 10 deg, regridded in
process to a tiny checkpoint's 11.25 deg grid, normalised with the checkpoint's statistics; clear one-line
errors for a missing variable, missing statistics, a grid that does not cover the checkpoint's, an absent time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import tiny_model

IN = ["latitude", "geopotential_500", "temperature_850", "u_component_of_wind_850"]
OUT = IN[1:]


@pytest.fixture(scope="module")
def grib(shared_data):
    path = shared_data / "ecmwf" / "pl_regular_ll.grib"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def trained(grib, tmp_path_factory):
    """A tiny ClimaX trained for a few steps on the file's own fields (regridded), saved self-contained:
    statistics and grid recorded. Returns (checkpoint dir, grid lat, grid lon, statistics, fields, times)."""
    from climax import save_checkpoint
    from pipelines.regrid import Grid, get_regridder, target_grid
    from pipelines.sources import open_source

    src = open_source(str(grib), variables=OUT)
    grid = target_grid(11.25)
    regrid = get_regridder(Grid(src["lat"].values, src["lon"].values), grid, "bilinear")
    phys = np.stack([regrid(src[v].values) for v in OUT], axis=1)  # (T, 3, 16, 32)
    times = src["time"].values
    stats = {v: {"mean": float(phys[:, j].mean()), "std": float(phys[:, j].std())} for j, v in enumerate(OUT)}
    stats["latitude"] = {"mean": 0.0, "std": 52.0}
    lat_field = np.broadcast_to(grid.lat[None, None, :, None], (len(times), 1, 16, 32))
    x_all = np.concatenate([lat_field, phys], axis=1)
    mean = np.array([stats[v]["mean"] for v in IN])[None, :, None, None]
    std = np.array([stats[v]["std"] for v in IN])[None, :, None, None]
    x_all = torch.from_numpy(((x_all - mean) / std).astype(np.float32))

    torch.manual_seed(0)
    model = tiny_model(IN, img_size=(16, 32), patch_size=2, embed_dim=32, depth=1, num_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hours = (times[1:] - times[:-1]) / np.timedelta64(1, "h")
    for _ in range(3):  # x(t) -> x(t + dt) on consecutive valid times
        pred = model(x_all[:-1], torch.as_tensor(hours, dtype=torch.float32), IN, OUT)
        loss = torch.nn.functional.mse_loss(pred, x_all[1:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("init_file")
    save_checkpoint(model, root / "ckpt" / "model.pt", in_vars=IN, out_vars=OUT, statistics=stats,
                    grid={"lat": grid.lat.tolist(), "lon": grid.lon.tolist()})
    return root / "ckpt", grid, stats, times, model


def test_forecast_from_grib_writes_netcdf_on_the_checkpoint_grid(grib, trained, tmp_path):
    import xarray as xr

    from jobs import forecast

    ckpt, grid, _, times, _ = trained
    out = tmp_path / "fc.nc"
    init = str(times[2])[:16]
    path = forecast.main([f"checkpoint={ckpt}", f"init_file={grib}", f"init_times=['{init}']", "leads=[6, 12]",
                          "rollout_step=6", f"output={out}", "progress=false", "device=cpu"])
    assert path == str(out)
    with xr.open_dataset(out) as ds:
        np.testing.assert_array_equal(ds["lat"].values, grid.lat)
        np.testing.assert_array_equal(ds["lon"].values, grid.lon)
        assert list(ds.data_vars) == OUT and ds["temperature_850"].dims == ("init_time", "lead_time", "lat", "lon")
        assert ds.sizes["init_time"] == 1 and ds.sizes["lead_time"] == 2
        np.testing.assert_array_equal(ds["init_time"].values, np.array([init], dtype="datetime64[ns]"))
        assert ds.attrs["initial_conditions"] == str(grib) and ds["temperature_850"].attrs["units"] == "K"
        t850 = ds["temperature_850"].values
    assert np.isfinite(t850).all() and 150 < t850.mean() < 350


def test_direct_from_all_times_equals_the_model_on_regridded_normalised_fields(grib, trained, tmp_path):
    """No init_times: every time of the file; Zarr output too. Values: the model by hand."""
    import xarray as xr

    from jobs import forecast
    from pipelines.regrid import Grid, get_regridder
    from pipelines.sources import open_source

    ckpt, grid, stats, times, model = trained
    out = tmp_path / "fc.zarr"
    forecast.main([f"checkpoint={ckpt}", f"init_file={grib}", "leads=[24]", "format=zarr", f"output={out}",
                   "progress=false", "device=cpu"])
    src = open_source(str(grib), variables=OUT)
    regrid = get_regridder(Grid(src["lat"].values, src["lon"].values), grid, "bilinear")
    x = np.concatenate([np.broadcast_to(grid.lat[None, None, :, None], (len(times), 1, 16, 32)),
                        np.stack([regrid(src[v].values) for v in OUT], axis=1)], axis=1)
    mean = np.array([stats[v]["mean"] for v in IN], dtype=np.float32)[None, :, None, None]
    std = np.array([stats[v]["std"] for v in IN], dtype=np.float32)[None, :, None, None]
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(((x - mean) / std).astype(np.float32)), torch.full((len(times),), 24.0), IN, OUT)
    expect = pred.numpy() * std[:, 1:] + mean[:, 1:]
    with xr.open_zarr(out) as ds:
        assert ds.sizes["time"] == len(times)
        np.testing.assert_allclose(ds["temperature"].sel(level=850).isel(prediction_timedelta=0).values,
                                   expect[:, 1], rtol=1e-5)


def test_missing_variable_statistics_grid_and_time_say_what(grib, trained, tmp_path, shared_data, capsys):
    from climax import save_checkpoint
    from jobs import forecast

    ckpt, grid, stats, times, _ = trained

    def one_error(args, *needles):
        with pytest.raises(SystemExit) as e:
            forecast.main([*args, "progress=false", f"output={tmp_path / 'x.nc'}"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert e.value.code == 1 and len(err) == 1, err
        for needle in needles:
            assert needle in err[0], err[0]

    base = [f"checkpoint={ckpt}", f"init_file={grib}", "leads=[6]"]
    one_error([*base, "init_times=['2030-01-01T00:00']"], "2030-01-01", "its times are")
    # a variable the file lacks
    rh = tiny_model([*IN, "specific_humidity_850"], img_size=(16, 32), embed_dim=32, depth=1, num_heads=2)
    save_checkpoint(rh, tmp_path / "q" / "model.pt", in_vars=[*IN, "specific_humidity_850"], out_vars=OUT,
                    statistics=stats, grid={"lat": grid.lat.tolist(), "lon": grid.lon.tolist()})
    one_error([f"checkpoint={tmp_path / 'q'}", f"init_file={grib}", "leads=[6]"], "specific_humidity_850")
    # no statistics (an original-style checkpoint): ckpt_statistics= fills them from the release's npz
    bare = tiny_model(IN, img_size=(16, 32), embed_dim=32, depth=1, num_heads=2)
    save_checkpoint(bare, tmp_path / "bare" / "model.pt", in_vars=IN, out_vars=OUT)
    one_error([f"checkpoint={tmp_path / 'bare'}", f"init_file={grib}", "leads=[6]"], "no normalisation statistics",
              "ckpt_statistics=")
    release = tmp_path / "release"
    release.mkdir()
    np.savez(release / "normalize_mean.npz", **{("lattitude" if v == "latitude" else v): np.array([stats[v]["mean"]])
                                                for v in IN})
    np.savez(release / "normalize_std.npz", **{("lattitude" if v == "latitude" else v): np.array([stats[v]["std"]])
                                               for v in IN})
    out = forecast.main([f"checkpoint={tmp_path / 'bare'}", f"init_file={grib}", "leads=[6]",
                         f"ckpt_statistics={release}", f"output={tmp_path / 'bare.nc'}", "progress=false"])
    assert out == str(tmp_path / "bare.nc")
    # a regional analysis cannot cover the checkpoint's global grid
    europe = shared_data / "era5" / "era5-single-level-scalar-time.grib"
    t2m = tiny_model(["2m_temperature"], img_size=(16, 32), embed_dim=32, depth=1, num_heads=2)
    save_checkpoint(t2m, tmp_path / "t2m" / "model.pt", in_vars=["2m_temperature"], out_vars=["2m_temperature"],
                    statistics={"2m_temperature": {"mean": 280.0, "std": 10.0}},
                    grid={"lat": grid.lat.tolist(), "lon": grid.lon.tolist()})
    if europe.is_file():
        one_error([f"checkpoint={tmp_path / 't2m'}", f"init_file={europe}", "leads=[6]"], str(europe.name))
    with pytest.raises(SystemExit) as e:  # a configuration error (exit 2), as every job's
        forecast.main([*base, "region=Europe"])
    assert e.value.code == 2 and "region= crops a shard dataset" in capsys.readouterr().err


def test_forecast_from_the_era5_ensemble_grib(trained, shared_data, tmp_path):
    """ERA5's GRIB 1 sample (3 deg, 10 members): one member, the variables it holds (in_vars/out_vars)."""
    import xarray as xr

    from jobs import forecast

    era5 = shared_data / "era5" / "era5-levels-members.grib"
    if not era5.is_file():
        pytest.skip(f"{era5} is absent")
    ckpt, grid, *_ = trained
    out = tmp_path / "era5.nc"
    forecast.main([f"checkpoint={ckpt}", f"init_file={era5}", "member=0", "init_times=['2017-01-01T12:00']",
                   "in_vars=[latitude, geopotential_500, temperature_850]",
                   "out_vars=[geopotential_500, temperature_850]", "leads=[12]", f"output={out}", "progress=false"])
    with xr.open_dataset(out) as ds:
        assert ds["geopotential_500"].shape == (1, 1, 16, 32) and np.isfinite(ds["geopotential_500"].values).all()
        np.testing.assert_array_equal(ds["lat"].values, grid.lat)
