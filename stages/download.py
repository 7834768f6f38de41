"""download@<dataset>: generate (SynthPed) or fetch and verify one dataset, then write its manifest."""

from __future__ import annotations

import argparse
import shutil
import socket
from pathlib import Path

from dmf_core import paths
from dmf_core.checks import certain_failures
from dmf_core.config import Config
from dmf_core.runtime import StageError, run_stage
from dmf_core.track import write_record


def generate_synthetic(cfg: Config, name: str) -> None:
    from dmf_core.data.synthped import world as synth

    out = paths.raw_dir(name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    s = cfg.synth
    if cfg.dataset(name).layout == "finegpr":
        synth.write_finegpr(tmp, ids=s.synthped.ids, images_per_id=s.synthped.images_per_id,
                            height=s.height, width=s.width, seed=s.seed, namespace=name)
    else:
        d = s.domain(name)
        synth.write_market_domain(tmp, name=name, style=d.style, train_ids=d.train_ids,
                                  test_ids=d.test_ids, height=s.height, width=s.width, seed=s.seed)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a killed generation never leaves a half dataset under the final name


def bad_images_report(name: str):
    """The list of unreadable images: next to the dataset's statistics, not inside its raw files."""
    return paths.dataset_stats_json(name).with_suffix(".bad_images.txt")


def acquire_real(cfg: Config, name: str):
    """Fetch, verify and extract a real dataset; (root, manifest, whether its counts are official)."""
    from dmf_core.data.sources.acquire import acquire, expected_statistics, layout_options
    from dmf_core.data.sources.layouts import parse_layout
    from dmf_core.data.sources.manifest import ACCEPTED_PARTIAL, check_statistics

    spec = cfg.dataset(name)
    own_folder = spec.layout == "csv" and spec.source == "dir"
    if own_folder:
        # the user's own folder: every row of its CSV checked before data/raw/<name> is touched;
        # data/raw/<name> mirrors the folder, so the manifest's image_ids hold there too
        manifest = parse_layout(spec.layout, Path(spec.location), name)
    root = acquire(name, spec, raw_dir=paths.raw_dir(name), lock_file=paths.CHECKSUMS, cache_dir=paths.ARCHIVES)
    if not own_folder:
        manifest = parse_layout(spec.layout, root, name, **layout_options(name, spec))
    expected = expected_statistics(name, spec)
    if not expected:  # no registry entry (your own images): nothing to compare the counts with
        return root, manifest, "unknown"
    table = check_statistics(manifest, expected, allow_partial=spec.allow_partial)
    return root, manifest, "match" if table["ok"].all() else ACCEPTED_PARTIAL


def main(cfg: Config, name: str) -> None:
    from dmf_core.data.sources.layouts import parse_layout
    from dmf_core.data.sources.manifest import verify_images, write_manifest

    spec = cfg.dataset(name)
    # the first stage of `dvc repro` to run says what a later one would certainly fail on
    problem = certain_failures(cfg, ".", skip=(name,))
    if problem:
        raise StageError(problem)
    report: dict = {"dataset": name, "layout": spec.layout, "source": spec.source}
    if spec.source == "synth":
        generate_synthetic(cfg, name)
        root = paths.raw_dir(name)
        manifest = parse_layout(spec.layout, root, name)
    else:
        root, manifest, report["official_statistics"] = acquire_real(cfg, name)
    if manifest.empty:
        raise StageError(f"{root}: no images found for layout {spec.layout!r}")
    report["folder"] = manifest.attrs["folder"]
    # unreadable images are listed and counted, never silently dropped
    report["unreadable_images"] = len(verify_images(manifest, root, bad_images_report(name)))
    write_manifest(manifest, paths.manifest_path(name))
    if report.get("official_statistics") in ("match", "unknown"):  # a partial copy's hash would refuse the full one
        from dmf_core.data.sources.acquire import extracted_record, record_verified

        record_verified(name, extracted_record(root), paths.CHECKSUMS,
                        recorded_by=f"download@{name} on {socket.gethostname()}")
    counts = manifest.groupby("split").agg(images=("image_id", "size"), ids=("pid", "nunique"))
    report["splits"] = {split: {k: int(v) for k, v in row.items()} for split, row in counts.iterrows()}
    write_record(paths.dataset_stats_json(name), report)  # statistics, not a DVC metric (docs/contracts.md)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", help="a key under datasets: in params.yaml")
    args = parser.parse_args()
    run_stage(f"download@{args.dataset}", lambda cfg: main(cfg, args.dataset))
