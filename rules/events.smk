rule detect_events:
    input:
        dataset=run_dir("preprocess", "dataset.zarr"),
    output:
        thresholds=run_dir("events", "thresholds.nc"),
        events=run_dir("events", "events.csv"),
    params:
        events=config["events"],
        code=script_code("detect_events"),
    log:
        log_path("detect_events"),
    benchmark:
        benchmark_path("detect_events")
    threads: 2  # dask workers of the per-pixel percentiles (one pass over the train split)
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../workflow/scripts/detect_events.py"
