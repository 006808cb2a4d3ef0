"""The whole workflow on the tiny config, run by snakemake in a temporary directory."""

from __future__ import annotations

import re
import subprocess

import pandas as pd
import pytest
import xarray as xr

from conftest import snakemake

pytestmark = pytest.mark.workflow


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Parse the 'Job stats' table of a dry run into {rule: count}."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("\n\n")[0]  # the table ends at the first blank line
    jobs = {}
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def test_tiny_workflow_writes_every_stage(tiny_run):
    res = tiny_run / "results" / "tiny"
    ds = xr.open_zarr(res / "preprocess" / "dataset.zarr")
    assert ds.sizes["lat"] == 32 and list(ds["channel"].values) == ["psl", "hus850", "pr_block4"]
    assert (res / "events" / "events.csv").stat().st_size > 0
    assert (res / "events" / "thresholds.nc").exists()
    for name in ("preprocess", "detect_events"):
        log = (res / "logs" / f"{name}.log").read_text()
        assert f"stage {name} finished" in log
    assert (res / "benchmarks" / "preprocess.tsv").exists()
    assert "heavy days of" in (res / "logs" / "detect_events.log").read_text()
    exp = res / "experiments" / "default"
    for name in ("best.pt", "last.pt", "train_log.csv"):
        assert (exp / "train" / name).exists(), name
    assert "epoch   2/2" in (exp / "logs" / "train_cvae.log").read_text()
    aug = xr.open_zarr(exp / "generate" / "augmented.zarr")
    assert int(aug["n_realizations"].sum()) > 0 and aug["pr"].attrs["units"] == "mm day-1"
    assert (exp / "generate" / "augmented_training_set.zarr").exists()
    assert (exp / "generate" / "generated_maps.png").stat().st_size > 10_000
    summary = (exp / "evaluate" / "summary.md").read_text()  # shows the generated samples, by a working link
    link = re.search(r"!\[generated samples\]\((.+)\)", summary).group(1)
    assert (exp / "evaluate" / link).resolve() == (exp / "generate" / "generated_maps.png").resolve()
    table = pd.read_csv(exp / "downstream" / "comparison.csv")
    assert set(table["training_set"]) == {"real", "augmented", "augmented_minus_real"}
    assert set(table["loss"]) == {"mae", "quantile"} and (exp / "downstream" / "comparison.png").exists()


def test_second_dry_run_does_nothing(tiny_run):
    proc = snakemake(tiny_run, "-n", "--configfile", "config/tiny.yaml")
    assert planned_jobs(proc) == {}, proc.stdout


def test_events_change_reruns_detect_events_and_what_follows_never_preprocess(tiny_run):
    text = (tiny_run / "config" / "tiny.yaml").read_text()
    changed = tiny_run / "config" / "tiny_p95.yaml"
    changed.write_text(re.sub(r"percentile: 99.0", "percentile: 95.0", text))
    proc = snakemake(tiny_run, "-n", "--configfile", str(changed))
    expected = ("detect_events", "train_cvae", "sample_ensembles", "evaluate", "compare_experiments", "generate",
                "generated_maps", "downstream", "all")
    assert planned_jobs(proc) == {name: 1 for name in expected}


def test_preprocess_change_reruns_preprocess_and_what_follows(tiny_run):
    text = (tiny_run / "config" / "tiny.yaml").read_text()
    changed = tiny_run / "config" / "tiny_chunks.yaml"
    changed.write_text(text.replace("chunk_time: 64", "chunk_time: 32"))
    jobs = planned_jobs(snakemake(tiny_run, "-n", "--configfile", str(changed)))
    assert jobs.get("preprocess") == 1 and jobs.get("detect_events") == 1 and "make_demo_data" not in jobs


def _variant(tiny_run, name, old, new):
    text = (tiny_run / "config" / "tiny.yaml").read_text()
    assert old in text
    path = tiny_run / "config" / f"{name}.yaml"
    path.write_text(text.replace(old, new))
    return str(path)


def test_train_change_reruns_only_training_and_what_follows(tiny_run):
    changed = _variant(tiny_run, "lr", "lr: 1.0e-3", "lr: 5.0e-4")
    jobs = planned_jobs(snakemake(tiny_run, "-n", "--configfile", changed))
    assert "preprocess" not in jobs and "detect_events" not in jobs and "make_demo_data" not in jobs
    assert jobs.get("train_cvae") == 1 and jobs.get("generate") == 1 and jobs.get("downstream") == 1


