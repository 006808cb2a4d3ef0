"""Snakemake script of rule compare_experiments: see precip_cvae.evaluate.compare_experiments."""

from precip_cvae import evaluate, plots
from precip_cvae.config import EvaluateConfig
from precip_cvae.logs import stage_logging

with stage_logging(snakemake.log[0], "compare_experiments"):
    cfg = EvaluateConfig.from_dict(snakemake.params.evaluate)
    table = evaluate.compare_experiments(
        dict(zip(snakemake.params.experiments, snakemake.input.metrics)), cfg, out_csv=snakemake.output.table,
        settings=snakemake.params.settings, seeds_csv=snakemake.output.seeds,
    )
    plots.write_comparison(table, cfg, out_png=snakemake.output.figure)
