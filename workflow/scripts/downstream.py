"""Snakemake script of rule downstream: see precip_cvae.downstream."""

from precip_cvae import downstream, plots
from precip_cvae.config import DownstreamConfig
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "downstream"), limit_threads(snakemake.threads):
    cfg = DownstreamConfig.from_dict(snakemake.params.downstream)
    table = downstream.run(snakemake.input.dataset, snakemake.input.thresholds, snakemake.input.events,
                           snakemake.input.training_set, cfg, snakemake.output.comparison)
    plots.write_downstream(table, snakemake.output.plot)
