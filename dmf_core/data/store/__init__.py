"""The packed store: one deterministic LMDB per (dataset, split) and its parquet sidecar (``pack``)."""
