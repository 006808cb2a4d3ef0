"""Spatial coordinates: longitude conventions, rotated-pole and curvilinear grids, bilinear onto each cell's
own position, coverage and regions (precip_cvae.coords, precip_cvae.grid)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from precip_cvae import coords, grid
from precip_cvae.io import InputError

CORDEX_POLE = {"grid_mapping_name": "rotated_latitude_longitude", "grid_north_pole_latitude": 39.25,
               "grid_north_pole_longitude": -162.0}


def test_wrap_longitudes_makes_a_grid_split_at_the_meridian_one_run():
    split = np.array([0.25, 0.75, 1.25, 358.75, 359.25, 359.75])
    values, order = grid.wrap_longitudes(split)
    assert values.tolist() == [-1.25, -0.75, -0.25, 0.25, 0.75, 1.25]
    assert order.tolist() == [3, 4, 5, 0, 1, 2]
    # across the dateline: one run upwards from 179 (above 180 is allowed)
    values, order = grid.wrap_longitudes(np.array([-179.5, -179.0, 178.5, 179.0, 179.5]))
    assert values.tolist() == [178.5, 179.0, 179.5, 180.5, 181.0]
    # a contiguous axis is left alone, in either convention
    for axis in (np.arange(-10.0, 5.0, 2.5), np.arange(200.0, 230.0, 2.5)):
        values, order = grid.wrap_longitudes(axis)
        assert values.tolist() == axis.tolist() and order.tolist() == list(range(axis.size))


def test_wrap_longitudes_to_a_centre_brings_0_360_to_the_target_convention():
    ncep = np.arange(0.0, 360.0, 2.5)  # global, as downloaded
    values, order = grid.wrap_longitudes(ncep, centre=-3.0)
    assert values[0] == -182.5 and values[-1] == 175.0 and np.all(np.diff(values) == 2.5)
    assert ncep[order][values.tolist().index(-10.0)] == 350.0
    values, _ = grid.wrap_longitudes(np.array([350.0, 355.0, 0.0, 5.0]), centre=0.0)
    assert values.tolist() == [-10.0, -5.0, 0.0, 5.0]
    values, _ = grid.wrap_longitudes(np.array([-170.0, -175.0, 175.0]), centre=180.0)
    assert values.tolist() == [175.0, 185.0, 190.0]


def test_rotated_pole_maps_the_rotated_origin_and_pole_where_cf_puts_them():
    lat, lon = grid.rotated_pole_to_geographic([0.0, 90.0], [0.0, 10.0], CORDEX_POLE)
    # the rotated origin is 90 - pole latitude north, on the meridian opposite the pole
    assert lat[0, 0] == pytest.approx(50.75) and lon[0, 0] == pytest.approx(18.0)
    # the rotated north pole is the geographic point named by the grid mapping
    assert lat[1, 0] == pytest.approx(39.25) and lon[1, 0] == pytest.approx(-162.0)
    # a pole at the geographic north pole (rotated by 180 in longitude by the convention): lat unchanged
    lat, lon = grid.rotated_pole_to_geographic([10.0, 45.0], [20.0], {"grid_north_pole_latitude": 90.0,
                                                                      "grid_north_pole_longitude": 180.0})
    assert lat[:, 0] == pytest.approx([10.0, 45.0]) and lon[:, 0] == pytest.approx([20.0, 20.0])
    with pytest.raises(ValueError, match="north_pole_grid_longitude 30 is not supported"):
        grid.rotated_pole_to_geographic([0.0], [0.0], {**CORDEX_POLE, "north_pole_grid_longitude": 30})


def test_bilinear_onto_2d_points_matches_the_regular_grid_and_a_hand_value():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(3, 4, 5))
    slat, slon = np.array([0.0, 1.0, 2.0, 3.0]), np.array([10.0, 11.0, 12.0, 13.0, 14.0])
    dlat, dlon = np.array([0.5, 1.25, 2.9]), np.array([10.1, 12.5])
    regular = grid.bilinear(src, slat, slon, dlat, dlon)
    la, lo = np.meshgrid(dlat, dlon, indexing="ij")
    np.testing.assert_allclose(grid.bilinear(src, slat, slon, la, lo), regular)
    # one point by hand: (0.5, 10.1) lies between rows 0, 1 (t 0.5) and columns 0, 1 (u 0.1)
    v = src[0]
    hand = 0.5 * 0.9 * v[0, 0] + 0.5 * 0.1 * v[0, 1] + 0.5 * 0.9 * v[1, 0] + 0.5 * 0.1 * v[1, 1]
    points = grid.bilinear(src, slat, slon, np.array([[0.5]]), np.array([[10.1]]))
    assert points.shape == (3, 1, 1) and points[0, 0, 0] == pytest.approx(hand)
    with pytest.raises(ValueError, match="one shape"):
        grid.bilinear(src, slat, slon, la, lo[:, :1])


def _field(lat, lon, extra=None, name="pr", units="mm/day", **attrs):
    times = pd.date_range("2001-01-01", periods=2)
    dims = ("time", *(extra or ("lat", "lon")))
    values = np.arange(2 * len(lat) * len(lon), dtype="float32").reshape(2, len(lat), len(lon))
    da = xr.DataArray(values, dims=dims, name=name, coords={"time": times, dims[1]: lat, dims[2]: lon},
                      attrs={"units": units, **attrs})
    da.attrs["source_files"] = json.dumps([f"{name}.nc"])
    return da


def test_a_cordex_layout_keeps_each_cells_lat_lon_and_its_axes():
    """rlat/rlon axes with 2-D lat/lon auxiliary coordinates (EURO-CORDEX): the axes become lat/lon (their names
    kept as original_name), the 2-D coordinates cell_lat/cell_lon; descending axes flip both together."""
    rlat, rlon = np.array([-2.0, -1.56, -1.12]), np.array([-3.0, -2.56])
    da = _field(rlat[::-1], rlon, extra=("rlat", "rlon"), grid_mapping="rotated_pole")
    lat2, lon2 = grid.rotated_pole_to_geographic(rlat[::-1], rlon, CORDEX_POLE)
    da = da.assign_coords(lat=(("rlat", "rlon"), lat2, {"standard_name": "latitude", "units": "degrees_north"}),
                          lon=(("rlat", "rlon"), lon2, {"standard_name": "longitude", "units": "degrees_east"}))
    da["rlat"].attrs = {"standard_name": "grid_latitude", "units": "degrees"}
    out = coords.standardise_coords(da, "target")
    assert out.dims == ("time", "lat", "lon") and out["lat"].attrs["original_name"] == "rlat"
    assert out["lat"].values.tolist() == rlat.tolist()  # flipped to ascending
    np.testing.assert_array_equal(out["cell_lat"].values, lat2[::-1])
    np.testing.assert_array_equal(out.values[0], da.values[0, ::-1])
    assert out["cell_lon"].attrs["standard_name"] == "longitude"
    # the same grid without its 2-D coordinates: computed from the pole in the grid mapping
    bare = da.drop_vars(["lat", "lon"]).assign_attrs(grid_mapping_attrs=json.dumps(CORDEX_POLE))
    computed = coords.standardise_coords(bare, "target")
    np.testing.assert_allclose(computed["cell_lat"].values, lat2[::-1])
    np.testing.assert_allclose(computed["cell_lon"].values, lon2[::-1])


def test_grids_that_cannot_be_located_are_refused_by_name():
    da = _field(np.arange(3.0), np.arange(2.0), extra=("y", "x"))
    gappy = da.assign_coords(lat=(("y", "x"), np.array([[40.0, 40.1], [np.nan, 41.0], [42.0, 42.1]])),
                             lon=(("y", "x"), np.zeros((3, 2))))
    with pytest.raises(InputError, match=r"pr.nc.*coordinate 'lat' has missing values"):
        coords.standardise_coords(gappy, "target")
    only_lat = da.assign_coords(lat=(("y", "x"), np.zeros((3, 2))))
    with pytest.raises(InputError, match="not one latitude and one longitude"):
        coords.standardise_coords(only_lat, "target")
    indices = xr.DataArray(np.zeros((2, 3, 2), "float32"), dims=("time", "y", "x"), name="pr",
                           coords={"time": pd.date_range("2001-01-01", periods=2),
                                   "lat": (("y", "x"), np.zeros((3, 2))), "lon": (("y", "x"), np.zeros((3, 2)))})
    with pytest.raises(InputError, match="dimension 'y' has no coordinate values"):
        coords.standardise_coords(indices, "target")


def test_target_longitudes_wrap_and_predictors_follow_the_target_convention(caplog):
    target = _field(np.array([40.0, 40.5]), np.array([0.25, 0.75, 359.25, 359.75]))
    with caplog.at_level(logging.INFO, logger="precip_cvae.coords"):
        t = coords.wrap_target_longitudes(coords.standardise_coords(target, "target"), "target")
    assert t["lon"].values.tolist() == [-0.75, -0.25, 0.25, 0.75]
    np.testing.assert_array_equal(t.values[0], target.values[0][:, [2, 3, 0, 1]])
    assert "wrapped to one contiguous run -0.75..0.75" in caplog.text
    assert coords.lon_centre(t) == pytest.approx(0.0, abs=1e-12)
    pred = _field(np.array([37.5, 40.0, 42.5]), np.arange(0.0, 360.0, 2.5), name="psl", units="Pa")
    p = coords.to_lon_convention(coords.standardise_coords(pred, "predictor"), 0.0, "predictor")
    assert p["lon"].values[0] == -180.0 and p["lon"].values[-1] == 177.5
    assert float(p.sel(lon=-2.5).values[0, 0]) == float(pred.sel(lon=357.5).values[0, 0])
    coords.check_coverage(t, [p])  # covered once both are in one convention
    regional = coords.to_lon_convention(_field(np.array([37.5, 42.5]), np.array([350.0, 355.0]), name="psl"),
                                        0.0, "predictor")
    with pytest.raises(InputError, match=r"psl.nc: predictor 'psl' covers lon -10 to -5 .* -0.75 to 0.75"):
        coords.check_coverage(t, [regional])


def test_coverage_is_checked_at_each_cells_own_position():
    """A rotated grid whose axes (rotated degrees) would pass any lat/lon box: the check uses its cells' lat/lon."""
    rlat, rlon = np.arange(-12.0, -5.0, 0.44), np.arange(-20.0, -12.0, 0.44)
    target = _field(rlat, rlon, extra=("rlat", "rlon"), grid_mapping_attrs=json.dumps(CORDEX_POLE))
    target["rlat"].attrs = {"standard_name": "grid_latitude", "units": "degrees"}
    target["rlon"].attrs = {"standard_name": "grid_longitude", "units": "degrees"}
    t = coords.wrap_target_longitudes(coords.standardise_coords(target, "target"), "target")
    lat, lon = coords.cell_points(t)
    wide = _field(np.arange(30.0, 50.0, 2.5), np.arange(-15.0, 10.0, 2.5), name="psl")
    coords.check_coverage(t, [coords.standardise_coords(wide, "predictor")])
    narrow = _field(np.arange(30.0, 50.0, 2.5), np.arange(-5.0, 10.0, 2.5), name="psl")
    with pytest.raises(InputError, match=f"the target's cells span {lon.min():g} to {lon.max():g}"):
        coords.check_coverage(t, [coords.standardise_coords(narrow, "predictor")])


