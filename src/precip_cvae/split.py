"""Time labels of the data set: the train/val/test split of the time stamps, and their ISO names.

A small module of its own so that every stage and the data loader use one definition without
importing a stage (``data`` used to import ``events`` for the date format).
"""

from __future__ import annotations

import json
import re

import numpy as np

from .config import SplitConfig
from .io import InputError

SPLITS = ("train", "val", "test")


def season_years(index, season_year: str = "calendar") -> np.ndarray:
    """The (season) year of each time stamp: the calendar year, or with ``season_year`` 'djf' the
    year of the season's January (December 2001 belongs to winter 2002)."""
    years = np.array([t.year for t in index], dtype=int)
    if season_year == "djf":
        years = years + (np.array([t.month for t in index]) == 12)
    return years


FOLD_PREFIX = "fold"


def fold_name(k: int) -> str:
    """Path component of fold ``k``: 'fold0', 'fold1', ..."""
    return f"{FOLD_PREFIX}{int(k)}"


def fold_index(run_path: str) -> int | None:
    """The fold of a run path 'iberia/fold2' (2), or None for a plain run 'iberia'."""
    m = re.search(rf"/{FOLD_PREFIX}(\d+)$", str(run_path))
    return int(m.group(1)) if m else None


def fold_blocks(years: np.ndarray, folds: int) -> list[np.ndarray]:
    """The (season) years of each fold: ``folds`` blocks of consecutive years, as equal in length as
    possible (the first blocks take one year more when the years do not divide evenly).

    Raises InputError when there are fewer distinct years than folds.
    """
    distinct = np.unique(np.asarray(years, dtype=int))
    if distinct.size < folds:
        raise InputError(f"preprocess.split.folds {folds} needs at least {folds} distinct (season) years; the data "
                         f"hold {distinct.size} ({distinct.tolist()}); lower folds or use another split method")
    return [b for b in np.array_split(distinct, folds)]


def fold_roles(folds: int, k: int) -> dict[str, list[int]]:
    """Which year blocks fold ``k`` uses: test = block k, val = block k+1 (cyclically), train = the rest.

    So over the folds every block is test once and val once: pooled test and pooled val days each
    cover the record exactly once.
    """
    if not 0 <= k < folds:
        raise InputError(f"fold {k} does not exist: preprocess.split.folds is {folds} (folds 0..{folds - 1})")
    val = (k + 1) % folds
    return {"test": [k], "val": [val], "train": [b for b in range(folds) if b not in (k, val)]}


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


def split_labels(index, cfg: SplitConfig, fold: int | None = None) -> np.ndarray:
    """'train'/'val'/'test'/'' label per time stamp ('' = in no split, dropped).

    Contiguous blocks keep time order (train first); year lists use calendar
    years or, with ``season_year: djf``, winter years (December counts to the
    following year); date ranges are inclusive, given as dates (a whole day) or
    date-times (sub-daily data split within a day); ``kfold_years`` gives the
    labels of ``fold`` (:func:`fold_roles` over :func:`fold_blocks` of the season
    years).  Steps are never shuffled.
    """
    n = len(index)
    labels = np.full(n, "", dtype=object)
    if cfg.method == "contiguous":
        f = np.asarray(cfg.fractions, dtype=float)
        edges = np.round(np.cumsum(f) * n).astype(int)
        labels[: edges[0]] = "train"
        labels[edges[0] : edges[1]] = "val"
        labels[edges[1] :] = "test"
    elif cfg.method == "kfold_years":
        if fold is None:
            raise InputError("preprocess.split.method 'kfold_years' needs a fold: each fold is its own data set "
                             "(results/<run>/fold<k>/...), built by the workflow")
        years = season_years(index, cfg.season_year)
        blocks = fold_blocks(years, cfg.folds)
        for name, which in fold_roles(cfg.folds, fold).items():
            chosen = np.concatenate([blocks[b] for b in which])
            labels[np.isin(years, chosen)] = name
    elif cfg.method == "years":
        years = season_years(index, cfg.season_year)
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
            f"split {cfg.method!r}{'' if fold is None else f' (fold {fold})'} leaves no days in {empty} (counts {counts}); "
            f"data span {index[0]} .. {index[-1]}; check preprocess.split"
        )
    return labels.astype(str)


def format_times(index) -> list[str]:
    """ISO strings: 'YYYY-MM-DD' for daily stamps at midnight, else 'YYYY-MM-DDTHH:MM'."""
    stamps = [(t.year, t.month, t.day, t.hour, t.minute) for t in index]
    if all(h == 0 and m == 0 for *_, h, m in stamps):
        return [f"{y:04d}-{mo:02d}-{d:02d}" for y, mo, d, _, _ in stamps]
    return [f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{m:02d}" for y, mo, d, h, m in stamps]


def season_year_rule(attrs) -> str:
    """The season-year rule ('djf' or 'calendar') a data set was split with, from the
    ``preprocess_config`` attribute preprocess writes; 'calendar' when it is absent or unreadable."""
    try:
        return json.loads(attrs.get("preprocess_config", "{}")).get("split", {}).get("season_year", "calendar")
    except (ValueError, AttributeError):
        return "calendar"
