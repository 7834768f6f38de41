"""pack@<dataset>: one single-file LMDB (+ parquet sidecar) per split of a dataset's manifest."""

from __future__ import annotations

import argparse
import shutil

from dmf_core import paths
from dmf_core.config import Config, expected_lmdb_meta
from dmf_core.runtime import run_stage
from dmf_core.track import write_record


def main(cfg: Config, name: str) -> None:
    from dmf_core.data.sources.manifest import read_manifest
    from dmf_core.data.store.lmdb_store import pack_split

    manifest = read_manifest(paths.manifest_path(name))
    out_dir = paths.lmdb_dir(name)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    summary = {}
    for split in sorted(manifest["split"].unique()):
        rows = manifest[manifest["split"] == split].sort_values("image_id").reset_index(drop=True)
        report = pack_split(rows, paths.raw_dir(name), paths.lmdb_path(name, split),
                            resize=cfg.pack.resize, on_corrupt=cfg.pack.on_corrupt,
                            relabel=split == "train", params_fingerprint=expected_lmdb_meta(cfg))
        summary[split] = {"images": report.count, "skipped": len(report.skipped), "bytes": report.bytes}
    write_record(paths.pack_stats_json(name), summary)  # statistics, not a DVC metric (docs/contracts.md)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", help="a key under datasets: in params.yaml")
    args = parser.parse_args()
    run_stage(f"pack@{args.dataset}", lambda cfg: main(cfg, args.dataset))
