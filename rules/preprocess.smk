rule preprocess:
    input:
        unpack(raw_inputs),
    output:
        dataset=directory(run_dir("preprocess", "dataset.zarr")),
    params:
        data=config["data"],
        preprocess=config["preprocess"],
        fold=run_fold,  # kfold_years: the fold of results/<run>/fold<k>/
        code=script_code("preprocess"),
    log:
        log_path("preprocess"),
    benchmark:
        benchmark_path("preprocess")
    threads: 4  # dask workers of the lazy read, regrid and zarr write (and BLAS/OpenMP)
    resources:
        mem_mb=8000,
        runtime=120,
    script:
        "../workflow/scripts/preprocess.py"
