"""The target transform: mm/day <-> the space the model works in.

``x = f(pr) / scale`` with ``f`` one of ``log1p``, ``sqrt`` or the identity, and
``scale`` the standard deviation of ``f(pr)`` over valid train pixels (fitted in
``preprocess`` on the train split only and stored in ``dataset.zarr``).  Every
``f`` maps 0 to 0 and is monotonic, so a non-negative field in one space is
non-negative in the other and a threshold maps to a threshold.

Works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import TARGET_TRANSFORMS, ConfigError


def _lib(a):
    if type(a).__module__.startswith("torch"):
        import torch

        return torch
    return np


@dataclass(frozen=True)
class TargetTransform:
    """``kind`` in {'log1p', 'sqrt', 'none'}; ``scale`` > 0 (dimensionless)."""

    kind: str = "log1p"
    scale: float = 1.0

    def __post_init__(self):
        if self.kind not in TARGET_TRANSFORMS:
            raise ConfigError(f"unknown target transform {self.kind!r}; valid names are {list(TARGET_TRANSFORMS)}")
        if not (self.scale > 0 and np.isfinite(self.scale)):
            raise ConfigError(f"target transform scale must be a positive number, got {self.scale}")

    def raw(self, pr_mm):
        """f(pr) without the scale; pr in mm/day, negatives clipped to 0."""
        lib = _lib(pr_mm)
        pr_mm = lib.clip(pr_mm, 0, None) if lib is np else pr_mm.clamp(min=0)
        if self.kind == "log1p":
            return lib.log1p(pr_mm)
        if self.kind == "sqrt":
            return lib.sqrt(pr_mm)
        return pr_mm

    def forward(self, pr_mm):
        """mm/day -> model space."""
        return self.raw(pr_mm) / self.scale

    def inverse(self, x):
        """model space -> mm/day (non-negative)."""
        lib = _lib(x)
        x = (lib.clip(x, 0, None) if lib is np else x.clamp(min=0)) * self.scale
        if self.kind == "log1p":
            return lib.expm1(x)
        if self.kind == "sqrt":
            return x * x
        return x

    def to_attrs(self) -> dict:
        return {"target_transform": self.kind, "target_transform_scale": float(self.scale)}

    @classmethod
    def from_attrs(cls, attrs) -> "TargetTransform":
        return cls(kind=str(attrs["target_transform"]), scale=float(attrs["target_transform_scale"]))
