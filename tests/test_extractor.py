"""FeatureExtractor: the evaluation's features and preprocessing for paths, PIL images, arrays and
[0, 1] tensors; batching; one clear error per bad input; loading without the pipeline or transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmf_core import FeatureExtractor
from dmf_core.config import config_from_dict
from dmf_core.model import pretrained
from dmf_core.model.build import build_model

H, W = 32, 16
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny image-only model (ImageNet mean/std, so normalisation matters) and a few images:
    PNGs at other sizes, one PNG at the model's size, one JPEG."""
    import copy

    import yaml

    root = tmp_path_factory.mktemp("extractor")
    params = copy.deepcopy(yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text()))
    params["model"]["image"].update(depth=1, dim=32, heads=2, height=H, width=W, patch=8, stride=8)
    params["fusion"].update(dim=32, layers=1, heads=2, mode="image_only")
    params["augment"].update(mean=MEAN, std=STD)
    cfg = config_from_dict(params)
    torch.manual_seed(0)
    pretrained.save_model(build_model(cfg, 4, pretrained=False), root / "model", cfg=cfg, num_classes=4, stage="finetune")
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate([(48, 24), (H, W), (100, 37), (20, 30)]):
        files.append(root / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    files.append(root / "im4.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(files[-1], quality=90)
    extractor = FeatureExtractor.from_pretrained(root / "model", device="cpu", batch_size=3)
    return {"root": root, "model": root / "model", "cfg": cfg, "files": files, "extractor": extractor}


def _evaluation_features(world, files, flip: bool = False) -> np.ndarray:
    """What the evaluation stage computes for these images: its decoder, its test transform with
    the training config's mean/std, its feature function."""
    from dmf_core.data.loading.loader import build_test_transform, decode_to_tensor
    from dmf_core.eval.features import extract_features

    model, _ = pretrained.load_model(world["model"])
    transform = build_test_transform(H, W, world["cfg"].augment)
    batch = torch.stack([transform(decode_to_tensor(f.read_bytes())) for f in files])
    return extract_features(model.embed_images, [{"image": batch}], flip=flip)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_paths_give_the_evaluation_features(world, flip):
    extractor = FeatureExtractor.from_pretrained(world["model"], device="cpu", batch_size=2, flip=flip)
    feats = extractor([str(f) for f in world["files"]])
    assert isinstance(feats, torch.Tensor) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert feats.shape == (5, 32)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
    np.testing.assert_allclose(feats.numpy(), _evaluation_features(world, world["files"], flip), atol=1e-5)


def test_every_input_kind_gives_the_same_feature(world):
    extractor = world["extractor"]
    pngs = world["files"][:4]
    by_path = extractor(pngs)
    pil = [Image.open(f) for f in pngs]
    torch.testing.assert_close(extractor(pil), by_path, atol=1e-6, rtol=0)
    torch.testing.assert_close(extractor([np.asarray(im.convert("RGB")) for im in pil]), by_path, atol=1e-6, rtol=0)
    torch.testing.assert_close(extractor(pngs[1]), by_path[1:2], atol=1e-6, rtol=0)  # one path, no list
    # The image at the model's size, decoded to [0, 1]: the tensor contract, same feature.
    from dmf_core.data.loading.loader import decode_to_tensor

    tensor = decode_to_tensor(pngs[1].read_bytes()).float()[None] / 255
    torch.testing.assert_close(extractor(tensor), by_path[1:2], atol=1e-6, rtol=0)
    mixed = extractor([pil[0], str(pngs[1]), np.asarray(pil[2].convert("RGB")), pngs[3]])
    torch.testing.assert_close(mixed, by_path, atol=1e-6, rtol=0)


def test_batch_size_changes_nothing(world):
    extractor = world["extractor"]
    images = torch.rand(7, 3, H, W, generator=torch.Generator().manual_seed(3))
    whole = extractor(images, batch_size=64)
    torch.testing.assert_close(extractor(images, batch_size=2), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(extractor(images[4:5]), whole[4:5], atol=1e-6, rtol=0)
    assert extractor.input_size == (H, W) and extractor.feature_dim == 32


def test_the_extractor_normalises_with_the_models_mean_and_std(world):
    extractor = world["extractor"]
    images = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(4))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.nn.functional.normalize(extractor.model.embed_images((images - mean) / std), dim=1)
    torch.testing.assert_close(extractor(images), want, atol=1e-6, rtol=0)


def test_progress_bar_on_long_inputs(world, capsys):
    world["extractor"](world["files"], batch_size=1, progress=True, desc="my images")
    assert "my images" in capsys.readouterr().err
    world["extractor"](world["files"], batch_size=1)  # not a terminal: quiet
    assert "my images" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Errors: one clear message naming the input
# ---------------------------------------------------------------------------------------------


def _bad_file(world):
    path = world["root"] / "bad.jpg"
    path.write_bytes(b"not a jpeg")
    return [world["files"][0], path]


@pytest.mark.parametrize("make, error, match", [
    (lambda w: [], ValueError, r"inputs: an empty list; expected at least one image"),
    (lambda w: torch.rand(3, H, W), ValueError, r"shape \(3, 32, 16\); expected a float tensor \(N, 3, 32, 16\)"
                                                r".*add a batch dimension"),
    (lambda w: torch.rand(2, 3, 64, 32), ValueError, r"shape \(2, 3, 64, 32\).*pass the images as a list"),
    (lambda w: torch.rand(2, 1, H, W), ValueError, r"shape \(2, 1, 32, 16\)"),
    (lambda w: torch.rand(0, 3, H, W), ValueError, r"an empty batch \(N = 0\)"),
    (lambda w: torch.randint(0, 255, (2, 3, H, W), dtype=torch.uint8), ValueError, r"dtype torch.uint8.*/ 255"),
    (lambda w: torch.rand(2, 3, H, W) * 255, ValueError, r"values in \[.*\]; expected .* in \[0, 1\]"),
    (lambda w: torch.full((1, 3, H, W), float("nan")), ValueError, r"values in \[nan"),
    (_bad_file, ValueError, r"inputs\[1\]: .*bad\.jpg: not a readable image"),
    (lambda w: [w["files"][0], w["root"] / "nope.png"], FileNotFoundError, r"inputs\[1\]: .*nope\.png: no such image"),
    (lambda w: [np.zeros((16, 8), np.uint8)], ValueError, r"inputs\[0\]: array of shape \(16, 8\) and dtype uint8"),
    (lambda w: [np.zeros((16, 8, 3), np.float32)], ValueError, r"inputs\[0\]: .*float32; expected an H x W x 3 uint8"),
    (lambda w: [w["files"][0], 7], TypeError, r"inputs\[1\]: int; expected an image file path, a PIL image"),
    (lambda w: {"a": 1}, TypeError, r"inputs: dict; expected a float tensor"),
])
def test_bad_inputs_are_one_clear_error(world, make, error, match):
    with pytest.raises(error, match=match) as exc:
        world["extractor"](make(world))
    assert "\n" not in str(exc.value)


def test_missing_model_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: model folder not found"):
        FeatureExtractor.from_pretrained(tmp_path / "nowhere")


def test_unavailable_device_is_an_error_not_a_fallback(world):
    from dmf_core.extractor import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            FeatureExtractor.from_pretrained(world["model"], device="cuda")


# ---------------------------------------------------------------------------------------------
# Loading on its own
# ---------------------------------------------------------------------------------------------


def test_loads_from_the_model_folder_alone_without_transformers(world, tmp_path):
    """A fresh interpreter: config.json + weights only (no meta.json, no params.yaml in the cwd);
    `import dmf_core` stays light, and an image-only model never imports transformers."""
    import shutil

    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(world["model"] / name, alone / name)
    images = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(5))
    torch.save(images, tmp_path / "images.pt")
    script = textwrap.dedent(f"""
        import json, sys
        import dmf_core
        light = "torch" not in sys.modules
        from dmf_core import FeatureExtractor
        import torch
        extractor = FeatureExtractor.from_pretrained({str(alone)!r}, device="cpu")
        feats = extractor(torch.load({str(tmp_path / "images.pt")!r}))
        print(json.dumps({{"light": light, "transformers": "transformers" in sys.modules,
                           "feats": feats.tolist()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["light"] and not out["transformers"]
    np.testing.assert_allclose(out["feats"], world["extractor"](images).numpy(), atol=1e-6)