def test_a_new_experiment_shares_preprocessing_and_events(tiny_run):
    text = (tiny_run / "config" / "tiny.yaml").read_text()
    path = tiny_run / "config" / "two_experiments.yaml"
    path.write_text(text + "\nexperiments:\n  default: {}\n  no_ext: {train: {loss: {lambda_ext: 0.0}}}\n")
    jobs = planned_jobs(snakemake(tiny_run, "-n", "--configfile", str(path)))
    # only the new experiment's jobs: the default experiment and the shared stages are up to date
    expected = ("train_cvae", "sample_ensembles", "evaluate", "compare_experiments", "generate", "generated_maps",
                "downstream", "all")
    assert jobs == {name: 1 for name in expected}, jobs
    # the new experiment's training, run: it reads the shared stages' outputs and reruns neither
    proc = snakemake(tiny_run, "results/tiny/experiments/no_ext/train/best.pt", "--configfile", str(path))
    assert planned_jobs(proc) == {"train_cvae": 1}, proc.stdout
    exp = tiny_run / "results" / "tiny" / "experiments"
    assert (exp / "no_ext" / "train" / "best.pt").exists() and (exp / "default" / "train" / "best.pt").exists()
    # what is left is the new experiment's later stages
    left = planned_jobs(snakemake(tiny_run, "-n", "--configfile", str(path)))
    assert left == {name: 1 for name in expected if name != "train_cvae"}, left


def test_experiment_seeds_plan_one_training_per_seed_and_generate_only_the_chosen(tiny_run):
    text = (tiny_run / "config" / "tiny.yaml").read_text()
    path = tiny_run / "config" / "seeds.yaml"
    path.write_text(text + "\nexperiment_seeds: [0, 1, 2]\nexperiments:\n  default: {}\n"
                    "  no_ext: {train: {loss: {lambda_ext: 0.0}}}\n")
    chosen = tiny_run / "config" / "seeds_chosen.yaml"
    import yaml

    cfg = yaml.safe_load(path.read_text())
    cfg["generate"] = {**cfg.get("generate", {}), "experiments": ["no_ext_seed1"]}  # the rest of generate kept
    chosen.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(tiny_run, "-n", "--configfile", str(chosen)))
    assert jobs["train_cvae"] == 6 and jobs["sample_ensembles"] == 6 and jobs["evaluate"] == 6
    assert jobs["generate"] == 1 and jobs["downstream"] == 1 and "preprocess" not in jobs
    out = snakemake(tiny_run, "-n", "--configfile", str(chosen)).stdout
    assert "experiments/no_ext_seed1/generate/generation_report.json" in out
    # every setting with a seed: 2 settings x 3 seeds generate when no experiment is chosen
    assert planned_jobs(snakemake(tiny_run, "-n", "--configfile", str(path)))["generate"] == 6


def test_choosing_experiments_to_generate_reruns_nothing(tiny_run):
    import yaml

    cfg = yaml.safe_load((tiny_run / "config" / "tiny.yaml").read_text())
    cfg["generate"] = {**cfg.get("generate", {}), "experiments": ["default"]}
    path = tiny_run / "config" / "generate_default.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # the same plan as the unchanged config (other tests may have left the comparison stale): no generate
    plain = planned_jobs(snakemake(tiny_run, "-n", "--configfile", "config/tiny.yaml"))
    chosen = planned_jobs(snakemake(tiny_run, "-n", "--configfile", str(path)))
    assert chosen == plain and "generate" not in chosen and "train_cvae" not in chosen


def test_key_order_and_spelled_out_defaults_rerun_nothing(tiny_run):
    import yaml

    cfg = yaml.safe_load((tiny_run / "config" / "tiny.yaml").read_text())
    sorted_path = tiny_run / "config" / "tiny_sorted.yaml"
    sorted_path.write_text(yaml.safe_dump(cfg, sort_keys=True))  # every key in another order
    assert sorted_path.read_text().splitlines()[0].startswith("data:")
    explicit = dict(cfg, events={**cfg["events"], "wet_threshold": 1.0, "criterion": "exceedance"})  # defaults
    explicit_path = tiny_run / "config" / "tiny_explicit.yaml"
    explicit_path.write_text(yaml.safe_dump(explicit, sort_keys=False))
    # the same plan as the unchanged config (other tests may have left the comparison stale)
    plain = planned_jobs(snakemake(tiny_run, "-n", "--configfile", "config/tiny.yaml"))
    for path in (sorted_path, explicit_path):
        jobs = planned_jobs(snakemake(tiny_run, "-n", "--configfile", str(path)))
        assert jobs == plain and "make_demo_data" not in jobs and "preprocess" not in jobs, (path.name, jobs)


