"""Snakemake script of rule pool_ensembles (kfold_years): see precip_cvae.evaluate.pool.pool_ensembles."""

from precip_cvae.evaluate import pool
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "pool_ensembles"), limit_threads(snakemake.threads):
    pool.pool_ensembles(list(snakemake.input.folds), snakemake.output.ensembles, datasets=list(snakemake.input.datasets))
