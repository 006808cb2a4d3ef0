"""Snakemake script of rule generate: see precip_cvae.generate."""

import os

from precip_cvae import generate
from precip_cvae.config import EventsConfig, GenerateConfig
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "generate"), limit_threads(snakemake.threads):
    generate.run(
        snakemake.input.checkpoint,
        snakemake.input.dataset,
        snakemake.input.thresholds,
        snakemake.input.events,
        GenerateConfig.from_dict(snakemake.params.generate),
        EventsConfig.from_dict(snakemake.params.events),
        out_dir=os.path.dirname(snakemake.output.report),
    )
