"""Helpers for the rules: path builders and input functions (no logic of the workflow)."""

import glob
import os
import re

from precip_cvae.config import experiment_names, experiment_sections, experiment_setting, generated_experiments
from precip_cvae.evaluate.names import EVALUATE_OUTPUT_FILES
from precip_cvae.provenance import script_fingerprint
from precip_cvae.split import fold_index, fold_name

RUN = config["run"]
# preprocess.split.method kfold_years: every fold is a run of its own below results/<run>/fold<k>/
# (preprocess, events, train, sample_ensembles), and results/<run>/ holds the pooled evaluation.
KFOLD = config["preprocess"]["split"]["method"] == "kfold_years"
FOLD_RUNS = [f"{RUN}/{fold_name(k)}" for k in range(config["preprocess"]["split"]["folds"])] if KFOLD else [RUN]
FOLD_RUN_PATTERN = f"{re.escape(RUN)}/fold[0-9]+"


wildcard_constraints:
    run=re.escape(RUN) + ("(/fold[0-9]+)?" if KFOLD else ""),


# The layout of results/, defined here once: results/<run>/<stage...> for a run (or a fold run
# <run>/fold<k>), results/<run>/experiments/<experiment>/<stage...> for an experiment of it. <run> and
# <experiment> may be wildcards ("{run}") or names.
def results_path(run, *parts):
    """results/<run>/<parts...>"""
    return os.path.join("results", run, *parts)


def experiment_path(run, experiment, *parts):
    """results/<run>/experiments/<experiment>/<parts...>"""
    return results_path(run, "experiments", experiment, *parts)


def run_dir(*parts):
    """results/{run}/<parts...> (the run wildcard)"""
    return results_path("{run}", *parts)


def log_path(name):
    return run_dir("logs", f"{name}.log")


def benchmark_path(name):
    return run_dir("benchmarks", f"{name}.tsv")


def raw_inputs(wildcards):
    """The NetCDF files preprocess reads, or the demo directory that will hold them."""
    if config["demo"]["enabled"]:
        return {"demo": config["demo"]["outdir"]}
    sources = [config["data"]["target"], *config["data"]["predictors"]]
    files = sorted({f for source in sources for f in glob.glob(source["paths"])})
    return {"files": files}


def run_fold(wildcards):
    """The fold of the wildcard's run (None for the run itself)."""
    return fold_index(wildcards.run)


def pooled(wildcards):
    """True for the pooled run of a kfold_years config (results/<run>/, scored over every fold)."""
    return KFOLD and wildcards.run == RUN


def per_fold(*parts):
    """results/<fold run>/<parts...> of every fold of the pooled run (the run itself without kfold)."""
    def paths(wildcards):
        names = {"experiment": getattr(wildcards, "experiment", "")}
        return [results_path(r, *parts).format(**names) for r in FOLD_RUNS]

    return paths


def fold_outputs(*parts):
    """results/<run or each fold run>/<parts...>: the stages that run once per fold."""
    return expand(run_dir(*parts), run=FOLD_RUNS)


def script_code(script):
    """Fingerprint of the package code that ``workflow/scripts/<script>.py`` imports (rerun trigger)."""
    return script_fingerprint(os.path.join(workflow.basedir, "workflow", "scripts", f"{script}.py"))


EXPERIMENTS = experiment_names(config)  # <setting>_seed<N> when experiment_seeds is set
GENERATED = generated_experiments(config)  # those generate and downstream run for


wildcard_constraints:
    experiment="|".join(re.escape(e) for e in EXPERIMENTS),


def exp_dir(*parts):
    """results/{run}/experiments/{experiment}/<parts...> (the wildcards)"""
    return experiment_path("{run}", "{experiment}", *parts)


def experiment_model(wildcards):
    """The model section of an experiment (run's model section + its overrides)."""
    return experiment_sections(config, wildcards.experiment)[0]


def experiment_train(wildcards):
    """The train section of an experiment (run's train section + its overrides)."""
    return experiment_sections(config, wildcards.experiment)[1]


def experiment_gpus(wildcards):
    """The job's GPUs (sbatch --gpus counts them over all its nodes): train.gpus on each of train.nodes."""
    train = experiment_train(wildcards)
    return int(train.get("gpus", 1)) * int(train.get("nodes", 1))


def experiment_nodes(wildcards):
    return int(experiment_train(wildcards).get("nodes", 1))


def device_gpus(section):
    """The gpu resource of generate and downstream (1 unless the section's device is cpu; auto uses one when given)."""
    return 0 if config[section]["device"] == "cpu" else 1


def train_resume_dir(wildcards):
    """Resume state of train_cvae: not a declared output, so it survives a failed job."""
    return experiment_path(wildcards.run, wildcards.experiment, "train_resume")


def all_experiment_outputs(*parts):
    """results/<run>/experiments/<experiment>/<parts...>: the pooled outputs under kfold_years."""
    return expand(experiment_path(RUN, "{experiment}", *parts), experiment=EXPERIMENTS)


