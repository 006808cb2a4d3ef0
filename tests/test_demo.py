"""The built-in demo data: statistics of daily precipitation, heavy days the predictors explain."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from precip_cvae import demo
from precip_cvae.config import DemoConfig


@pytest.fixture(scope="module")
def fields():
    """Five years of the demo's grid (config/config.yaml: 32 x 32 fine, 8 x 8 predictors)."""
    return demo.make_demo_fields(DemoConfig(years=5, nlat=32, nlon=32, nclat=8, nclon=8))


def test_statistics_resemble_daily_precipitation(fields):
    """The ranges the module docstring promises (E-OBS Iberia: 0.27, 7.2, 35, 116 mm/day, about 400 km)."""
    s = demo.statistics(fields)
    assert 0.18 <= s["wet_day_frequency"] <= 0.35
    assert 4.0 <= s["wet_day_mean"] <= 10.0
    assert 25.0 <= s["p99_wet"] <= 60.0
    assert 100.0 <= s["max"] <= 450.0
    assert 150.0 <= s["efolding_km"] <= 600.0


def test_heavy_days_are_the_wettest_and_the_predictors_show_them(fields):
    """Heavy days carry several times the rain of other days, over a wider wet area, under the deepest and
    moistest lows: a model can learn them from the condition."""
    s = demo.statistics(fields)
    assert s["heavy_ratio"] > 4.0 and s["corr_psl"] < -0.5
    pr = fields.target["pr"].values * 86400.0
    heavy = fields.heavy
    wet_area = (pr >= 1.0).mean(axis=(1, 2))
    assert wet_area[heavy].mean() > 2 * wet_area[~heavy].mean()
    psl = fields.predictors["psl"].values
    low = (psl - psl.mean(axis=0)).min(axis=(1, 2))
    hus = fields.predictors["hus850"].values
    moist = (hus - hus.mean(axis=0)).max(axis=(1, 2))
    assert low[heavy].mean() < np.percentile(low, 10) and moist[heavy].mean() > np.percentile(moist, 80)
    assert heavy.mean() == pytest.approx(DemoConfig().heavy_fraction, abs=0.002)


def test_correlation_length_is_a_distance_not_a_pixel_count():
    """The same field statistics on a grid twice as fine: the e-folding distance in km stays put."""
    coarse = demo.statistics(demo.make_demo_fields(DemoConfig(years=2, nlat=16, nlon=16, nclat=8, nclon=8)))
    fine = demo.statistics(demo.make_demo_fields(DemoConfig(years=2, nlat=32, nlon=32, nclat=8, nclon=8)))
    assert fine["efolding_km"] == pytest.approx(coarse["efolding_km"], rel=0.25)


def test_statistics_by_hand():
    """Two days of 2 x 2 pixels: wet frequency, wet mean, maximum and the heavy ratio computed by hand."""
    mm = np.array([[[0.0, 2.0], [4.0, 0.5]], [[10.0, 0.0], [6.0, 8.0]]])  # mm/day
    time = pd.date_range("2001-01-01", periods=2)
    target = xr.Dataset({"pr": (("time", "lat", "lon"), mm / 86400.0)},
                        coords={"time": time, "lat": [40.0, 40.5], "lon": [0.0, 0.5]})
    psl = xr.Dataset({"psl": (("time", "lat", "lon"), np.array([[[101000.0]], [[100000.0]]]))},
                     coords={"time": time, "lat": [40.0], "lon": [0.0]})
    s = demo.statistics(demo.DemoFields(target=target, predictors=psl, heavy=np.array([False, True])))
    assert s["wet_day_frequency"] == pytest.approx(5 / 8)  # 2, 4, 10, 6, 8 are >= 1
    assert s["wet_day_mean"] == pytest.approx(30 / 5)
    assert s["max"] == pytest.approx(10.0)
    assert s["heavy_ratio"] == pytest.approx((24 / 4) / (6.5 / 4))
    assert s["corr_psl"] == pytest.approx(-1.0)  # the wetter day has the lower pressure
