"""What the teacher head (:mod:`dmf_core.model.teacher`) is built from, and its vectors.

``fusion.captions: shuffled`` with prototypes: every identity gets another identity's prototype
(a seeded derangement), the control that keeps the vectors and changes only what they say.

``fusion.mode: prototypes``: one vector per training identity, the mean sentence embedding (the
frozen encoder's token states, mean-pooled over the real tokens and L2-normalised, as
all-MiniLM-L6-v2 is meant to be read) of every caption of the identity's images.
``fusion.mode: phrases``: one vector per attribute value, the sentence embedding of its phrase
(:func:`dmf_core.data.captions.phrases.value_phrases`). ``fusion.teacher: learned`` needs none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmf_core.config import Config

TEACHER_MODES = ("prototypes", "phrases")
_CHUNK = 256  # captions per encoder call when pooling


def uses_teacher(cfg: Config, stage: str) -> bool:
    return stage == "pretrain" and cfg.fusion.mode in TEACHER_MODES


def reads_text(cfg: Config, stage: str) -> bool:
    """Whether the teacher's vectors come from the text encoder (not the learned twin)."""
    return uses_teacher(cfg, stage) and cfg.fusion.teacher == "text"


def teacher_spec(cfg: Config, num_classes: int, vector_dim: int) -> dict:
    """The :class:`~dmf_core.model.teacher.TeacherHead` arguments of ``cfg``'s mode."""
    from dmf_core.data.captions.controls import ATTRIBUTE_CLASSES

    phrases = cfg.fusion.mode == "phrases"
    return {"vectors": sum(ATTRIBUTE_CLASSES) if phrases else num_classes, "vector_dim": vector_dim,
            "learned": cfg.fusion.teacher == "learned", "residual": not phrases,
            "temperature": cfg.fusion.teacher_temperature, "groups": list(ATTRIBUTE_CLASSES) if phrases else None}


def teacher_texts(cfg: Config, dataset, picker, num_classes: int) -> list[list[str]]:
    """Per teacher vector, the texts whose mean embedding it is: each training identity's captions
    (every caption of every image, in file order), or each attribute value's phrase."""
    if cfg.fusion.mode == "phrases":
        from dmf_core.data.captions.phrases import value_phrases

        return [[phrase] for phrase in value_phrases()]
    texts: list[list[str]] = [[] for _ in range(num_classes)]
    for i, label in enumerate(dataset.labels.tolist()):
        if label < num_classes:  # held-out identities teach nothing
            texts[label] += [picker.text(r) for r in dataset.caption_rows(i)]
    empty = [c for c, t in enumerate(texts) if not t]
    if empty:
        raise ValueError(f"fusion.mode=prototypes: identities {empty[:5]} have no caption to build a prototype from")
    if cfg.fusion.captions == "shuffled":
        # the control: each identity is taught by another one's prototype, the same set of
        # vectors (the same geometry) with the language no longer true of the identity
        from dmf_core.data.captions.controls import derangement

        texts = [texts[j] for j in derangement(num_classes, cfg.seed)]
    return texts


@torch.no_grad()
def sentence_embeddings(cache, texts: list[str], device: torch.device) -> torch.Tensor:
    """(N, D) mean-pooled, L2-normalised sentence embeddings of ``texts`` from the frozen
    encoder's token states (``cache``: a :class:`~dmf_core.model.text.CaptionStateCache`)."""
    states, mask = cache.encode(texts, device)
    weights = mask.unsqueeze(-1).to(states.dtype)
    return F.normalize((states * weights).sum(1) / weights.sum(1).clamp_min(1.0), dim=1)


@torch.no_grad()
def teacher_vectors(cache, groups: list[list[str]], device: torch.device) -> torch.Tensor:
    """(len(groups), D): per group of texts, the normalised mean of their sentence embeddings,
    summed chunk by chunk (a paper-scale caption set never holds all its embeddings at once)."""
    flat = [(g, t) for g, texts in enumerate(groups) for t in texts]
    sums, sizes = None, torch.tensor([len(g) for g in groups], device=device, dtype=torch.float32)
    for start in range(0, len(flat), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        emb = sentence_embeddings(cache, [t for _, t in chunk], device)
        if sums is None:
            sums = torch.zeros(len(groups), emb.shape[1], device=emb.device)
        sums.index_add_(0, torch.tensor([g for g, _ in chunk], device=emb.device), emb)
    return F.normalize(sums / sizes.to(sums.device)[:, None], dim=1)
