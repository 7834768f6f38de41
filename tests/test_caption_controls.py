"""The controls of the caption experiments: shuffled captions and the attribute head's targets;
identities held out of pretraining."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dmf_core.data.captions.attributes import ATTRIBUTE_CODES, ATTRIBUTE_COLUMNS
from dmf_core.data.captions.controls import (
    ATTRIBUTE_CLASSES,
    attribute_targets,
    derangement,
    shuffled_caption_sources,
)
from dmf_core.data.captions.generate import generate_captions
from dmf_core.data.loading.loader import CaptionPicker
from dmf_core.data.loading.sampler import PKSampler
from dmf_core.train.health import cosine_statistics, retrieval_map


@pytest.mark.parametrize("n", [2, 3, 7, 64])
def test_derangement_moves_every_identity(n):
    perm = derangement(n, seed=3)
    assert sorted(perm) == list(range(n)) and not (perm == np.arange(n)).any()
    assert (derangement(n, seed=3) == perm).all()


def test_shuffled_sources_read_another_identitys_images():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    source = shuffled_caption_sources(labels, seed=0)
    assert (labels[source] != labels).all()
    # one identity's images all borrow from the same other identity, cycling through its images
    for lbl in range(3):
        lent = set(labels[source[labels == lbl]])
        assert len(lent) == 1


class _Toy:
    """What attribute_targets reads of a dataset: labels, path and each image's caption rows."""

    def __init__(self, labels, rows):
        self.labels, self._rows, self.path = np.asarray(labels), rows, "toy.lmdb"
        self.num_classes = int(self.labels.max()) + 1

    def caption_rows(self, i):
        return self._rows[i]


def test_attribute_targets_are_what_the_captions_state():
    rng = np.random.default_rng(0)
    attrs = [{c: int(rng.choice(list(ATTRIBUTE_CODES[c]))) for c in ATTRIBUTE_COLUMNS} for _ in range(3)]
    manifest = pd.DataFrame({"image_id": [f"{i}.jpg" for i in range(3)], "pid": [0, 1, 2], "viewpoint": 28,
                             "weather": 1, "illumination": 3, "scene": 1})
    frame = generate_captions(manifest, pd.DataFrame([{"pid": pid, **a} for pid, a in enumerate(attrs)]),
                              per_image=1, seed=0).captions
    picker = CaptionPicker(frame, seed=0)
    table = attribute_targets(_Toy([0, 1, 2], [range(0, 1), range(1, 2), range(2, 3)]), picker)
    want = np.array([[a[c] - 1 for c in ATTRIBUTE_COLUMNS] for a in attrs])
    assert (table == want).all()
    assert (table < np.array(ATTRIBUTE_CLASSES)).all()
    bad = CaptionPicker(pd.DataFrame({"image_id": ["0.jpg"], "caption_idx": 0, "caption": ["a person"]}), seed=0)
    with pytest.raises(ValueError, match="does not state"):
        attribute_targets(_Toy([0], [range(0, 1)]), bad)


def test_held_out_identities_are_never_drawn():
    labels = np.repeat(np.arange(10), 4)
    sampler = PKSampler(labels, 4, 2, seed=0, exclude_from=8)
    drawn = {int(labels[i]) for epoch in range(5) for batch in sampler.plan(epoch) for i in batch}
    assert drawn == set(range(8))


def test_cosine_statistics_tell_collapse_from_spread():
    pids = np.array([0, 0, 1, 1])
    collapsed = torch.tensor([[1.0, 0.001], [1.0, 0.0], [1.0, -0.001], [1.0, 0.002]])
    spread = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-0.1, 1.0], [0.1, 1.0]])
    assert cosine_statistics(collapsed, pids)["cosine_other_id"] > 0.99
    health = cosine_statistics(spread, pids)
    assert health["cosine_other_id"] == pytest.approx(0.0, abs=1e-4) and health["cosine_same_id"] > 0.9
    assert retrieval_map(spread, pids, spread, pids) == 100.0


def test_caption_to_image_retrieval_leaves_the_captions_own_image_out():
    """A caption that matches only its own picture loses the credit of that match once the picture
    is out (its identity's other image ties, and ties count against it); one that matches the
    other images of its identity keeps 100."""
    pids = np.array([0, 0, 1, 1])
    images = torch.eye(4)
    own_only = torch.eye(4)  # caption i points at image i, orthogonal to its identity's other image
    assert retrieval_map(own_only, pids, images, pids) == 75.0  # the old count: own image at rank 1
    assert retrieval_map(own_only, pids, images, pids, own_image_out=True) == pytest.approx(33.33, abs=0.01)
    identity = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    assert retrieval_map(identity, pids, images, pids, own_image_out=True) == 100.0
    with pytest.raises(ValueError, match="describe gallery image i"):
        retrieval_map(identity, pids, images, pids[::-1].copy(), own_image_out=True)
