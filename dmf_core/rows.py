"""The matrix's rows by name: ``pretrain``, one fine-tuning source (``market1501``), or several
trained on together, named after their parts joined by ``+`` (``market1501+cuhk03np+cuhksysu``).

A row's parts are what it trains on; a target that is one of them is in-domain for that row and
stays out of its cross-domain mean. Names only: the data a row reads is
:mod:`dmf_core.data.loading.union`'s job.
"""

from __future__ import annotations

from dmf_core.paths import PRETRAIN_ROW

SEPARATOR = "+"


def row_parts(row: str) -> list[str]:
    """The datasets a fine-tuning row trains on, in the order the name gives them."""
    return row.split(SEPARATOR)


def trains_on(row: str, target: str) -> bool:
    """Whether ``row`` trains on ``target``'s training images (in-domain); never for ``pretrain``."""
    return row != PRETRAIN_ROW and target in row_parts(row)


def row_problem(row: str, datasets) -> str | None:
    """Why ``row`` is no valid fine-tuning row name over the configured ``datasets``, or None."""
    parts = row_parts(row)
    if any(not p for p in parts):
        return f"{row!r}: an empty part (parts are joined by a single {SEPARATOR!r})"
    unknown = [p for p in parts if p not in datasets]
    if unknown:
        return f"{row!r}: dataset(s) {unknown} not listed under datasets"
    if len(set(parts)) != len(parts):
        return f"{row!r}: a dataset appears twice"
    if PRETRAIN_ROW in parts:
        return (f"{row!r}: {PRETRAIN_ROW!r} names the pretrained model's row of the matrix; "
                "rename that dataset")
    return None
