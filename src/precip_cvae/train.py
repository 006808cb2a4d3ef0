"""The ``train_cvae`` stage: fit the cVAE, validate on prior samples, keep checkpoints.

* AdamW with weight decay, gradient clipping, optional cosine / plateau schedule.
* Every epoch, validation draws ``val_members`` fields per val day **from the prior**
  p(z|y), as generation will, and scores them in mm/day (MAE_all and MAE_tail of
  the ensemble mean, RMSE_ext, correlation, extreme-frequency ratio at the local
  threshold, fair CRPS, twCRPS, L_rec); the posterior reconstruction MAE is logged
  beside them for reference but never selects a model.
* Early stopping on ``early_stopping_metric`` with ``patience``; a model can be
  selected as best only once the KL warm-up has finished (before that, beta < beta_kl
  and the prior is not yet trained to match the posterior).
* ``train_log.csv`` is rewritten and flushed every epoch, after that epoch's resume
  state is saved (a logged epoch is never lost); one readable line per epoch goes to
  the rule's log.
* Checkpoints (:mod:`precip_cvae.checkpoint`): ``best.pt`` and ``last.pt`` in the
  output directory, and a resume copy of ``last.pt`` in ``resume_dir``, which is not a
  declared Snakemake output, so it survives a failed job.  A rerun with the same
  config continues from it exactly (model, optimizer, scheduler, RNG, early-stopping
  state, log rows).  SIGTERM / SIGUSR1 (SLURM's warnings before a time limit or
  preemption) stop at the next step and exit non-zero; the resume state of the last
  complete epoch is on disk.  A non-finite loss stops with the epoch and step named.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, distributed, metrics
from .conditioning import condition_sampling_grid, fit_static
from .config import ConfigError, ModelConfig, TrainConfig, config_hash
from .data import (Batch, FieldData, PatchSampler, ZarrFields, augment, block_days_for, check_augmentations, day_blocks,
                   epoch_indices, epoch_plan, make_batch, open_fields, stream_batches)
from .io import InputError, atomic_path
from .losses import beta_schedule, compute_loss, extreme_mae, kl_divergence, masked_mae, warmup_finished
from .model import CVAE, count_parameters
from .provenance import file_sha256
from .distributed import Dist, RankJob
from .interrupts import NonFiniteLoss, SignalFlag, TrainingInterrupted
from .resources import limit_threads, select_device

log = logging.getLogger(__name__)

LOG_COLUMNS = [
    "epoch", "beta", "lr", "warmup_done",
    "train_loss", "train_rec", "train_mae_all", "train_mae_ext", "train_kl", "train_mass", "train_crps", "train_tail",
    "train_energy", "train_pooled", "train_mean",
    "val_MAE_all", "val_MAE_tail", "val_RMSE_ext", "val_corr", "val_freq_ratio",
    "val_CRPS", "val_CRPS_heavy", "val_twCRPS", "val_L_rec", "val_KL", "val_post_MAE_all",
    "is_best", "epoch_seconds", "samples_per_s",
]


@dataclass(frozen=True)
class TrainPaths:
    """Inputs and outputs of :func:`run`.

    ``best``, ``last`` and ``log_csv`` are the rule's outputs (passed by the script, so the
    rule is the one place their names are defined); ``resume_dir`` holds ``resume.pt`` and
    the resume copy of ``best.pt``, which are not Snakemake outputs (they survive a failed
    job).  :meth:`in_dir` puts the outputs under their default names in one directory.
    """

    dataset: str
    thresholds: str
    events: str
    best: Path
    last: Path
    log_csv: Path
    resume_dir: str

    def __post_init__(self):
        for name in ("best", "last", "log_csv"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    @classmethod
    def in_dir(cls, dataset: str, thresholds: str, events: str, out_dir: str, resume_dir: str) -> "TrainPaths":
        out = Path(out_dir)
        return cls(dataset, thresholds, events, out / "best.pt", out / "last.pt", out / "train_log.csv", resume_dir)

    @property
    def resume(self) -> Path:
        return Path(self.resume_dir) / "resume.pt"

    @property
    def resume_best(self) -> Path:
        return Path(self.resume_dir) / "best.pt"


# ----------------------------------------------------------------------------- pieces


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, cfg.patience // 5))
    return None


@dataclass
class EarlyStopping:
    """Track the best validation value; selection and patience start after warm-up."""

    metric: str
    patience: int
    warmup_epochs: int
    best_value: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, epoch: int, value: float) -> tuple[bool, bool]:
        """(is_best, should_stop) after ``epoch`` (0-based) with validation ``value``."""
        if not warmup_finished(epoch, self.warmup_epochs):
            return False, False
        if np.isfinite(value) and value < self.best_value:
            self.best_value, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True, False
        self.bad_epochs += 1
        return False, self.bad_epochs >= self.patience

    def state(self) -> dict:
        return dataclasses.asdict(self)


#: Per-day sums of the validation scores (:func:`_val_day_sums`), in this column order.
VAL_SUMS = ("n", "abs", "n_tail", "abs_tail", "sq_tail", "fc_exceed", "obs_exceed", "crps", "tw")


def _val_day_sums(ens: np.ndarray, obs: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per day of a block: the additive parts of the val scores (:data:`VAL_SUMS`, (N, 9)) and of the pooled
    correlation (:func:`precip_cvae.metrics.pearson_parts`, (N, 6)).  ``ens`` (M, N, H, W) and ``obs`` (N, H, W)
    mm/day, NaN invalid; ``thr`` (H, W) the heavy threshold (NaN: none)."""
    ens, obs = ens.astype(np.float64), obs.astype(np.float64)
    v = np.isfinite(obs)
    t = np.nan_to_num(thr.astype(np.float64), nan=np.inf)[None]
    mean = ens.mean(axis=0)
    crps = metrics.crps_ensemble(ens, obs) if ens.shape[0] > 1 else np.abs(mean - obs)
    tw = metrics.twcrps_ensemble(ens, obs, t[0])
    ext = v & (np.nan_to_num(obs, nan=-np.inf) > t)
    err = np.where(v, np.abs(mean - np.nan_to_num(obs)), 0.0)
    day = lambda a: a.sum(axis=(-2, -1))  # noqa: E731
    sums = np.stack([
        day(v), day(err), day(ext), day(np.where(ext, err, 0.0)), day(np.where(ext, err * err, 0.0)),
        day((ens > t) & v).mean(axis=0), day(ext), day(np.where(v, crps, 0.0)), day(np.where(v, tw, 0.0)),
    ], axis=-1)
    return sums, metrics.pearson_parts(mean, obs, v)


