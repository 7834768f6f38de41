"""One phrase per attribute value, in the words the caption templates use
(:mod:`dmf_core.data.captions.generate`): what language says of each value on its own.

``fusion.mode: phrases`` (language as the attribute teacher) scores an image against the text
encoder's embedding of each phrase; the order is :data:`ATTRIBUTE_COLUMNS`, codes ascending, so
that phrase ``sum(classes[:a]) + c`` is class ``c`` of attribute ``a``
(:data:`dmf_core.data.captions.controls.ATTRIBUTE_CLASSES`).
"""

from __future__ import annotations

from dmf_core.data.captions.attributes import ATTRIBUTE_CODES, ATTRIBUTE_COLUMNS, COLOURS

_FIXED: dict[str, dict[int, str]] = {
    "gender": {1: "a man", 2: "a woman"},
    "hair": {1: "a person with long hair", 2: "a person with short hair"},
    "age": {1: "a teenage person", 2: "an adult person", 3: "an elderly person"},
    "glasses": {1: "a person who wears glasses", 2: "a person with no glasses"},
    "short_sleeve": {1: "a top with short sleeves", 2: "a top with long sleeves"},
    "top_length": {1: "a long top", 2: "a short top"},
    "dress": {1: "a dress", 2: "trousers"},
    "boots": {1: "boots", 2: "shoes"},
    "hat": {1: "a person who wears a hat", 2: "a person with no hat"},
    "bag": {1: "a person who carries a bag", 2: "a person with no bag"},
    "shoe_color": {1: "dark shoes", 2: "light shoes"},
    "upper_color": {code: f"a {colour} top" for code, colour in COLOURS.items()},
    "lower_color": {code: f"{colour} trousers" for code, colour in COLOURS.items()},
}


def value_phrases() -> list[str]:
    """Every attribute value's phrase, attribute by attribute (:data:`ATTRIBUTE_COLUMNS`), codes ascending."""
    phrases = []
    for attribute in ATTRIBUTE_COLUMNS:
        codes = sorted(ATTRIBUTE_CODES[attribute])
        if sorted(_FIXED[attribute]) != codes:
            raise AssertionError(f"value phrases of {attribute!r} do not cover its codes {codes}")
        phrases += [_FIXED[attribute][c] for c in codes]
    return phrases
