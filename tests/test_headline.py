"""`python -m precip_cvae.headline results/<run>`: what `make demo` prints at its end."""

import pandas as pd

from precip_cvae import headline


def _write(run, experiment="default"):
    out = run / "experiments" / experiment / "evaluate"
    out.mkdir(parents=True)
    pd.DataFrame([
        {"source": "cVAE (best)", "subset": "all", "CRPS": 1.0, "spread/skill": 0.95},
        {"source": "climatology", "subset": "all", "CRPS": 2.0, "spread/skill": 0.8},
        {"source": "analogs", "subset": "all", "CRPS": 1.25, "spread/skill": 0.9},
        {"source": "cVAE (best)", "subset": "heavy", "CRPS": 6.0, "spread/skill": 0.9},
        {"source": "climatology", "subset": "heavy", "CRPS": 12.0, "spread/skill": 0.2},
        {"source": "analogs", "subset": "heavy", "CRPS": 5.0, "spread/skill": 0.6},
    ]).to_csv(out / "headline.csv", index=False)
    return out


def test_prints_each_subset_with_the_crps_ratio_to_each_baseline(tmp_path, capsys):
    run = tmp_path / "results" / "demo"
    _write(run)
    (run / "experiments" / "default" / "generate").mkdir()
    (run / "experiments" / "default" / "generate" / "generated_maps.png").write_bytes(b"png")
    assert headline.main([str(run)]) == 0
    text = capsys.readouterr().out
    # all days: 1.0 / 2.0 and 1.0 / 1.25; heavy days: 6 / 12 and 6 / 5
    assert "cVAE (best) CRPS = 0.500 x climatology, 0.800 x analogs" in text
    assert "cVAE (best) CRPS = 0.500 x climatology, 1.200 x analogs" in text
    assert text.index("All days") < text.index("0.800 x analogs") < text.index("Heavy-event days")
    for where in ("summary.md", "maps.png", "generated_maps.png", "make report"):
        assert where in text, where


def test_a_run_without_evaluation_is_a_clear_error(tmp_path, capsys):
    assert headline.main([str(tmp_path / "results" / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "headline.csv" in err and "nothing" in err
