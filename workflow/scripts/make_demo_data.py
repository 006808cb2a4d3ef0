"""Snakemake script of rule make_demo_data: see precip_cvae.demo."""

from precip_cvae.config import DemoConfig
from precip_cvae.demo import write_demo_data
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "make_demo_data"), limit_threads(snakemake.threads):
    cfg = DemoConfig.from_dict({k: v for k, v in snakemake.params.demo.items() if k != "enabled"})
    write_demo_data(cfg, snakemake.output[0])