def fold_experiment_outputs(*parts):
    """Per-fold outputs of every experiment (train): results/<fold run>/experiments/<experiment>/<parts...>."""
    return expand(experiment_path("{run}", "{experiment}", *parts), run=FOLD_RUNS, experiment=EXPERIMENTS)


def generated_outputs(*parts):
    """Outputs of generate/downstream: only the experiments in generate.experiments (all when empty); under
    kfold_years from the first fold's model (its train years are most of the record)."""
    return expand(experiment_path(FOLD_RUNS[0], "{experiment}", *parts), experiment=GENERATED)


def generated_link(wildcards):
    """The generate stage's folder of the experiment relative to its evaluate folder ("" when it is not generated)."""
    if wildcards.experiment not in GENERATED:
        return ""
    here = experiment_path(wildcards.run, wildcards.experiment, "evaluate")
    return os.path.relpath(experiment_path(FOLD_RUNS[0], wildcards.experiment, "generate"), here)


def evaluate_dataset(wildcards):
    """The data set(s) evaluate fits its tail thresholds on: one per fold for the pooled kfold run."""
    if pooled(wildcards):
        return per_fold("preprocess", "dataset.zarr")(wildcards)
    return results_path(wildcards.run, "preprocess", "dataset.zarr")


def evaluate_train_log(wildcards):
    """train_log.csv of the experiment: one per fold for the pooled kfold run."""
    if pooled(wildcards):
        return per_fold("experiments", "{experiment}", "train", "train_log.csv")(wildcards)
    return experiment_path(wildcards.run, wildcards.experiment, "train", "train_log.csv")


def experiment_settings():
    """experiment -> [setting, seed] (seed None without experiment_seeds), for compare_experiments."""
    return {e: list(experiment_setting(config, e)) for e in EXPERIMENTS}


def generate_section():
    """The generate section without its experiment selection (choosing experiments reruns nothing)."""
    return {k: v for k, v in config["generate"].items() if k != "experiments"}


def generate_netcdf_outputs():
    """The NetCDF copies of the samples and their conditions, when generate.netcdf."""
    if not config["generate"]["netcdf"]:
        return {}
    return {"netcdf": exp_dir("generate", "augmented.nc"), "condition_netcdf": exp_dir("generate", "augmented_condition.nc")}


def generate_checkpoint(wildcards):
    """The checkpoint generate samples from: best.pt or last.pt of the experiment."""
    name = config["generate"]["checkpoint"] + ".pt"
    return experiment_path(wildcards.run, wildcards.experiment, "train", name)


# ----------------------------------------------------------------------------- evaluate

# The evaluate rule's outputs: every file of precip_cvae.evaluate.names.EVALUATE_OUTPUT_FILES (the one place
# their names are defined), those below also in the report (caption in workflow/report/, figure label)
EVALUATE_REPORTED = {
    "headline": ("headline.rst", "headline scores (table)"),
    "summary": ("summary.rst", "summary (markdown)"),
    "training_curves": ("training_curves.rst", "training curves"),
    "maps": ("maps.rst", "maps of the heaviest days"),
    "tail_qq": ("tail_qq.rst", "tail Q-Q"),
    "rank_histogram": ("rank_histogram.rst", "rank histograms"),
    "rapsd": ("rapsd.rst", "RAPSD"),
    "fss_scale": ("fss_scale.rst", "FSS against scale"),
    "indices": ("indices.rst", "climate indices (table)"),
    "index_bias": ("indices.rst", "climate-index bias maps"),
}


def evaluate_outputs():
    """key -> path (a report() item where EVALUATE_REPORTED names it), for the evaluate rule's output."""
    out = {}
    for key, name in EVALUATE_OUTPUT_FILES.items():
        path = exp_dir("evaluate", name)
        if key in EVALUATE_REPORTED:
            caption, label = EVALUATE_REPORTED[key]
            path = report(path, caption=f"../workflow/report/{caption}", category="Evaluation",
                          subcategory="{experiment}", labels={"experiment": "{experiment}", "figure": label})
        out[key] = path
    return out


EVALUATE = config.get("evaluate") or {}


def evaluate_section(part):
    """The evaluate keys that sampling depends on (part="sampling": EVALUATE_SAMPLING_KEYS) or scoring (the rest)."""
    from precip_cvae.config import EVALUATE_SAMPLING_KEYS

    sampling = part == "sampling"
    return {k: v for k, v in EVALUATE.items() if (k in EVALUATE_SAMPLING_KEYS) == sampling}


def evaluate_checkpoints(wildcards):
    """The checkpoints evaluate samples, in config order: the experiment's best.pt / last.pt, or paths as given."""
    from precip_cvae.config import EvaluateConfig

    train_dir = experiment_path(wildcards.run, wildcards.experiment, "train")
    entries = EvaluateConfig.from_dict(EVALUATE).checkpoints
    return [os.path.join(train_dir, f"{e}.pt") if e in ("best", "last") else e for e in entries]


def downstream_outputs():
    """The downstream comparison of every experiment when downstream.enabled, else nothing."""
    if not config["downstream"]["enabled"]:
        return []
    return generated_outputs("downstream", "comparison.csv")
