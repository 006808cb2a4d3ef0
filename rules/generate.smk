rule generate:
    input:
        checkpoint=generate_checkpoint,
        dataset=run_dir("preprocess", "dataset.zarr"),
        thresholds=run_dir("events", "thresholds.nc"),
        events=run_dir("events", "events.csv"),
    output:
        augmented=directory(exp_dir("generate", "augmented.zarr")),
        training_set=directory(exp_dir("generate", "augmented_training_set.zarr")),
        report=exp_dir("generate", "generation_report.json"),
        report_md=exp_dir("generate", "generation_report.md"),
        **generate_netcdf_outputs(),
    params:
        generate=generate_section(),
        events=config["events"],
        code=script_code("generate"),
    log:
        exp_dir("logs", "generate.log"),
    benchmark:
        exp_dir("benchmarks", "generate.tsv")
    threads: 4  # torch sampling, the zarr writer and dask (BLAS/OpenMP too)
    resources:
        gpu=device_gpus("generate"),  # 1 unless generate.device is cpu
        mem_mb=8000,
        runtime=120,
    script:
        "../workflow/scripts/generate.py"


# The generated samples beside the real days they were drawn for (a figure only: editing it reruns no sampling)
rule generated_maps:
    input:
        augmented=exp_dir("generate", "augmented.zarr"),
        dataset=run_dir("preprocess", "dataset.zarr"),
    output:
        maps=report(
            exp_dir("generate", "generated_maps.png"),
            caption="../workflow/report/generated_maps.rst",
            category="Generation",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "generated heavy-day samples"},
        ),
    params:
        n_days=config["evaluate"]["n_map_days"],
        splits=config["generate"]["splits"],
        code=script_code("generated_maps"),
    log:
        exp_dir("logs", "generated_maps.log"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../workflow/scripts/generated_maps.py"
