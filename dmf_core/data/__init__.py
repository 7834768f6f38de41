"""Data, one sub-package per stage's job.

- ``sources``: dataset acquisition for ``download`` (registry, fetch, extract, layouts, manifests)
  (the ``dmf datasets`` view of them is :mod:`dmf_core.datasets_view`);
- ``synthped``: the embedded SynthPed world ``download`` generates;
- ``captions``: attribute tables to captions, for ``captions``;
- ``store``: the packed LMDB store ``pack`` writes and every later stage reads;
- ``loading``: datasets, the P x K sampler and augmentation for training and evaluation.

``images.py`` (checked image decoding) is shared by sources, store and loading.
"""