def test_a_region_in_either_longitude_convention_selects_the_same_cells():
    t = coords.standardise_coords(_field(np.array([40.0, 41.0]), np.arange(-9.75, 4.5, 0.5)), "target")
    a = coords.select_region(t, [39.0, 42.0, -5.0, 2.0])
    b = coords.select_region(t, [39.0, 42.0, 355.0, 2.0])
    c = coords.select_region(t, [39.0, 42.0, 355.0, 362.0])
    assert a["lon"].values.tolist() == b["lon"].values.tolist() == c["lon"].values.tolist()
    assert a.sizes["lon"] == 14


def test_a_level_axis_of_several_levels_and_a_global_grid_repeating_a_meridian_are_refused():
    plev = _field(np.array([40.0, 42.5]), np.array([0.0, 2.5]), name="ta")
    plev = plev.expand_dims(plev=[85000.0, 50000.0]).transpose("time", "plev", "lat", "lon")
    with pytest.raises(InputError, match=r"ta.nc: predictor 'ta': unexpected dimension 'plev' of size 2"):
        coords.standardise_coords(plev, "predictor")
    one = coords.standardise_coords(plev.isel(plev=[0]), "predictor")  # one level: dropped
    assert one.dims == ("time", "lat", "lon")
    both = _field(np.array([40.0, 42.5]), np.arange(-180.0, 180.1, 2.5), name="psl")
    with pytest.raises(InputError, match="repeat a cell after wrapping"):
        coords.to_lon_convention(coords.standardise_coords(both, "predictor"), 10.0, "predictor")


