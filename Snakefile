# precip-cvae: NetCDF climate data -> conditional VAE -> synthetic heavy-rainfall fields.
# Table of contents: config and its schema, one rules file per stage, and `all`.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/preprocess.smk"
include: "rules/events.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/generate.smk"
include: "rules/downstream.smk"


rule all:
    input:
        expand(
            "results/{run}/{path}",
            run=RUN,
            path=["preprocess/dataset.zarr", "events/thresholds.nc", "events/events.csv"],
        ),
        all_experiment_outputs("train", "best.pt"),
        all_experiment_outputs("evaluate", "summary.md"),
        generated_outputs("generate", "generation_report.json"),
        expand("results/{run}/experiments_comparison.csv", run=RUN),
        expand("results/{run}/experiments_seeds.csv", run=RUN),
        downstream_outputs(),
    default_target: True
