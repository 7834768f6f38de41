"""`dmf explain` and the maps: the attention capture leaves the model alone, the maps mean
something on a trained model (the deletion test), the command's outputs and errors, and the maps
in `dmf search` and in the evaluation's ranked list (off: the picture as before, byte for byte)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dmf_core import cli
from dmf_core.eval import explain

ROOT = Path(__file__).resolve().parents[1]
H, W = 64, 32  # SynthPed at half the demo's size: an 8 x 4 grid of 8-pixel patches, as the demo's 16-pixel one
TRAIN_IDS, TEST_IDS, PER_ID = 16, 8, 8


# ---------------------------------------------------------------------------------------------
# A tiny model trained on SynthPed, in seconds
# ---------------------------------------------------------------------------------------------


def synthped_images(root: Path, ids: int, per_id: int) -> tuple[list[Path], np.ndarray]:
    """Clean SynthPed renders (FineGPR layout) of ``ids`` identities at H x W: files and pids."""
    from dmf_core.data.synthped.world import write_finegpr

    write_finegpr(root, ids=ids, images_per_id=per_id, height=H, width=W, seed=0)
    files = sorted(root.rglob("*.jpg"))
    return files, np.array([int(f.parent.name) for f in files])


def synthped_split(root: Path) -> tuple[tuple[torch.Tensor, np.ndarray], tuple[torch.Tensor, np.ndarray], list[Path]]:
    """(images, pids) of TRAIN_IDS identities to train on and of TEST_IDS others, PER_ID images
    each, and the others' files."""
    files, pids = synthped_images(root, TRAIN_IDS + TEST_IDS, PER_ID)
    images = as_model_input(files)
    train_ids = np.isin(pids, np.unique(pids)[:TRAIN_IDS])
    test_files = [f for f, held_out in zip(files, ~train_ids) if held_out]
    return (images[train_ids], pids[train_ids]), (images[~train_ids], pids[~train_ids]), test_files


def as_model_input(files: list[Path]) -> torch.Tensor:
    """Files -> normalised (mean/std 0.5) float N x 3 x H x W, as the model sees them."""
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for f in files]
    return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - 0.5) / 0.5


class FlipDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i].flip(-1) if torch.rand(()) < 0.5 else self.images[i]
        return {"image": image, "label": int(self.labels[i]), "index": i}


def tiny_params(seed: int = 0, epochs: int = 10, lr: float = 0.003) -> dict:
    """params.yaml with an image-only ViT (2 blocks, width 64, 8-pixel patches at H x W) and one
    fusion block; pretraining ``epochs`` at ``lr``, P x K = 8 x 4."""
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["seed"] = seed
    params["model"]["image"].update(depth=2, dim=64, heads=2, height=H, width=W, patch=8, stride=8)
    params["fusion"].update(dim=64, layers=1, heads=2, mode="image_only")
    params["train"].update(threads=1)  # 3 s to train; 2 threads on 2 shared, busy cores took 20-60 s
    params["pretrain"].update(epochs=epochs, P=8, K=4, warmup_epochs=1, holdout_ids=0, lr=lr)
    return params


def train_tiny_model(out: Path, images: torch.Tensor, pids: np.ndarray, *, seed: int = 0, epochs: int = 10,
                     lr: float = 0.003) -> Path:
    """The :func:`tiny_params` model pretrained by the pipeline's own loop (ID + triplet, P x K)
    on ``images``; returns its model folder. 10 epochs on 16 identities: rank-1 0.42-0.50 on 8
    held-out ones (chance 0.11) at seeds 0-3, about 3 s on one core."""
    from dmf_core.config import config_from_dict
    from dmf_core.data.loading.sampler import PKSampler
    from dmf_core.train.loop import StageData, train

    cfg = config_from_dict(tiny_params(seed, epochs, lr))
    labels = np.unique(pids, return_inverse=True)[1]
    dataset = FlipDataset(images, labels)
    sampler = PKSampler(labels, 8, 4, seed=seed)
    data = StageData(loader=torch.utils.data.DataLoader(dataset, batch_sampler=sampler),
                     num_classes=int(labels.max()) + 1, num_images=len(dataset), set_epoch=sampler.set_epoch)
    train(cfg, "pretrain", data, out_dir=out / "model", metrics_path=out / "metrics.json",
          curve_path=out / "curve.tsv", work_dir=out / "work")
    return out / "model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny model trained on 16 SynthPed identities, and 8 others' images (files and tensors)."""
    root = tmp_path_factory.mktemp("explain")
    (train_x, train_pids), (test_x, test_pids), test_files = synthped_split(root / "synthped")
    model_dir = train_tiny_model(root / "run", train_x, train_pids, seed=0)
    return {"root": root, "model": model_dir, "images": test_x, "pids": test_pids, "files": test_files}