def test_a_given_config_is_the_whole_story(tiny_run):
    """Nothing leaks from config/config.yaml (the demo) into a config given with --configfile."""
    import yaml

    cfg = yaml.safe_load((tiny_run / "config" / "tiny.yaml").read_text())
    one = dict(cfg, experiments={"only": {"train": {"lr": 5.0e-4}}})
    path = tiny_run / "config" / "one_experiment.yaml"
    path.write_text(yaml.safe_dump(one))
    proc = snakemake(tiny_run, "-n", "--configfile", str(path))
    jobs = planned_jobs(proc)
    assert jobs["train_cvae"] == 1 and "experiments/only/train/best.pt" in proc.stdout
    assert "experiments/default/" not in proc.stdout  # the demo's `default` experiment is not there
    # without a demo section the data are read where the config says (the tiny run wrote them), never made
    no_demo = {k: v for k, v in cfg.items() if k != "demo"}
    path = tiny_run / "config" / "no_demo.yaml"
    path.write_text(yaml.safe_dump(no_demo))
    proc = snakemake(tiny_run, "-n", "--configfile", str(path))
    assert "make_demo_data" not in planned_jobs(proc) and "make_demo_data" not in proc.stdout


def test_code_edits_rerun_only_the_rules_whose_scripts_run_that_code(tiny_run, tmp_path):
    """A copy of the package put first on the path of a dry run on the finished tiny run: docstrings and
    comments edited in every module plan nothing; a changed colour map in plots.py plans exactly the rules
    whose scripts draw figures (evaluate, compare_experiments, downstream, generated_maps), never the sampling or
    training."""
    import shutil

    from precip_cvae import provenance

    copy = tmp_path / "src" / "precip_cvae"
    shutil.copytree(provenance._package_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": str(tmp_path / "src")}
    # what tiny.yaml plans now (other tests may have run other configs in this directory)
    before = planned_jobs(snakemake(tiny_run, "-n", "--configfile", "config/tiny.yaml", env=env))
    assert not {"train_cvae", "sample_ensembles", "evaluate", "generate", "downstream"} & set(before), before
    modules = sorted(copy.rglob("*.py"))
    assert len(modules) > 25
    for path in modules:
        text = path.read_text()
        edited = text.replace('"""', '"""Edited docstring. ', 1) if text.lstrip().startswith('"""') else text
        path.write_text("# an edited comment\n" + edited.replace("\n\n\n", "\n\n\n# another comment\n", 1))
    proc = snakemake(tiny_run, "-n", "--configfile", "config/tiny.yaml", env=env)
    assert planned_jobs(proc) == before, proc.stdout[-3000:]
    plots = copy / "plots.py"
    text = plots.read_text()
    assert 'PRECIP_CMAP = "YlGnBu"' in text
    plots.write_text(text.replace('PRECIP_CMAP = "YlGnBu"', 'PRECIP_CMAP = "Blues"'))
    jobs = planned_jobs(snakemake(tiny_run, "-n", "--configfile", "config/tiny.yaml", env=env))
    assert jobs == {**before, "evaluate": 1, "compare_experiments": 1, "downstream": 1, "generated_maps": 1, "all": 1}


def test_schema_rejects_a_typo_at_dry_run(tiny_run):
    bad = tiny_run / "config" / "typo.yaml"
    bad.write_text((tiny_run / "config" / "tiny.yaml").read_text() + "\nevnets: {percentile: 95}\n")
    proc = snakemake(tiny_run, "-n", "--configfile", str(bad), check=False)
    assert proc.returncode != 0
    assert "evnets" in proc.stdout + proc.stderr


def test_lint_reports_only_environment_advice(tiny_run):
    proc = snakemake(tiny_run, "--lint", "--configfile", "config/tiny.yaml", check=False)
    text = proc.stdout + proc.stderr
    lints = re.findall(r"^\s+\* (.+?):?$", text, flags=re.M)
    assert lints, text
    assert set(lints) == {"Specify a conda environment or container for each rule."}, text
