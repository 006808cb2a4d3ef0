"""Are generated samples near-copies of real training fields?  The d1/d2 test of :func:`memorisation_check`."""

from __future__ import annotations

import numpy as np

from ..neighbours import nearest_rmse

__all__ = ["NEAR_COPY_RATIO", "MEMORISATION_SAMPLE_BYTES", "memorisation_check", "samples_to_check"]


#: A sample is a near-copy when its nearest real train field is closer than this fraction of the
#: distance to the second nearest (the d1/d2 ratio test used for memorisation in generative
#: models, e.g. Yoon et al. 2023): a copy sits next to one field, a novel field between several.
NEAR_COPY_RATIO = 1.0 / 3.0

#: The check holds the samples it compares (float32 fields, and their valid pixels once more while it compares):
#: no more of them than this many bytes, whatever ``generate.memorisation_max_samples`` says (5000 fields of
#: 465 x 705 cells would be 6.7 GB)
MEMORISATION_SAMPLE_BYTES = 2**30


def samples_to_check(max_samples: int, cells: int) -> int:
    """How many samples the memorisation check keeps: ``max_samples``, fewer where their fields of ``cells``
    cells would pass :data:`MEMORISATION_SAMPLE_BYTES` (at least one)."""
    return max(1, min(int(max_samples), MEMORISATION_SAMPLE_BYTES // (4 * max(int(cells), 1))))


def memorisation_check(samples: np.ndarray, reference: np.ndarray, warn_fraction: float,
                       anchors: np.ndarray | None = None, anchor_index: np.ndarray | None = None) -> dict:
    """Are the samples near-copies of real training fields?

    A sample is a near-copy when its nearest train field is closer than
    ``NEAR_COPY_RATIO`` times the second nearest (d1/d2 < 1/3); ``warning`` when more
    than ``warn_fraction`` of the samples are.  The ratio is scale-free: a smooth sample
    lies close (in RMSE) to many real fields, with d1/d2 near 1, and is not mistaken for
    a copy; a copy has d1 near 0 and a real d2.

    For context, the sample-to-nearest RMSE is also compared with the nearest-neighbour
    RMSE of real fields like the samples (``anchors``: the real fields of the sampled
    days; default every train field) to the other train fields.  That comparison alone
    is no memorisation test: on Iberia pairs of dry days made its 5th percentile 0 over
    all train days (nothing could be flagged), and against the heavy days it flagged
    37 % of smooth samples that were not nearest to their own day (d1/d2 median 0.95).

    Parameters
    ----------
    samples : (Ns, ...) synthetic fields; reference : (Nr, ...) real train fields (NaN = masked), an ndarray or
        fields read from the store as they are indexed (:class:`precip_cvae.data.DayFields`; compared a block
        at a time, :func:`precip_cvae.neighbours.nearest_rmse`)
    anchors : (Na, ...) real fields like the samples, optional
    anchor_index : (Na,) int, the position of each anchor in ``reference`` (-1: not in it);
        that pair is skipped
    """
    s = samples.reshape(samples.shape[0], -1)
    r = reference.reshape(reference.shape[0], -1) if isinstance(reference, np.ndarray) else reference
    n_ref = len(r)
    two = nearest_rmse(s, r, k=2) if n_ref > 1 else np.repeat(nearest_rmse(s, r)[:, None], 2, 1)
    d_sample = two[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(two[:, 1] > 0, two[:, 0] / two[:, 1], 1.0)  # d1 = d2 = 0: several identical fields
    if anchors is None:
        r = np.asarray(r[np.arange(n_ref)]).reshape(n_ref, -1) if not isinstance(r, np.ndarray) else r
        d_real = nearest_rmse(r, r, exclude_self=True)
    else:
        a = anchors.reshape(anchors.shape[0], -1)
        index = np.full(a.shape[0], -1) if anchor_index is None else np.asarray(anchor_index)
        d_real = nearest_rmse(a, r, exclude=index)
    p5 = float(np.percentile(d_real, 5)) if d_real.size else float("nan")
    frac_copy = float((ratio < NEAR_COPY_RATIO).mean()) if ratio.size else 0.0
    return {
        "fraction_near_copies": frac_copy,
        "near_copy_ratio": NEAR_COPY_RATIO,
        "sample_nn_ratio_median": float(np.median(ratio)) if ratio.size else float("nan"),
        "sample_nn_rmse_median": float(np.median(d_sample)) if d_sample.size else float("nan"),
        "real_nn_rmse_p5": p5,
        "real_nn_rmse_median": float(np.median(d_real)) if d_real.size else float("nan"),
        "fraction_closer_than_real_p5": float((d_sample < p5).mean()) if d_sample.size else 0.0,
        "reference_fields": int(n_ref),
        "samples_checked": int(s.shape[0]),
        "warn_fraction": warn_fraction,
        "warning": frac_copy > warn_fraction,
        "per_sample_nn_rmse": d_sample,
        "per_sample_nn_ratio": ratio,
    }
