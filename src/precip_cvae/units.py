"""Precipitation units: parse a units string and convert to mm/day.

Understood (case-insensitive, with ``/``, ``-1``, ``^-1`` or ``**-1`` for inverse
powers, and ``.`` or spaces between factors):

* rates: ``mm/day``, ``mm d-1``, ``mm/h``, ``kg m-2 s-1``, ``kg/m2/s``, ``m s-1``, ...
* amounts per time step: ``mm``, ``kg m-2``, ``m`` (as ERA5 ``tp``), ``cm``; these
  need the time step of the data (``dt_seconds``) and become rates by dividing by it.

Liquid water density 1000 kg m-3 is assumed (1 kg m-2 of water = 1 mm).
"""

from __future__ import annotations

import re

SECONDS_PER_DAY = 86400.0
MM_PER_DAY = "mm day-1"

# factor to SI base (m, kg, s) and which dimension the unit belongs to
_UNITS = {
    "mm": (1e-3, "L"),
    "millimeter": (1e-3, "L"),
    "millimetre": (1e-3, "L"),
    "millimeters": (1e-3, "L"),
    "millimetres": (1e-3, "L"),
    "cm": (1e-2, "L"),
    "m": (1.0, "L"),
    "meter": (1.0, "L"),
    "metre": (1.0, "L"),
    "meters": (1.0, "L"),
    "metres": (1.0, "L"),
    "kg": (1.0, "M"),
    "g": (1e-3, "M"),
    "s": (1.0, "T"),
    "sec": (1.0, "T"),
    "second": (1.0, "T"),
    "seconds": (1.0, "T"),
    "min": (60.0, "T"),
    "minute": (60.0, "T"),
    "h": (3600.0, "T"),
    "hr": (3600.0, "T"),
    "hour": (3600.0, "T"),
    "hours": (3600.0, "T"),
    "d": (SECONDS_PER_DAY, "T"),
    "day": (SECONDS_PER_DAY, "T"),
    "days": (SECONDS_PER_DAY, "T"),
}
_WATER_DENSITY = 1000.0  # kg m-3

_TOKEN = re.compile(r"^([a-z]+)(?:\^|\*\*)?([+-]?\d+)?$")


class UnitsError(ValueError):
    """A units string that is not a precipitation rate or amount."""


def _parse(units: str) -> tuple[float, dict[str, int]]:
    """Return (factor to SI, {dim: exponent}) for a units string."""
    text = units.strip().lower().replace("**", "^")
    text = re.sub(r"\s*\.\s*|\s+", " ", text)
    # split on '/', everything after a '/' is in the denominator
    parts = text.split("/")
    factor = 1.0
    dims: dict[str, int] = {}
    for i, part in enumerate(parts):
        sign = 1 if i == 0 else -1
        for token in part.split():
            match = _TOKEN.match(token)
            if not match or match.group(1) not in _UNITS:
                raise UnitsError(f"cannot parse units {units!r}: unknown factor {token!r}")
            name, power = match.group(1), int(match.group(2) or 1)
            # 'm2' style: a trailing digit without sign is handled by the regex as power
            scale, dim = _UNITS[name]
            power *= sign
            factor *= scale**power
            dims[dim] = dims.get(dim, 0) + power
    return factor, {k: v for k, v in dims.items() if v != 0}


def factor_to_mm_per_day(units: str, dt_seconds: float | None = None) -> float:
    """Multiplicative factor that converts values in ``units`` to mm/day.

    Parameters
    ----------
    units : str
        A precipitation rate (``kg m-2 s-1``) or amount per time step (``mm``).
    dt_seconds : float, optional
        The time step of the data in seconds; required for amounts.

    Raises
    ------
    UnitsError
        If ``units`` is not a precipitation rate or amount, or an amount is given
        without a time step.
    """
    if units is None or str(units).strip() == "":
        raise UnitsError("no units given")
    factor, dims = _parse(str(units))
    # mass per area -> depth of water
    if dims.get("M") == 1 and dims.get("L") == -2:
        factor /= _WATER_DENSITY
        dims = {k: v for k, v in {**dims, "M": 0, "L": 1}.items() if v != 0}
    if dims.get("L") != 1 or "M" in dims or dims.get("T", 0) not in (0, -1):
        raise UnitsError(
            f"units {units!r} are not a precipitation rate (length/time, mass/area/time) "
            "or amount (length, mass/area)"
        )
    to_mm = factor * 1e3  # depth in m -> mm
    if dims.get("T") == -1:
        return to_mm * SECONDS_PER_DAY
    if dt_seconds is None or not dt_seconds > 0:
        raise UnitsError(
            f"units {units!r} are an amount per time step; converting to mm/day needs the time step"
        )
    return to_mm * SECONDS_PER_DAY / float(dt_seconds)
