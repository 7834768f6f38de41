"""download@<dataset>: generate (SynthPed) or fetch and verify one dataset, then write its manifest."""

from __future__ import annotations

import argparse
import json
import shutil

from dmf_core import paths
from dmf_core.config import Config
from dmf_core.runtime import StageError, run_stage


def generate_synthetic(cfg: Config, name: str) -> None:
    from dmf_core.data import synth

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


def main(cfg: Config, name: str) -> None:
    from dmf_core.data.layouts import parse_layout
    from dmf_core.data.manifest import write_manifest

    spec = cfg.dataset(name)
    report: dict = {"dataset": name, "layout": spec.layout, "source": spec.source}
    if spec.source == "synth":
        generate_synthetic(cfg, name)
        root = paths.raw_dir(name)
        manifest = parse_layout(spec.layout, root, name)
    else:
        from dmf_core.data.acquire import acquire, expected_statistics, layout_options
        from dmf_core.data.manifest import check_statistics, verify_images

        root = acquire(name, spec, raw_dir=paths.raw_dir(name), lock_file=paths.CHECKSUMS,
                       cache_dir=paths.ARCHIVES)
        manifest = parse_layout(spec.layout, root, name, **layout_options(name, spec))
        check_statistics(manifest, expected_statistics(name, spec), allow_partial=spec.allow_partial)
        # unreadable images are listed (inside the stage's output) and counted, never silently dropped
        bad = verify_images(manifest, root, root / "bad_images.txt")
        report["unreadable_images"] = len(bad)
    if manifest.empty:
        raise StageError(f"{root}: no images found for layout {spec.layout!r}")
    write_manifest(manifest, paths.manifest_path(name))
    counts = manifest.groupby("split").agg(images=("image_id", "size"), ids=("pid", "nunique"))
    report["splits"] = {split: {k: int(v) for k, v in row.items()} for split, row in counts.iterrows()}
    out = paths.dataset_stats_json(name)  # statistics, not a DVC metric (docs/contracts.md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", help="a key under datasets: in params.yaml")
    args = parser.parse_args()
    run_stage(f"download@{args.dataset}", lambda cfg: main(cfg, args.dataset))
