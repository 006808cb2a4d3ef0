rule preprocess:
    input:
        unpack(raw_inputs),
    output:
        dataset=directory(run_dir("preprocess", "dataset.zarr")),
    params:
        data=config["data"],
        preprocess=config["preprocess"],
        code=script_code("preprocess"),
    log:
        log_path("preprocess"),
    benchmark:
        benchmark_path("preprocess")
    resources:
        mem_mb=8000,
        runtime=120,
    script:
        "../workflow/scripts/preprocess.py"
