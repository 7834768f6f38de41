"""``dmf export``: a trained model as one ONNX or TorchScript file that runs without dmf.

The exported graph is :class:`~dmf_core.extractor.TestTimeEncoder`, the module
:class:`~dmf_core.extractor.FeatureExtractor` itself calls: input ``images``, float32
(N, 3, H, W) with values in [0, 1] at the model's input size and any N; it normalises with the
model's mean/std inside the graph and returns ``features`` (N, D), the L2-normalised test-time
feature f. The model's ``config.json`` travels inside the file (ONNX metadata ``dmf.config``;
TorchScript extra file ``config.json``), so a consumer can read the input size and mean/std.

After writing, the file is loaded back (onnxruntime on the CPU, ``torch.jit.load``) and run at
two batch sizes against the torch model; a difference over ``atol`` is an error, not a warning.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}
INPUT_NAME, OUTPUT_NAME = "images", "features"
CHECK_BATCHES = (1, 3)
EXPORT_EXTRA = "pip install 'dmf[export]' (onnx, onnxscript, onnxruntime)"


def format_of(out: str | Path, fmt: str | None) -> str:
    """``fmt`` as given, else inferred from the suffix of ``out`` (.onnx; .pt, .ts, .torchscript)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{out}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
                         f"pass --format {'|'.join(FORMATS)}")
    return SUFFIXES[suffix]


def example_batch(size: tuple[int, int], n: int, seed: int = 0) -> torch.Tensor:
    """A reproducible float batch in [0, 1] (N, 3, H, W): what the exported graph is fed."""
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _export_torchscript(encoder: torch.nn.Module, example: torch.Tensor, out: Path, config: dict) -> None:
    with warnings.catch_warnings():  # tracer warnings about constant shapes: the check below is the judge
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(encoder, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"config.json": json.dumps(config, sort_keys=True)})


def _export_onnx(encoder: torch.nn.Module, example: torch.Tensor, out: Path, config: dict,
                 opset: int | None) -> None:
    try:
        import onnx  # noqa: F401 - torch.onnx needs both; say so before a long trace
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"--format onnx needs {exc.name}: {EXPORT_EXTRA}") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(encoder, (example,), None, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes={"images": {0: batch}},
                                    opset_version=opset, dynamo=True, verbose=False)
    program.model.metadata_props["dmf.config"] = json.dumps(config, sort_keys=True)
    program.model.metadata_props["dmf.input"] = (
        f"{INPUT_NAME}: float32 (N, 3, {config['image_size'][0]}, {config['image_size'][1]}) in [0, 1]; "
        f"normalised inside the graph with mean {config['image_mean']} std {config['image_std']}")
    program.model.metadata_props["dmf.output"] = f"{OUTPUT_NAME}: float32 (N, {config['feature_dim']}), L2-normalised f"
    program.save(str(out))


def run_exported(path: str | Path, fmt: str, images: torch.Tensor) -> np.ndarray:
    """Features of ``images`` (float [0, 1] N x 3 x H x W) from an exported file, on the CPU."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(f"checking the ONNX file needs onnxruntime: {EXPORT_EXTRA} (or --no-check)") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    with warnings.catch_warnings():  # torch 2.14 flags torch.jit as deprecated; it still loads and runs
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(images).numpy()


def check_exported(path: Path, fmt: str, encoder: torch.nn.Module, atol: float = 1e-4) -> float:
    """Max abs difference between the file and ``encoder`` at each of :data:`CHECK_BATCHES`;
    ValueError over ``atol``."""
    worst = 0.0
    for n in CHECK_BATCHES:
        images = example_batch(encoder.image_size, n, seed=n)
        with torch.inference_mode():
            want = encoder(images).numpy()
        got = run_exported(path, fmt, images)
        if got.shape != want.shape:
            raise ValueError(f"{path}: batch of {n} gave features of shape {got.shape}, expected {want.shape}")
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > atol:
        raise ValueError(f"{path}: the exported {fmt} model differs from the torch model by {worst:.3g} "
                         f"(max abs, tolerance {atol:g})")
    return worst


def export_model(model_dir: str | Path, out: str | Path, fmt: str | None = None, *, flip: bool = False,
                 opset: int | None = None, check: bool = True) -> dict:
    """Export ``model_dir`` to ``out`` (format ``fmt`` or from the suffix); returns what was written:
    path, format, input/output shapes and, with ``check``, the max abs difference to torch."""
    from dmf_core.extractor import FeatureExtractor

    fmt = format_of(out, fmt)
    out = Path(out)
    extractor = FeatureExtractor.from_pretrained(model_dir, device="cpu", flip=flip)
    encoder, config = extractor.encoder, {**extractor.config, "flip": bool(flip)}
    out.parent.mkdir(parents=True, exist_ok=True)
    example = example_batch(extractor.input_size, 2)
    try:
        if fmt == "onnx":
            _export_onnx(encoder, example, out, config, opset)
        else:
            _export_torchscript(encoder, example, out, config)
        diff = check_exported(out, fmt, encoder) if check else None
    except BaseException:
        out.unlink(missing_ok=True)  # no half-written or unchecked-and-wrong file left behind
        raise
    h, w = extractor.input_size
    record = {"path": str(out), "format": fmt, "input": f"{INPUT_NAME}: float32 N x 3 x {h} x {w} in [0, 1]",
              "output": f"{OUTPUT_NAME}: float32 N x {extractor.feature_dim}, L2-normalised", "flip": bool(flip),
              "max_abs_diff": diff, "checked_batches": list(CHECK_BATCHES) if check else []}
    log.info("exported %s -> %s (%s)", model_dir, out, record)
    return record
