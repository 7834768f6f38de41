"""`dmf export`: ONNX (run in onnxruntime) and TorchScript (torch.jit.load) files of a tiny model
give the FeatureExtractor's features at several batch sizes; the config travels in the file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dmf_core import FeatureExtractor, cli
from dmf_core.config import config_from_dict
from dmf_core.model import pretrained
from dmf_core.model.build import build_model

H, W = 32, 16
BATCHES = (1, 5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import copy

    import yaml

    params = copy.deepcopy(yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text()))
    params["model"]["image"].update(depth=1, dim=32, heads=2, height=H, width=W, patch=8, stride=8)
    params["fusion"].update(dim=32, layers=1, heads=2, mode="image_only")
    params["augment"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    cfg = config_from_dict(params)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export") / "model"
    pretrained.save_model(build_model(cfg, 4, pretrained=False), out, cfg=cfg, num_classes=4, stage="finetune")
    return out


def _batch(n: int) -> torch.Tensor:
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(100 + n))


def _export(model_dir, out, capsys, *extra) -> str:
    rc = cli.main(["export", str(model_dir), "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def test_onnx_in_onnxruntime_matches_the_extractor(model_dir, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    printed = _export(model_dir, out, capsys, "--format", "onnx")
    assert "wrote" in printed and "N x 3 x 32 x 16 in [0, 1]" in printed and "max abs diff" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, H, W]  # dynamic N
    assert outp.name == "features" and outp.shape[1] == 32
    extractor = FeatureExtractor.from_pretrained(model_dir, device="cpu")
    for n in BATCHES:
        x = _batch(n)
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (n, 32)
        assert np.abs(got - extractor(x).numpy()).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    config = json.loads(meta["dmf.config"])
    assert config["image_size"] == [H, W] and config["image_std"] == [0.229, 0.224, 0.225]


@pytest.mark.parametrize("flip", [False, True])
def test_torchscript_matches_the_extractor(model_dir, tmp_path, capsys, flip):
    out = tmp_path / "m.pt"  # the format from the suffix
    _export(model_dir, out, capsys, *(["--flip"] if flip else []))
    extra = {"config.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is flagged deprecated in torch 2.14
        module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["config.json"])["flip"] is flip
    extractor = FeatureExtractor.from_pretrained(model_dir, device="cpu", flip=flip)
    for n in BATCHES:
        x = _batch(n)
        with torch.no_grad():
            got = module(x)
        assert got.shape == (n, 32)
        assert (got - extractor(x)).abs().max().item() < 1e-4


def test_export_errors_are_one_line(model_dir, tmp_path, capsys):
    rc = cli.main(["export", str(model_dir), "--out", str(tmp_path / "m.bin")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot tell the format from the suffix '.bin'" in err and err.count("\n") == 1
    rc = cli.main(["export", str(tmp_path / "none"), "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert rc == 1 and "none: model folder not found" in err and not (tmp_path / "m.pt").exists()
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", str(model_dir), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert exc.value.code == 2


def test_a_failed_check_leaves_no_file(model_dir, tmp_path, monkeypatch):
    from dmf_core import export

    monkeypatch.setattr(export, "run_exported", lambda path, fmt, images: np.zeros((len(images), 32), np.float32))
    with pytest.raises(ValueError, match="differs from the torch model"):
        export.export_model(model_dir, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
