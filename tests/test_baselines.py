"""Baselines checked on hand-made inputs."""

import numpy as np
import pytest

from precip_cvae import baselines as b
from precip_cvae.config import ConfigError


def _train(T=6, H=3, W=4):
    # field t is constant t + 1: its identity is readable from any pixel
    return (np.arange(T, dtype=np.float32) + 1)[:, None, None] * np.ones((T, H, W), np.float32)


def test_climatology_draws_only_train_fields():
    train = _train()
    ens = b.climatology(train, n_days=7, n_members=5, rng=np.random.default_rng(0))
    assert ens.shape == (5, 7, 3, 4)
    assert ens.dtype == train.dtype
    # every (member, day) field is exactly one of the train fields
    for field in ens.reshape(-1, 3, 4):
        assert any(np.array_equal(field, t) for t in train)
    # draws vary (not one field repeated) and reproduce with the same seed
    assert len(np.unique(ens[:, :, 0, 0])) > 1
    np.testing.assert_array_equal(ens, b.climatology(train, 7, 5, rng=np.random.default_rng(0)))


def test_analogs_known_nearest_days():
    # 1-D conditions on a line; train days 0..5 at these positions
    train_cond = np.array([[0.0], [10.0], [3.0], [7.0], [4.0], [20.0]])
    target_cond = np.array([[3.4], [9.0], [25.0]])
    train = _train()
    ens, idx = b.analogs(train_cond, target_cond, train, n_members=3)
    # distances: 3.4 -> |.4 (2), .6 (4), 3.4 (0), 3.6 (3)|; 9 -> 1 (1), 2 (3), 5 (4)
    # 25 -> 5 (5), 15 (1), 18 (3)
    np.testing.assert_array_equal(idx, [[2, 4, 0], [1, 3, 4], [5, 1, 3]])
    assert ens.shape == (3, 3, 3, 4)
    np.testing.assert_array_equal(ens[:, :, 0, 0], (idx + 1).T)  # ens[j, i] = train[idx[i, j]]


def test_analogs_euclidean_in_2d_and_ties_to_lower_index():
    train_cond = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [-1.0, -1.0]])
    target = np.array([[0.0, 0.0]])
    _, idx = b.analogs(train_cond, target, _train(4), n_members=4)
    # distances 0, 5, sqrt2, sqrt2 -> tie between 2 and 3 goes to 2
    np.testing.assert_array_equal(idx, [[0, 2, 3, 1]])


def test_analogs_leave_one_out():
    train_cond = np.array([[0.0], [1.0], [5.0], [6.0]])
    train = _train(4)
    _, idx = b.analogs(train_cond, train_cond, train, n_members=1)
    np.testing.assert_array_equal(idx[:, 0], [0, 1, 2, 3])  # itself, without exclusion
    _, idx = b.analogs(train_cond, train_cond, train, n_members=2, exclude=np.arange(4))
    np.testing.assert_array_equal(idx, [[1, 2], [0, 2], [3, 1], [2, 1]])
    assert not np.any(idx == np.arange(4)[:, None])
    # several excluded per day (e.g. neighbouring dates), -1 = nothing
    ex = np.array([[0, 1], [1, -1], [2, 3], [3, -1]])
    _, idx = b.analogs(train_cond, train_cond, train, n_members=1, exclude=ex)
    np.testing.assert_array_equal(idx[:, 0], [2, 0, 1, 2])
    with pytest.raises(ValueError, match="n_members"):
        b.analogs(train_cond, train_cond, train, n_members=4, exclude=np.arange(4))


