"""Helpers for the rules: path builders and input functions (no logic of the workflow)."""

import glob
import os
import re

from precip_cvae.provenance import code_fingerprint

RUN = config["run"]


wildcard_constraints:
    run=re.escape(RUN),


def run_dir(*parts):
    """results/<run>/<parts...>"""
    return os.path.join("results", "{run}", *parts)


def log_path(name):
    return run_dir("logs", name + ".log")


def benchmark_path(name):
    return run_dir("benchmarks", name + ".tsv")


def raw_inputs(wildcards):
    """The NetCDF files preprocess reads, or the demo directory that will hold them."""
    if config["demo"]["enabled"]:
        return {"demo": config["demo"]["outdir"]}
    sources = [config["data"]["target"], *config["data"]["predictors"]]
    files = sorted({f for source in sources for f in glob.glob(source["paths"])})
    return {"files": files}


def stage_code(module):
    """Fingerprint of a package module and everything it imports (rerun trigger)."""
    return code_fingerprint(f"precip_cvae.{module}")
