rule downstream:
    input:
        dataset=run_dir("preprocess", "dataset.zarr"),
        thresholds=run_dir("events", "thresholds.nc"),
        events=run_dir("events", "events.csv"),
        training_set=exp_dir("generate", "augmented_training_set.zarr"),
    output:
        comparison=report(
            exp_dir("downstream", "comparison.csv"),
            caption="../workflow/report/downstream.rst",
            category="Downstream",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "augmented vs real (table)"},
        ),
        plot=report(
            exp_dir("downstream", "comparison.png"),
            caption="../workflow/report/downstream.rst",
            category="Downstream",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "augmented vs real"},
        ),
    params:
        downstream=config["downstream"],
        code=script_code("downstream"),
    log:
        exp_dir("logs", "downstream.log"),
    benchmark:
        exp_dir("benchmarks", "downstream.tsv")
    threads: 4  # torch training of the downscalers (BLAS/OpenMP too)
    resources:
        gpu=device_gpus("downstream"),  # 1 unless downstream.device is cpu
        mem_mb=8000,
        runtime=240,
    script:
        "../workflow/scripts/downstream.py"
