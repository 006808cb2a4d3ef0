"""Names shared by the evaluate modules: sources, metric tables and the headline scores."""

from __future__ import annotations

from typing import Mapping

from ..config import EvaluateConfig

CVAE = "cvae"
TRUTH = "truth"
NO_CHECKPOINT = "-"
METRIC_COLUMNS = ["model", "checkpoint", "split", "subset", "metric", "value"]
SUBSETS = ("all", "heavy")
#: key -> file name of every output of the evaluate rule (the rule's output keys; rules/evaluate.smk)
EVALUATE_OUTPUT_FILES = {
    "metrics_csv": "metrics.csv",
    "metrics_json": "metrics.json",
    "headline": "headline.csv",
    "summary": "summary.md",
    "training_curves": "training_curves.png",
    "maps": "maps.png",
    "tail_qq": "tail_qq.png",
    "rank_histogram": "rank_histogram.png",
    "rapsd": "rapsd.png",
    "fss_scale": "fss_scale.png",
    "indices": "indices.csv",
    "return_levels": "return_levels.csv",
    "index_bias": "index_bias.png",
    "day_components": "day_components.npz",
}


def cvae_source(label: str) -> str:
    """Cache group / source name of a checkpoint label: 'best' -> 'cvae_best'."""
    return f"{CVAE}_{label}"


def model_and_checkpoint(source: str) -> tuple[str, str]:
    """('cvae', 'best') for 'cvae_best'; ('analogs', '-') for a baseline."""
    if source.startswith(CVAE + "_"):
        return CVAE, source[len(CVAE) + 1:]
    return source, NO_CHECKPOINT


def source_label(source: str) -> str:
    """Display name: 'cVAE (best)', 'analogs'."""
    model, ckpt = model_and_checkpoint(source)
    return f"cVAE ({ckpt})" if model == CVAE else model


def percentile_names(cfg: EvaluateConfig) -> tuple[str, str]:
    """Metric-name tags of the two percentiles: ('p95', 'p99')."""
    return tuple(f"p{p:g}" for p in cfg.percentiles)  # type: ignore[return-value]


def headline_window(cfg: EvaluateConfig) -> int:
    """The FSS window of the headline table: the middle of ``fss_windows`` (upper middle if even)."""
    windows = sorted(int(w) for w in cfg.fss_windows)
    return windows[len(windows) // 2]


def headline_metrics(cfg: EvaluateConfig) -> list[tuple[str, str, str]]:
    """(metric, label, better) of the headline table, in order; better is 'lower', 'higher' or 'one'.

    The proper tail scores come first; ``mae_tail`` sits right after the frequency
    bias, never alone (forecaster's dilemma).
    """
    hi = percentile_names(cfg)[1]
    w = headline_window(cfg)
    up = hi.upper()
    return [
        ("crps", "CRPS", "lower"),
        (f"twcrps_{hi}", f"twCRPS {up}", "lower"),
        (f"fss_{hi}_w{w}", f"FSS {up} ({w} px)", "higher"),
        (f"freq_bias_{hi}", f"freq. bias {up}", "one"),
        (f"mae_tail_{hi}", f"MAE_tail {up} (improper)", "lower"),
        (f"csi_{hi}", f"CSI {up}", "higher"),
        ("spread_skill", "spread/skill", "one"),
    ]


#: (metric, label, better) of the domain-mean scores: unconditional, whatever the day turned out to be
AREAL_METRICS = [
    ("crps_field", "CRPS of the domain mean", "lower"),
    ("spread_skill_field", "spread/skill of the domain mean", "one"),
]


def headline_split(meta: Mapping) -> str:
    """'test' when evaluated, else the last evaluated split."""
    return "test" if "test" in meta["splits"] else meta["splits"][-1]