def test_analogs_chunking_matches_single_block():
    rng = np.random.default_rng(0)
    tc, qc = rng.normal(size=(50, 6)), rng.normal(size=(23, 6))
    train = rng.gamma(0.5, 4.0, size=(50, 2, 2))
    e1, i1 = b.analogs(tc, qc, train, 5, chunk=4)
    e2, i2 = b.analogs(tc, qc, train, 5)
    np.testing.assert_array_equal(i1, i2)
    d = ((qc[:, None, :] - tc[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(i2, np.argsort(d, axis=1, kind="stable")[:, :5])


def test_interpolation_reproduces_linear_field_inside_hull():
    clat = np.array([40.0, 42.0, 44.0, 46.0])
    clon = np.array([0.0, 3.0, 6.0])
    flat = np.linspace(40.0, 46.0, 13)
    flon = np.linspace(0.0, 6.0, 7)

    def f(lat, lon, a):
        return a * (2.0 + 0.5 * (lat - 40.0) + 0.25 * lon)

    coarse = np.stack([f(clat[:, None], clon[None, :], a) for a in (1.0, 3.0)])
    out = b.interpolation(coarse, clat, clon, flat, flon)
    assert out.shape == (2, 13, 7)
    expect = np.stack([f(flat[:, None], flon[None, :], a) for a in (1.0, 3.0)])
    np.testing.assert_allclose(out, expect, rtol=1e-12)
    # descending coarse latitudes give the same result
    out_desc = b.interpolation(coarse[:, ::-1], clat[::-1], clon, flat, flon)
    np.testing.assert_allclose(out_desc, expect, rtol=1e-12)


def test_interpolation_nearest_edge_outside_hull():
    clat = np.array([0.0, 1.0])
    clon = np.array([0.0, 1.0])
    coarse = np.array([[[1.0, 2.0], [3.0, 4.0]]])  # value = 1 + lon + 2 lat
    out = b.interpolation(coarse, clat, clon, np.array([-5.0, 0.5, 9.0]), np.array([-1.0, 2.0]))
    # lat clipped to [0, 0.5, 1], lon to [0, 1]
    np.testing.assert_allclose(out[0], [[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]])


def test_registry_common_convention():
    train = _train()
    inputs = b.BaselineInputs(
        train_pr=train, n_members=2, rng=0,
        train_cond=np.arange(6.0)[:, None], target_cond=np.array([[0.2], [4.9]]),
        coarse_pr=np.ones((2, 2, 2)), coarse_lat=np.array([0.0, 1.0]),
        coarse_lon=np.array([0.0, 1.0]), fine_lat=np.linspace(0, 1, 3),
        fine_lon=np.linspace(0, 1, 4),
    )
    clim = b.get_baseline("climatology")(inputs)
    assert clim.shape == (2, 2, 3, 4)  # n_days inferred from target_cond
    ana = b.get_baseline("analogs")(inputs)
    np.testing.assert_array_equal(ana[:, :, 0, 0], [[1.0, 6.0], [2.0, 5.0]])
    interp = b.get_baseline("interpolation")(inputs)
    assert interp.shape == (1, 2, 3, 4)  # deterministic: one-member ensemble
    assert set(b.BASELINES) == {"climatology", "analogs", "interpolation"}
    with pytest.raises(ValueError, match="train_cond"):
        b.get_baseline("analogs")(b.BaselineInputs(train_pr=train, n_members=2))


def test_unknown_baseline_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        b.get_baseline("persistence")
    msg = str(err.value)
    assert "persistence" in msg
    for name in ("analogs", "climatology", "interpolation"):
        assert name in msg


# ----------------------------------------------------------------------------- a coastline (issue 18)

COAST = np.array([[1.0, 2.0, np.nan],
                  [3.0, 4.0, np.nan],
                  [5.0, np.nan, np.nan]])  # (lat 0, 1, 2) x (lon 0, 1, 2): sea to the south-east


def test_interpolation_uses_valid_coarse_cells_only():
    """Weights of missing neighbours are dropped and the rest renormalised; no weighted valid
    neighbour: the nearest valid coarse value.  Values by hand."""
    c = np.arange(3.0)
    out = b.interpolation(COAST[None], c, c, np.array([0.5, 1.5, 0.25, 2.0]), np.array([0.5, 1.5, 2.0]))[0]
    # (0.5, 0.5): four valid corners, 1/4 each: (1 + 2 + 3 + 4) / 4
    assert out[0, 0] == pytest.approx(2.5)
    # (1.5, 1.5): only (1, 1) = 4 is valid of its four corners
    assert out[1, 1] == pytest.approx(4.0)
    # (1.5, 0.5): corners 3, 4, 5 valid (1/4 each), (2, 1) sea: (3 + 4 + 5) / 3
    assert out[1, 0] == pytest.approx(4.0)
    # (0.25, 1.5): (0, 1) = 2 with weight 0.75 * 0.5, (1, 1) = 4 with 0.25 * 0.5, the rest sea
    assert out[2, 1] == pytest.approx((2 * 0.375 + 4 * 0.125) / 0.5)
    # (2, 2): its one weighted corner (2, 2) is sea; nearest valid cell (1, 1) at sqrt(2), value 4
    assert out[3, 2] == pytest.approx(4.0)
    assert np.isfinite(out).all()
    # a day with no valid coarse cell stays missing
    assert np.isnan(b.interpolation(np.full((1, 3, 3), np.nan), c, c, c, c)).all()


def test_interpolation_without_missing_values_equals_scipy_bilinear():
    from scipy.interpolate import RegularGridInterpolator

    rng = np.random.default_rng(4)
    clat, clon = np.array([0.0, 1.0, 2.5, 3.0]), np.array([10.0, 12.0, 13.0])
    coarse = rng.gamma(1.0, 3.0, size=(3, 4, 3))
    flat, flon = np.linspace(-0.5, 3.5, 9), np.linspace(9.0, 14.0, 11)
    out = b.interpolation(coarse, clat, clon, flat, flon)
    interp = RegularGridInterpolator((clat, clon), np.moveaxis(coarse, 0, -1))
    la, lo = np.meshgrid(np.clip(flat, 0.0, 3.0), np.clip(flon, 10.0, 13.0), indexing="ij")
    expect = np.moveaxis(interp(np.stack([la.ravel(), lo.ravel()], -1)).reshape(9, 11, 3), -1, 0)
    np.testing.assert_allclose(out, expect, rtol=1e-12)


def test_interpolation_baseline_scores_are_finite_on_a_coastline(tmp_path):
    """No predictors, the block-averaged target as condition (target_blocks) on a grid with sea:
    the blocks average their land cells, and the interpolation baseline's MAE, CRPS and twCRPS
    are finite (they were NaN: the all-sea blocks spread NaN onto the coastal land cells)."""
    import pandas as pd

    from conftest import make_field_da, write_nc
    from precip_cvae import events, preprocess
    from precip_cvae.evaluate import sample, score
    from precip_cvae.config import DataConfig, EvaluateConfig, EventsConfig, PreprocessConfig, VariableSource

    times = pd.date_range("2000-01-01", periods=400, freq="D")
    pr = np.random.default_rng(0).gamma(0.6, 5.0, size=(400, 8, 8)).astype("float32")
    sea = np.add.outer(np.arange(8), np.arange(8)) >= 8  # the south-east half: block (1, 1) is all sea
    pr[:, sea] = np.nan
    write_nc(make_field_da(pr, times), tmp_path / "target" / "pr.nc")
    data = DataConfig(target=VariableSource(str(tmp_path / "target" / "*.nc"), "pr"), predictors=())
    cfg = PreprocessConfig(target_coarse_factor=4, condition_grid="target_blocks", grid_multiple=1)
    ds = preprocess.run(data, cfg, str(tmp_path / "d.zarr"))
    blocks = ds["coarse_pr"].values  # (T, 2, 2)
    assert np.isnan(blocks[:, 1, 1]).all()  # block of cells 4..7 x 4..7: all sea
    land = ~sea[4:, :4]  # block (1, 0): 10 of its 16 cells are land
    np.testing.assert_allclose(blocks[:, 1, 0], np.nanmean(pr[:, 4:, :4][:, land], axis=1), rtol=1e-5)

    events.run(str(tmp_path / "d.zarr"), EventsConfig(min_exceed_fraction=0.02), str(tmp_path / "t.nc"),
               str(tmp_path / "e.csv"))
    ecfg = EvaluateConfig(members=2, baselines=("climatology", "interpolation"), fss_windows=(1, 3))
    sample.sample_ensembles(sample.SamplePaths(str(tmp_path / "d.zarr"), str(tmp_path / "t.nc"),
                                               str(tmp_path / "e.csv"), {}, str(tmp_path / "ens.zarr")), ecfg)
    ens = xr_open(tmp_path / "ens.zarr", "test/interpolation")
    truth = xr_open(tmp_path / "ens.zarr", "test/truth")["pr"].values
    assert np.isfinite(ens["pr"].values[:, np.isfinite(truth)]).all()
    table = score.score_cache(str(tmp_path / "ens.zarr"), score.tail_thresholds(str(tmp_path / "d.zarr"), ecfg),
                              ecfg).table
    rows = table[(table.model == "interpolation") & (table.subset == "all")].set_index(["split", "metric"])["value"]
    for split in ("val", "test"):
        for metric in ("mae_all", "crps", "twcrps_p95", "twcrps_p99", "fss_p95_w1", "mass_error_mae"):
            assert np.isfinite(rows[(split, metric)]), (split, metric)
        # deterministic: its CRPS is its MAE
        assert rows[(split, "crps")] == pytest.approx(rows[(split, "mae_all")], rel=1e-6)


def xr_open(store, group):
    from precip_cvae import io

    return io.open_zarr_group(store, group)