def _val_scores(sums: np.ndarray, corr: np.ndarray, heavy: np.ndarray) -> dict[str, float]:
    """The val scores from the per-day parts: pooled over every valid pixel of the days (as the whole-array
    metrics compute them: :func:`precip_cvae.metrics.mae`, ``mae_tail``, ``rmse_ext``, ``frequency_bias``)."""
    total = dict(zip(VAL_SUMS, sums.sum(axis=0)))
    ratio = lambda a, b: float(a / b) if b > 0 else float("nan")  # noqa: E731
    crps_heavy = sums[heavy]
    return {
        "val_MAE_all": ratio(total["abs"], total["n"]),
        "val_MAE_tail": ratio(total["abs_tail"], total["n_tail"]),
        "val_RMSE_ext": float(np.sqrt(total["sq_tail"] / total["n_tail"])) if total["n_tail"] > 0 else float("nan"),
        "val_corr": metrics.pearson_of_parts(corr),
        "val_freq_ratio": ratio(total["fc_exceed"], total["obs_exceed"]),
        "val_CRPS": ratio(total["crps"], total["n"]),
        "val_CRPS_heavy": ratio(crps_heavy[:, 7].sum(), crps_heavy[:, 0].sum()) if heavy.any() else float("nan"),
        "val_twCRPS": ratio(total["tw"], total["n"]),
    }


