"""Typed, frozen configuration sections.

The Snakemake workflow validates ``config/config.yaml`` against
``workflow/schemas/config.schema.yaml`` (which fills defaults and rejects unknown
keys); each rule passes only its own section to its script, and the script turns
that plain dict into one of the dataclasses below with ``from_dict``.  Package
functions receive dataclasses, never raw dicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

# the `device` key of train, evaluate, generate and downstream (precip_cvae.resources.select_device)
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong kind."""


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}"
        )


def _build(cls, data: Mapping[str, Any] | None, where: str, nested: dict | None = None):
    data = dict(data or {})
    _check_keys(cls, data, where)
    nested = nested or {}
    kwargs = {}
    for key, value in data.items():
        if key in nested:
            kwargs[key] = nested[key](value, f"{where}.{key}")
        elif isinstance(value, list):
            kwargs[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def lookup(registry: Mapping[str, Any], name: str, what: str) -> Any:
    """Return ``registry[name]`` or raise an error that lists the valid names."""
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(
            f"unknown {what} {name!r}; valid names are {sorted(registry)}"
        ) from None


def config_hash(section: Any) -> str:
    """A short, stable SHA-256 of a config section (dataclass or plain data)."""
    if dataclasses.is_dataclass(section):
        section = dataclasses.asdict(section)
    text = json.dumps(section, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class VariableSource:
    """One input variable: a glob of NetCDF files and the variable name in them.

    ``units`` overrides the file's ``units`` attribute when it is missing or wrong;
    ``precipitation`` marks a predictor that is precipitation (converted to mm/day
    and kept raw as ``coarse_pr`` for mass checks and the interpolation baseline).
    """

    paths: str
    variable: str
    units: str | None = None
    precipitation: bool = False

    @classmethod
    def from_dict(cls, data, where="data"):
        return _build(cls, data, where)


@dataclass(frozen=True)
class StaticSource:
    """Time-invariant fields (orography, land fraction, ...) for the fine-grid condition.

    ``paths``: a glob of NetCDF files; ``variables``: the names to read (each a
    (lat, lon) field, a length-1 time or level axis is dropped), regridded to the
    target grid by preprocess.
    """

    paths: str
    variables: tuple[str, ...]

    def __post_init__(self):
        if not self.variables:
            raise ConfigError("data.static.variables is empty; name the static fields to read")

    @classmethod
    def from_dict(cls, data, where="data.static"):
        data = dict(data or {})
        for key in ("paths", "variables"):
            if key not in data:
                raise ConfigError(f"{where}: needs {key!r}")
        return _build(cls, data, where)


@dataclass(frozen=True)
class DataConfig:
    target: VariableSource
    predictors: tuple[VariableSource, ...]
    static: StaticSource | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "data") -> "DataConfig":
        data = dict(data)
        _check_keys(cls, data, where)
        if "target" not in data:
            raise ConfigError(f"{where}: needs a 'target'")
        return cls(
            target=VariableSource.from_dict(data["target"], f"{where}.target"),
            predictors=tuple(
                VariableSource.from_dict(p, f"{where}.predictors[{i}]")
                for i, p in enumerate(data.get("predictors") or [])
            ),
            static=None if not data.get("static") else StaticSource.from_dict(data["static"], f"{where}.static"),
        )


# ----------------------------------------------------------------------------- demo


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and seed of the synthetic demo data set (see :mod:`precip_cvae.demo`)."""

    seed: int = 42
    start_year: int = 2001
    years: int = 10
    nlat: int = 64
    nlon: int = 64
    nclat: int = 16
    nclon: int = 16
    heavy_fraction: float = 0.015
    outdir: str = "data/demo"

    @classmethod
    def from_dict(cls, data, where="demo"):
        return _build(cls, data, where)


# ----------------------------------------------------------------------------- preprocess


SPLIT_METHODS = ("contiguous", "years", "dates")
MISSING_POLICIES = ("mask", "refuse")
PREDICTOR_MISSING_POLICIES = ("refuse", "drop_days", "fill_climatology")
PREDICTOR_AGGREGATIONS = ("mean", "min", "max", "sum")


def parse_step(text: str, key: str) -> float:
    """Seconds of a time step written as pandas does ('1D', '24h', '6h', '30min', '0h')."""
    import pandas as pd

    try:
        return float(pd.to_timedelta(str(text)).total_seconds())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {text!r} is not a time step (e.g. '1D', '6h', '30min')") from exc
TARGET_TRANSFORMS = ("log1p", "sqrt", "none")


@dataclass(frozen=True)
class SplitConfig:
    """How days are split by time.

    ``contiguous``: three consecutive blocks with the given fractions (train first).
    ``years``: lists of years; for seasons that span a new year (DJF) the year of a
    day is that of its season's January when ``season_year`` is ``djf``.
    ``dates``: inclusive ``[start, end]`` ISO date or date-time pairs (a date-only end
    includes its whole day; date-times split sub-daily data within a day).
    """

    method: str = "contiguous"
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    train_years: tuple[int, ...] = ()
    val_years: tuple[int, ...] = ()
    test_years: tuple[int, ...] = ()
    season_year: str = "calendar"
    train_dates: tuple[str, ...] = ()
    val_dates: tuple[str, ...] = ()
    test_dates: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in SPLIT_METHODS:
            raise ConfigError(f"preprocess.split.method {self.method!r}; valid: {list(SPLIT_METHODS)}")
        if self.season_year not in ("calendar", "djf"):
            raise ConfigError("preprocess.split.season_year must be 'calendar' or 'djf'")
        if self.method == "contiguous":
            if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
                raise ConfigError(
                    f"preprocess.split.fractions must be three non-negative numbers summing to 1, got {list(self.fractions)}"
                )

    @classmethod
    def from_dict(cls, data, where="preprocess.split"):
        return _build(cls, data, where)


@dataclass(frozen=True)
class MinSplitDays:
    """The fewest time steps each split may hold (``preprocess.min_split_days``)."""

    train: int = 30
    val: int = 10
    test: int = 10

    def __post_init__(self):
        for name in ("train", "val", "test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"preprocess.min_split_days.{name} must be >= 1")

    @classmethod
    def from_dict(cls, data, where="preprocess.min_split_days"):
        return _build(cls, data, where)


@dataclass(frozen=True)
class PreprocessConfig:
    """Checks and normalisation of the raw inputs (see :mod:`precip_cvae.preprocess`).

    ``min_split_days``: fewest steps per split.  ``predictor_missing_policy``: a predictor day
    with more than ``predictor_missing_cells`` of its cells missing is refused, dropped
    (``drop_days``) or filled with the train mean (``fill_climatology``), counted either way.
    ``time_step`` (pandas notation, '1D'): sum a finer target to this step first.
    ``predictor_aggregation`` (mean/min/max/sum): reduce predictors finer than the target over
    each target interval [t + ``aggregation_offset``, t + offset + step); None refuses them.
    """

    split: SplitConfig = field(default_factory=SplitConfig)
    condition_grid: str = "first"
    target_coarse_factor: int = 0
    mask_missing_fraction: float = 0.5
    missing_policy: str = "mask"
    negative_tolerance: float = 0.01
    min_overlap_days: int = 30
    grid_multiple: int = 8
    transform: str = "log1p"
    chunk_time: int = 128
    region: tuple[float, ...] = ()
    min_split_days: MinSplitDays = field(default_factory=MinSplitDays)
    predictor_missing_policy: str = "refuse"
    predictor_missing_cells: float = 0.0
    time_step: str | None = None
    predictor_aggregation: str | None = None
    aggregation_offset: str = "0h"

    def __post_init__(self):
        if self.predictor_missing_policy not in PREDICTOR_MISSING_POLICIES:
            raise ConfigError(f"preprocess.predictor_missing_policy {self.predictor_missing_policy!r}; "
                              f"valid: {list(PREDICTOR_MISSING_POLICIES)}")
        if not 0 <= self.predictor_missing_cells < 1:
            raise ConfigError("preprocess.predictor_missing_cells must be in [0, 1)")
        if self.predictor_aggregation is not None and self.predictor_aggregation not in PREDICTOR_AGGREGATIONS:
            raise ConfigError(f"preprocess.predictor_aggregation {self.predictor_aggregation!r}; "
                              f"valid: {list(PREDICTOR_AGGREGATIONS)} or null")
        if self.time_step is not None and not parse_step(self.time_step, "preprocess.time_step") > 0:
            raise ConfigError(f"preprocess.time_step {self.time_step!r} must be a positive time step")
        offset = parse_step(self.aggregation_offset, "preprocess.aggregation_offset")
        if offset < 0:
            raise ConfigError(f"preprocess.aggregation_offset {self.aggregation_offset!r} must not be negative")
        if self.missing_policy not in MISSING_POLICIES:
            raise ConfigError(
                f"preprocess.missing_policy {self.missing_policy!r}; valid: {list(MISSING_POLICIES)}"
            )
        if self.transform not in TARGET_TRANSFORMS:
            raise ConfigError(f"preprocess.transform {self.transform!r}; valid: {list(TARGET_TRANSFORMS)}")
        if not 0 < self.mask_missing_fraction <= 1:
            raise ConfigError("preprocess.mask_missing_fraction must be in (0, 1]")
        if self.grid_multiple < 1:
            raise ConfigError("preprocess.grid_multiple must be >= 1")

    @classmethod
    def from_dict(cls, data, where="preprocess"):
        return _build(cls, data, where, nested={"split": SplitConfig.from_dict,
                                                "min_split_days": MinSplitDays.from_dict})


# ----------------------------------------------------------------------------- events


EVENT_CRITERIA = ("exceedance", "domain_mean", "either")


@dataclass(frozen=True)
class EventsConfig:
    """Heavy-precipitation thresholds and the heavy-day criterion.

    ``percentile`` of wet days (>= ``wet_threshold`` mm/day) per pixel, train split
    only; pixels with fewer than ``min_wet_days`` wet train days use the pooled
    value (the same percentile over all wet train values of all valid pixels).
    """

    wet_threshold: float = 1.0
    percentile: float = 99.0
    min_wet_days: int = 30
    criterion: str = "exceedance"
    min_exceed_fraction: float = 0.05
    domain_mean_percentile: float = 99.0
    require_train_events: bool = True

    def __post_init__(self):
        if self.criterion not in EVENT_CRITERIA:
            raise ConfigError(f"events.criterion {self.criterion!r}; valid names are {list(EVENT_CRITERIA)}")
        if not 0 < self.percentile < 100:
            raise ConfigError("events.percentile must be in (0, 100)")

    @classmethod
    def from_dict(cls, data, where="events"):
        return _build(cls, data, where)


# ----------------------------------------------------------------------------- model


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(base_filters=8, d_y=16, d_z=8, depth=2),
    "small": dict(base_filters=32, d_y=128, d_z=32, depth=3),
    "medium": dict(base_filters=64, d_y=256, d_z=64, depth=4),
    "seed": dict(base_filters=96, d_y=384, d_z=96, depth=4),
}
PRIORS = ("learned", "standard")
LATENTS = ("map", "vector")
CONDITIONINGS = ("fine", "coarse")


@dataclass(frozen=True)
class ModelConfig:
    """Size, regularisation and structure of the cVAE. ``None`` sizes take the preset's value.

    ``latent``: ``map`` (``latent_channels`` per location at 1 / 2**``latent_level`` of
    the target resolution) or ``vector`` (``d_z`` numbers, the seed's design).
    ``conditioning``: ``fine`` (predictors interpolated to the target grid and stacked
    with the static channels fitted on train) or ``coarse`` (encoded on their own grid,
    the seed's design).  ``noise_channels``: fresh N(0, 1) channels (no KL) fed to every
    decoder scale finer than the map latent's, for small-scale variability between members.
    """

    preset: str = "small"
    base_filters: int | None = None
    d_y: int | None = None
    d_z: int | None = None
    depth: int | None = None
    dropout_encoder: float = 0.1
    dropout_decoder: float = 0.1
    prior: str = "learned"
    latent: str = "map"
    latent_level: int = 1
    latent_channels: int = 8
    conditioning: str = "fine"
    noise_channels: int = 0

    def __post_init__(self):
        preset = lookup(MODEL_PRESETS, self.preset, "model preset")
        for key, value in preset.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.prior not in PRIORS:
            raise ConfigError(f"model.prior {self.prior!r}; valid names are {list(PRIORS)}")
        if self.latent not in LATENTS:
            raise ConfigError(f"model.latent {self.latent!r}; valid names are {list(LATENTS)}")
        if self.conditioning not in CONDITIONINGS:
            raise ConfigError(f"model.conditioning {self.conditioning!r}; valid names are {list(CONDITIONINGS)}")
        if self.latent == "map" and not 1 <= self.latent_level <= self.depth:
            raise ConfigError(f"model.latent_level {self.latent_level} must be in 1..model.depth ({self.depth})")
        if self.latent_channels < 1 or self.noise_channels < 0:
            raise ConfigError("model.latent_channels must be >= 1 and model.noise_channels >= 0")
        for key in ("dropout_encoder", "dropout_decoder"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be in [0, 1)")

    @classmethod
    def from_dict(cls, data, where="model"):
        return _build(cls, data, where)


# ----------------------------------------------------------------------------- loss

LOSS_SPACES = ("transformed", "mm")
CRPS_SPACES = ("transformed", "mm", "both")
EARLY_STOPPING_METRICS = ("MAE_all", "MAE_tail", "L_rec", "CRPS", "twCRPS")
SCHEDULERS = ("none", "cosine", "plateau")
AUGMENTATION_NAMES = ("flip", "rot90", "noise", "mixup")

#: Named training presets: values for the ``None`` keys of ``train`` and ``train.loss``.
#: ``seed`` is the original system's final setting, exactly; ``default`` is the setting
#: measured best on Iberia val (docs/results-iberia.md).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(epochs=60, lr=1e-3, patience=10, early_stopping_metric="CRPS"),
    "seed": dict(epochs=100, lr=1e-4, patience=25, early_stopping_metric="MAE_all"),
}
LOSS_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(lambda_base=1.0, lambda_ext=0.0, beta_kl=0.05, lambda_mass=0.01, warmup_epochs=5,
                    lambda_crps=1.0, lambda_tail=0.0, kl_per_pixel=True, free_bits=0.0),
    "seed": dict(lambda_base=1.0, lambda_ext=5.0, beta_kl=0.01, lambda_mass=0.01, warmup_epochs=15,
                 lambda_crps=0.0, lambda_tail=0.0, kl_per_pixel=False, free_bits=0.0),
}


@dataclass(frozen=True)
class LossConfig:
    """Weights of the training loss (see :mod:`precip_cvae.losses`).

    ``L = base*MAE_all + ext*MAE_ext + beta(epoch)*KL + mass*L_mass + crps*afCRPS + tail*twCRPS``.
    ``None`` fields take the values of ``preset`` (:data:`LOSS_PRESETS`), which
    :class:`TrainConfig` sets to its own ``preset``.
    """

    preset: str = "default"
    lambda_base: float | None = None
    lambda_ext: float | None = None
    beta_kl: float | None = None
    lambda_mass: float | None = None
    warmup_epochs: int | None = None
    space: str = "transformed"
    lambda_crps: float | None = None
    ensemble_members: int = 4
    crps_alpha: float = 0.95
    crps_space: str = "transformed"
    lambda_tail: float | None = None
    tail_percentile: float = 90.0
    kl_per_pixel: bool | None = None
    free_bits: float | None = None

    def __post_init__(self):
        preset = lookup(LOSS_PRESETS, self.preset, "train preset")
        for key, value in preset.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.space not in LOSS_SPACES:
            raise ConfigError(f"train.loss.space {self.space!r}; valid names are {list(LOSS_SPACES)}")
        if self.crps_space not in CRPS_SPACES:
            raise ConfigError(f"train.loss.crps_space {self.crps_space!r}; valid names are {list(CRPS_SPACES)}")
        if self.warmup_epochs < 0:
            raise ConfigError("train.loss.warmup_epochs must be >= 0")
        if (self.lambda_crps > 0 or self.lambda_tail > 0) and self.ensemble_members < 2:
            raise ConfigError("train.loss.ensemble_members must be >= 2 when lambda_crps or lambda_tail > 0")
        if not 0 <= self.crps_alpha <= 1:
            raise ConfigError("train.loss.crps_alpha must be in [0, 1]")
        if not 0 < self.tail_percentile < 100:
            raise ConfigError("train.loss.tail_percentile must be in (0, 100)")
        if self.free_bits < 0:
            raise ConfigError("train.loss.free_bits must be >= 0")

    @property
    def n_prior(self) -> int:
        """Prior members decoded per training step (0 when no ensemble term is on)."""
        return int(self.ensemble_members) if (self.lambda_crps > 0 or self.lambda_tail > 0) else 0

    @classmethod
    def from_dict(cls, data, where="train.loss", preset: str = "default"):
        data = dict(data or {})
        if "preset" in data and data["preset"] != preset:
            raise ConfigError(f"{where}.preset: set train.preset instead (got {data['preset']!r})")
        data["preset"] = preset
        return _build(cls, data, where)


# ----------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, validation, early stopping, sampling and augmentation.

    ``preset`` (:data:`TRAIN_PRESETS`) gives the values of the ``None`` fields here and
    in ``loss``: ``default`` or ``seed`` (the original system's final setting).
    """

    preset: str = "default"
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    scheduler: str = "none"
    early_stopping_metric: str | None = None
    patience: int | None = None
    oversample_heavy: float = 1.0
    augment: tuple[str, ...] = ()
    noise_std: float = 0.05
    mixup_alpha: float = 0.2
    val_members: int = 4
    seed: int = 0
    device: str = "auto"
    gpus: int = 1
    num_threads: int = 0
    loss: LossConfig | None = None

    def __post_init__(self):
        preset = lookup(TRAIN_PRESETS, self.preset, "train preset")
        for key, value in preset.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.loss is None:
            object.__setattr__(self, "loss", LossConfig(preset=self.preset))
        if self.loss.preset != self.preset:
            raise ConfigError(f"train.loss was resolved with preset {self.loss.preset!r} but train.preset is "
                              f"{self.preset!r}; build the loss with LossConfig(preset={self.preset!r}, ...)")
        if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
            raise ConfigError(
                f"train.early_stopping_metric {self.early_stopping_metric!r}; valid names are {list(EARLY_STOPPING_METRICS)}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"train.scheduler {self.scheduler!r}; valid names are {list(SCHEDULERS)}")
        for name in self.augment:
            if name not in AUGMENTATION_NAMES:
                raise ConfigError(f"unknown augmentation {name!r}; valid names are {sorted(AUGMENTATION_NAMES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"train.device {self.device!r}; valid names are {list(DEVICES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.val_members < 1:
            raise ConfigError("train.epochs, train.batch_size and train.val_members must be >= 1")

    @classmethod
    def from_dict(cls, data, where="train"):
        data = dict(data or {})
        preset = data.get("preset", "default")
        lookup(TRAIN_PRESETS, preset, "train preset")
        data["loss"] = LossConfig.from_dict(data.get("loss"), f"{where}.loss", preset=preset)
        return _build(cls, data, where)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict:
    """``base`` updated recursively by ``override`` (plain dicts; lists are replaced)."""
    out = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


#: ``<setting><SEED_SUFFIX><seed>``: an experiment name when ``experiment_seeds`` is set.
SEED_SUFFIX = "_seed"


def experiment_names(config: Mapping[str, Any]) -> list[str]:
    """Every experiment of a run, in config order.

    Without ``experiment_seeds`` these are the keys of ``experiments``; with it each
    setting runs once per seed, as ``<setting>_seed<N>`` (``train.seed`` = N).
    """
    settings = list((config.get("experiments") or {"default": {}}).keys())
    seeds = list(config.get("experiment_seeds") or [])
    if len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"experiment_seeds must be distinct non-negative integers, got {seeds}")
    if not seeds:
        return settings
    return [f"{name}{SEED_SUFFIX}{seed}" for name in settings for seed in seeds]


def experiment_setting(config: Mapping[str, Any], experiment: str) -> tuple[str, int | None]:
    """``(setting, seed)`` of an experiment name; seed None without ``experiment_seeds``."""
    names = experiment_names(config)
    if experiment not in names:
        raise ConfigError(f"unknown experiment {experiment!r}; valid names are {names}")
    if not config.get("experiment_seeds"):
        return experiment, None
    setting, _, seed = experiment.rpartition(SEED_SUFFIX)
    return setting, int(seed)


def experiment_sections(config: Mapping[str, Any], experiment: str) -> tuple[dict, dict]:
    """The (model, train) sections of ``experiment``: the run's sections with its overrides
    (and its seed as ``train.seed`` when the run has ``experiment_seeds``)."""
    setting, seed = experiment_setting(config, experiment)
    overrides = lookup(config.get("experiments") or {"default": {}}, setting, "experiment") or {}
    train = deep_merge(config.get("train") or {}, overrides.get("train"))
    if seed is not None:
        train["seed"] = seed
    return deep_merge(config.get("model") or {}, overrides.get("model")), train


def generated_experiments(config: Mapping[str, Any]) -> list[str]:
    """The experiments that ``generate`` (and ``downstream``) run for: ``generate.experiments``,
    where a setting name stands for all its seeds; every experiment when that list is empty."""
    names = experiment_names(config)
    wanted = list((config.get("generate") or {}).get("experiments") or [])
    if not wanted:
        return names
    chosen = []
    for want in wanted:
        match = [n for n in names if n == want or experiment_setting(config, n)[0] == want]
        if not match:
            settings = list((config.get("experiments") or {"default": {}}).keys())
            raise ConfigError(f"generate.experiments: unknown experiment {want!r}; valid names are "
                              f"{sorted(set(names) | set(settings))}")
        chosen += [n for n in match if n not in chosen]
    return [n for n in names if n in chosen]


# ----------------------------------------------------------------------------- generate


@dataclass(frozen=True)
class GenerateConfig:
    """Synthetic samples for heavy-event days (see :mod:`precip_cvae.generate`)."""

    checkpoint: str = "best"
    splits: tuple[str, ...] = ("train",)
    members: int = 10
    z_scale: float = 1.0
    filter_heavy: bool = False
    max_rounds: int = 5
    seed: int = 0
    batch_days: int = 16
    synthetic_weight: float = 1.0
    netcdf: bool = False
    memorisation_warn_fraction: float = 0.05
    memorisation_max_reference: int = 5000
    memorisation_max_samples: int = 5000
    experiments: tuple[str, ...] = ()
    device: str = "auto"

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ConfigError(f"generate.device {self.device!r}; valid names are {list(DEVICES)}")
        if self.checkpoint not in ("best", "last"):
            raise ConfigError(f"generate.checkpoint {self.checkpoint!r}; valid names are ['best', 'last']")
        for s in self.splits:
            if s not in ("train", "val", "test"):
                raise ConfigError(f"generate.splits: unknown split {s!r}; valid names are ['test', 'train', 'val']")
        if self.members < 1 or self.max_rounds < 1 or self.batch_days < 1:
            raise ConfigError("generate.members, max_rounds and batch_days must be >= 1")
        if not self.z_scale >= 0:
            raise ConfigError("generate.z_scale must be >= 0")

    @classmethod
    def from_dict(cls, data, where="generate"):
        return _build(cls, data, where)


# ----------------------------------------------------------------------------- evaluate

EVALUATE_SPLITS = ("val", "test")
# keys of the evaluate section that the sampling rule depends on (a change resamples);
# the other keys only change the scores and plots, recomputed from the cached ensembles
EVALUATE_SAMPLING_KEYS = ("members", "splits", "checkpoints", "baselines", "seed", "batch_size", "device")


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation of the cVAE checkpoints and the baselines (see :mod:`precip_cvae.evaluate`).

    ``checkpoints`` holds ``best`` / ``last`` (the experiment's own) and/or paths to
    other ``.pt`` files; ``baselines`` are names in
    :data:`precip_cvae.baselines.BASELINES` (checked by the stage, which lists the
    valid ones).  ``percentiles`` are the (moderate, extreme) wet-day percentiles of
    the train split that define the local tail thresholds (P95, P99 by default);
    metric names carry them (``twcrps_p99``).
    """

    members: int = 16
    splits: tuple[str, ...] = ("val", "test")
    checkpoints: tuple[str, ...] = ("best", "last")
    baselines: tuple[str, ...] = ("climatology", "analogs", "interpolation")
    fss_windows: tuple[int, ...] = (1, 3, 9, 27)
    percentiles: tuple[float, float] = (95.0, 99.0)
    wet_threshold: float = 1.0
    min_wet_days: int = 30
    seed: int = 0
    batch_size: int = 32
    n_map_days: int = 4
    device: str = "auto"

    def __post_init__(self):
        if self.members < 1 or self.batch_size < 1 or self.n_map_days < 0 or self.min_wet_days < 1:
            raise ConfigError("evaluate.members, batch_size and min_wet_days must be >= 1, n_map_days >= 0")
        if not self.splits:
            raise ConfigError(f"evaluate.splits is empty; valid names are {list(EVALUATE_SPLITS)}")
        for name in self.splits:
            if name not in EVALUATE_SPLITS:
                raise ConfigError(f"evaluate.splits: unknown split {name!r}; valid names are {list(EVALUATE_SPLITS)}")
        if len(set(self.splits)) != len(self.splits):
            raise ConfigError(f"evaluate.splits lists a split twice: {list(self.splits)}")
        if not self.checkpoints:
            raise ConfigError("evaluate.checkpoints is empty; give 'best', 'last' and/or paths to .pt files")
        for entry in self.checkpoints:
            if entry not in ("best", "last") and not str(entry).endswith(".pt"):
                raise ConfigError(
                    f"evaluate.checkpoints: {entry!r} is neither 'best', 'last' nor a path to a .pt file"
                )
        if not self.fss_windows or any(int(w) != w or w < 1 for w in self.fss_windows):
            raise ConfigError(f"evaluate.fss_windows must be positive integers, got {list(self.fss_windows)}")
        if len(self.percentiles) != 2 or not 0 < self.percentiles[0] < self.percentiles[1] < 100:
            raise ConfigError(
                f"evaluate.percentiles must be two increasing numbers in (0, 100), got {list(self.percentiles)}"
            )
        if self.device not in DEVICES:
            raise ConfigError(f"evaluate.device {self.device!r}; valid names are {list(DEVICES)}")

    def checkpoint_labels(self) -> tuple[str, ...]:
        """Short names of ``checkpoints``: 'best', 'last', or a path's file stem (made unique)."""
        labels: list[str] = []
        for entry in self.checkpoints:
            label = entry if entry in ("best", "last") else str(entry).replace("\\", "/").rsplit("/", 1)[-1][:-3]
            base, k = label, 2
            while label in labels:
                label, k = f"{base}_{k}", k + 1
            labels.append(label)
        return tuple(labels)

    @classmethod
    def from_dict(cls, data, where="evaluate"):
        return _build(cls, data, where)


# ----------------------------------------------------------------------------- downstream

DOWNSTREAM_LOSSES = ("mae", "quantile")


@dataclass(frozen=True)
class DownstreamConfig:
    """The optional downstream check (see :mod:`precip_cvae.downstream`)."""

    enabled: bool = False
    losses: tuple[str, ...] = ("mae", "quantile")
    quantile: float = 0.9
    seeds: int = 3
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    filters: int = 16
    bootstrap: int = 1000
    device: str = "auto"

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ConfigError(f"downstream.device {self.device!r}; valid names are {list(DEVICES)}")
        for name in self.losses:
            if name not in DOWNSTREAM_LOSSES:
                raise ConfigError(f"unknown downstream loss {name!r}; valid names are {list(DOWNSTREAM_LOSSES)}")
        if not 0 < self.quantile < 1:
            raise ConfigError("downstream.quantile must be in (0, 1)")
        if self.seeds < 1 or self.epochs < 1 or self.bootstrap < 10 or not self.losses:
            raise ConfigError("downstream.seeds and epochs must be >= 1, bootstrap >= 10, losses not empty")

    @classmethod
    def from_dict(cls, data, where="downstream"):
        return _build(cls, data, where)
