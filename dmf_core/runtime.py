"""What every stage script does around its work: logging, config loading, clean failure."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dmf_core.config import Config, ConfigError, load_config

log = logging.getLogger("dmf")


class StageError(RuntimeError):
    """A failure the user can act on; reported as one line without a traceback."""


def setup_logging() -> None:
    level = os.environ.get("DMF_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def run_stage(name: str, body: Callable[[Config], None], params: str | Path = "params.yaml") -> None:
    """Load and validate params, run ``body``; expected errors exit non-zero with one clear line.

    Set ``DMF_DEBUG=1`` to see the traceback of such an error as well.
    """
    setup_logging()
    started = time.perf_counter()
    try:
        cfg = load_config(params)
        body(cfg)
    except (ConfigError, StageError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("DMF_DEBUG"):
            raise
        print(f"dmf {name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    log.info("%s done in %.1f s", name, time.perf_counter() - started)
