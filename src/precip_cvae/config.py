"""Typed, frozen configuration sections, checked against one schema.

``config.schema.yaml`` (next to this module) is the one source of truth for every key's
type, enum, bounds and default.  The Snakemake workflow validates the whole config
against it (filling in the defaults, rejecting unknown keys); each rule passes only
its own section to its script, which turns that plain dict into one of the
dataclasses below with ``from_dict``.  Each dataclass is a :class:`Section`: whether
built by ``from_dict`` or directly, its values are checked against the section's
sub-schema, so a test that builds ``EvaluateConfig(members=0)`` meets the same error
as a user who writes ``members: 0``.  ``__post_init__`` code holds only what a schema
cannot say (presets, checks across keys).  Package functions receive dataclasses,
never raw dicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Mapping

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong kind."""


# ----------------------------------------------------------------------------- the schema


@lru_cache(maxsize=None)
def schema() -> dict:
    """The workflow's JSON schema (``config.schema.yaml``)."""
    return yaml.load(SCHEMA_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C: 8x faster


def _deref(node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    if not ref.startswith("#/"):
        raise ValueError(f"{SCHEMA_PATH}: only local references are supported, got {ref!r}")
    target: Any = schema()
    for part in ref[2:].split("/"):
        target = target[part]
    return _deref(target)


def schema_node(path: str) -> Mapping[str, Any]:
    """The schema of ``path`` ('train.loss', 'evaluate.splits'), references resolved."""
    node: Mapping[str, Any] = schema()
    for part in path.split("."):
        node = _deref(node["properties"][part])
    return node


def schema_enum(path: str) -> tuple:
    """The allowed values of ``path`` (of its items for an array), ``None`` left out."""
    node = schema_node(path)
    if "items" in node:
        node = _deref(node["items"])
    return tuple(v for v in node["enum"] if v is not None)


@lru_cache(maxsize=None)
def _validator(path: str, key: str) -> jsonschema.protocols.Validator:
    prop = dict(_deref(schema_node(path)["properties"][key]))
    cls = jsonschema.validators.validator_for(schema())
    return cls(prop)


def _plain(value: Any) -> Any:
    """``value`` as JSON data: tuples as lists, paths as strings."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # np.int64(3) is the integer 3
        return value.item()
    return value


def _message(where: str, error: jsonschema.ValidationError, description: str) -> str:
    at = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    if error.validator == "enum":
        names = [v for v in error.validator_value if v is not None]
        null = " or null" if None in error.validator_value else ""
        return f"{at}: unknown name {error.instance!r}; valid names are {names}{null}"
    return f"{at}: {error.message}" + (f" ({description})" if description else "")


class Section:
    """Base of the config dataclasses: one ``from_dict`` and one schema check for all.

    A subclass names its place in the schema (``SCHEMA``, e.g. ``'train.loss'``), the
    keys that hold sections of their own (``NESTED``: key -> class, checked by that
    class), the schema keys it does not take (``WORKFLOW_ONLY``: switches the workflow
    reads, dropped by ``from_dict``) and its fields that are not config keys
    (``INTERNAL``).  It may define ``_resolve`` (presets fill ``None`` fields, before
    the schema check) and ``_check`` (what a schema cannot say, after it).
    """

    SCHEMA: ClassVar[str] = ""
    NESTED: ClassVar[Mapping[str, type]] = {}
    WORKFLOW_ONLY: ClassVar[frozenset] = frozenset()
    INTERNAL: ClassVar[frozenset] = frozenset()

    def __post_init__(self):
        self._resolve()
        self._validate()
        self._check()

    def _resolve(self) -> None:
        pass

    def _check(self) -> None:
        pass

    def _validate(self) -> None:
        props = schema_node(self.SCHEMA)["properties"]
        for f in fields(self):
            if f.name in self.INTERNAL:
                continue
            if f.name in self.NESTED:  # checked by its own class; here only that it is one
                kind, value = self.NESTED[f.name], getattr(self, f.name)
                if not (isinstance(value, kind) or (value is None and f.default is None)
                        or (isinstance(f.default, tuple) and isinstance(value, tuple)
                            and all(isinstance(v, kind) for v in value))):
                    raise ConfigError(f"{self.SCHEMA}.{f.name}: expected a {kind.__name__} section, got {value!r}")
                continue
            error = jsonschema.exceptions.best_match(
                _validator(self.SCHEMA, f.name).iter_errors(_plain(getattr(self, f.name))))
            if error is not None:
                raise ConfigError(_message(f"{self.SCHEMA}.{f.name}", error,
                                           _deref(props[f.name]).get("description", "")))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str | None = None, **internal: Any):
        """The section from plain config data; ``where`` (default ``SCHEMA``) names it in errors;
        ``internal`` sets fields of ``INTERNAL`` (not config keys).

        Raises
        ------
        ConfigError
            An unknown key (the message lists the valid ones), a missing required key,
            or a value the schema or ``_check`` refuses.
        """
        where = where or cls.SCHEMA
        data = {k: v for k, v in dict(data or {}).items() if k not in cls.WORKFLOW_ONLY}
        known = {f.name for f in fields(cls)} - cls.INTERNAL
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING and f.name not in data]
        if required:
            raise ConfigError(f"{where}: needs {required[0]!r}")
        if set(internal) - cls.INTERNAL:
            raise TypeError(f"{cls.__name__}.from_dict: {sorted(set(internal) - cls.INTERNAL)} are not internal fields")
        kwargs = dict(internal)
        for key, value in data.items():
            if key in cls.NESTED:
                kwargs[key] = cls._nested(key, value, f"{where}.{key}")
            elif isinstance(value, list):
                kwargs[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            else:
                kwargs[key] = value
        try:
            return cls(**kwargs)
        except ConfigError as err:
            text = str(err)
            if where != cls.SCHEMA and text.startswith(cls.SCHEMA):
                raise ConfigError(where + text[len(cls.SCHEMA):]) from None
            raise

    @classmethod
    def _nested(cls, key: str, value: Any, where: str) -> Any:
        if isinstance(value, cls.NESTED[key]):
            return value
        return cls.NESTED[key].from_dict(value, where)


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


# the `device` key of train, evaluate, generate and downstream (precip_cvae.resources.select_device)
DEVICES = schema_enum("train.device")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class VariableSource(Section):
    """One input variable: a glob of NetCDF files and the variable name in them.

    ``units`` overrides the file's ``units`` attribute when it is missing or wrong;
    ``precipitation`` marks a predictor that is precipitation (converted to mm/day
    and kept raw as ``coarse_pr`` for mass checks and the interpolation baseline).
    ``condition_transform`` (predictors only): ``log1p`` takes the logarithm of a
    non-negative predictor (in its converted units) before the normalisation, so a
    heavy-tailed field such as precipitation is not dominated by its few largest days.
    """

    SCHEMA = "data.target"  # and each of data.predictors (the same definition)

    paths: str
    variable: str
    units: str | None = None
    precipitation: bool = False
    condition_transform: str = "none"


@dataclass(frozen=True)
class StaticSource(Section):
    """Time-invariant fields (orography, land fraction, ...) for the fine-grid condition.

    ``paths``: a glob of NetCDF files; ``variables``: the names to read (each a
    (lat, lon) field, a length-1 time or level axis is dropped), regridded to the
    target grid by preprocess.
    """

    SCHEMA = "data.static"

    paths: str
    variables: tuple[str, ...]


@dataclass(frozen=True)
class DataConfig(Section):
    SCHEMA = "data"
    NESTED = {"target": VariableSource, "predictors": VariableSource, "static": StaticSource}

    target: VariableSource
    predictors: tuple[VariableSource, ...] = ()
    static: StaticSource | None = None

    def _check(self):
        if self.target.condition_transform != "none":
            raise ConfigError(f"data.target.condition_transform {self.target.condition_transform!r}: only predictors "
                              "take one; the target's transform is preprocess.transform")

    @classmethod
    def _nested(cls, key, value, where):
        if key == "predictors":
            return tuple(VariableSource.from_dict(p, f"{where}[{i}]") for i, p in enumerate(value or []))
        if key == "static" and not value:
            return None
        return super()._nested(key, value, where)


# ----------------------------------------------------------------------------- demo


@dataclass(frozen=True)
class DemoConfig(Section):
    """Sizes and seed of the synthetic demo data set (see :mod:`precip_cvae.demo`)."""

    SCHEMA = "demo"
    WORKFLOW_ONLY = frozenset({"enabled"})  # whether the make_demo_data rule runs

    seed: int = 42
    start_year: int = 2001
    years: int = 10
    nlat: int = 64
    nlon: int = 64
    nclat: int = 16
    nclon: int = 16
    heavy_fraction: float = 0.015
    outdir: str = "data/demo"


# ----------------------------------------------------------------------------- preprocess


def parse_step(text: str, key: str) -> float:
    """Seconds of a time step written as pandas does ('1D', '24h', '6h', '30min', '0h')."""
    import pandas as pd

    try:
        return float(pd.to_timedelta(str(text)).total_seconds())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {text!r} is not a time step (e.g. '1D', '6h', '30min')") from exc
TARGET_TRANSFORMS = schema_enum("preprocess.transform")  # precip_cvae.transform


@dataclass(frozen=True)
class SplitConfig(Section):
    """How days are split by time.

    ``contiguous``: three consecutive blocks with the given fractions (train first).
    ``years``: lists of years; for seasons that span a new year (DJF) the year of a
    day is that of its season's January when ``season_year`` is ``djf``.
    ``dates``: inclusive ``[start, end]`` ISO date or date-time pairs (a date-only end
    includes its whole day; date-times split sub-daily data within a day).
    ``kfold_years``: cross-validation over ``folds`` blocks of consecutive (season) years
    (:func:`precip_cvae.split.fold_blocks`); each fold is its own data set and DAG branch.
    """

    SCHEMA = "preprocess.split"

    method: str = "contiguous"
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    train_years: tuple[int, ...] = ()
    val_years: tuple[int, ...] = ()
    test_years: tuple[int, ...] = ()
    season_year: str = "calendar"
    train_dates: tuple[str, ...] = ()
    val_dates: tuple[str, ...] = ()
    test_dates: tuple[str, ...] = ()
    folds: int = 5

    def _check(self):
        if self.method == "contiguous" and abs(sum(self.fractions) - 1) > 1e-6:
            raise ConfigError(f"preprocess.split.fractions must be three non-negative numbers summing to 1, "
                              f"got {list(self.fractions)}")


@dataclass(frozen=True)
class MinSplitDays(Section):
    """The fewest time steps each split may hold (``preprocess.min_split_days``)."""

    SCHEMA = "preprocess.min_split_days"

    train: int = 30
    val: int = 10
    test: int = 10


@dataclass(frozen=True)
class PreprocessConfig(Section):
    """Checks and normalisation of the raw inputs (see :mod:`precip_cvae.preprocess`).

    ``min_split_days``: fewest steps per split.  ``predictor_missing_policy``: a predictor day
    with more than ``predictor_missing_cells`` of its cells missing is refused, dropped
    (``drop_days``) or filled with the train mean (``fill_climatology``), counted either way.
    ``time_step`` (pandas notation, '1D'): sum a finer target to this step first.
    ``predictor_aggregation`` (mean/min/max/sum): reduce predictors finer than the target over
    each target interval [t + ``aggregation_offset``, t + offset + step); None refuses them.
    """

    SCHEMA = "preprocess"
    NESTED = {"split": SplitConfig, "min_split_days": MinSplitDays}

    split: SplitConfig = field(default_factory=SplitConfig)
    condition_grid: str = "first"
    target_coarse_factor: int = 0
    mask_missing_fraction: float = 0.5
    missing_policy: str = "mask"
    negative_tolerance: float = 0.01
    max_rain_mm_day: float = 2000.0
    time_match: str = "day"
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

    def _check(self):
        if self.time_step is not None and not parse_step(self.time_step, "preprocess.time_step") > 0:
            raise ConfigError(f"preprocess.time_step {self.time_step!r} must be a positive time step")
        if parse_step(self.aggregation_offset, "preprocess.aggregation_offset") < 0:
            raise ConfigError(f"preprocess.aggregation_offset {self.aggregation_offset!r} must not be negative")


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class EventsConfig(Section):
    """Heavy-precipitation thresholds and the heavy-day criterion.

    ``percentile`` of wet days (>= ``wet_threshold`` mm/day) per pixel, train split
    only; pixels with fewer than ``min_wet_days`` wet train days use the pooled
    value (the same percentile over all wet train values of all valid pixels).
    """

    SCHEMA = "events"

    wet_threshold: float = 1.0
    percentile: float = 99.0
    min_wet_days: int = 30
    criterion: str = "exceedance"
    min_exceed_fraction: float = 0.05
    domain_mean_percentile: float = 99.0
    require_train_events: bool = True


# ----------------------------------------------------------------------------- model


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(base_filters=8, d_y=16, d_z=8, depth=2),
    "small": dict(base_filters=32, d_y=128, d_z=32, depth=3),
    "medium": dict(base_filters=64, d_y=256, d_z=64, depth=4),
    "seed": dict(base_filters=96, d_y=384, d_z=96, depth=4),
}


#: ``model.global_latent`` when it is not set, for the map latent with the global context (issue 28, 3 seeds x 5
#: folds on Iberia val: the domain mean's CRPS -0.026 [-0.035, -0.017], pixel scores within their intervals)
DEFAULT_GLOBAL_LATENT = 4


@dataclass(frozen=True)
class ModelConfig(Section):
    """Size, regularisation and structure of the cVAE. ``None`` sizes take the preset's value.

    ``latent``: ``map`` (``latent_channels`` per location at 1 / 2**``latent_level`` of
    the target resolution) or ``vector`` (``d_z`` numbers, the seed's design).
    ``conditioning``: ``fine`` (predictors interpolated to the target grid and stacked
    with the static channels fitted on train) or ``coarse`` (encoded on their own grid,
    the seed's design).  ``condition_interpolation`` (``fine`` only): ``index`` stretches the
    predictor grid over the target grid (bilinear in index space); ``geographic`` samples it at
    each target cell's own latitude and longitude (a rotated-pole or projected target, or a
    predictor domain larger than the target's).  ``noise_channels``: fresh N(0, 1) channels (no KL) fed to every
    decoder scale finer than the map latent's, for small-scale variability between members.  ``decoder_blocks``:
    residual blocks (two 3x3 convolutions each) after the decoder's convolution at every scale finer than the
    bottom, a deeper decoder for few parameters (0: one convolution per scale).  ``global_latent``: latent numbers
    for the whole field beside the map latent (a map latent's prior is factorised over its cells, so members cannot
    differ coherently over the domain without it); ``None`` (the default) takes :data:`DEFAULT_GLOBAL_LATENT`
    with the map latent and the global context, else 0 (issue 28: 4 numbers measured best on Iberia val).
    ``hierarchical_prior`` (with global numbers and the learned prior): the map latent's prior also reads the global
    numbers, ``p(z_map | y, z_global)``, so a member's cells shift together with its global draw (sampling draws
    the global numbers first; the KL of the map is taken given the posterior's global draw).
    ``bg_correlation``
    (Bernoulli-gamma output): the correlation length in cells of the uniforms a sampled field is drawn from
    (0: every pixel independently).  ``context``: ``global`` (the condition vector sees the whole field and
    GroupNorm its statistics) or ``local`` (every value depends on the cells within a bounded distance only:
    the vector pools ``context_cells`` around each cell and the norms are per pixel), which ``train.patch_size``
    and tiled sampling need.
    """

    SCHEMA = "model"

    preset: str = "small"
    base_filters: int | None = None
    d_y: int | None = None
    d_z: int | None = None
    depth: int | None = None
    dropout_encoder: float = 0.0
    dropout_decoder: float = 0.0
    prior: str = "learned"
    latent: str = "map"
    latent_level: int = 1
    latent_channels: int = 8
    conditioning: str = "fine"
    condition_interpolation: str = "index"
    noise_channels: int = 0
    decoder_blocks: int = 0
    global_latent: int | None = None
    hierarchical_prior: bool = False
    residual: bool = False
    bg_correlation: float = 0.0
    context: str = "global"
    context_cells: int = 32

    def _resolve(self):
        for key, value in lookup(MODEL_PRESETS, self.preset, "model preset").items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.global_latent is None:
            fits = self.latent == "map" and self.context == "global"
            object.__setattr__(self, "global_latent", DEFAULT_GLOBAL_LATENT if fits else 0)

    def _check(self):
        if self.latent == "map" and not 1 <= self.latent_level <= self.depth:
            raise ConfigError(f"model.latent_level {self.latent_level} must be in 1..model.depth ({self.depth})")
        if self.global_latent and (self.latent != "map" or self.context != "global"):
            raise ConfigError(f"model.global_latent needs model.latent 'map' and model.context 'global' (got "
                              f"{self.latent!r} and {self.context!r})")
        if self.hierarchical_prior and (not self.global_latent or self.prior != "learned"):
            raise ConfigError(f"model.hierarchical_prior needs model.global_latent > 0 and model.prior 'learned' (got "
                              f"{self.global_latent} and {self.prior!r})")


# ----------------------------------------------------------------------------- loss

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
class LossConfig(Section):
    """Weights of the training loss (see :mod:`precip_cvae.losses`).

    ``L = base*L_rec + ext*MAE_ext + beta(epoch)*KL + mass*L_mass + crps*afCRPS + tail*twCRPS
    + energy*ES + pooled*afCRPS_pooled``, ``L_rec`` by ``reconstruction``; afCRPS_pooled is over the
    block means (mm/day) of ``pooled_sizes`` (cells; 0 is the whole field).  ``None`` fields take the values of ``preset`` (:data:`LOSS_PRESETS`), which
    :class:`TrainConfig` sets to its own ``preset``.
    """

    SCHEMA = "train.loss"
    INTERNAL = frozenset({"preset"})  # set by TrainConfig from train.preset

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
    reconstruction: str = "l1"
    wet_threshold_mm: float = 0.1
    lambda_energy: float = 0.0
    lambda_pooled: float = 0.0
    pooled_sizes: tuple[int, ...] = (4, 8, 0)
    lambda_mean: float = 1.0

    def _resolve(self):
        for key, value in lookup(LOSS_PRESETS, self.preset, "train preset").items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)

    def _check(self):
        if self.uses_ensemble and self.ensemble_members < 2:
            raise ConfigError("train.loss.ensemble_members must be >= 2 when lambda_crps, lambda_tail, "
                              "lambda_energy or lambda_pooled > 0 or reconstruction is 'ensemble_mean'")
        if self.lambda_pooled > 0 and not self.pooled_sizes:
            raise ConfigError("train.loss.pooled_sizes must name at least one block size when lambda_pooled > 0")

    @property
    def uses_ensemble(self) -> bool:
        """Whether a term of the loss scores prior members."""
        return (self.lambda_crps > 0 or self.lambda_tail > 0 or self.lambda_energy > 0 or self.lambda_pooled > 0
                or self.reconstruction == "ensemble_mean")

    @property
    def n_prior(self) -> int:
        """Prior members decoded per training step (0 when no ensemble term is on)."""
        return int(self.ensemble_members) if self.uses_ensemble else 0

    @property
    def model_output(self) -> str:
        """What the decoder gives for this loss: the law's parameters for 'bernoulli_gamma', else the field."""
        return "bernoulli_gamma" if self.reconstruction == "bernoulli_gamma" else "field"

    @classmethod
    def from_dict(cls, data, where=None, preset: str = "default"):
        where = where or cls.SCHEMA
        data = dict(data or {})
        if "preset" in data:
            if data["preset"] != preset:
                raise ConfigError(f"{where}.preset: set train.preset instead (got {data['preset']!r})")
            del data["preset"]
        return super().from_dict(data, where, preset=preset)


# ----------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimisation, validation, early stopping, sampling and augmentation.

    ``preset`` (:data:`TRAIN_PRESETS`) gives the values of the ``None`` fields here and
    in ``loss``: ``default`` or ``seed`` (the original system's final setting).
    """

    SCHEMA = "train"
    NESTED = {"loss": LossConfig}

    preset: str = "default"
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    scheduler: str = "none"
    ema_decay: float = 0.0
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
    nodes: int = 1
    num_threads: int = 0
    in_memory: str | bool = "auto"
    memory_budget_gb: float = 4.0
    loader_workers: int = 2
    shuffle_buffer_days: int = 512
    patch_size: tuple[int, int] | None = None
    patch_min_valid: float = 0.5
    loss: LossConfig | None = None

    def _resolve(self):
        for key, value in lookup(TRAIN_PRESETS, self.preset, "train preset").items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.loss is None:
            object.__setattr__(self, "loss", LossConfig(preset=self.preset))

    def _check(self):
        if self.loss.preset != self.preset:
            raise ConfigError(f"train.loss was resolved with preset {self.loss.preset!r} but train.preset is "
                              f"{self.preset!r}; build the loss with LossConfig(preset={self.preset!r}, ...)")

    @classmethod
    def from_dict(cls, data, where=None):
        where = where or cls.SCHEMA
        data = dict(data or {})
        preset = data.get("preset", "default")
        lookup(TRAIN_PRESETS, preset, "train preset")
        data["loss"] = LossConfig.from_dict(data.get("loss"), f"{where}.loss", preset=preset)
        return super().from_dict(data, where)


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
class GenerateConfig(Section):
    """Synthetic samples for heavy-event days (see :mod:`precip_cvae.generate`)."""

    SCHEMA = "generate"

    checkpoint: str = "best"
    splits: tuple[str, ...] = ("train",)
    members: int = 10
    z_scale: float = 1.0
    filter_heavy: bool = True
    max_rounds: int = 10
    seed: int = 0
    batch_days: int = 16
    synthetic_weight: float = 1.0
    netcdf: bool = False
    memorisation_warn_fraction: float = 0.05
    memorisation_max_reference: int = 5000
    memorisation_max_samples: int = 5000
    experiments: tuple[str, ...] = ()
    device: str = "auto"
    inference_memory_gb: float = 2.0
    calibrate: str = "none"


# ----------------------------------------------------------------------------- evaluate

EVALUATE_SPLITS = schema_enum("evaluate.splits")
# keys of the evaluate section that the sampling rule depends on (a change resamples);
# the other keys only change the scores and plots, recomputed from the cached ensembles
EVALUATE_SAMPLING_KEYS = ("members", "splits", "checkpoints", "baselines", "seed", "batch_size", "device", "calibrate")


@dataclass(frozen=True)
class BootstrapConfig(Section):
    """Intervals of the headline scores (``evaluate.bootstrap``): a paired bootstrap over days or whole
    seasons (:mod:`precip_cvae.evaluate.intervals`)."""

    SCHEMA = "evaluate.bootstrap"

    samples: int = 1000
    block: str = "day"
    confidence: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """Evaluation of the cVAE checkpoints and the baselines (see :mod:`precip_cvae.evaluate`).

    ``checkpoints`` holds ``best`` / ``last`` (the experiment's own) and/or paths to
    other ``.pt`` files; ``baselines`` are names in
    :data:`precip_cvae.baselines.BASELINES` (checked by the stage, which lists the
    valid ones).  ``percentiles`` are the (moderate, extreme) wet-day percentiles of
    the train split that define the local tail thresholds (P95, P99 by default);
    metric names carry them (``twcrps_p99``).
    """

    SCHEMA = "evaluate"
    NESTED = {"bootstrap": BootstrapConfig}

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
    inference_memory_gb: float = 2.0
    calibrate: str = "none"
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)

    def _check(self):
        if not self.percentiles[0] < self.percentiles[1]:
            raise ConfigError(f"evaluate.percentiles must be two increasing numbers in (0, 100), "
                              f"got {list(self.percentiles)}")

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


# ----------------------------------------------------------------------------- downstream

@dataclass(frozen=True)
class DownstreamConfig(Section):
    """The optional downstream check (see :mod:`precip_cvae.downstream`)."""

    SCHEMA = "downstream"

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
