"""Evaluation: features, distances, ranking, re-ranking, the cross-domain matrix, pictures."""

