# precip-cvae: NetCDF climate data -> conditional VAE -> synthetic heavy-rainfall fields.
# Table of contents: config and its schema, one rules file per stage, and `all`.

from snakemake.utils import min_version, validate

from precip_cvae.config import SCHEMA_PATH
from precip_cvae.provenance import canonicalise_config

min_version("9.0")


# config/config.yaml (the demo) is the config when none is given. A config given with --configfile is
# the whole story: keys it leaves out take the schema's defaults, nothing comes from the demo config.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"



validate(config, str(SCHEMA_PATH))  # src/precip_cvae/config.schema.yaml; fills in the defaults
canonicalise_config(config)  # keys sorted: key order and spelled-out defaults rerun nothing


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
        fold_outputs("preprocess", "dataset.zarr"),
        fold_outputs("events", "thresholds.nc"),
        fold_outputs("events", "events.csv"),
        fold_experiment_outputs("train", "best.pt"),
        all_experiment_outputs("evaluate", "summary.md"),
        generated_outputs("generate", "generation_report.json"),
        generated_outputs("generate", "generated_maps.png"),
        expand("results/{run}/experiments_comparison.csv", run=RUN),
        expand("results/{run}/experiments_seeds.csv", run=RUN),
        downstream_outputs(),
    default_target: True
