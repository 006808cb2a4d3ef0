"""The headline of a finished run, printed: ``python -m precip_cvae.headline results/<run>``.

``make demo`` ends with it: for each experiment, the cVAE against each baseline on all days and on
heavy-event days (the headline split's ``headline.csv`` written by the evaluate stage), its CRPS as a
ratio of each baseline's, and where the rest is (``summary.md`` with intervals, ``maps.png``, the
generated samples, ``report.html``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

SUBSETS = {"all": "All days", "heavy": "Heavy-event days"}


def experiment_lines(headline_csv: Path) -> list[str]:
    """Lines for one experiment: a table per subset and the cVAE's CRPS / each baseline's."""
    table = pd.read_csv(headline_csv)
    lines = []
    for subset, title in SUBSETS.items():
        part = table[table["subset"] == subset].drop(columns="subset")
        if part.empty:
            lines += [f"{title}: none in the split", ""]
            continue
        lines += [f"{title}:", part.to_markdown(index=False, floatfmt=".3g"), ""]
        if "CRPS" in part.columns:  # the primary checkpoint is the first row (evaluate.report.headline_table)
            model, crps = part["source"].iloc[0], float(part["CRPS"].iloc[0])
            ratios = [f"{crps / float(v):.3f} x {name}" for name, v in zip(part["source"][1:], part["CRPS"][1:])
                      if float(v) > 0]
            if ratios:
                lines += [f"{model} CRPS = " + ", ".join(ratios) + " (below 1: better)", ""]
    return lines


def run_lines(run_dir: str | Path) -> list[str]:
    """The headline of every experiment of ``run_dir`` (results/<run>) and where to look next."""
    run_dir = Path(run_dir)
    found = sorted(run_dir.glob("experiments/*/evaluate/headline.csv"))
    if not found:
        raise FileNotFoundError(f"no experiments/*/evaluate/headline.csv under {run_dir}: has the evaluate stage run?")
    lines = []
    for csv in found:
        exp = csv.parent.parent
        lines += [f"== {run_dir.name}: experiment {exp.name} (headline split, test when scored; lower CRPS/twCRPS is better, spread/skill "
                  "and frequency bias best at 1)", ""]
        lines += experiment_lines(csv)
        lines += ["Where to look:",
                  f"  {exp / 'evaluate' / 'summary.md'}   every headline score with 90 % intervals, how to read them",
                  f"  {exp / 'evaluate' / 'maps.png'}   the heaviest test days: truth, cVAE members, best analog"]
        generated = exp / "generate" / "generated_maps.png"
        if generated.exists():
            lines.append(f"  {generated}   generated heavy-day samples beside the real day")
        lines += ["  report.html   all figures: `make report` (snakemake --report report.html)", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="results/<run> of a finished workflow")
    args = parser.parse_args(argv)
    try:
        print("\n".join(run_lines(args.run_dir)))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
