import pytest

from precip_cvae.units import UnitsError, factor_to_mm_per_day


@pytest.mark.parametrize(
    "units, factor",
    [
        ("mm/day", 1.0),
        ("mm d-1", 1.0),
        ("mm day-1", 1.0),
        ("mm day^-1", 1.0),
        ("kg m-2 s-1", 86400.0),
        ("kg/m2/s", 86400.0),
        ("kg m**-2 s**-1", 86400.0),
        ("kg.m-2.s-1", 86400.0),
        ("mm/h", 24.0),
        ("mm hr-1", 24.0),
        ("m s-1", 86400.0 * 1000.0),
        ("kg m-2 d-1", 1.0),
    ],
)
def test_rates(units, factor):
    assert factor_to_mm_per_day(units) == pytest.approx(factor)
    assert factor_to_mm_per_day(units, 3600) == pytest.approx(factor)  # a rate ignores the time step


@pytest.mark.parametrize(
    "units, dt, factor",
    [
        ("mm", 86400, 1.0),  # daily totals
        ("kg m-2", 600, 144.0),  # 10-minute accumulations: 144 steps a day
        ("m", 3600, 24000.0),  # ERA5-like hourly metres
        ("mm", 10800, 8.0),  # 3-hourly totals
    ],
)
def test_amounts_need_the_time_step(units, dt, factor):
    assert factor_to_mm_per_day(units, dt) == pytest.approx(factor)
    with pytest.raises(UnitsError, match="time step"):
        factor_to_mm_per_day(units)


@pytest.mark.parametrize("units", ["K", "Pa", "degC", "kg kg-1", "m s-2", "kg m-3", ""])
def test_non_precipitation_units_are_refused(units):
    with pytest.raises(UnitsError):
        factor_to_mm_per_day(units, 86400)
