"""The ``evaluate`` stage: ensembles of the cVAE checkpoints and of the baselines, scored.

Two rules joined by a zarr cache of the ensembles, and a run-level comparison.  Each
rule's script imports only the modules it runs, so that the code fingerprint that
reruns it (:func:`precip_cvae.provenance.script_fingerprint`) covers nothing else:
a wording change in the summary rescores, it never resamples.

* :mod:`.names` -- names of the sources, metrics and headline scores (shared);
* :mod:`.sample` -- rule ``sample_ensembles``: checkpoint and baseline ensembles
  written to ``ensembles.zarr`` (its layout is in that module's docstring);
* :mod:`.score` -- every score of an ensemble (:func:`.score.score`) and of the
  whole cache (:func:`.score.score_cache`);
* :mod:`.report` -- rule ``evaluate``: ``metrics.csv``/``.json``, ``headline.csv``
  and ``summary.md`` (:func:`.report.run`); the figures are
  :func:`precip_cvae.plots.write_figures`;
* :mod:`.compare` -- rule ``compare_experiments``: every experiment beside the
  baselines, and the spread over seeds.

Everything is in mm day-1 on the **original grid** (the padding added by
``preprocess`` is cropped); pixels that are masked or missing in the truth are NaN
in every ensemble and excluded from every score.

The forecaster's dilemma
------------------------
``mae_tail`` (error where the truth is extreme) rewards forecasting extremes
everywhere.  The headline tail scores are proper or two-sided: twCRPS, FSS,
frequency bias and CSI; ``mae_tail`` is only ever shown beside the frequency
bias (see :func:`.names.headline_metrics`).

This file imports nothing: importing one module of the package does not make the
others part of its rule's fingerprint.
"""
