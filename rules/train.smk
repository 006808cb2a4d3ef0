rule train_cvae:
    input:
        dataset=run_dir("preprocess", "dataset.zarr"),
        thresholds=run_dir("events", "thresholds.nc"),
        events=run_dir("events", "events.csv"),
    output:
        best=exp_dir("train", "best.pt"),
        last=exp_dir("train", "last.pt"),
        log_csv=exp_dir("train", "train_log.csv"),
    params:
        model=experiment_model,
        train=experiment_train,
        resume_dir=train_resume_dir,
        code=script_code("train_cvae"),
    log:
        exp_dir("logs", "train_cvae.log"),
    benchmark:
        exp_dir("benchmarks", "train_cvae.tsv")
    threads: 8
    resources:
        gpu=experiment_gpus,
        nodes=experiment_nodes,
        mem_mb=16000,
        runtime=720,
    script:
        "../workflow/scripts/train_cvae.py"
