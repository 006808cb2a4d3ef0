"""Time labels of the data set: the train/val/test split of the time stamps, and their ISO names.

A small module of its own so that every stage and the data loader use one definition without
importing a stage (``data`` used to import ``events`` for the date format).
"""

from __future__ import annotations

import re

import numpy as np

from .config import SplitConfig
from .io import InputError

SPLITS = ("train", "val", "test")


def _season_years(index) -> np.ndarray:
    years = np.array([t.year for t in index])
    months = np.array([t.month for t in index])
    return years, months


_ISO_STAMP = re.compile(r"^\s*(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}))?)?\s*$")


def _split_bound(key: str, text: str, end: bool) -> tuple:
    """A ``[start, end]`` bound of a date split as (year, month, day, hour, minute, second), so any
    calendar compares (360_day has 30 February); a date-only end is the whole day."""
    m = _ISO_STAMP.match(str(text))
    if m is None:
        raise InputError(f"{key}: {text!r} is not an ISO date or date-time (e.g. 2001-12-31 or 2020-10-31T06:00)")
    y, mo, d, h, mi, sec = (int(v) if v is not None else None for v in m.groups())
    if h is None:
        return (y, mo, d, 24, 0, 0) if end else (y, mo, d, 0, 0, 0)  # 24:00: after every step of the day
    return (y, mo, d, h, mi, sec or 0)


def split_labels(index, cfg: SplitConfig) -> np.ndarray:
    """'train'/'val'/'test'/'' label per time stamp ('' = in no split, dropped).

    Contiguous blocks keep time order (train first); year lists use calendar
    years or, with ``season_year: djf``, winter years (December counts to the
    following year); date ranges are inclusive, given as dates (a whole day) or
    date-times (sub-daily data split within a day).  Steps are never shuffled.
    """
    n = len(index)
    labels = np.full(n, "", dtype=object)
    if cfg.method == "contiguous":
        f = np.asarray(cfg.fractions, dtype=float)
        edges = np.round(np.cumsum(f) * n).astype(int)
        labels[: edges[0]] = "train"
        labels[edges[0] : edges[1]] = "val"
        labels[edges[1] :] = "test"
    elif cfg.method == "years":
        years, months = _season_years(index)
        if cfg.season_year == "djf":
            years = years + (months == 12)
        for name, chosen in (("train", cfg.train_years), ("val", cfg.val_years), ("test", cfg.test_years)):
            labels[np.isin(years, list(chosen))] = name
    else:
        # full time stamps as tuples: sub-daily data split within a day, any calendar compares
        stamps = [(t.year, t.month, t.day, getattr(t, "hour", 0), getattr(t, "minute", 0), getattr(t, "second", 0))
                  for t in index]
        for name, rng in (("train", cfg.train_dates), ("val", cfg.val_dates), ("test", cfg.test_dates)):
            if len(rng) != 2:
                raise InputError(f"preprocess.split.{name}_dates must be [start, end], got {list(rng)}")
            lo, hi = (_split_bound(f"preprocess.split.{name}_dates", text, end) for text, end in zip(rng, (False, True)))
            labels[np.array([lo <= st <= hi for st in stamps], dtype=bool)] = name
    counts = {s: int((labels == s).sum()) for s in SPLITS}
    empty = [s for s, c in counts.items() if c == 0]
    if empty:
        raise InputError(
            f"split {cfg.method!r} leaves no days in {empty} (counts {counts}); "
            f"data span {index[0]} .. {index[-1]}; check preprocess.split"
        )
    return labels.astype(str)


def format_times(index) -> list[str]:
    """ISO strings: 'YYYY-MM-DD' for daily stamps at midnight, else 'YYYY-MM-DDTHH:MM'."""
    stamps = [(t.year, t.month, t.day, t.hour, t.minute) for t in index]
    if all(h == 0 and m == 0 for *_, h, m in stamps):
        return [f"{y:04d}-{mo:02d}-{d:02d}" for y, mo, d, _, _ in stamps]
    return [f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{m:02d}" for y, mo, d, h, m in stamps]
