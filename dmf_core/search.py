"""Features, retrieval and maps with a trained model, outside the pipeline: ``dmf extract``,
``dmf search`` and ``dmf explain``.

- :func:`extract_to_files`: features of a packed LMDB split or of image files/folders, in
  batches, with a progress bar -> ``<out>.npy`` (float32, N x D, L2-normalised f, the test-time
  feature of the evaluation: pre-BNNeck, optionally flip-averaged) + ``<out>.parquet`` (one row per
  feature, in the same order: ``key, image_id, pid, camid`` for an LMDB split, ``path`` for files).
- :func:`search`: query images -> the top-k of a packed gallery split by cosine distance
  (``1 - cos``) with a faiss inner-product index over the L2-normalised features; writes a JSON of
  (gallery image, distance) per query and a ranked-list PNG (``maps``: with each image's map under it).
- :func:`explain_files`: image files -> one PNG per image with its map over it
  (:mod:`dmf_core.eval.explain`: how much each patch moves the retrieval feature).

Both embed through :class:`~dmf_core.extractor.FeatureExtractor` (image files directly; an LMDB
split through the evaluation's test loader, decoded to [0, 1], then the extractor's model call).
The model directory (``models/<source>`` or ``models/pretrain``) carries its own
``config.json``: input size and normalisation come from there, not from params.yaml, so a model
is always fed what it was trained on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dmf_core import paths

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PARQUET_META_KEY = b"dmf.features"


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named in ``inputs``: files as given, folders searched recursively (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    if not files:
        raise FileNotFoundError("no query images given")
    return files


def resolve_split(source: str | Path, split: str) -> Path:
    """A packed split: an ``.lmdb`` path as given, or a dataset name -> data/lmdb/<name>/<name>-<split>.lmdb."""
    source = Path(source)
    if source.suffix == ".lmdb":
        return source
    if len(source.parts) == 1 and not source.exists():
        return paths.lmdb_path(str(source), split)
    raise ValueError(f"{source}: expected a packed split (<...>.lmdb) or a dataset name under data/lmdb/")


def is_lmdb_source(source: str | Path) -> bool:
    source = Path(source)
    return source.suffix == ".lmdb" or (len(source.parts) == 1 and not source.exists()
                                        and paths.lmdb_dir(str(source)).is_dir())


# ---------------------------------------------------------------------------------------------
# Model and features
# ---------------------------------------------------------------------------------------------


def load_extractor(model_dir: str | Path, device: str = "auto", *, batch_size: int = 128, flip: bool = False,
                   num_workers: int = 0):
    """The :class:`~dmf_core.extractor.FeatureExtractor` of a model folder a training stage wrote."""
    from dmf_core.extractor import FeatureExtractor

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: model folder not found (expected e.g. models/<source>; "
                                "run `dvc repro` or `dvc pull` first)")
    return FeatureExtractor.from_pretrained(model_dir, device=device, batch_size=batch_size, flip=flip,
                                            num_workers=num_workers)


def split_features(extractor, lmdb_path: Path, desc: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Features of every image of a packed split, in key order, and the split's sidecar: the
    evaluation's test loader with the [0, 1] transform, through the extractor's model call."""
    from dmf_core.data.loading.loader import build_test_loader
    from dmf_core.extractor import UNIT_RANGE

    loader = build_test_loader(Path(lmdb_path), UNIT_RANGE, *extractor.input_size, extractor.batch_size,
                               extractor.num_workers, pin_memory=extractor.device.type == "cuda")
    return extractor.embed_batches(loader, desc=desc).numpy(), loader.dataset.sidecar


def file_features(extractor, files: Sequence[Path], desc: str) -> np.ndarray:
    return extractor([str(f) for f in files], desc=desc).numpy()


def _ids_frame_of_split(sidecar: pd.DataFrame) -> pd.DataFrame:
    return sidecar[["key", "image_id", "pid", "camid"]].reset_index(drop=True)


