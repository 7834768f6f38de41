"""What every stage script does around its work: logging, config loading, clean failure."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from dmf_core.config import Config, ConfigError, load_config

log = logging.getLogger("dmf")


class StageError(RuntimeError):
    """A failure the user can act on; reported as one line without a traceback."""


def process_rank() -> int:
    """This process's global rank under torchrun (``RANK``); 0 when not distributed."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def setup_logging() -> None:
    """Log lines on stderr: INFO on rank 0, WARNING on the other ranks of a torchrun job.

    ``DMF_LOG_LEVEL`` sets the level on every rank. Lines of a non-zero rank say which rank.
    """
    rank = process_rank()
    level = os.environ.get("DMF_LOG_LEVEL") or ("INFO" if rank == 0 else "WARNING")
    where = f" [rank {rank}]" if rank else ""
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s{where} %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def relaunch_under_torchrun(nproc: int) -> None:
    """With ``nproc`` > 1, replace this process by ``torchrun --standalone --nproc-per-node nproc``
    running the same script and arguments; a no-op for one process (a torchrun agent costs ~1.7 s
    of start-up for nothing) and inside a torchrun worker (``LOCAL_RANK`` is set)."""
    if nproc <= 1:
        return
    if "LOCAL_RANK" in os.environ:
        if "WORLD_SIZE" not in os.environ:  # not torchrun's: a stray variable would train alone
            raise StageError(f"train.nproc is {nproc}, but LOCAL_RANK={os.environ['LOCAL_RANK']} is set without "
                             "WORLD_SIZE; unset LOCAL_RANK, or start the stage under torchrun")
        return
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            sys.argv[0], *sys.argv[1:]]
    log.info("%d processes: %s", nproc, " ".join(argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        raise StageError(f"cannot start torchrun for train.nproc={nproc} ({exc})") from exc


def run_stage(name: str, body: Callable[[Config], None], params: str | Path = "params.yaml", *,
              distributed: bool = False) -> None:
    """Load and validate params, run ``body``; expected errors exit non-zero with one clear line.

    A ``distributed`` stage (training) runs under torchrun when ``train.nproc`` > 1, and in this
    one process otherwise. Log lines go through ``tqdm.write`` while ``body`` runs, so that a line
    logged while a progress bar is drawn comes out whole, on its own line, and the bar is redrawn
    below it. Set ``DMF_DEBUG=1`` to see the traceback of such an error as well.
    """
    setup_logging()
    started = time.perf_counter()
    try:
        cfg = load_config(params)
        if distributed:
            relaunch_under_torchrun(cfg.train.nproc)
        with logging_redirect_tqdm():
            body(cfg)
    except (ConfigError, StageError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("DMF_DEBUG"):
            raise
        print(f"dmf {name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    log.info("%s done in %.1f s", name, time.perf_counter() - started)
