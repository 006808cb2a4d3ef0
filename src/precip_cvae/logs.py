"""Logging for stage scripts: one readable line per event, to the rule's log and stderr."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(log_path: str | Path | None = None, level: int = logging.INFO, append: bool = False) -> logging.Logger:
    """Send package logging to ``log_path`` (line-buffered, so ``tail -f`` works) and stderr; ``append``
    keeps what the file holds (a DDP rank writing into its rule's log)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        if not append:
            open(log_path, "w").close()  # a fresh log, then appended to: a DDP rank writing into the same file
        handlers.append(logging.FileHandler(log_path, mode="a"))  # O_APPEND: writers never overwrite each other
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=".*v3_unstable.*")
    for noisy in ("distributed", "fsspec", "asyncio", "numcodecs", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return root


@contextlib.contextmanager
def stage_logging(log_path: str | Path | None, stage: str):
    """Set up logging for a stage; log its duration, or the error with its traceback."""
    setup(log_path)
    log = logging.getLogger(f"precip_cvae.{stage}")
    start = time.perf_counter()
    log.info("stage %s started", stage)
    try:
        yield log
    except BaseException as exc:
        log.error("stage %s failed after %.1f s: %s: %s", stage, time.perf_counter() - start, type(exc).__name__, exc,
                  exc_info=not isinstance(exc, (ValueError, KeyboardInterrupt, SystemExit)))
        raise
    log.info("stage %s finished in %.1f s", stage, time.perf_counter() - start)