def features_paths(out: str | Path) -> tuple[Path, Path]:
    """``feats`` or ``feats.npy`` -> (``feats.npy``, ``feats.parquet``)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".npy" else out
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".parquet")


def write_features(out: str | Path, feats: np.ndarray, ids: pd.DataFrame, info: dict) -> tuple[Path, Path]:
    """``<out>.npy`` + ``<out>.parquet`` (ids in feature order; ``info`` in the schema metadata)."""
    if len(ids) != len(feats):
        raise ValueError(f"{out}: {len(feats)} features but {len(ids)} id rows")
    npy, parquet = features_paths(out)
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, feats)
    table = pa.Table.from_pandas(ids.reset_index(drop=True), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[PARQUET_META_KEY] = json.dumps(info, sort_keys=True).encode()
    pq.write_table(table.replace_schema_metadata(meta), parquet)
    return npy, parquet


def read_features(path: str | Path) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """What :func:`write_features` wrote: (features, ids, info)."""
    npy, parquet = features_paths(path)
    for p in (npy, parquet):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (write it with `dmf extract ... --out {npy}`)")
    feats = np.load(npy, allow_pickle=False)
    pfile = pq.ParquetFile(parquet)
    info = json.loads((pfile.schema_arrow.metadata or {}).get(PARQUET_META_KEY, b"{}"))
    ids = pfile.read().to_pandas()
    if len(ids) != len(feats):
        raise ValueError(f"{parquet}: {len(ids)} rows, but {npy} holds {len(feats)} features")
    return feats, ids, info


def extract_to_files(source: Sequence[str | Path], out: str | Path, *, model_dir: str | Path,
                     split: str = "gallery", batch_size: int = 128, flip: bool = False, device: str = "auto",
                     num_workers: int = 0) -> tuple[Path, Path, int]:
    """Features of one packed split (an ``.lmdb`` path or a dataset name + ``split``) or of image
    files/folders -> ``<out>.npy`` + ``<out>.parquet``. Returns (npy, parquet, count)."""
    extractor = load_extractor(model_dir, device, batch_size=batch_size, flip=flip, num_workers=num_workers)
    if len(source) == 1 and is_lmdb_source(source[0]):
        lmdb_path = resolve_split(source[0], split)
        feats, sidecar = split_features(extractor, lmdb_path, f"extract {lmdb_path.name}")
        ids = _ids_frame_of_split(sidecar)
        origin = {"lmdb": str(lmdb_path)}
    else:
        files = list_images(source)
        feats = file_features(extractor, files, f"extract {len(files)} images")
        ids = pd.DataFrame({"path": [str(f) for f in files]})
        origin = {"files": [str(s) for s in source]}
    info = {**origin, "model": str(Path(model_dir)), "params_hash": extractor.meta.get("params_hash"),
            "flip": bool(flip), "normalised": True, "dim": int(feats.shape[1]) if feats.ndim == 2 else 0}
    npy, parquet = write_features(out, feats, ids, info)
    log.info("%d features of dim %d -> %s, %s", len(feats), info["dim"], npy, parquet)
    return npy, parquet, len(feats)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def _gallery_features(extractor, gallery_lmdb: Path, sidecar: pd.DataFrame, cached: str | Path | None
                      ) -> np.ndarray:
    if cached is not None:
        feats, ids, info = read_features(cached)
        if "image_id" not in ids or ids["image_id"].astype(str).tolist() != sidecar["image_id"].astype(str).tolist():
            raise ValueError(f"{cached}: its rows are not the images of {gallery_lmdb} in key order "
                             f"(extract them with `dmf extract {gallery_lmdb} --model {extractor.source}`)")
        if info.get("params_hash") not in (None, extractor.meta.get("params_hash")):
            raise ValueError(f"{cached}: extracted with another model (params_hash {info.get('params_hash')}, "
                             f"{extractor.source} has {extractor.meta.get('params_hash')})")
        if bool(info.get("flip", False)) != extractor.flip:
            raise ValueError(f"{cached}: extracted with flip={info.get('flip')}, this search uses "
                             f"flip={extractor.flip}")
        return feats
    return split_features(extractor, gallery_lmdb, f"gallery {gallery_lmdb.name}")[0]


def search(queries: Sequence[str | Path], *, model_dir: str | Path, gallery: str | Path, k: int = 10,
           out_dir: str | Path = "reports/search", flip: bool = False, batch_size: int = 128,
           device: str = "auto", num_workers: int = 0, gallery_features: str | Path | None = None,
           plot_queries: int = 8, maps: str | None = None) -> dict:
    """Top-k gallery matches of each query image; writes ``search.json`` and ``search.png``
    under ``out_dir`` and returns the JSON record. ``maps`` (a method of
    :mod:`dmf_core.eval.explain`, or None): each image of the PNG has its map under it."""
    from dmf_core.data.store.lmdb_store import LmdbReader
    from dmf_core.eval.retrieval import topk

    files = list_images(queries)
    gallery_lmdb = resolve_split(gallery, "gallery")
    reader = LmdbReader(gallery_lmdb)
    extractor = load_extractor(model_dir, device, batch_size=batch_size, flip=flip, num_workers=num_workers)
    sidecar = reader.sidecar
    g_feats = _gallery_features(extractor, gallery_lmdb, sidecar, gallery_features)
    q_feats = file_features(extractor, files, "queries")
    dist, idx = topk(q_feats, g_feats, k)

    record = {"model": str(Path(model_dir)), "gallery": str(gallery_lmdb), "k": int(idx.shape[1]),
              "distance": "cosine (1 - cos of L2-normalised features)", "flip": bool(flip), "queries": []}
    for qi, path in enumerate(files):
        matches = []
        for rank, (gi, d) in enumerate(zip(idx[qi].tolist(), dist[qi].tolist()), start=1):
            row = sidecar.iloc[gi]
            matches.append({"rank": rank, "image_id": str(row["image_id"]), "key": str(row["key"]),
                            "pid": int(row["pid"]), "camid": int(row["camid"]), "distance": round(float(d), 6)})
        record["queries"].append({"query": str(path), "matches": matches})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "search.json", out_dir / "search.png"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    shown = min(len(files), max(1, int(plot_queries)))
    load_map = None if maps is None else search_map_loader(extractor, files, reader, maps)
    plot_search_results(files[:shown], idx[:shown], dist[:shown], reader, png_path, load_map=load_map)
    record["outputs"] = {"json": str(json_path), "png": str(png_path)}
    log.info("%d queries, top-%d of %d gallery images -> %s, %s", len(files), record["k"], len(sidecar),
             json_path, png_path)
    return record


def plot_search_results(query_files: Sequence[Path], idx: np.ndarray, dist: np.ndarray, reader,
                        out_png: Path, load_map=None) -> Path:
    """One row per query (identity unknown): the query file, then its top-k gallery images with
    rank, distance, id and camera; the evaluation's ranked-list drawing (with ``load_map``, the
    maps of the same images under each row)."""
    from PIL import Image

    from dmf_core.data.images import decode_rgb
    from dmf_core.eval.visualise import plot_ranked_list

    sidecar = reader.sidecar

    def load_image(role: str, index: int):
        if role == "query":
            with Image.open(query_files[index]) as im:
                return im.convert("RGB")
        return decode_rgb(reader.get_bytes(int(index)), "stored image")

    queries = [{"index": i, "pid": None, "camid": None, "label": Path(f).name[:14]} for i, f in enumerate(query_files)]
    gallery = [{"index": int(j), "pid": int(sidecar["pid"].iloc[j]), "camid": int(sidecar["camid"].iloc[j])}
               for j in range(len(sidecar))]
    return plot_ranked_list(queries, gallery, idx.tolist(), out_png, load_image=load_image,
                            top_k=idx.shape[1], distances=dist.tolist(), thumb=(96, 48), load_map=load_map)


# ---------------------------------------------------------------------------------------------
# Maps: dmf explain, and the maps of a search's picture
# ---------------------------------------------------------------------------------------------


def _normalised(extractor, unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] images at the model's size -> what the model sees (its mean/std), on its device."""
    import torch

    return (unit.to(extractor.device, torch.float32) - extractor.encoder.mean) / extractor.encoder.std


