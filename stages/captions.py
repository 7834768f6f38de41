"""captions: the pretraining caption table, generated from FineGPR attributes or read from captions people wrote."""

from __future__ import annotations

from pathlib import Path

from dmf_core import paths
from dmf_core.config import Config
from dmf_core.runtime import StageError, run_stage
from dmf_core.track import write_record


def main(cfg: Config) -> None:
    from dmf_core.checks import certain_failures
    from dmf_core.data.captions import generate as cap
    from dmf_core.data.captions.attributes import read_attributes
    from dmf_core.data.captions.published import read_caption_source
    from dmf_core.data.sources.manifest import read_manifest

    problem = certain_failures(cfg)  # before pack: a missing text encoder or weights fails pretraining
    if problem:
        raise StageError(problem)
    c = cfg.captions
    manifest = read_manifest(paths.manifest_path(c.dataset))
    out_parquet = paths.captions_parquet(c.dataset)
    out_json = out_parquet.with_name(out_parquet.stem + "_coco.json")
    out_parquet.parent.mkdir(parents=True, exist_ok=True)
    if c.source != "attributes":
        captions = read_caption_source(c, manifest, manifest_path=paths.manifest_path(c.dataset),
                                       raw_dir=paths.raw_dir(c.dataset))
        cap.write_captions(captions, out_parquet, out_json)
        metrics = cap.caption_metrics(captions)
        metrics.update(caption_source=c.source, skipped=captions.attrs.get("skipped", {}))
        if "entries" in captions.attrs:
            metrics["entries_per_split"] = captions.attrs["entries"]
    else:
        attributes = read_attributes(Path(c.file), on_bad_rows=c.on_bad_rows)
        result = cap.generate_captions(manifest, attributes, per_image=c.per_image, seed=c.seed,
                                       viewpoint_words=c.viewpoint_words, on_bad_rows=c.on_bad_rows,
                                       content=c.content)
        cap.write_captions(result, out_parquet, out_json)
        metrics = result.metrics
    write_record(paths.captions_stats_json(), metrics)  # statistics, not a DVC metric (docs/contracts.md)


if __name__ == "__main__":
    run_stage("captions", main)
