"""Snakemake script of rule sample_ensembles: see precip_cvae.evaluate.sample.sample_ensembles."""

from precip_cvae.config import EvaluateConfig
from precip_cvae.evaluate import sample
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "sample_ensembles"), limit_threads(snakemake.threads):
    cfg = EvaluateConfig.from_dict(snakemake.params.evaluate)
    paths = sample.SamplePaths(
        dataset=snakemake.input.dataset,
        thresholds=snakemake.input.thresholds,
        events=snakemake.input.events,
        checkpoints=dict(zip(cfg.checkpoint_labels(), snakemake.input.checkpoints)),
        out=snakemake.output.ensembles,
    )
    sample.sample_ensembles(paths, cfg, threads=snakemake.threads, experiment=snakemake.wildcards.experiment)
