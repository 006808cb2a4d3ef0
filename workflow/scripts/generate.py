"""Snakemake script of rule generate: see precip_cvae.generate."""

from precip_cvae import generate
from precip_cvae.config import EventsConfig, GenerateConfig
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "generate"), limit_threads(snakemake.threads):
    out = snakemake.output
    generate.run(
        generate.GeneratePaths(
            checkpoint=snakemake.input.checkpoint,
            dataset=snakemake.input.dataset,
            thresholds=snakemake.input.thresholds,
            events=snakemake.input.events,
            augmented=out.augmented,
            training_set=out.training_set,
            report=out.report,
            report_md=out.report_md,
            netcdf=getattr(out, "netcdf", None),  # declared only when generate.netcdf
            condition_netcdf=getattr(out, "condition_netcdf", None),
        ),
        GenerateConfig.from_dict(snakemake.params.generate),
        EventsConfig.from_dict(snakemake.params.events),
    )
