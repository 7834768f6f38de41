"""The `dmf` command: what a re-ID user touches outside `dvc repro`.

  dmf search    query images -> top-k matches in a packed gallery split (JSON + ranked-list PNG)
  dmf explain   images -> one PNG each: where the model looks (how much each patch moves the feature)
  dmf extract   features of a packed split or of image files -> .npy + parquet of ids
  dmf export    a trained model -> one ONNX or TorchScript file (images in [0, 1] -> features)
  dmf datasets  every known dataset, its state here and what to do next
  dmf doctor    versions, GPUs, disk, what the params need (text encoder, weights, files), DVC, git
  dmf matrix    the cross-domain evaluation matrix of the last run
  dmf showcase  a sheet of SynthPed images with their captions (README picture)

Errors are one line on stderr and a non-zero exit code; `dmf --debug <command>` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dmf_core import paths

# dmf_core.eval.explain's methods, its default first (not imported here: `dmf --help` stays free of torch).
MAP_METHODS = ("gradient", "rollout")


def _doctor(args: argparse.Namespace) -> int:
    """Facts to know before a long run: versions, GPUs, disk, what the params need, DVC and git."""
    import torch

    rows = [("python", sys.version.split()[0]), ("torch", torch.__version__),
            ("torch built for CUDA", torch.version.cuda or "no (CPU build)"),
            ("cuda available", str(torch.cuda.is_available()))]
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        rows.append((f"gpu {i}", f"{props.name}, {props.total_memory / 2**30:.0f} GiB"))
    if torch.cuda.is_available():
        rows.append(("bf16 supported", str(torch.cuda.is_bf16_supported())))
    rows.append(("cpu threads", str(os.cpu_count())))
    for where in (paths.DATA, paths.MODELS):
        probe = where if where.exists() else Path(".")
        rows.append((f"free disk ({where}/)", f"{shutil.disk_usage(probe).free / 2**30:.1f} GiB"))
    params_row, needs = _doctor_requirements(Path(args.params))
    rows.append(params_row)
    rows += [(r.what, r.detail if r.ok else f"{'MISSING' if r.certain else 'WARNING'}: {r.detail}")
             for r in needs]
    for pkg in ("dvc", "transformers", "faiss-cpu", "lmdb", "clearml"):
        try:
            rows.append((pkg, importlib.metadata.version(pkg)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((pkg, "not installed"))
    git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True)
    rows.append(("git repository", "yes" if git.returncode == 0 else "no: run `git init`"))
    rows.append(("dvc initialised", "yes" if Path(".dvc").is_dir() else "no: run `dvc init`"))
    rows.append(("dvc remote", _dvc_remote()))
    rows.append(("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "unset")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    failing = [r for r in needs if not r.ok and r.certain]
    if failing:
        print(f"{len(failing)} thing(s) the params need are missing: `dvc repro` would fail on them")
    return 1 if failing else 0


def _doctor_requirements(params: Path) -> tuple[tuple[str, str], list]:
    """A row about the params file, and what those params need (none when it cannot be read)."""
    from dmf_core.checks import requirements
    from dmf_core.config import ConfigError, load_config

    if not params.is_file():
        return ("params", f"{params} not found: what the params need is not checked"), []
    try:
        cfg = load_config(params)
    except ConfigError as exc:
        return ("params", f"{params} is not valid: {exc}"), []
    return ("params", str(params)), requirements(cfg)


def _dvc_remote() -> str:
    """The default DVC remote as DVC itself resolves it, or how to add one.

    DVC's config API merges its levels as ``dvc`` does: system, global, then the repository's
    .dvc/config and .dvc/config.local (the DVC repository that holds the working directory).
    """
    from dvc.config import Config
    from dvc.exceptions import DvcException

    try:
        config = Config.from_cwd()
    except (DvcException, OSError) as exc:
        return f"unreadable DVC config: {exc}"
    remotes = {name: section.get("url", "?") for name, section in config["remote"].items()}
    default = config["core"].get("remote")
    if default in remotes:
        return f"{default} -> {remotes[default]} (default)"
    if not remotes:
        return "none: `dvc remote add -d store <url>` to share data and models (docs/scaling.md)"
    listed = ", ".join(f"{name} -> {url}" for name, url in remotes.items())
    if default:
        return f"{listed} (the default {default!r} is not defined: `dvc remote default <name>`)"
    return f"{listed} (no default: `dvc remote default <name>`)"


def _matrix(args: argparse.Namespace) -> int:
    """Print the cross-domain evaluation matrix of the last `dvc repro`."""
    path = paths.REPORTS / "eval_matrix.md"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `dvc repro` first")
    print(path.read_text())
    if args.json:
        print(json.dumps(json.loads(paths.eval_matrix_json().read_text()), indent=2))
    return 0


def _search(args: argparse.Namespace) -> int:
    """Query image(s) or folder(s) -> the top-k matches in a packed gallery split (faiss, cosine)."""
    from dmf_core.search import search

    record = search(args.queries, model_dir=args.model, gallery=args.gallery, k=args.k, out_dir=args.out,
                    flip=args.flip, batch_size=args.batch_size, device=args.device,
                    num_workers=args.num_workers, gallery_features=args.gallery_features,
                    plot_queries=args.plot_queries, maps=args.map_method if args.maps else None)
    for q in record["queries"][: args.print]:
        best = ", ".join(f"{m['image_id']} ({m['distance']:.3f})" for m in q["matches"][:3])
        print(f"{q['query']}: {best}{', ...' if len(q['matches']) > 3 else ''}")
    print(f"wrote {record['outputs']['json']} and {record['outputs']['png']}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    """Images -> one PNG each: the image and, over it, how much each patch moves its retrieval feature."""
    from dmf_core.search import explain_files

    written = explain_files(args.images, model_dir=args.model, out_dir=args.out, method=args.method,
                            device=args.device, sheet=args.sheet)
    pictures = len(written) - (args.sheet is not None)
    print(f"wrote {pictures} picture(s) to {args.out}" + (f" and the sheet {args.sheet}" if args.sheet else ""))
    return 0


def _extract(args: argparse.Namespace) -> int:
    """Features of a packed split or of image files/folders -> .npy + a parquet of ids."""
    from dmf_core.search import extract_to_files

    npy, parquet, n = extract_to_files(args.source, args.out, model_dir=args.model, split=args.split,
                                       batch_size=args.batch_size, flip=args.flip, device=args.device,
                                       num_workers=args.num_workers)
    print(f"wrote {n} features to {npy} and their ids to {parquet}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """A trained model -> one ONNX or TorchScript file (images N x 3 x H x W in [0, 1] -> features)."""
    from dmf_core.export import export_model

    record = export_model(args.model_dir, args.out, args.format, flip=args.flip, opset=args.opset,
                          check=not args.no_check)
    checked = ("not checked (--no-check)" if record["max_abs_diff"] is None else
               f"checked at batch sizes {record['checked_batches']}: max abs diff {record['max_abs_diff']:.2g}")
    print(f"wrote {record['path']} ({record['format']}; input {record['input']}; "
          f"output {record['output']}; {checked})")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    """Every registered or configured dataset: its state here, its size, and what to do next."""
    from dmf_core.datasets_view import collect, format_table

    if args.forget:
        return _forget(args.forget)
    rows = collect(args.params)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(format_table(rows, verbose=args.verbose))
    return 0


def _forget(name: str) -> int:
    """Drop the archive hash recorded for ``name`` (its archive was replaced on purpose)."""
    from dmf_core.data.sources.fetch import forget_lock, read_lock

    record = forget_lock(paths.CHECKSUMS, name)
    if record is None:
        known = ", ".join(sorted(read_lock(paths.CHECKSUMS))) or "none"
        raise KeyError(f"{paths.CHECKSUMS}: no hash recorded for {name!r} (recorded: {known})")
    print(f"forgot sha256 {record.get('sha256')} of {record.get('file')} for {name} (recorded at "
          f"{record.get('recorded_at', 'an unknown time')} by {record.get('recorded_by', 'an earlier run')}); "
          f"the next download@{name} that verifies its archive records the new hash")
    return 0


def _showcase(args: argparse.Namespace) -> int:
    """A sheet of SynthPed images with their captions under them (the README picture)."""
    from dmf_core.showcase import sample_sheet_with_captions

    out = sample_sheet_with_captions(args.out, dataset=args.dataset, num=args.num, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="DIR",
                   help="a trained model folder (model.safetensors + config.json), e.g. models/sp_market")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="images per batch (default 128)")
    p.add_argument("--flip", action="store_true", help="average the features of each image and its mirror")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", dest="log_info", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_doctor, _add_matrix, _add_search, _add_explain, _add_extract, _add_export,
                        _add_datasets, _add_showcase):
        add_command(sub)
    return parser


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser("doctor", help=_doctor.__doc__, description=_doctor.__doc__)
    doctor.add_argument("--params", default="params.yaml", help="params file whose needs are checked "
                        "(default params.yaml)")
    doctor.set_defaults(func=_doctor)


def _add_matrix(sub: argparse._SubParsersAction) -> None:
    matrix = sub.add_parser("matrix", help=_matrix.__doc__, description=_matrix.__doc__)
    matrix.add_argument("--json", action="store_true", help="also print reports/eval_matrix.json")
    matrix.set_defaults(func=_matrix)


def _add_search(sub: argparse._SubParsersAction) -> None:
    search = sub.add_parser(
        "search", help=_search.__doc__, description=_search.__doc__,
        epilog="example: dmf search my_queries/ --model models/sp_market --gallery sp_cuhk -k 10")
    search.add_argument("queries", nargs="+", help="query image files and/or folders (searched recursively)")
    search.add_argument("--gallery", required=True, metavar="NAME|LMDB",
                        help="a packed dataset name (its gallery split) or a .lmdb file, e.g. "
                             "data/lmdb/sp_cuhk/sp_cuhk-gallery.lmdb")
    search.add_argument("-k", type=_positive_int, default=10, help="matches per query (default 10)")
    search.add_argument("--out", default="reports/search", metavar="DIR",
                        help="where search.json and search.png go (default reports/search)")
    search.add_argument("--gallery-features", metavar="NPY",
                        help="reuse gallery features written by `dmf extract` for the same model and split")
    search.add_argument("--plot-queries", type=_positive_int, default=8,
                        help="queries drawn in the PNG (default 8; the JSON has all)")
    search.add_argument("--print", type=int, default=5, metavar="N", help="queries summarised on stdout (default 5)")
    search.add_argument("--maps", action="store_true",
                        help="draw each image's map (dmf explain) under it in the PNG")
    search.add_argument("--map-method", choices=MAP_METHODS, default=MAP_METHODS[0],
                        help=f"map of --maps (default {MAP_METHODS[0]}; docs/cli.md, dmf explain)")
    _add_model_args(search)
    search.set_defaults(func=_search)


def _add_explain(sub: argparse._SubParsersAction) -> None:
    explain = sub.add_parser(
        "explain", help=_explain.__doc__, description=_explain.__doc__ + " Maps and how they were chosen: docs/cli.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: dmf explain my_queries/ --model models/sp_market --out reports/explain")
    explain.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    explain.add_argument("--model", required=True, metavar="DIR",
                         help="a trained model folder (model.safetensors + config.json), e.g. models/sp_market")
    explain.add_argument("--out", default="reports/explain", metavar="DIR",
                         help="where the pictures go, <image stem>.png each (default reports/explain)")
    explain.add_argument("--method", choices=MAP_METHODS, default=MAP_METHODS[0],
                         help=f"{' or '.join(MAP_METHODS)} (default {MAP_METHODS[0]}; docs/cli.md says why)")
    explain.add_argument("--sheet", metavar="PNG", help="also one PNG with every image side by side")
    explain.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    explain.set_defaults(func=_explain)


def _add_extract(sub: argparse._SubParsersAction) -> None:
    extract = sub.add_parser(
        "extract", help=_extract.__doc__, description=_extract.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples: dmf extract sp_cuhk --split gallery --model models/sp_market --out feats/cuhk_gallery\n"
               "          dmf extract photos/ --model models/sp_market --out feats/photos")
    extract.add_argument("source", nargs="+",
                         help="a packed dataset name (with --split), a .lmdb file, or image files/folders")
    extract.add_argument("--split", default="gallery", choices=("train", "query", "gallery"),
                         help="split of a dataset name (default gallery)")
    extract.add_argument("--out", required=True, metavar="PATH",
                         help="output stem: writes PATH.npy (float32, L2-normalised) and PATH.parquet (ids)")
    _add_model_args(extract)
    extract.set_defaults(func=_extract)


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", help=_export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_export.__doc__ + "\n\nThe graph normalises with the model's mean/std itself and returns "
        "the L2-normalised\ntest-time feature (N x D); the written file is run against the torch model "
        "(docs/cli.md).",
        epilog="examples: dmf export models/sp_market --format onnx --out exported/sp_market.onnx\n"
               "          dmf export models/sp_market --format torchscript --out exported/sp_market.pt")
    export.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a trained model folder (model.safetensors + config.json), e.g. models/sp_market")
    export.add_argument("--format", choices=("onnx", "torchscript"),
                        help="default: from the suffix of --out (.onnx; .pt, .ts, .torchscript)")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    export.add_argument("--flip", action="store_true",
                        help="the graph adds the mirrored image's feature (as --flip of search/extract)")
    export.add_argument("--opset", type=_positive_int, help="ONNX opset (default: torch's recommended one)")
    export.add_argument("--no-check", action="store_true",
                        help="skip running the written file against the torch model")
    export.set_defaults(func=_export)


def _add_datasets(sub: argparse._SubParsersAction) -> None:
    datasets = sub.add_parser("datasets", help=_datasets.__doc__, description=_datasets.__doc__)
    datasets.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    datasets.add_argument("--json", action="store_true", help="machine-readable output")
    datasets.add_argument("--verbose", action="store_true", help="how to get every dataset, not only missing ones")
    datasets.add_argument("--forget", metavar="NAME", help="drop the archive hash recorded for NAME in "
                          "data/checksums.json (after replacing its archive on purpose)")
    datasets.set_defaults(func=_datasets)


def _add_showcase(sub: argparse._SubParsersAction) -> None:
    showcase = sub.add_parser("showcase", help=_showcase.__doc__, description=_showcase.__doc__)
    showcase.add_argument("--out", default="docs/img/captions_sample.png", help="PNG to write")
    showcase.add_argument("--dataset", default="synthped", help="a FineGPR-format dataset with captions")
    showcase.add_argument("--num", type=_positive_int, default=6, help="images (one per identity)")
    showcase.add_argument("--seed", type=int, default=0, help="which identities and images")
    showcase.set_defaults(func=_showcase)


def _error_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    if isinstance(exc, KeyError) and text.startswith(("'", '"')):
        text = text.strip("'\"")
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.log_info else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # a log line next to a progress bar comes out whole
            return args.func(args)
    except KeyboardInterrupt:
        print(f"dmf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"dmf {args.command}: error: {_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