@torch.no_grad()
def validate(model: CVAE, val: FieldData | ZarrFields, cfg: TrainConfig, epoch: int, device,
             batch_size: int) -> dict[str, float]:
    """Scores of prior samples on the val days (mm/day), plus posterior reconstruction MAE.

    A fixed generator seeds the prior draws, so epochs are compared on the same noise.  The val days come in
    blocks of whole batches (:func:`precip_cvae.data.block_days_for`, in memory or from the store) and every
    score is summed per day, so memory holds one block's members; both give the same batches, hence the same
    draws.
    """
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 7919)
    transform = val.transform
    thr_x = val.thr_x.to(device)
    thr = val.thr_mm[0, 0].cpu().numpy()  # (H, W)
    post_err, kl_sum, lrec_sum, n_seen, sums, corr = 0.0, 0.0, 0.0, 0, [], []
    for _, block in day_blocks(val, block_days_for(val, batch_size)):
        members = []
        for start in range(0, len(block), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(block)))
            b = make_batch(block, idx, thr_x, device)
            out = model(b.x, b.y, b.valid)
            kl_sum += float(kl_divergence(out.mu_q, out.logvar_q, out.mu_p, out.logvar_p)) * len(idx)
            recon = model.reconstruct(b.x, b.y, b.valid)
            post_err += float(masked_mae(transform.inverse(recon), transform.inverse(b.x), b.valid)) * len(idx)
            s = model.sample(b.y, b.valid, n_samples=cfg.val_members, generator=g)  # (M, B, 1, H, W)
            first = s[0]
            if cfg.loss.space == "mm":
                p0, t0 = transform.inverse(first), transform.inverse(b.x)
            else:
                p0, t0 = first, b.x
            lrec = (cfg.loss.lambda_base * masked_mae(p0, t0, b.valid)
                    + cfg.loss.lambda_ext * extreme_mae(p0, t0, b.extreme))
            lrec_sum += float(lrec) * len(idx)
            members.append(transform.inverse(s[:, :, 0]).float().cpu())  # (M, B, H, W) mm/day
            n_seen += len(idx)
        part, moments = _val_day_sums(torch.cat(members, dim=1).numpy(), block.pr_mm[:, 0].cpu().numpy(), thr)
        sums.append(part)
        corr.append(moments)
    heavy = val.is_event.cpu().numpy().astype(bool)
    return {
        **_val_scores(np.concatenate(sums), np.concatenate(corr), heavy),
        "val_L_rec": lrec_sum / n_seen,
        "val_KL": kl_sum / n_seen,
        "val_post_MAE_all": post_err / n_seen,
    }


