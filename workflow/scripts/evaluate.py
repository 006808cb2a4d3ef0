"""Snakemake script of rule evaluate: scores (precip_cvae.evaluate.report.run), then figures (precip_cvae.plots)."""

from precip_cvae import plots
from precip_cvae.config import EvaluateConfig
from precip_cvae.evaluate import report
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "evaluate"), limit_threads(snakemake.threads):
    cfg = EvaluateConfig.from_dict(snakemake.params.evaluate)
    paths = report.ScorePaths(
        ensembles=snakemake.input.ensembles,
        dataset=report.one_or_list(snakemake.input.dataset),
        train_log=report.one_or_list(snakemake.input.train_log),
        outputs={key: snakemake.output[key] for key in report.OUTPUT_FILES},
    )
    result = report.run(paths, cfg, experiment=snakemake.wildcards.experiment,
                        generated=snakemake.params.generated or None)
    plots.write_figures(result, paths, cfg)
