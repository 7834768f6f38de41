"""What the controls of the caption experiments change (docs/training.md, "Losses").

* Shuffled captions: every identity reads the captions of another identity (a derangement), so
  the caption path keeps its form and its amount of supervision but says nothing true.
* The attribute head: the attributes the captions state, as one class label per attribute and
  identity, without language. They are read back from the captions themselves
  (:func:`dmf_core.data.captions.generate.parse_caption_attributes`), so they are exactly what the
  caption path is told.
"""

from __future__ import annotations

import numpy as np

from dmf_core.data.captions.attributes import ATTRIBUTE_CODES, ATTRIBUTE_COLUMNS

#: Classes of each attribute, in ATTRIBUTE_COLUMNS order (codes 1..n become classes 0..n-1).
ATTRIBUTE_CLASSES: list[int] = [len(ATTRIBUTE_CODES[a]) for a in ATTRIBUTE_COLUMNS]


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) without fixed points (n >= 2)."""
    if n < 2:
        raise ValueError(f"shuffled captions need at least 2 identities, got {n}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    # a random cyclic order: each identity takes the next one's captions, none keeps its own
    order = rng.permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def shuffled_caption_sources(labels: np.ndarray, seed: int) -> np.ndarray:
    """For every image, the image whose captions it reads: the j-th image of identity ``l`` reads
    the captions of the (j mod n)-th image of identity ``perm[l]``."""
    labels = np.asarray(labels, dtype=np.int64)
    n_ids = int(labels.max()) + 1
    perm = derangement(n_ids, seed)
    members = [np.flatnonzero(labels == lbl) for lbl in range(n_ids)]
    source = np.empty(len(labels), dtype=np.int64)
    for lbl, own in enumerate(members):
        other = members[perm[lbl]]
        if len(own) and not len(other):
            raise ValueError(f"identity label {perm[lbl]} has no images to lend its captions")
        source[own] = other[np.arange(len(own)) % len(other)]
    return source


def attribute_targets(dataset, picker) -> np.ndarray:
    """(num_classes, 13) int64: each identity's attribute classes, parsed from the first caption
    of its first image."""
    from dmf_core.data.captions.generate import parse_caption_attributes

    table = np.full((dataset.num_classes, len(ATTRIBUTE_COLUMNS)), -1, dtype=np.int64)
    first = {}
    for i, lbl in enumerate(dataset.labels.tolist()):
        first.setdefault(lbl, i)
    for lbl, i in sorted(first.items()):
        rows = dataset.caption_rows(i)
        if not len(rows):
            raise ValueError(f"{dataset.path}: image {i} (label {lbl}) has no caption to read attributes from")
        caption = picker.text(rows[0])
        found = parse_caption_attributes(caption, strict=False)
        missing = [a for a in ATTRIBUTE_COLUMNS if a not in found]
        if missing:
            raise ValueError(f"attribute head: caption {caption!r} does not state {missing}; the control needs "
                             "captions generated from the attribute table (captions.source: attributes)")
        table[lbl] = [int(found[a]) - 1 for a in ATTRIBUTE_COLUMNS]
    return table