def validation_batch(model: CVAE, cfg: TrainConfig) -> int:
    """Val days per batch: the larger of ``train.batch_size`` and 64, fewer when their whole-field activations
    (:meth:`CVAE.bytes_per_cell`) would exceed ``train.memory_budget_gb`` (continental grids)."""
    H, W = model.fine_shape
    fit = int(cfg.memory_budget_gb * 1e9 // (H * W * model.bytes_per_cell()))
    return max(1, min(max(cfg.batch_size, 64), fit))


def _write_log(rows: list[dict], path: Path) -> None:
    """The whole log, written to a temporary sibling and renamed onto ``path``: a reader polling it (a monitor,
    the resume) and a kill during the write see the last complete log, never a truncated one."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_step(model: CVAE, opt, batch, cfg: TrainConfig, epoch: int, transform, autocast,
               dist: Dist | None = None) -> dict | None:
    """One optimisation step on ``batch``; returns the loss components, or None if the loss is not finite
    (then no update is made; under DDP every rank agrees before any backward pass)."""
    with autocast:
        out = model(batch.x, batch.y, batch.valid, n_prior=cfg.loss.n_prior, window=batch.window)
    out = type(out)(*(None if t is None else (type(t)(*(u.float() for u in t)) if isinstance(t, tuple) else t.float())
                      for t in out))
    losses = compute_loss(out, batch.x, batch.valid, batch.extreme, cfg.loss, epoch, transform, batch.coarse_mm,
                          batch.tail_x)
    total = losses["total"]
    finite = bool(torch.isfinite(total))
    if dist is not None:
        finite = dist.all_true(finite)
    if not finite:
        log.error("non-finite loss components: %s", {k: float(torch.as_tensor(v).detach()) for k, v in losses.items()})
        return None
    opt.zero_grad(set_to_none=True)
    total.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return losses


# ----------------------------------------------------------------------------- the stage


def run(paths: TrainPaths, model_cfg: ModelConfig, cfg: TrainConfig, threads: int = 1, experiment: str = "default"):
    """Train (or resume training) and write best.pt, last.pt and train_log.csv.

    With ``cfg.gpus > 1`` training runs data-parallel in ``cfg.gpus`` processes started
    by torchrun (:mod:`precip_cvae.distributed`: NCCL on GPUs, gloo on CPU), each taking
    its share of every global batch of ``batch_size``; only rank 0 validates, writes
    checkpoints and logs.  With ``cfg.nodes > 1``, ``cfg.gpus`` processes on each node of
    the SLURM job (one torchrun per node under ``srun``).

    ``threads`` (the rule's) reach dask, torch and BLAS through
    :func:`precip_cvae.resources.limit_threads`; ``train.num_threads``, when set, replaces
    it; with DDP each process gets ``threads // gpus`` (at least 1).

    Returns
    -------
    list of dict: the rows of train_log.csv.
    """
    check_augmentations(cfg.augment)
    world = max(1, int(cfg.gpus))
    if world > 1 or cfg.nodes > 1:
        threads = max(1, int(cfg.num_threads or threads) // world)
        job = RankJob("precip_cvae.train:train_process", dict(paths=paths, model_cfg=model_cfg, cfg=cfg,
                                                                threads=threads, experiment=experiment), threads)
        distributed.launch(world, job, paths.resume_dir, nodes=cfg.nodes)
        import pandas as pd

        return pd.read_csv(paths.log_csv).to_dict("records")
    return train_process(paths, model_cfg, cfg, threads, experiment, dist=Dist())


def train_process(paths: TrainPaths, model_cfg: ModelConfig, cfg: TrainConfig, threads: int, experiment: str,
                  dist: Dist) -> list[dict]:
    """One training process on ``threads`` cores (a DDP rank: its share of the rule's threads)."""
    with limit_threads(max(1, int(threads if dist.world > 1 else (cfg.num_threads or threads)))):
        return _train(paths, model_cfg, cfg, experiment, dist)


def _train(paths: TrainPaths, model_cfg: ModelConfig, cfg: TrainConfig, experiment: str, dist: Dist) -> list[dict]:
    """Set up, resume, then one epoch after another (train, validate, log and save), then finish."""
    s = _set_up(paths, model_cfg, cfg, experiment, dist)
    _resume(s)
    if dist.main:
        _write_log(s.history, paths.log_csv)
    epoch = s.start_epoch - 1
    with SignalFlag() as flag:
        for epoch in range(s.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            means, train_seconds = _train_epoch(s, epoch, flag)
            scores, value, is_best, should_stop, lr = _validate_epoch(s, epoch)
            if dist.main:
                _log_and_save(s, epoch, means, scores, value, is_best, lr, time.perf_counter() - t0, train_seconds)
            if should_stop:
                if dist.main:
                    log.info("early stopping after epoch %d: no %s improvement for %d epochs (best %.4f at epoch "
                             "%d)", epoch + 1, cfg.early_stopping_metric, cfg.patience, s.stopper.best_value,
                             s.stopper.best_epoch + 1)
                break
    return _finish(s, epoch) if dist.main else s.history


@dataclass
class _Session:
    """One training process: its data, model and optimiser, and the state a resume restores."""

    paths: TrainPaths
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    train: FieldData | ZarrFields  # in memory, or streamed from the store (train.in_memory)
    val: FieldData | ZarrFields
    model: CVAE
    net: torch.nn.Module  # what a training step calls: the DDP wrapper under DDP
    opt: torch.optim.Optimizer
    sched: Any
    stopper: EarlyStopping
    meta: dict  # what every checkpoint holds besides the state
    thr_x: torch.Tensor
    tail_x: torch.Tensor
    autocast: Any
    history: list = field(default_factory=list)
    start_epoch: int = 0
    ema: Any = None  # torch.optim.swa_utils.AveragedModel of ``model`` (train.ema_decay > 0), else None
    patches: PatchSampler | None = None  # train.patch_size: where each sample's patch is cut

    @property
    def eval_model(self) -> CVAE:
        """The weights that are validated, saved as ``model_state`` and sampled: the moving average when on."""
        return self.model if self.ema is None else self.ema.module

    def snapshot(self, epoch: int) -> dict:
        extra = {} if self.ema is None else {"train_model_state": self.model.state_dict(),
                                             "ema_state": self.ema.state_dict()}
        return {
            **self.meta,
            **extra,
            "epoch": epoch,
            "model_state": self.eval_model.state_dict(),
            "optimizer_state": self.opt.state_dict(),
            "scheduler_state": self.sched.state_dict() if self.sched is not None else None,
            "rng": _rng_state(),
            "early_stopping": self.stopper.state(),
            "history": self.history,
        }


def in_memory(cfg: TrainConfig, nbytes: int) -> bool:
    """Whether training holds its days in memory (``train.in_memory``; ``auto``: when their tensors, ``nbytes``,
    fit ``train.memory_budget_gb``) or streams them from the store by time chunks."""
    budget = cfg.memory_budget_gb * 1e9
    held = cfg.in_memory is True or (cfg.in_memory == "auto" and nbytes <= budget)
    log.info("train and val days: %.2f GB as tensors, budget %.2f GB (train.in_memory %s): %s", nbytes / 1e9,
             budget / 1e9, cfg.in_memory, "held in memory" if held else
             f"streamed from the store ({cfg.loader_workers} reader processes, buffers of {cfg.shuffle_buffer_days} days)")
    return held


def _set_up(paths: TrainPaths, model_cfg: ModelConfig, cfg: TrainConfig, experiment: str, dist: Dist) -> _Session:
    """Data (on the GPU when it fits), static channels, model, optimiser and the checkpoints' metadata."""
    device = select_device(cfg.device, "train.device")
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    data = open_fields(paths.dataset, paths.thresholds, paths.events, splits=("train", "val"))
    if in_memory(cfg, data.nbytes):
        data = data.read()
    try:
        train, val = data.select("train"), data.select("val")
    except InputError as exc:
        raise InputError(f"{paths.dataset}: {exc}; expected train and val days (preprocess.split)") from exc
    if not bool(train.is_event.any()):
        log.warning("%s: no heavy-event day in the train split: the extreme loss term only sees single pixels, "
                    "train.oversample_heavy has no effect", paths.events)
    if cfg.early_stopping_metric == "CRPS_heavy" and not bool(val.is_event.any()):
        raise InputError(f"{paths.events}: no heavy-event day in the val split; train.early_stopping_metric "
                         "CRPS_heavy needs at least one (choose CRPS, or a val period with heavy days)")
    if device.type == "cuda" and isinstance(data, FieldData):  # on the GPU when it fits (a quarter of free memory)
        free, _ = torch.cuda.mem_get_info()
        if data.nbytes < free / 4:
            train, val = train.to(device), val.to(device)
    fine_shape, coarse_shape, n_channels = train.fine_shape, train.coarse_shape, train.n_channels
    fine = model_cfg.conditioning == "fine"
    if fine and any(a in ("flip", "rot90") for a in cfg.augment):
        raise InputError(f"train.augment {list(cfg.augment)}: flip/rot90 would move the fields against the static "
                         "fine-grid channels (model.conditioning 'fine'); drop them or use conditioning 'coarse'")
    thr_attrs = data.thr_attrs or {}
    static = fit_static(data, cfg.loss.tail_percentile, float(thr_attrs.get("wet_threshold_mm_day", 1.0)),
                        int(thr_attrs.get("min_wet_days", 30)))
    static_names = list(static.names) if fine else []
    log.info("tail threshold (twCRPS): local P%g of wet train days; static channels %s", cfg.loss.tail_percentile,
             static_names or "none (conditioning 'coarse')")

    torch.manual_seed(cfg.seed)
    try:
        model = CVAE(model_cfg, n_channels, fine_shape, coarse_shape, n_static=len(static_names),
                     output=cfg.loss.model_output, transform=data.transform).to(device)
    except ValueError as exc:  # e.g. a grid the model's depth cannot halve: name the data set
        raise InputError(f"{paths.dataset}: {exc}") from exc
    if fine:
        model.set_static(static.values)
        if model.geographic:
            model.set_condition_grid(torch.from_numpy(condition_sampling_grid(train)))
            log.info("condition: the predictor grid sampled at each target cell's own position "
                     "(model.condition_interpolation geographic)")
    patches = None
    if cfg.patch_size is not None:
        if not model.local:
            raise ConfigError(f"train.patch_size {list(cfg.patch_size)} needs model.context 'local' (a global model's "
                              "condition vector and norms see the whole field, so a patch is not a window of it)")
        try:
            patches = PatchSampler(static.region, cfg.patch_size, 2**model.depth, cfg.patch_min_valid)
        except ValueError as exc:
            raise InputError(f"{paths.dataset}: {exc}") from exc
        log.info("patches of %s cells at %d places (corners every %d cells, >= %.0f%% of cells with data); the "
                 "model's values reach %d cells (model.receptive_radius)", list(cfg.patch_size), len(patches),
                 2**model.depth, 100 * cfg.patch_min_valid, model.receptive_radius())
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = count_parameters(model)
    log.info("job: SLURM_JOB_ID=%s CUDA_VISIBLE_DEVICES=%s torch.cuda.is_available()=%s",
             os.environ.get("SLURM_JOB_ID", "-"), os.environ.get("CUDA_VISIBLE_DEVICES", "-"), torch.cuda.is_available())
    log.info("model %s: %d parameters (%.2f M); condition %s %s -> fine %s; device %s",
             model_cfg.preset, n_params, n_params / 1e6, list(data.channels), coarse_shape, fine_shape, device)
    opt = build_optimizer(model, cfg)
    thresholds_sha = file_sha256(paths.thresholds)
    chash = config_hash({"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg),
                         "thresholds": thresholds_sha, "dataset": data.attrs.get("preprocess_config", "")})
    meta = {
        "model_config": dataclasses.asdict(model_cfg),
        "model_args": {"n_channels": n_channels, "fine_shape": list(fine_shape), "coarse_shape": list(coarse_shape),
                       "n_static": len(static_names), "output": cfg.loss.model_output,
                       "transform": data.transform.to_attrs()},
        "train_config": dataclasses.asdict(cfg),
        "config_hash": chash,
        "experiment": experiment,
        "parameter_count": n_params,
        "data": {
            "channels": list(data.channels),
            "cond_mean": [float(v) for v in np.atleast_1d(data.attrs.get("cond_mean", []))],
            "transform": data.transform.to_attrs(),
            "pad_lat": [int(v) for v in data.attrs.get("pad_lat", [0, 0])],
            "pad_lon": [int(v) for v in data.attrs.get("pad_lon", [0, 0])],
            "dataset": str(paths.dataset),
            "thresholds": str(paths.thresholds),
            "thresholds_sha256": thresholds_sha,
            "static_channels": static_names,
            "tail_percentile": float(cfg.loss.tail_percentile),
        },
    }
    for out in (paths.best, paths.last, paths.log_csv):
        out.parent.mkdir(parents=True, exist_ok=True)
    Path(paths.resume_dir).mkdir(parents=True, exist_ok=True)
    return _Session(
        paths=paths, cfg=cfg, dist=dist, device=device, train=train, val=val, model=model, net=net, opt=opt,
        sched=build_scheduler(opt, cfg), stopper=EarlyStopping(cfg.early_stopping_metric, cfg.patience,
                                                               cfg.loss.warmup_epochs),
        ema=None if not cfg.ema_decay else torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True),
        meta=meta, thr_x=train.thr_x.to(device), tail_x=static.tail_x.to(device), patches=patches,
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext(),
    )


def _resume(s: _Session) -> None:
    """Continue from ``resume.pt`` when it holds this config (same hash); otherwise start afresh."""
    paths, chash = s.paths, s.meta["config_hash"]
    if not paths.resume.exists():
        return
    try:
        state = checkpoint.load(paths.resume, map_location=s.device)
    except checkpoint.CheckpointError as exc:
        log.warning("ignoring resume state: %s", exc)
        return
    if state.get("config_hash") != chash:
        log.info("resume state %s is from another config (hash %s, now %s): starting afresh",
                 paths.resume, state.get("config_hash"), chash)
        return
    s.model.load_state_dict(state.get("train_model_state", state["model_state"]))
    if s.ema is not None:
        s.ema.load_state_dict(state["ema_state"])
    s.opt.load_state_dict(state["optimizer_state"])
    if s.sched is not None and state.get("scheduler_state"):
        s.sched.load_state_dict(state["scheduler_state"])
    s.stopper = EarlyStopping(**state["early_stopping"])
    s.history = list(state["history"])
    s.start_epoch = int(state["epoch"]) + 1
    _set_rng_state(state["rng"])
    log.info("resuming from %s after epoch %d (best %s %.4f at epoch %d)", paths.resume, state["epoch"],
             s.stopper.metric, s.stopper.best_value, s.stopper.best_epoch)


def epoch_batches(s: _Session, g: torch.Generator):
    """This rank's share of each batch of one epoch, on the training device.

    In memory: a permutation of the train days (or weighted draws, :func:`precip_cvae.data.epoch_indices`) cut
    into batches.  Streamed: :func:`precip_cvae.data.epoch_plan`'s batches (shuffled by time chunk, then within
    a buffer), read by ``train.loader_workers`` processes.  Both draw from ``g`` first (the augmentations after).
    """
    cfg, dist = s.cfg, s.dist
    if isinstance(s.train, FieldData):
        order = epoch_indices(s.train.is_event, cfg.oversample_heavy, g)
        for start in range(0, len(s.train), cfg.batch_size):
            index = order[start : start + cfg.batch_size][dist.rank :: dist.world]
            yield make_batch(s.train, index, s.thr_x, s.device, s.tail_x)
        return
    plan = epoch_plan(s.train, cfg.oversample_heavy, g, cfg.batch_size, cfg.shuffle_buffer_days)
    move = lambda t: None if t is None else t.to(s.device, non_blocking=True)  # noqa: E731
    for _, x, valid, y, coarse in stream_batches(s.train, plan, cfg.loader_workers, dist.rank, dist.world,
                                                 pin_memory=s.device.type == "cuda"):
        yield Batch(move(x), move(valid), move(y), move(coarse), s.thr_x, s.tail_x)


LOSS_TERMS = ("total", "rec", "mae_all", "mae_ext", "kl", "mass", "crps", "tail", "energy", "pooled", "mean")


def _train_epoch(s: _Session, epoch: int, flag: SignalFlag) -> tuple[dict[str, float], float]:
    """One pass over the train days (this rank's share of each batch); the mean loss terms over all ranks and
    the seconds it took.

    Raises
    ------
    TrainingInterrupted
        A signal arrived (on any rank): the state after the previous epoch is the resume state.
    NonFiniteLoss
        The loss of a step was not finite (no update was made).
    """
    cfg, dist, paths = s.cfg, s.dist, s.paths
    t0 = time.perf_counter()
    s.net.train()
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    n_steps = 0
    for step, batch in enumerate(epoch_batches(s, g)):
        if dist.any_true(flag.signum is not None):
            raise TrainingInterrupted(
                flag.signum or signal.SIGTERM,
                f"interrupted by signal {flag.signum} in epoch {epoch} step {step}; the state after epoch "
                f"{epoch - 1} is in {paths.resume}; rerun to resume",
            )
        batch = augment(batch, cfg.augment, g, cfg)
        if s.patches is not None:
            batch = s.patches.crop(batch, g)
        losses = train_step(s.net, s.opt, batch, cfg, epoch, s.train.transform, s.autocast,
                            dist if dist.world > 1 else None)
        if losses is None:
            raise NonFiniteLoss(
                f"non-finite loss at epoch {epoch} step {step}; the last good state (epoch "
                f"{epoch - 1}) is in {paths.resume}. Lower train.lr or check the inputs."
            )
        if s.ema is not None:
            s.ema.update_parameters(s.model)
        for k in sums:
            sums[k] += float(losses[k].detach())
        n_steps += 1
    means = {k: v / n_steps for k, v in dist.mean(sums).items()}
    return means, time.perf_counter() - t0


def _validate_epoch(s: _Session, epoch: int) -> tuple[dict[str, float], float, bool, bool, float]:
    """Rank 0 validates on prior samples; every rank steps the scheduler and the early stopping with rank 0's
    value.  Returns (scores, value, is_best, should_stop, lr): the scores are empty on the other ranks, lr is
    the learning rate this epoch trained with (read before the scheduler steps)."""
    cfg, dist = s.cfg, s.dist
    if dist.main:
        scores = validate(s.eval_model, s.val, cfg, epoch, s.device, validation_batch(s.eval_model, cfg))
        value = scores[f"val_{cfg.early_stopping_metric}"]
    else:  # only rank 0 validates; the others follow its decisions
        scores, value = {}, 0.0
    value = dist.broadcast_value(value)
    lr = s.opt.param_groups[0]["lr"]
    if s.sched is not None:
        s.sched.step(value) if cfg.scheduler == "plateau" else s.sched.step()
    is_best, should_stop = s.stopper.update(epoch, value)
    return scores, value, is_best, dist.broadcast_flag(should_stop), lr


def _log_and_save(s: _Session, epoch: int, means: dict[str, float], scores: dict[str, float], value: float,
                  is_best: bool, lr: float, seconds: float, train_seconds: float) -> None:
    """The epoch's row and log line; best.pt when best, last.pt and the resume state, then train_log.csv."""
    cfg, paths = s.cfg, s.paths
    beta = beta_schedule(epoch, cfg.loss.beta_kl, cfg.loss.warmup_epochs)
    row = {
        "epoch": epoch, "beta": beta, "lr": lr,
        "warmup_done": warmup_finished(epoch, cfg.loss.warmup_epochs),
        "train_loss": means["total"], **{f"train_{k}": means[k] for k in LOSS_TERMS if k != "total"},
        **scores, "is_best": is_best, "epoch_seconds": seconds, "samples_per_s": len(s.train) / train_seconds,
    }
    s.history.append({k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()})
    log.info(
        "epoch %3d/%d beta %.4f loss %.4f | val %s %.4f (MAE_all %.3f MAE_tail %.3f freq %.2f CRPS %.3f "
        "twCRPS %.3f) | %.1f s, %.0f samples/s%s",
        epoch + 1, cfg.epochs, beta, row["train_loss"], cfg.early_stopping_metric, value,
        scores["val_MAE_all"], scores["val_MAE_tail"], scores["val_freq_ratio"], scores["val_CRPS"],
        scores["val_twCRPS"], seconds, row["samples_per_s"], "  * best" if is_best else "",
    )
    state = s.snapshot(epoch)
    if is_best:
        checkpoint.save(state, paths.best)
        checkpoint.save(state, paths.resume_best)
    checkpoint.save(state, paths.last)
    checkpoint.save(state, paths.resume)
    _write_log(s.history, paths.log_csv)  # after the resume state: a logged epoch is never lost to a kill


def _finish(s: _Session, epoch: int) -> list[dict]:
    """best.pt from the selected epoch (restored from resume_dir if a failed attempt lost it, else the last
    epoch with a warning when none was selected), the final log, and the resume state removed."""
    paths, cfg, stopper = s.paths, s.cfg, s.stopper
    if epoch < s.start_epoch:  # nothing left to train (resumed after the last epoch)
        checkpoint.save(s.snapshot(epoch), paths.last)
    if not paths.best.exists() and stopper.best_epoch >= 0 and paths.resume_best.exists():
        # a failed earlier attempt lost its declared outputs; the selected model survived in resume_dir
        with atomic_path(paths.best) as tmp:
            tmp.write_bytes(paths.resume_best.read_bytes())
    if stopper.best_epoch < 0 or not paths.best.exists():
        log.warning(
            "no epoch after the KL warm-up (%d epochs) was validated: best.pt is the last epoch, not a selected model",
            cfg.loss.warmup_epochs,
        )
        with atomic_path(paths.best) as tmp:
            tmp.write_bytes(paths.last.read_bytes())
    _write_log(s.history, paths.log_csv)
    paths.resume.unlink(missing_ok=True)
    paths.resume_best.unlink(missing_ok=True)
    log.info("training done: %d epochs, best %s %.4f at epoch %d", len(s.history), cfg.early_stopping_metric,
             stopper.best_value, stopper.best_epoch + 1)
    return s.history
