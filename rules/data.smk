rule make_demo_data:
    output:
        directory(config["demo"]["outdir"]),
    params:
        demo=config["demo"],
        code=script_code("make_demo_data"),
    log:
        "logs/make_demo_data.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    script:
        "../workflow/scripts/make_demo_data.py"
