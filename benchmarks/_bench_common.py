"""Shared helpers of the evaluation benchmarks: synthetic re-ID-like features, per-case subprocesses."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import numpy as np


def synthetic(nq: int, ng: int, dim: int, n_ids: int, n_cams: int, seed: int = 0, noise: float = 3.0):
    """Identity-clustered float32 features (a mediocre model: positives spread over the ranking),
    pids 1..n_ids (5% of the gallery as pid-0 distractors) and cameras."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids + 1, dim)).astype(np.float32)
    q_pids = rng.integers(1, n_ids + 1, nq)
    g_pids = rng.integers(1, n_ids + 1, ng)
    g_pids[rng.random(ng) < 0.05] = 0
    qf = centres[q_pids] + noise * rng.standard_normal((nq, dim), dtype=np.float32)
    gf = centres[g_pids] + noise * rng.standard_normal((ng, dim), dtype=np.float32)
    return qf, gf, q_pids, g_pids, rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_case(script: str, case: str, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script --case case`` in a fresh interpreter (peak RSS per case); parse its JSON line."""
    cmd = [sys.executable, script, "--case", case, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"case": case, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)