def _load(model_dir: Path):
    from dmf_core.model.build import DMFModel

    return DMFModel.from_pretrained(model_dir)[0]


# ---------------------------------------------------------------------------------------------
# The attention weights: read beside the forward pass, which stays as it was
# ---------------------------------------------------------------------------------------------


def test_captured_attention_is_what_the_forward_computes_and_changes_nothing():
    from dmf_core.config import config_from_dict
    from dmf_core.model.build import build_model

    torch.manual_seed(0)
    model = build_model(config_from_dict(tiny_params()), 4, with_text=False, pretrained=False).eval()
    images = torch.randn(3, 3, H, W)
    with torch.no_grad():
        plain = model.embed_images(images)
    qkv_out, proj_in = [], []
    first = model.image_encoder.blocks[0].attn
    hooks = [first.qkv.register_forward_hook(lambda _m, _i, out: qkv_out.append(out)),
             first.proj.register_forward_pre_hook(lambda _m, args: proj_in.append(args[0]))]
    with torch.no_grad(), explain.attention_weights(model) as layers:
        hooked = model.embed_images(images)
    for hook in hooks:
        hook.remove()
    assert torch.equal(plain, hooked)  # the hooks only read: the feature bit for bit
    assert len(layers) == 2 + 1 and all(torch.isfinite(a).all() for a in layers)
    assert layers[0].shape == (3, 2, 33, 33) and layers[2].shape == (3, 2, 34, 34)  # ViT: CLS + 32; fusion: +1
    torch.testing.assert_close(layers[0].sum(-1), torch.ones(3, 2, 33))
    # The captured weights times v are the layer's own SDPA output (the input of its projection).
    b, n, c3 = qkv_out[0].shape
    v = qkv_out[0].reshape(b, n, 3, 2, c3 // 6).permute(2, 0, 3, 1, 4)[2]
    torch.testing.assert_close((layers[0] @ v).transpose(1, 2).reshape(b, n, c3 // 3), proj_in[0],
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the hooks are gone
        assert torch.equal(model.embed_images(images), plain)
    assert not first.qkv._forward_hooks


def test_cli_methods_are_the_modules():
    assert cli.MAP_METHODS[0] == explain.DEFAULT_METHOD and set(cli.MAP_METHODS) == set(explain.METHODS)


# ---------------------------------------------------------------------------------------------
# The maps mean something: the deletion test on a trained model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", explain.METHODS)
def test_masking_the_mapped_patches_moves_the_feature_most(trained, method):
    """Mask (model's mean colour) the quarter of the patches a map ranks highest, lowest, or at
    random: the feature moves most for the highest, averaged over 64 held-out images. Measured
    at seeds 0-3 (this model, benchmarks/explain_deletion.py --tiny): top 0.23-0.28, random
    0.020-0.024, bottom 0.008-0.015 for both maps."""
    model, images = _load(trained["model"]), trained["images"]
    feats = explain.embed(model, images)
    nearest = (feats @ feats.T).fill_diagonal_(-2).argmax(1)
    same_id = trained["pids"][nearest.numpy()] == trained["pids"]
    assert same_id.mean() > 0.3  # a trained model: rank-1 0.42-0.52 on these 8 unseen ids (chance 0.11)
    maps = explain.patch_maps(model, images, method)
    assert maps.shape == (64, 8, 4) and torch.isfinite(maps).all() and (maps >= 0).all()
    d = explain.deletion_distances(model, images, maps, fraction=0.25)
    top, rand, bottom = (float(d[k].mean()) for k in ("top", "random", "bottom"))
    assert top > 4 * rand and top > 8 * bottom, (method, top, rand, bottom)
    assert (d["top"] > d["bottom"]).mean() >= 0.9


def test_an_images_map_does_not_depend_on_its_batch(trained):
    model, images = _load(trained["model"]), trained["images"][:5]
    for method in explain.METHODS:
        together = explain.patch_maps(model, images, method)
        alone = torch.cat([explain.patch_maps(model, x[None], method) for x in images])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# dmf explain
# ---------------------------------------------------------------------------------------------


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_explain_writes_one_picture_per_image_and_a_sheet(trained, tmp_path, capsys):
    folder = tmp_path / "people"
    (folder / "sub").mkdir(parents=True)
    for i, f in enumerate(trained["files"][:3]):
        (folder / ("sub" if i == 2 else "") / f"p{i}.jpg").write_bytes(f.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc, stdout, err = _run(["explain", str(folder), str(trained["files"][3]), "--model", str(trained["model"]),
                            "--out", str(out), "--sheet", str(tmp_path / "sheet.png"), "--method", "rollout"], capsys)
    assert rc == 0, err
    assert "wrote 4 picture(s)" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["p0.png", "p1.png", "p2.png", trained["files"][3].stem + ".png"])
    with Image.open(out / "p0.png") as one, Image.open(tmp_path / "sheet.png") as sheet:
        assert one.width > one.height * 0.8  # the image and its map side by side
        assert sheet.width > 1.5 * one.width and sheet.height > 1.5 * one.height  # four columns, two rows
    rc, _, err = _run(["explain", str(folder / "p0.jpg"), str(folder / "sub" / "p2.jpg"), "--model",
                       str(trained["model"]), "--out", str(tmp_path / "default")], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == ["p0.png", "p2.png"]


def test_explain_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys):
    good = str(trained["files"][0])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    not_a_model = tmp_path / "empty_model"
    not_a_model.mkdir()
    cases = [([good, str(tmp_path / "missing.jpg")], trained["model"], "missing.jpg: no such image file"),
             ([good], tmp_path / "no_model", "no_model: model folder not found"),
             ([good], not_a_model, "empty_model: no config.json or meta.json"),
             ([good, str(bad)], trained["model"], "bad.jpg: not a readable image")]
    for images, model, message in cases:
        out = tmp_path / "out"
        rc, stdout, err = _run(["explain", *images, "--model", str(model), "--out", str(out)], capsys)
        assert rc == 1 and stdout == "" and err.count("\n") == 1, err
        assert err.startswith("dmf explain: error: ") and message in err, err
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Maps in dmf search and in the evaluation's ranked list
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(trained, tmp_path_factory) -> Path:
    """A project folder: models/tiny, and the held-out images packed as data/lmdb/toy/toy-{query,gallery}."""
    import shutil

    import pandas as pd

    from dmf_core import paths
    from dmf_core.data.store.lmdb_store import pack_split

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(trained["model"], root / "models" / "tiny")
    image_root = trained["files"][0].parents[2]
    rows = pd.DataFrame({"image_id": [f.relative_to(image_root).as_posix() for f in trained["files"]],
                         "pid": trained["pids"], "camid": np.arange(len(trained["files"])) % PER_ID})
    query = rows["camid"] == 0
    for split, part in (("query", rows[query]), ("gallery", rows[~query])):
        pack_split(part.reset_index(drop=True), image_root, root / paths.lmdb_path("toy", split))
    return root


def test_search_maps_on_and_off(trained, project, tmp_path, capsys):
    queries = [str(f) for f in trained["files"][:2]]
    argv = ["search", *queries, "--model", str(project / "models/tiny"), "-k", "4",
            "--gallery", str(project / "data/lmdb/toy/toy-gallery.lmdb")]
    rc, _, err = _run([*argv, "--out", str(tmp_path / "off")], capsys)
    assert rc == 0, err
    rc, _, err = _run([*argv, "--out", str(tmp_path / "on"), "--maps"], capsys)
    assert rc == 0, err
    off, on = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("off", "on"))
    assert off == on  # the maps change the picture only
    with Image.open(tmp_path / "off/search.png") as a, Image.open(tmp_path / "on/search.png") as b:
        assert b.width == a.width and b.height > 1.5 * a.height  # each thumbnail with its map under it


def test_evaluation_ranked_list_maps_on_and_off(project, monkeypatch):
    from dmf_core import paths
    from dmf_core.config import config_from_dict
    from dmf_core.eval.run import evaluate_cell

    monkeypatch.chdir(project)
    pictures = {}
    for maps in (False, True):
        params = tiny_params()
        params["evaluate"].update(ranked_list_maps=maps, ranked_list_queries=2)
        record = evaluate_cell(config_from_dict(params), "tiny", "toy")
        pictures[maps] = paths.ranked_list_png("tiny", "toy").read_bytes()
        assert record["num_query"] == 8 and record["num_gallery"] == 56
    assert pictures[False] != pictures[True]
    from io import BytesIO

    with Image.open(BytesIO(pictures[False])) as off, Image.open(BytesIO(pictures[True])) as on:
        assert on.width == off.width and on.height > 1.5 * off.height


# The ranked-list pictures of test_ranked_list_off_is_the_picture_before_maps, drawn by the code
# before maps existed (commit 66de7e0) with these versions; other versions may draw other bytes.
BEFORE_MAPS = {"versions": ("3.11.2", "2.14.3", "13.0.0"),
               "evaluation": "754ffd758697441195b97adf9a9272500d217580488e613cfffbd3a6b0f7c445",
               "search": "e06f7bbd579bbf877c9d4f82052a63fc60c446fca65e23962cbfd2ff3a226432"}


def test_ranked_list_off_is_the_picture_before_maps(tmp_path):
    """Maps off (the default), the evaluation's and the search's ranked lists are the bytes the
    code drew before maps existed: the matrix's outputs do not move."""
    import matplotlib
    import PIL
    from matplotlib import ft2font

    from dmf_core.eval.visualise import plot_ranked_list, ranked_list_for_queries

    if (matplotlib.__version__, ft2font.__freetype_version__, PIL.__version__) != BEFORE_MAPS["versions"]:
        pytest.skip(f"the reference bytes were drawn with matplotlib, FreeType, Pillow {BEFORE_MAPS['versions']}")
    rng = np.random.default_rng(0)
    qf, gf = rng.standard_normal((6, 8)), rng.standard_normal((40, 8))
    gf[:6] = qf + 0.01

    def load_image(kind, index):
        seed = index + (0 if kind == "query" else 100)
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 32, 3), dtype=np.uint8))

    ranked_list_for_queries(qf, gf, np.arange(6) % 3, np.arange(40) % 5, np.zeros(6, int), np.arange(40) % 3,
                            load_image=load_image, num_queries=3, seed=0, out_png=tmp_path / "eval.png")
    queries = [{"index": i, "pid": None, "camid": None, "label": f"q{i}.png"} for i in range(2)]
    gallery = [{"index": j, "pid": j % 5, "camid": j % 3} for j in range(40)]
    plot_ranked_list(queries, gallery, [list(range(5)), list(range(5, 10))], tmp_path / "search.png",
                     load_image=load_image, top_k=5, distances=[[0.1] * 5] * 2, thumb=(96, 48))
    for name in ("evaluation", "search"):
        png = tmp_path / ("eval.png" if name == "evaluation" else "search.png")
        assert hashlib.sha256(png.read_bytes()).hexdigest() == BEFORE_MAPS[name], name
