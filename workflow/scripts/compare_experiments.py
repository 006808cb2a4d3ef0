"""Snakemake script of rule compare_experiments: see precip_cvae.evaluate.compare.compare_experiments and precip_cvae.sweep."""

from precip_cvae import io, plots, sweep
from precip_cvae.config import EvaluateConfig
from precip_cvae.evaluate import compare
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "compare_experiments"), limit_threads(snakemake.threads):
    cfg = EvaluateConfig.from_dict(snakemake.params.evaluate)
    table = compare.compare_experiments(
        dict(zip(snakemake.params.experiments, snakemake.input.metrics)), cfg, out_csv=snakemake.output.table,
        settings=snakemake.params.settings, seeds_csv=snakemake.output.seeds,
        components=dict(zip(snakemake.params.experiments, snakemake.input.components)),
        differences_csv=snakemake.output.differences,
    )
    plots.write_comparison(table, cfg, out_png=snakemake.output.figure)
    seeds = io.read_csv(snakemake.output.seeds, dtype={"checkpoint": str})
    sweep.write_seeds_figure(seeds, cfg, out_png=snakemake.output.seeds_figure)
