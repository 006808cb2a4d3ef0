"""Snakemake script of rule evaluate: scores (precip_cvae.evaluate.run), then figures (precip_cvae.plots)."""

from pathlib import Path

from precip_cvae import evaluate, plots
from precip_cvae.config import EvaluateConfig
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "evaluate"), limit_threads(snakemake.threads):
    cfg = EvaluateConfig.from_dict(snakemake.params.evaluate)
    paths = evaluate.ScorePaths(
        ensembles=snakemake.input.ensembles,
        dataset=snakemake.input.dataset,
        train_log=snakemake.input.train_log,
        out_dir=str(Path(snakemake.output.metrics_csv).parent),
    )
    result = evaluate.run(paths, cfg, experiment=snakemake.wildcards.experiment)
    plots.write_figures(result, paths, cfg)
