"""Snakemake script of rule generated_maps: see precip_cvae.plots.write_generated_maps."""

from precip_cvae import plots
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "generated_maps"), limit_threads(snakemake.threads):
    plots.write_generated_maps(snakemake.input.augmented, snakemake.input.dataset, snakemake.output.maps,
                               n_days=snakemake.params.n_days, splits=snakemake.params.splits)