def test_geographic_condition_sampling_is_bilinear_at_each_cells_own_position():
    """model.condition_interpolation geographic: F.grid_sample of the predictor grid at condition_sampling_grid
    equals grid.bilinear of it at each fine cell's lat/lon (a rotated-pole target, a Gaussian-like uneven
    predictor latitude axis, cells beyond the predictor hull clamped); the model keeps the grid in its checkpoint."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    from precip_cvae import checkpoint
    from precip_cvae.conditioning import condition_sampling_grid
    from precip_cvae.config import ModelConfig
    from precip_cvae.model import CVAE

    rlat, rlon = np.arange(-12.0, -5.0, 0.44)[:16], np.arange(-20.0, -12.0, 0.44)[:16]
    lat2, lon2 = grid.rotated_pole_to_geographic(rlat, rlon, CORDEX_POLE)
    clat, clon = np.array([33.0, 35.2, 37.1, 39.0, 41.0, 42.9, 44.8]), np.arange(-12.5, 8.0, 2.5)
    data = SimpleNamespace(lat=rlat, lon=rlon, cells={"cell_lat": lat2, "cell_lon": lon2},
                           condition_attrs={"standard_name": "latitude", "units": "degrees_north"}, clat=clat, clon=clon)
    g = condition_sampling_grid(data)
    y = np.random.default_rng(0).normal(size=(2, 3, clat.size, clon.size))
    sampled = F.grid_sample(torch.from_numpy(y).float(), torch.from_numpy(g)[None].expand(2, -1, -1, -1),
                            mode="bilinear", padding_mode="border", align_corners=True).numpy()
    np.testing.assert_allclose(sampled, grid.bilinear(y, clat, clon, lat2, lon2), rtol=1e-5, atol=1e-5)
    # a condition grid of the target's own blocks: the fine axes, not the cells
    blocks = SimpleNamespace(**{**vars(data), "condition_attrs": {"standard_name": "grid_latitude"},
                                "clat": rlat[::4] + 0.66, "clon": rlon[::4] + 0.66})
    gb = condition_sampling_grid(blocks)
    expected = 2.0 * ((rlat[8] - (rlat[0] + 0.66)) / (4 * 0.44)) / 3 - 1.0  # row 8 between block centres 1 and 2
    assert gb[0, 0].tolist() == [-1.0, -1.0] and gb[8, 8].tolist() == pytest.approx([expected, expected], abs=1e-6)

    cfg = ModelConfig(preset="tiny", condition_interpolation="geographic")
    model = CVAE(cfg, 3, (16, 16), (clat.size, clon.size))
    model.set_condition_grid(torch.from_numpy(g))
    state = {"model_config": dict(vars(cfg)), "model_state": model.state_dict(),
             "model_args": {"n_channels": 3, "fine_shape": [16, 16], "coarse_shape": [clat.size, clon.size]}}
    again = checkpoint.build_model(state)
    torch.testing.assert_close(again.cond_grid, model.cond_grid)
    out = again.encode_condition(torch.from_numpy(y[:, :, :, :]).float())
    assert out.maps[0].shape[-2:] == (16, 16)
    with pytest.raises(ValueError, match="needs model.condition_interpolation 'geographic'"):
        CVAE(ModelConfig(preset="tiny"), 3, (16, 16), (7, 8)).set_condition_grid(torch.from_numpy(g))
