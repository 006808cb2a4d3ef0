"""Self-describing checkpoints: save atomically, load with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values only (no pickled
objects), so ``torch.load(..., weights_only=True)`` reads it and a file carrying
a pickled payload is refused.  It holds everything needed to rebuild the model
without the training code or config (as nanoGPT's sampler does):

``format`` (``CHECKPOINT_FORMAT``), ``package_version``, ``model_config`` (dict),
``model_args`` (n_channels, fine_shape, coarse_shape), ``model_state``,
``data`` (channels, cond_mean/std, transform, pad, thresholds path and SHA-256,
dataset path), ``train_config``, ``config_hash``, ``epoch``, ``optimizer_state``,
``scheduler_state``, ``rng`` (torch CPU/CUDA states), ``early_stopping``,
``history`` (the train-log rows so far), ``parameter_count``.

Compatibility rule: a checkpoint is loadable when its ``format`` equals this
package's ``CHECKPOINT_FORMAT`` (bumped whenever the model or the layout changes
incompatibly); the package version is recorded and a different one is logged,
not refused.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import ModelConfig
from .io import atomic_path
from .model import CVAE
from .transform import TargetTransform

log = logging.getLogger(__name__)

#: 2: map latent, fine-grid conditioning with static channels (``model_args.n_static``),
#: the train preset; format-1 checkpoints (the vector-latent cVAE of 0.1.x) are refused.
CHECKPOINT_FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or from an incompatible version/config."""


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically (temporary file + rename)."""
    state = {"format": CHECKPOINT_FORMAT, "package_version": __version__, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint safely; clear errors for missing, truncated, unsafe or incompatible files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it carries objects other than tensors and plain values "
            f"(weights_only=True): {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "model_state" not in state:
        raise CheckpointError(f"{path}: not a precip-cvae checkpoint (no model_state)")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {state.get('format')!r} (package {state.get('package_version')}) is not "
            f"this package's format {CHECKPOINT_FORMAT} (package {__version__}); retrain, or use the package "
            "version that wrote it"
        )
    if state.get("package_version") != __version__:
        log.warning("%s was written by precip-cvae %s; this is %s (same checkpoint format, loading)",
                    path, state.get("package_version"), __version__)
    return state


def build_model(state: dict[str, Any]) -> CVAE:
    """Rebuild the model from a checkpoint dict alone."""
    # checkpoints written before model.global_latent existed have none (not the default of today's configs)
    cfg = ModelConfig(**{"global_latent": 0, **state["model_config"]})
    args = state["model_args"]
    output = str(args.get("output", "field"))
    transform = TargetTransform.from_attrs(args["transform"]) if "transform" in args else None
    model = CVAE(cfg, int(args["n_channels"]), tuple(args["fine_shape"]), tuple(args["coarse_shape"]),
                 int(args.get("n_static", 0)), output, transform)
    model.load_state_dict(state["model_state"])
    return model


def load_model(path: str | Path, device="cpu") -> tuple[CVAE, dict[str, Any]]:
    """(model in eval mode on ``device``, checkpoint dict)."""
    state = load(path)
    model = build_model(state).to(device)
    model.eval()
    return model, state


def check_matches_data(state: dict[str, Any], channels, fine_shape, path: str | Path) -> None:
    """Refuse a checkpoint trained on other condition channels or another grid."""
    want = list(state["data"]["channels"])
    if list(channels) != want:
        raise CheckpointError(f"{path}: trained on condition channels {want}, the data has {list(channels)}")
    if tuple(state["model_args"]["fine_shape"]) != tuple(fine_shape):
        raise CheckpointError(
            f"{path}: trained on a {tuple(state['model_args']['fine_shape'])} grid, the data has {tuple(fine_shape)}"
        )