def search_map_loader(extractor, query_files: Sequence[Path], reader, method: str):
    """``load_map(kind, index)`` of a search picture: a query file (index into ``query_files``) or
    a gallery image (index into ``reader``), decoded as for its feature, with its map over it."""
    import torch

    from dmf_core.data.images import decode_rgb
    from dmf_core.data.loading.loader import decode_to_tensor
    from dmf_core.eval.explain import map_loader
    from dmf_core.extractor import ImageInputs

    transform = extractor.transform()

    def load_input(kind: str, index: int) -> torch.Tensor:
        if kind == "query":
            unit = ImageInputs([str(query_files[index])], transform)[0]
        else:
            unit = transform(decode_to_tensor(reader.get_bytes(int(index)), "stored image")).as_subclass(torch.Tensor)
        return _normalised(extractor, unit[None])[0]

    def load_image(kind: str, index: int):
        if kind == "query":
            return decode_rgb(Path(query_files[index]), str(query_files[index]))
        return decode_rgb(reader.get_bytes(int(index)), "stored image")

    return map_loader(extractor.model, load_input, load_image, method)


def _unique_png_names(files: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per file; a stem seen before gets ``_2``, ``_3``, ..."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        stem = Path(f).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    return names


def explain_files(inputs: Sequence[str | Path], *, model_dir: str | Path, out_dir: str | Path,
                  method: str | None = None, device: str = "auto", sheet: str | Path | None = None,
                  batch_size: int = 32) -> list[Path]:
    """One PNG per image of ``inputs`` (files and folders) under ``out_dir``: the image as the
    model sees it (resized to its input) and the ``method`` map over it (:mod:`dmf_core.eval.explain`;
    default its default). ``sheet``: also one PNG with every image side by side. Every image is
    read and every map computed before anything is written: a bad input writes nothing."""
    import torch

    from dmf_core.eval.explain import DEFAULT_METHOD, METHODS, patch_maps, plot_explanations
    from dmf_core.extractor import ImageInputs

    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"map method {method!r}; expected one of {', '.join(METHODS)}")
    files = list_images(inputs)
    extractor = load_extractor(model_dir, device)
    dataset = ImageInputs([str(f) for f in files], extractor.transform())
    unit = torch.stack([dataset[i] for i in range(len(files))])  # an unreadable file fails here
    maps = torch.cat([patch_maps(extractor.model, _normalised(extractor, chunk), method)
                      for chunk in unit.split(batch_size)]).numpy()
    pictures = [_to_pil(u) for u in unit]
    out_dir = Path(out_dir)
    written = []
    for name, f, picture, heat in zip(_unique_png_names(files), files, pictures, maps):
        written.append(plot_explanations([picture], [heat], out_dir / name, titles=[Path(f).name[:24]],
                                         method=method))
    if sheet is not None:
        written.append(plot_explanations(pictures, list(maps), Path(sheet), method=method,
                                         titles=[Path(f).name[:18] for f in files]))
    log.info("%d maps (%s) of %s -> %s", len(files), method, model_dir, out_dir)
    return written


def _to_pil(unit: torch.Tensor):
    from PIL import Image

    array = (unit.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array, "RGB")
