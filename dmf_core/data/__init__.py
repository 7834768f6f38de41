"""Data layer: dataset registry, fetching, layouts, SynthPed, captions, LMDB, loaders."""

