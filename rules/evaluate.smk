# The evaluate stage in two rules joined by a zarr cache of the ensembles:
# sample_ensembles (checkpoints + baselines -> ensembles.zarr) and evaluate (scores,
# figures, summary), plus the run-level compare_experiments. Keys of the evaluate section
# that change what is sampled go to the first rule only (evaluate_section in common.smk),
# so a new FSS window or percentile rescores without resampling.


rule sample_ensembles:
    input:
        dataset=run_dir("preprocess", "dataset.zarr"),
        thresholds=run_dir("events", "thresholds.nc"),
        events=run_dir("events", "events.csv"),
        checkpoints=evaluate_checkpoints,
    output:
        ensembles=directory(exp_dir("evaluate", "ensembles.zarr")),
    wildcard_constraints:
        run=FOLD_RUN_PATTERN if KFOLD else re.escape(RUN),  # kfold_years: each fold samples its own days
    params:
        evaluate=evaluate_section("sampling"),
        code=script_code("sample_ensembles"),
    log:
        exp_dir("logs", "sample_ensembles.log"),
    benchmark:
        exp_dir("benchmarks", "sample_ensembles.tsv")
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
    script:
        "../workflow/scripts/sample_ensembles.py"


if KFOLD:

    # kfold_years: the held-out days of every fold, each scored by the model that never saw it, in one cache
    rule pool_ensembles:
        input:
            folds=per_fold("experiments", "{experiment}", "evaluate", "ensembles.zarr"),
            datasets=per_fold("preprocess", "dataset.zarr"),
        output:
            ensembles=directory(exp_dir("evaluate", "ensembles.zarr")),
        wildcard_constraints:
            run=re.escape(RUN),
        params:
            code=script_code("pool_ensembles"),
        log:
            exp_dir("logs", "pool_ensembles.log"),
        threads: 1
        resources:
            mem_mb=8000,
            runtime=60,
        script:
            "../workflow/scripts/pool_ensembles.py"


rule evaluate:
    input:
        ensembles=exp_dir("evaluate", "ensembles.zarr"),
        dataset=evaluate_dataset,  # one per fold for a kfold_years run (thresholds fitted on each fold's train)
        train_log=evaluate_train_log,
    output:
        **evaluate_outputs(),
    params:
        evaluate=evaluate_section("scoring"),
        generated=generated_link,  # where summary.md points for the generate stage's samples ("" when none)
        code=script_code("evaluate"),
    log:
        exp_dir("logs", "evaluate.log"),
    benchmark:
        exp_dir("benchmarks", "evaluate.tsv")
    threads: 2  # numpy/scipy scores (BLAS/OpenMP) and dask reads of the cached ensembles
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../workflow/scripts/evaluate.py"


rule compare_experiments:
    input:
        metrics=all_experiment_outputs("evaluate", "metrics.csv"),
        components=all_experiment_outputs("evaluate", "day_components.npz"),
    output:
        table=report(
            run_dir("experiments_comparison.csv"),
            caption="../workflow/report/comparison.rst",
            category="Comparison",
            labels={"figure": "experiments vs baselines (table)"},
        ),
        figure=report(
            run_dir("experiments_comparison.png"),
            caption="../workflow/report/comparison.rst",
            category="Comparison",
            labels={"figure": "experiments vs baselines"},
        ),
        seeds=report(
            run_dir("experiments_seeds.csv"),
            caption="../workflow/report/comparison.rst",
            category="Comparison",
            labels={"figure": "experiments over seeds (table)"},
        ),
        seeds_figure=report(
            run_dir("experiments_seeds.png"),
            caption="../workflow/report/seeds.rst",
            category="Comparison",
            labels={"figure": "experiments over seeds"},
        ),
        differences=report(
            run_dir("experiments_differences.csv"),
            caption="../workflow/report/differences.rst",
            category="Comparison",
            labels={"figure": "settings against the reference (table)"},
        ),
    params:
        evaluate=evaluate_section("scoring"),
        experiments=EXPERIMENTS,
        settings=experiment_settings(),
        code=script_code("compare_experiments"),
    log:
        log_path("compare_experiments"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    script:
        "../workflow/scripts/compare_experiments.py"
