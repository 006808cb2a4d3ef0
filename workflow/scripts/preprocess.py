"""Snakemake script of rule preprocess: see precip_cvae.preprocess."""

from precip_cvae import preprocess
from precip_cvae.config import DataConfig, PreprocessConfig
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "preprocess"), limit_threads(snakemake.threads):
    preprocess.run(
        DataConfig.from_dict(snakemake.params.data),
        PreprocessConfig.from_dict(snakemake.params.preprocess),
        out=snakemake.output.dataset,
        fold=snakemake.params.fold,
    )
