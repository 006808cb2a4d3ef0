"""Snakemake script of rule train_cvae: see precip_cvae.train."""

import sys

from precip_cvae import train
from precip_cvae.config import ModelConfig, TrainConfig
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "train_cvae"), limit_threads(snakemake.threads):
    paths = train.TrainPaths(
        dataset=snakemake.input.dataset,
        thresholds=snakemake.input.thresholds,
        events=snakemake.input.events,
        best=snakemake.output.best,
        last=snakemake.output.last,
        log_csv=snakemake.output.log_csv,
        resume_dir=snakemake.params.resume_dir,
    )
    try:
        train.run(paths, ModelConfig.from_dict(snakemake.params.model), TrainConfig.from_dict(snakemake.params.train),
                  threads=snakemake.threads, experiment=snakemake.wildcards.experiment)
    except train.TrainingInterrupted as exc:
        sys.exit(128 + exc.signum)  # non-zero: the scheduler's retry resumes
