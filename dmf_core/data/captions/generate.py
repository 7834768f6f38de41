"""FineGPR-C style captions from identity attributes and per-image rendering conditions.

A caption is a sentence template whose slots are filled with *person* phrases (built once per
identity from its 13 attributes) and *condition* phrases (built once per viewpoint word x weather
x illumination x scene type). A compiled template is a short sequence of "runs", each run being
either person text or condition text, so a caption is the concatenation of a few pre-rendered
strings. Captioning the whole manifest is therefore integer index arithmetic in numpy plus
``pyarrow.compute.take`` / ``binary_join_element_wise`` in C: no Python loop per image.

Determinism: the template and phrase variants of caption ``k`` of an image are a hash of
(seed, pid, viewpoint, weather, illumination, scene code, k), independent of manifest order.
The ``per_image`` captions of one image use different templates (as long as per_image <= number
of templates). A caption states only what the attributes and conditions say, and states all of
them, so :func:`parse_caption_attributes` recovers every value from the text.

No torch import here: the captions stage must start fast.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dmf_core.data.captions.attributes import (
    ATTRIBUTE_CODES,
    ATTRIBUTE_COLUMNS,
    COLOURS,
    validate_attribute_frame,
)
from dmf_core.data.captions.codes import (
    ILLUMINATION,
    N_VIEWPOINTS,
    SCENE,
    SCENE_TYPES,
    WEATHER,
    viewpoint_angle,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Rendering conditions (FACTS §4.2; their codes: dmf_core.data.captions.codes)
# ---------------------------------------------------------------------------------------------

CONDITION_COLUMNS: tuple[str, ...] = ("viewpoint", "weather", "illumination", "scene")

#: default angle -> word mapping (params.yaml captions.viewpoint_words); [lo, hi) degrees, wraps at 360.
DEFAULT_VIEWPOINT_WORDS: dict[str, list[float]] = {
    "front": [315, 45], "right": [45, 135], "back": [135, 225], "left": [225, 315]}

FILENAME_RE = (r"^(?P<pid>\d+)_c(?P<viewpoint>\d+)_w(?P<weather>\d+)_l(?P<illumination>\d+)"
               r"_p(?P<scene>\d+)\.[A-Za-z]+$")

_MAX_LISTED = 5
PERSON_VARIANTS = 4
CONDITION_VARIANTS = 4


class CaptionInputError(ValueError):
    """Manifest / attributes do not fit; the message lists the first offending rows and a count."""


class CaptionParseError(ValueError):
    """A caption contains contradictory phrases for one attribute."""


def viewpoint_word_table(viewpoint_words: dict[str, list[float]] | None) -> list[str]:
    """Word for each viewpoint code 1..36 (index code-1); every angle must fall in exactly one range."""
    words = dict(viewpoint_words) if viewpoint_words else dict(DEFAULT_VIEWPOINT_WORDS)
    for word, rng in words.items():
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            raise ValueError(f"captions.viewpoint_words: word {word!r} must be lower-case letters/hyphens")
        if not isinstance(rng, (list, tuple)) or len(rng) != 2:
            raise ValueError(f"captions.viewpoint_words.{word}: expected [lo, hi) in degrees, got {rng!r}")
    table: list[str] = []
    for code in range(1, N_VIEWPOINTS + 1):
        angle = float(viewpoint_angle(code))
        hits = []
        for word, (lo, hi) in words.items():
            lo, hi = float(lo) % 360, float(hi) % 360
            inside = (lo <= angle < hi) if lo < hi else (angle >= lo or angle < hi)
            if inside:
                hits.append(word)
        if len(hits) != 1:
            what = "no word" if not hits else f"several words {hits}"
            raise ValueError(f"captions.viewpoint_words: viewpoint c{code:02d} ({angle:g} deg) matches {what}; "
                             f"ranges are [lo, hi) degrees with wrap-around and must cover 0-360 exactly once")
        table.append(hits[0])
    return table


# ---------------------------------------------------------------------------------------------
# Phrase banks
# ---------------------------------------------------------------------------------------------

_WEATHER_PHRASES = {
    1: ["in sunny weather", "under a sunny sky"], 2: ["in cloudy weather", "under a cloudy sky"],
    3: ["in overcast weather", "under an overcast sky"], 4: ["in foggy weather", "in the fog"],
    5: ["in neutral weather", "in mild weather"], 6: ["in a blizzard", "in blizzard conditions"],
    7: ["in light snow", "in light snowfall"]}
_WEATHER_ADJ = {1: "sunny", 2: "cloudy", 3: "overcast", 4: "foggy", 5: "mild", 6: "blizzard", 7: "lightly snowy"}
_TIME_PHRASES = {
    1: ["at midnight", "around midnight"], 2: ["at dawn", "at daybreak"], 3: ["in the morning", "in the forenoon"],
    4: ["at noon", "at midday"], 5: ["in the afternoon"], 6: ["at dusk", "at sunset"], 7: ["at night", "late at night"]}
_TIME_NOUN = {1: "midnight", 2: "dawn", 3: "morning", 4: "noon", 5: "afternoon", 6: "dusk", 7: "night"}
_SCENE_PHRASES = {
    "urban": ["in the city", "in an urban area", "on a city street"],
    "wild": ["in the wild", "in the countryside", "in a natural setting"]}
_VIEW_PHRASES = {
    "front": ["seen from the front", "facing the camera", "in front view"],
    "back": ["seen from behind", "seen from the back", "in back view"],
    "left": ["seen from the left", "in left side view"],
    "right": ["seen from the right", "in right side view"]}

_AGE_ADJ = {1: ["teenage"], 2: ["adult"], 3: ["elderly", "older"]}
_GENDER = {1: dict(adj="male", noun="man", teen="boy", pron="he", poss="his"),
           2: dict(adj="female", noun="woman", teen="girl", pron="she", poss="her")}
_TOP_NOUNS = {1: ["coat", "long top"], 2: ["shirt", "jacket", "short top"]}  # top_length 1 long, 2 short
_ALL_TOP_NOUNS = ("t-shirt", "shirt", "jacket", "short top", "long top", "coat")


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows (by sound of its first word, for our vocabulary)."""
    word = phrase.strip().lower()
    if re.match(r"(one|uni|use|eu|ewe)", word):
        return "a"
    if re.match(r"(hour|honest|honou?r)", word):
        return "an"
    return "an" if word[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _person_slots(attrs: dict[str, int], rnd: random.Random) -> dict[str, str]:
    g = _GENDER[attrs["gender"]]
    age = attrs["age"]
    age_adj = rnd.choice(_AGE_ADJ[age])
    form = rnd.randrange(3)
    if form == 0:
        subject = f"{age_adj} {g['adj']} {rnd.choice(['pedestrian', 'person'])}"
    elif form == 1 and age == 1:
        subject = f"{age_adj} {g['teen']}"
    elif form == 1:
        subject = f"{age_adj} {g['noun']}"
    else:
        subject = f"{g['adj']} teenager" if age == 1 else f"{age_adj} {g['adj']}"
    hair = ATTRIBUTE_CODES["hair"][attrs["hair"]]
    sleeve = "short" if attrs["short_sleeve"] == 1 else "long"
    nouns = list(_TOP_NOUNS[attrs["top_length"]])
    if attrs["top_length"] == 2 and sleeve == "short":
        nouns.append("t-shirt")
    top = rnd.choice(nouns)
    upper_colour = COLOURS[attrs["upper_color"]]
    if top.endswith(" top") or rnd.random() < 0.4:
        upper = with_article(f"{upper_colour} {top} with {sleeve} sleeves")
    else:
        upper = with_article(f"{sleeve}-sleeved {upper_colour} {top}")
    lower_colour = COLOURS[attrs["lower_color"]]
    if attrs["dress"] == 1:
        lower = with_article(f"{lower_colour} dress")
    else:
        lower = f"{lower_colour} {rnd.choice(['trousers', 'pants'])}"
    shade = ATTRIBUTE_CODES["shoe_color"][attrs["shoe_color"]]
    foot = "boots" if attrs["boots"] == 1 else "shoes"
    shoes = f"{shade} {foot}" if rnd.random() < 0.7 else f"a pair of {shade} {foot}"
    # accessories: glasses, hat, bag
    items = {"glasses": ("glasses", "no glasses"), "hat": ("a hat", "no hat"), "bag": ("a bag", "no bag")}
    pos = [items[k][0] for k in ("glasses", "hat", "bag") if attrs[k] == 1]
    neg = [items[k][1] for k in ("glasses", "hat", "bag") if attrs[k] == 2]
    rnd.shuffle(pos)
    rnd.shuffle(neg)
    if pos and neg:
        acc_with = f"with {_join_and(pos)}, but {_join_and(neg)}"
    else:
        acc_with = f"with {_join_and(pos or neg)}"
    wear = [items[k][attrs[k] - 1] for k in ("glasses", "hat") ]
    rnd.shuffle(wear)
    wears = f"wears {wear[0]} and {wear[1]}"
    carries = f"carries {items['bag'][attrs['bag'] - 1]}"
    acc_clause = f"{wears} and {carries}" if rnd.random() < 0.5 else f"{carries} and {wears}"
    hair_with = f"with {hair} hair"
    pron = g["pron"]
    return {
        "subj": with_article(subject), "hair": hair, "hair_with": hair_with, "upper": upper, "lower": lower,
        "shoes": shoes, "acc_with": acc_with, "acc_clause": acc_clause, "pron": pron,
        "this_person": rnd.choice([pron, "this person"]),
    }


def _condition_slots(view_word: str, weather: int, illum: int, scene_type: str, rnd: random.Random) -> dict[str, str]:
    weather_phrase = rnd.choice(_WEATHER_PHRASES[weather])
    time_phrase = rnd.choice(_TIME_PHRASES[illum])
    form = rnd.randrange(3)
    if form == 0:
        wt = "on " + with_article(f"{_WEATHER_ADJ[weather]} {_TIME_NOUN[illum]}")
    elif form == 1:
        wt = f"{weather_phrase} {time_phrase}"
    else:
        wt = f"{time_phrase} {weather_phrase}"
    views = _VIEW_PHRASES.get(view_word, [f"seen from the {view_word}", f"in {view_word} view"])
    return {
        "wt": wt, "scene": rnd.choice(_SCENE_PHRASES[scene_type]), "view": rnd.choice(views),
        "dmf_bg": "on " + with_article(f"{_WEATHER_ADJ[weather]} {scene_type} background {time_phrase}"),
        "dmf_view": "with " + with_article(f"{view_word}-side view" if view_word in ("left", "right")
                                           else f"{view_word} view"),
    }


#: Sentence templates; lower-case slot names are filled as-is, a capitalised slot name capitalises
#: its first letter. Person slots: subj hair hair_with upper lower shoes acc_with acc_clause pron
#: this_person. Condition slots: wt scene view dmf_bg dmf_view.
TEMPLATES: tuple[str, ...] = (
    # DMF figure style
    "{Subj} in {upper} and {lower} and {shoes}, {hair_with}, {acc_with}, {dmf_bg}, {dmf_view}.",
    # FineGPR-C style 1
    "There is {subj} {hair_with}, who wears {upper}, {lower} and {shoes} {wt} {scene}, {view}; "
    "{this_person} also {acc_clause}.",
    # FineGPR-C style 2
    "{Wt} {scene}, {view}, {subj}, who has {hair} hair, wears {upper}, {lower} and {shoes}; "
    "{this_person} also {acc_clause}.",
    "{Scene} {wt}, {subj} {hair_with} is {view}. {Pron} wears {upper}, {lower} and {shoes}. "
    "{Pron} {acc_clause}.",
    "{Subj} {hair_with}, {view} {wt} {scene}: {upper}, {lower}, {shoes}, {acc_with}.",
    "{View}, {subj} {wt} {scene}. {Pron} has {hair} hair and is dressed in {upper} and {lower} with {shoes}; "
    "{pron} {acc_clause}.",
)
#: Templates that state the identity's attributes and the viewpoint only, no weather, time of
#: day or scene (``captions.content: person``): the conditions a re-ID feature should ignore.
PERSON_TEMPLATES: tuple[str, ...] = (
    "{Subj} in {upper} and {lower} and {shoes}, {hair_with}, {acc_with}, {dmf_view}.",
    "There is {subj} {hair_with}, who wears {upper}, {lower} and {shoes}, {view}; {this_person} also {acc_clause}.",
    "{View}, {subj}, who has {hair} hair, wears {upper}, {lower} and {shoes}; {this_person} also {acc_clause}.",
    "{Subj} {hair_with} is {view}. {Pron} wears {upper}, {lower} and {shoes}. {Pron} {acc_clause}.",
    "{Subj} {hair_with}, {view}: {upper}, {lower}, {shoes}, {acc_with}.",
    "{View}, {subj}. {Pron} has {hair} hair and is dressed in {upper} and {lower} with {shoes}; "
    "{pron} {acc_clause}.",
)
TEMPLATE_SETS = {"full": TEMPLATES, "person": PERSON_TEMPLATES}
_PERSON_SLOTS = {"subj", "hair", "hair_with", "upper", "lower", "shoes", "acc_with", "acc_clause", "pron",
                 "this_person"}
_CONDITION_SLOTS = {"wt", "scene", "view", "dmf_bg", "dmf_view"}


@dataclass(frozen=True)
class _Run:
    kind: str  # "P" or "C"
    parts: tuple[tuple[str, str], ...]  # ("lit", text) | ("slot", name)

    def render(self, slots: dict[str, str], capitalise_first: bool) -> str:
        out = []
        for what, text in self.parts:
            if what == "lit":
                out.append(text)
            else:
                value = slots[text.lower()]
                out.append(value[:1].upper() + value[1:] if text[:1].isupper() else value)
        s = "".join(out)
        return s[:1].upper() + s[1:] if capitalise_first else s


def compile_template(template: str) -> list[_Run]:
    """Split a template into alternating person / condition runs (literals join the run before)."""
    tokens = re.split(r"(\{\w+\})", template)
    runs: list[list[Any]] = []  # [kind, parts]
    pending: list[tuple[str, str]] = []
    for tok in tokens:
        if not tok:
            continue
        if tok.startswith("{"):
            name = tok[1:-1]
            kind = "P" if name.lower() in _PERSON_SLOTS else "C" if name.lower() in _CONDITION_SLOTS else None
            if kind is None:
                raise ValueError(f"template {template!r}: unknown slot {{{name}}}")
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(("slot", name))
            else:
                if runs and not (runs[-1][1][-1][0] == "lit" and runs[-1][1][-1][1][-1:].isspace()):
                    raise ValueError(f"template {template!r}: runs must be separated by whitespace before {tok}")
                runs.append([kind, [*pending, ("slot", name)]])
                pending = []
        elif runs:
            runs[-1][1].append(("lit", tok))
        else:
            pending.append(("lit", tok))
    return [_Run(kind, tuple(parts)) for kind, parts in runs]


# ---------------------------------------------------------------------------------------------
# Parsing captions back into attributes (faithfulness checks)
# ---------------------------------------------------------------------------------------------

_COLOUR_RE = "|".join(COLOURS.values())
_TOPS_RE = "|".join(re.escape(n) for n in _ALL_TOP_NOUNS)


def _codes(text: str, table: list[tuple[str, int]]) -> set[int]:
    return {code for pattern, code in table if re.search(pattern, text)}


_SIMPLE: dict[str, list[tuple[str, int]]] = {
    "gender": [(r"\b(male|man|boy|he|his|him)\b", 1), (r"\b(female|woman|girl|she|her)\b", 2)],
    "age": [(r"\b(teenage|teenager|teen|boy|girl)\b", 1), (r"\badult\b", 2), (r"\b(elderly|older)\b", 3)],
    "hair": [(r"\blong(-haired| hair)\b", 1), (r"\bshort(-haired| hair)\b", 2)],
    "glasses": [(r"(?<!no )(?<!without )\bglasses\b", 1), (r"\b(no|without) glasses\b", 2)],
    "short_sleeve": [(r"\bshort(-sleeved| sleeves)\b", 1), (r"\blong(-sleeved| sleeves)\b", 2)],
    "top_length": [(r"\b(coat|long top)\b", 1), (r"\b(shirt|t-shirt|jacket|short top)\b", 2)],
    "dress": [(r"\bdress\b", 1), (r"\b(trousers|pants)\b", 2)],
    "boots": [(r"\bboots\b", 1), (r"\bshoes\b", 2)],
    "hat": [(r"(?<!without )\ba hat\b", 1), (r"\b(no|without a) hat\b", 2)],
    "bag": [(r"(?<!without )\ba bag\b", 1), (r"\b(no|without a) bag\b", 2)],
    "shoe_color": [(r"\bdark(-colou?red)? (boots|shoes)\b", 1), (r"\blight(-colou?red)? (boots|shoes)\b", 2)],
    "weather": [(r"\bsunny\b", 1), (r"\bcloudy\b", 2), (r"\bovercast\b", 3), (r"\bfog(gy)?\b", 4),
                (r"\b(neutral|mild)\b", 5), (r"\bblizzard\b", 6), (r"\blight(ly)? snow(fall|y)?\b", 7)],
    "illumination": [(r"\bmidnight\b", 1), (r"\b(dawn|daybreak)\b", 2), (r"\b(morning|forenoon)\b", 3),
                     (r"\b(noon|midday)\b", 4), (r"\bafternoon\b", 5), (r"\b(dusk|sunset)\b", 6),
                     (r"\bnight\b", 7)],
}
_COLOUR_CODE = {v: k for k, v in COLOURS.items()}


def parse_caption_attributes(caption: str, *, strict: bool = True) -> dict[str, Any]:
    """Recover attribute codes and conditions stated by a caption.

    Returns a dict with the attribute codes found (keys of ATTRIBUTE_COLUMNS), ``weather`` and
    ``illumination`` codes, ``scene`` ("urban"/"wild") and ``viewpoint`` (the view word). With
    ``strict`` (default) contradictory phrases for one key (e.g. "no hat" and "a hat", "he" and
    "she") raise :class:`CaptionParseError`; otherwise such keys are left out.
    """
    text = caption.lower()
    out: dict[str, Any] = {}
    conflicts: list[str] = []

    def put(key: str, values: set) -> None:
        if len(values) == 1:
            out[key] = next(iter(values))
        elif len(values) > 1:
            conflicts.append(f"{key}: {sorted(values, key=str)}")

    for key, table in _SIMPLE.items():
        put(key, _codes(text, table))
    put("upper_color", {_COLOUR_CODE[m] for m in re.findall(rf"\b({_COLOUR_RE}) (?:{_TOPS_RE})\b", text)})
    put("lower_color", {_COLOUR_CODE[m] for m in re.findall(rf"\b({_COLOUR_RE}) (?:dress|trousers|pants)\b", text)})
    scene = set()
    if re.search(r"\b(city|urban)\b", text):
        scene.add("urban")
    if re.search(r"\b(wild|countryside|natural)\b", text):
        scene.add("wild")
    put("scene", scene)
    views = set(re.findall(r"\bseen from the ([a-z][a-z-]*)", text))
    views |= set(re.findall(r"\b(?:in|with an?) ([a-z][a-z-]*?)(?:[ -]side)? view\b", text))
    if "seen from behind" in text:
        views.add("back")
    if "facing the camera" in text:
        views.add("front")
    put("viewpoint", views)
    if conflicts and strict:
        raise CaptionParseError(f"contradictory phrases in caption {caption!r}: {'; '.join(conflicts)}")
    return out


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@dataclass
class CaptionResult:
    captions: pd.DataFrame  # image_id, caption_idx, caption; sorted by image_id, caption_idx
    skipped: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 arithmetic wraps)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _rows_listing(frame: pd.DataFrame, mask: np.ndarray, columns: list[str]) -> str:
    rows = np.flatnonzero(mask)[:_MAX_LISTED]
    parts = []
    for r in rows:
        parts.append(", ".join(f"{c}={frame[c].iat[r]!r}" for c in columns if c in frame.columns))
    return "; ".join(f"[{p}]" for p in parts)


def _conditions(manifest: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """Condition codes per row (int64, 0 where unknown) + bad-row mask + a description of the problem."""
    n = len(manifest)
    if all(c in manifest.columns for c in CONDITION_COLUMNS):
        cond = {c: pd.to_numeric(manifest[c], errors="coerce").fillna(0).to_numpy(np.int64)
                for c in CONDITION_COLUMNS}
        source = "condition columns"
        pid_from_name = None
    else:
        base = pc.replace_substring_regex(_string_array(manifest["image_id"]), r"^.*/", "")
        parts = pc.extract_regex(base, FILENAME_RE)
        cond = {}
        for c in ("pid", *CONDITION_COLUMNS):
            vals = pc.cast(pc.struct_field(parts, c), pa.int64())
            cond[c] = vals.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        pid_from_name = cond.pop("pid")
        source = "file names (IIII_cCC_wWW_lLL_pPP.jpg; condition columns absent)"
    bad = np.zeros(n, dtype=bool)
    for c, hi in (("viewpoint", N_VIEWPOINTS), ("weather", len(WEATHER)), ("illumination", len(ILLUMINATION)),
                  ("scene", len(SCENE))):
        bad |= (cond[c] < 1) | (cond[c] > hi)
    if pid_from_name is not None:
        pid_col = pd.to_numeric(manifest["pid"], errors="coerce").fillna(-1).to_numpy(np.int64)
        bad |= pid_from_name != pid_col
    return cond, bad, source


def generate_captions(manifest: pd.DataFrame, attributes: pd.DataFrame, *, per_image: int, seed: int,
                      viewpoint_words: dict[str, list[float]] | None = None,
                      on_bad_rows: str = "fail", metrics_sample: int = 2000,
                      content: str = "full") -> CaptionResult:
    """Caption every image of a FineGPR-layout manifest from its identity's attributes and its conditions.

    ``manifest`` needs image_id and pid, plus viewpoint/weather/illumination/scene (1-based codes)
    or FineGPR file names to parse them from. ``attributes`` is :func:`read_attributes` output.
    Bad rows (codes out of range, malformed names, ids without attributes, ids with attributes
    but no images) raise :class:`CaptionInputError` unless ``on_bad_rows == "skip"``, in which
    case they are dropped and counted in ``result.skipped`` and ``result.metrics["skipped"]``.
    """
    _check_generation_params(manifest, per_image, on_bad_rows, content)
    view_table = viewpoint_word_table(viewpoint_words)
    skipped: dict[str, int] = dict(getattr(attributes, "attrs", {}).get("skipped", {}) or {})
    problems: list[str] = []
    attrs = _valid_attributes(attributes, problems, skipped)
    attr_pids = attrs["pid"].to_numpy(np.int64)
    keep, cond, pid = _rows_to_caption(manifest, attr_pids, problems, skipped)
    if problems:
        message = "captions: bad input: " + " | ".join(problems)
        if on_bad_rows == "fail":
            raise CaptionInputError(message + " (set captions.on_bad_rows: skip to drop and count them)")
        log.warning("%s; skipping", message)
    images = _Images.of(manifest, keep, cond, pid, attr_pids, view_table)
    compiled = [compile_template(t) for t in TEMPLATE_SETS[content]]
    pieces, offsets = _phrase_table(compiled, attrs, sorted(set(view_table)), seed)
    plan = _plan_captions(images, compiled, offsets, per_image, seed)
    captions = pa.table({
        "image_id": images.image_id.take(pa.array(plan.image)) if per_image > 1 else images.image_id,
        "caption_idx": pa.array(plan.k.astype(np.int16)),
        "caption": _join_pieces(pieces, plan.pieces),
    }).to_pandas()
    metrics = _generation_metrics(captions, plan, images, attrs, pieces, view_table, skipped,
                                  sample=metrics_sample, seed=seed)
    return CaptionResult(captions=captions, skipped={k: int(v) for k, v in skipped.items()}, metrics=metrics)


def _check_generation_params(manifest: pd.DataFrame, per_image: int, on_bad_rows: str, content: str) -> None:
    if on_bad_rows not in ("fail", "skip"):
        raise ValueError(f"captions.on_bad_rows: expected 'fail' or 'skip', got {on_bad_rows!r}")
    if per_image < 1:
        raise ValueError(f"captions.per_image: expected >= 1, got {per_image}")
    if content not in TEMPLATE_SETS:
        raise ValueError(f"captions.content: expected one of {sorted(TEMPLATE_SETS)}, got {content!r}")
    for col in ("image_id", "pid"):
        if col not in manifest.columns:
            raise CaptionInputError(f"manifest: missing column {col!r} (have {list(manifest.columns)})")


def _valid_attributes(attributes: pd.DataFrame, problems: list[str], skipped: dict[str, int]) -> pd.DataFrame:
    """One row per pid with known codes, sorted by pid; rows with unknown codes go to ``problems``."""
    ok_attr = validate_attribute_frame(attributes).to_numpy()
    if not ok_attr.all():
        listing = _rows_listing(attributes, ~ok_attr, ["pid", *ATTRIBUTE_COLUMNS])
        problems.append(f"attributes: {int((~ok_attr).sum())} row(s) with unknown codes: {listing}")
        skipped["attribute_rows_bad"] = skipped.get("attribute_rows_bad", 0) + int((~ok_attr).sum())
    return attributes[ok_attr].drop_duplicates("pid").sort_values("pid")


def _rows_to_caption(manifest: pd.DataFrame, attr_pids: np.ndarray, problems: list[str],
                     skipped: dict[str, int]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Which manifest rows can be captioned (readable conditions, an identity with attributes),
    with every row's condition codes and pid. Bad rows, and identities with attributes but no
    images, are described in ``problems`` and counted in ``skipped``."""
    cond, bad_cond, cond_source = _conditions(manifest)
    if bad_cond.any():
        listing = _rows_listing(manifest, bad_cond, ["image_id", "pid", *CONDITION_COLUMNS])
        problems.append(f"manifest: {int(bad_cond.sum())} image(s) with malformed or out-of-range conditions "
                        f"(from {cond_source}; expected c01-c36, w01-w07, l01-l07, p01-p09 and the file name's "
                        f"pid = pid): {listing}")
    skipped["images_bad_conditions"] = int(bad_cond.sum())
    pid = pd.to_numeric(manifest["pid"], errors="coerce").fillna(-1).to_numpy(np.int64)
    pos = np.searchsorted(attr_pids, pid)
    pos_c = np.minimum(pos, max(len(attr_pids) - 1, 0))
    has_attr = attr_pids[pos_c] == pid if len(attr_pids) else np.zeros(len(pid), dtype=bool)
    no_attr = ~has_attr
    if no_attr.any():
        missing_ids = np.unique(pid[no_attr])
        problems.append(f"{len(missing_ids)} id(s) in the manifest have no attributes ({int(no_attr.sum())} "
                        f"image(s)), e.g. pid {missing_ids[:_MAX_LISTED].tolist()}: "
                        f"{_rows_listing(manifest, no_attr, ['image_id', 'pid'])}")
    skipped["images_missing_attributes"] = int(no_attr.sum())
    skipped["ids_missing_attributes"] = int(len(np.unique(pid[no_attr])))
    orphan = np.setdiff1d(attr_pids, np.unique(pid[has_attr]))
    if len(orphan):
        problems.append(f"{len(orphan)} id(s) have attributes but no images in the manifest, e.g. pid "
                        f"{orphan[:_MAX_LISTED].tolist()}")
    skipped["ids_without_images"] = int(len(orphan))
    return has_attr & ~bad_cond, cond, pid


def _rows_by_image_id(manifest: pd.DataFrame, keep: np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """The kept rows in image_id order, and their image_ids; a repeated image_id is an error."""
    rows = np.flatnonzero(keep)
    image_col = pc.cast(_string_array(manifest["image_id"]), pa.large_string())
    if len(rows) < len(manifest):
        image_col = image_col.take(pa.array(rows))
    if len(image_col) > 1:
        head, tail = image_col.slice(0, len(image_col) - 1), image_col.slice(1)
        if not pc.all(pc.less_equal(head, tail)).as_py():
            order = pc.sort_indices(image_col).to_numpy()
            rows = rows[order]
            image_col = image_col.take(pa.array(order))
            head, tail = image_col.slice(0, len(image_col) - 1), image_col.slice(1)
        same = pc.equal(head, tail).to_numpy(zero_copy_only=False)
        if same.any():
            dups = image_col.take(pa.array(np.flatnonzero(same)[:_MAX_LISTED])).to_pylist()
            raise CaptionInputError(f"manifest: image_id not unique ({int(same.sum())} repeats), e.g. {dups}")
    return rows, image_col


@dataclass(frozen=True)
class _Images:
    """The images to caption, in image_id order, with their codes and rows in the phrase table."""

    image_id: pa.Array
    pid: np.ndarray
    viewpoint: np.ndarray  # FineGPR codes, 1-based
    weather: np.ndarray
    illumination: np.ndarray
    scene: np.ndarray
    scene_type: np.ndarray  # index into SCENE_TYPES
    person: np.ndarray  # the identity's entry among the person phrases (its index in the sorted pids)
    condition: np.ndarray  # (view word, weather, illumination, scene type) entry among the condition phrases

    @classmethod
    def of(cls, manifest: pd.DataFrame, keep: np.ndarray, cond: dict[str, np.ndarray], pid: np.ndarray,
           attr_pids: np.ndarray, view_table: list[str]) -> _Images:
        rows, image_col = _rows_by_image_id(manifest, keep)
        view_vocab = sorted(set(view_table))
        view_code_to_word = np.array([view_vocab.index(w) for w in view_table], dtype=np.int64)
        vp, we, il, sc = (cond[c][rows] for c in CONDITION_COLUMNS)
        scene_type = np.array([0] + [SCENE_TYPES.index(SCENE[k]) for k in range(1, len(SCENE) + 1)],
                              dtype=np.int64)[sc]
        view_word = view_code_to_word[vp - 1] if len(rows) else vp
        return cls(image_id=image_col, pid=pid[rows], viewpoint=vp, weather=we, illumination=il, scene=sc,
                   scene_type=scene_type, person=np.searchsorted(attr_pids, pid[rows]),
                   condition=((view_word * 7 + (we - 1)) * 7 + (il - 1)) * 2 + scene_type)


def _phrase_table(compiled: list[list[_Run]], attrs: pd.DataFrame, view_vocab: list[str],
                  seed: int) -> tuple[list[str], list[list[int]]]:
    """Every run of every template, pre-rendered: ``pieces`` and ``offsets[t][j]``, where the block
    of run j of template t starts. A person run's block holds every identity x PERSON_VARIANTS,
    a condition run's every (view word, weather, illumination, scene type) x CONDITION_VARIANTS."""
    records = attrs[list(ATTRIBUTE_COLUMNS)].astype(int).to_dict("records")
    pids = attrs["pid"].to_numpy(np.int64)
    pieces: list[str] = [""]
    offsets: list[list[int]] = []
    for t, runs in enumerate(compiled):
        offs = []
        person: dict[tuple[int, int], dict[str, str]] = {}  # (id index, variant) -> slots, shared by runs
        condition: dict[tuple[int, int, int, int, int], dict[str, str]] = {}
        for j, run in enumerate(runs):
            offs.append(len(pieces))
            if run.kind == "P":
                pieces += _person_pieces(run, j == 0, records, pids, person, seed, t)
            else:
                pieces += _condition_pieces(run, j == 0, view_vocab, condition, seed, t)
        offsets.append(offs)
    return pieces, offsets


def _person_pieces(run: _Run, first: bool, records: list[dict[str, int]], pids: np.ndarray,
                   slots: dict[tuple[int, int], dict[str, str]], seed: int, t: int) -> list[str]:
    """``run`` for every identity and person variant (entry: id index * PERSON_VARIANTS + variant)."""
    out = []
    for i, rec in enumerate(records):
        for v in range(PERSON_VARIANTS):
            if (i, v) not in slots:
                slots[i, v] = _person_slots(rec, random.Random(f"{seed}|P|{int(pids[i])}|{t}|{v}"))
            out.append(run.render(slots[i, v], first))
    return out


def _condition_pieces(run: _Run, first: bool, view_vocab: list[str],
                      slots: dict[tuple[int, int, int, int, int], dict[str, str]], seed: int,
                      t: int) -> list[str]:
    """``run`` for every condition and variant (entry: ``_Images.condition`` * CONDITION_VARIANTS
    + variant)."""
    out = []
    for w, wi, li, (si, stype), v in itertools.product(range(len(view_vocab)), range(1, 8), range(1, 8),
                                                       enumerate(SCENE_TYPES), range(CONDITION_VARIANTS)):
        key = (w, wi, li, si, v)
        if key not in slots:
            rnd = random.Random(f"{seed}|C|{view_vocab[w]}|{wi}|{li}|{stype}|{t}|{v}")
            slots[key] = _condition_slots(view_vocab[w], wi, li, stype, rnd)
        out.append(run.render(slots[key], first))
    return out


@dataclass(frozen=True)
class _CaptionPlan:
    """Caption c is caption ``k[c]`` of image ``image[c]``, written with template ``template[c]``
    as the concatenation of the phrase-table pieces ``pieces[:, c]`` (runs x captions)."""

    image: np.ndarray
    k: np.ndarray
    template: np.ndarray
    pieces: np.ndarray
    n_templates: int
    per_image: int


def _plan_captions(images: _Images, compiled: list[list[_Run]], offsets: list[list[int]], per_image: int,
                   seed: int) -> _CaptionPlan:
    """Caption k of an image takes the template and variants its hash picks, plus k (mod their
    counts): the captions of one image differ in template first, then in variants."""
    n_t = len(compiled)
    base_t, base_vp, base_vc = _image_draws(images, seed, n_t)
    img_of = np.repeat(np.arange(len(images.pid), dtype=np.int64), per_image)
    k_of = np.tile(np.arange(per_image, dtype=np.int64), len(images.pid))
    tmpl = (base_t[img_of] + k_of) % n_t
    shift = k_of // n_t
    ent_p = images.person[img_of] * PERSON_VARIANTS + (base_vp[img_of] + shift) % PERSON_VARIANTS
    ent_c = images.condition[img_of] * CONDITION_VARIANTS + (base_vc[img_of] + shift) % CONDITION_VARIANTS
    idx = np.zeros((max(len(r) for r in compiled), len(img_of)), dtype=np.int32)
    for t, runs in enumerate(compiled):
        m = tmpl == t
        for j, run in enumerate(runs):
            idx[j, m] = offsets[t][j] + (ent_p[m] if run.kind == "P" else ent_c[m])
    return _CaptionPlan(image=img_of, k=k_of, template=tmpl, pieces=idx, n_templates=n_t, per_image=per_image)


def _image_draws(images: _Images, seed: int, n_t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: template, person variant and condition variant, from a hash of (seed, pid and the
    condition codes), so they do not depend on the manifest's order."""
    key = (((((images.pid.astype(np.uint64) * np.uint64(64) + images.viewpoint.astype(np.uint64)) * np.uint64(8)
              + images.weather.astype(np.uint64)) * np.uint64(8) + images.illumination.astype(np.uint64))
            * np.uint64(16) + images.scene.astype(np.uint64)) ^ _mix64(np.array([seed], dtype=np.uint64))[0])
    h = _mix64(key)
    base_t = (h % np.uint64(n_t)).astype(np.int64)
    base_vp = ((h >> np.uint64(20)) % np.uint64(PERSON_VARIANTS)).astype(np.int64)
    base_vc = ((h >> np.uint64(40)) % np.uint64(CONDITION_VARIANTS)).astype(np.int64)
    return base_t, base_vp, base_vc


def _join_pieces(pieces: list[str], idx: np.ndarray) -> pa.ChunkedArray:
    """The captions: row j of ``idx`` picks each caption's j-th piece; joined in C, in chunks."""
    table = pa.array(pieces, type=pa.large_string())  # large_string: pandas takes it without a copy
    chunk = 1 << 19
    out_chunks = []
    for start in range(0, idx.shape[1], chunk):
        cols = [table.take(pa.array(idx[j, start:start + chunk])) for j in range(idx.shape[0])]
        out_chunks.append(pc.binary_join_element_wise(*cols, pa.scalar("", pa.large_string())))
    return pa.chunked_array(out_chunks, type=pa.large_string())


def _generation_metrics(captions: pd.DataFrame, plan: _CaptionPlan, images: _Images, attrs: pd.DataFrame,
                        pieces: list[str], view_table: list[str], skipped: dict[str, int], *, sample: int,
                        seed: int) -> dict[str, Any]:
    """:func:`caption_metrics`' figures, counted from the pieces (fast: no pass over the caption text),
    plus coverage and correctness against the attributes and conditions on a seeded sample."""
    idx, total = plan.pieces, len(plan.image)
    words_per_piece = np.array([len(p.split()) for p in pieces], dtype=np.int32)
    n_words = np.zeros(total, dtype=np.int32)
    used = np.zeros(len(pieces), dtype=bool)
    for j in range(idx.shape[0]):
        n_words += words_per_piece[idx[j]]
        used[idx[j]] = True
    vocab = _vocabulary(pa.array([pieces[i] for i in np.flatnonzero(used)], type=pa.string()))
    metrics: dict[str, Any] = {
        "source": "generated",
        "images_captioned": int(len(images.pid)),
        "ids_captioned": int(len(np.unique(images.pid))),
        "captions": int(total),
        "per_image": int(plan.per_image),
        "unique_captions": _count_unique_combinations(idx, pieces),
        "vocabulary_size": len(vocab),
        "words_per_caption": _length_stats(n_words),
        "templates_used": {str(t): int(c) for t, c in enumerate(np.bincount(plan.template,
                                                                            minlength=plan.n_templates))},
        "viewpoint_words": {f"c{c + 1:02d}": w for c, w in enumerate(view_table)},
        "skipped": {k: int(v) for k, v in sorted(skipped.items())},
    }
    sample_rows = _sample_positions(total, sample, seed)
    sampled = plan.image[sample_rows]  # the image of each sampled caption
    metrics.update(_coverage(captions, sample_rows, attrs.set_index("pid"), images.pid[sampled],
                             {"weather": images.weather[sampled], "illumination": images.illumination[sampled]},
                             images.scene_type[sampled], np.array(view_table)[images.viewpoint[sampled] - 1]))
    metrics["attribute_values"] = _attribute_value_counts(attrs[attrs["pid"].isin(images.pid)])
    return metrics


def _count_unique_combinations(idx: np.ndarray, pieces: list[str]) -> int:
    """Distinct captions, counted as distinct combinations of (deduplicated) piece strings.

    Hashing the ~1 GB of caption text at full scale would need several GB; a caption is the
    concatenation of its pieces, so equal piece combinations give equal captions (and, with run
    boundaries at whitespace, different combinations give different captions). The 64-bit row
    hash makes a false merge improbable (~n^2 / 2^65).
    """
    if idx.shape[1] == 0:
        return 0
    first: dict[str, int] = {}
    canon = np.array([first.setdefault(p, i) for i, p in enumerate(pieces)], dtype=np.uint64)
    h = np.zeros(idx.shape[1], dtype=np.uint64)
    for j in range(idx.shape[0]):
        h = _mix64(h * np.uint64(0x9E3779B97F4A7C15) + canon[idx[j]] + np.uint64(j + 1))
    return int(len(np.unique(h)))


def _string_array(series: pd.Series) -> pa.Array:
    """A pandas column as one pyarrow string array (no Python objects for arrow-backed columns)."""
    arr = pa.array(series.astype(str), type=pa.string()) if len(series) else pa.array([], pa.string())
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _take_rows(arr: pa.ChunkedArray, rows: np.ndarray) -> list:
    """Values at sorted global positions, taken chunk by chunk (ChunkedArray.take would concatenate)."""
    out: list = []
    start = 0
    for chunk in arr.chunks:
        end = start + len(chunk)
        lo, hi = np.searchsorted(rows, [start, end])
        if hi > lo:
            out.extend(chunk.take(pa.array(rows[lo:hi] - start)).to_pylist())
        start = end
    return out


def _sample_positions(total: int, size: int, seed: int) -> np.ndarray:
    if total <= size:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))


def _length_stats(n_words: np.ndarray) -> dict[str, float]:
    if len(n_words) == 0:
        return {"min": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    return {"min": int(n_words.min()), "mean": round(float(n_words.mean()), 2),
            "p50": float(np.percentile(n_words, 50)), "p95": float(np.percentile(n_words, 95)),
            "max": int(n_words.max())}


def _vocabulary(texts: pa.Array) -> set[str]:
    lowered = pc.utf8_lower(texts)
    words = pc.list_flatten(pc.split_pattern_regex(lowered, r"[^a-z0-9'-]+"))
    uniq = pc.unique(words).to_pylist()
    return {w.strip("'-") for w in uniq if w and w.strip("'-")}


def _attribute_value_counts(attrs: pd.DataFrame) -> dict[str, dict[str, int]]:
    out = {}
    for col in ATTRIBUTE_COLUMNS:
        counts = attrs[col].value_counts()
        out[col] = {ATTRIBUTE_CODES[col][int(k)]: int(v) for k, v in sorted(counts.items())}
    return out


def _coverage(captions: pd.DataFrame, sample_rows: np.ndarray, truth: pd.DataFrame | None,
              pids: np.ndarray | None, conds: dict[str, np.ndarray] | None, scene_type: np.ndarray | None,
              view_words: np.ndarray | None) -> dict[str, Any]:
    """Per-attribute coverage over a sample: fraction of captions stating the attribute (and, with
    the truth given, stating it correctly), plus the number of captions with contradictions."""
    keys = [*ATTRIBUTE_COLUMNS, "weather", "illumination", "scene", "viewpoint"]
    stated = dict.fromkeys(keys, 0)
    correct = dict.fromkeys(keys, 0)
    contradictions = 0
    texts = _take_rows(_chunked(captions["caption"]), sample_rows)
    for i, text in enumerate(texts):
        try:
            parsed = parse_caption_attributes(str(text))
        except CaptionParseError:
            contradictions += 1
            parsed = parse_caption_attributes(str(text), strict=False)
        for k in keys:
            if k not in parsed:
                continue
            stated[k] += 1
            if truth is None or pids is None:
                continue
            if k not in ATTRIBUTE_COLUMNS and conds is None:
                continue  # the conditions' truth is not given (caption_metrics): attributes only
            if k in ATTRIBUTE_COLUMNS:
                expected = int(truth.at[int(pids[i]), k])
            elif k == "scene":
                expected = SCENE_TYPES[int(scene_type[i])]
            elif k == "viewpoint":
                expected = str(view_words[i])
            else:
                expected = int(conds[k][i])
            correct[k] += int(parsed[k] == expected)
    n = max(len(texts), 1)
    out: dict[str, Any] = {
        "coverage_sample": int(len(texts)),
        "attribute_coverage": {k: round(stated[k] / n, 4) for k in keys},
        "contradictory_captions_in_sample": contradictions,
    }
    if truth is not None and pids is not None:
        out["attribute_correct"] = {k: round(correct[k] / n, 4) for k in keys}
    return out


def caption_metrics(captions: pd.DataFrame, attributes: pd.DataFrame | None = None,
                    manifest: pd.DataFrame | None = None, *, sample: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Metrics of any caption table (generated or read from FineGPR-C).

    Images captioned, unique captions, vocabulary size, words per caption (min/mean/p50/p95/max)
    and per-attribute coverage over a seeded sample (fraction of captions from which
    :func:`parse_caption_attributes` recovers the attribute; with ``attributes`` and a
    ``manifest`` holding pid also the fraction recovered correctly).
    """
    arr = _chunked(captions["caption"])
    n_words, hashes, vocab = [], [], set()
    step = 1 << 18
    for s in range(0, len(arr), step):  # chunked: flat memory at millions of captions
        part = arr.slice(s, step).combine_chunks()
        n_words.append(pc.list_value_length(pc.utf8_split_whitespace(part)).to_numpy(zero_copy_only=False))
        hashes.append(pd.util.hash_array(np.asarray(part.to_pylist(), dtype=object)))
        vocab |= _vocabulary(pc.unique(part))
    metrics: dict[str, Any] = {
        "source": "table",
        "images_captioned": int(captions["image_id"].nunique()),
        "captions": int(len(captions)),
        "unique_captions": int(len(np.unique(np.concatenate(hashes)))) if hashes else 0,
        "vocabulary_size": len(vocab),
        "words_per_caption": _length_stats(np.concatenate(n_words) if n_words else np.zeros(0, np.int64)),
    }
    rows = _sample_positions(len(captions), sample, seed)
    truth = pids = None
    if attributes is not None and manifest is not None and "pid" in manifest.columns:
        truth = attributes.drop_duplicates("pid").set_index("pid")
        pid_of = dict(zip(manifest["image_id"].astype(str), manifest["pid"].astype(int), strict=False))
        pids = np.array([pid_of.get(str(i), -1) for i in captions["image_id"].to_numpy()[rows]])
        if (pids < 0).any() or not np.isin(pids, truth.index.to_numpy()).all():
            truth = pids = None
    cov = _coverage(captions, rows, truth, pids, None, None, None)
    if truth is not None:  # conditions not compared here; keep only attribute correctness
        cov["attribute_correct"] = {k: v for k, v in cov["attribute_correct"].items() if k in ATTRIBUTE_COLUMNS}
    metrics.update(cov)
    return metrics


# ---------------------------------------------------------------------------------------------
# Writing / reading
# ---------------------------------------------------------------------------------------------


def _as_frame(result_or_df: CaptionResult | pd.DataFrame) -> pd.DataFrame:
    df = result_or_df.captions if isinstance(result_or_df, CaptionResult) else result_or_df
    missing = [c for c in ("image_id", "caption_idx", "caption") if c not in df.columns]
    if missing:
        raise ValueError(f"captions table: missing column(s) {missing}")
    return df


_UNSAFE_JSON = r'["\\\x00-\x1f]'


def _json_strings(arr: pa.Array) -> pa.Array:
    """JSON string literals (with quotes) for a string array; vectorised when nothing needs escaping."""
    if len(arr) == 0:
        return pa.array([], pa.large_string())
    arr = pc.cast(arr, pa.large_string())
    if not pc.any(pc.match_substring_regex(arr, _UNSAFE_JSON)).as_py():
        return pc.binary_join_element_wise(_large('"'), arr, _large('"'), _large(""))
    return pa.array([json.dumps(s, ensure_ascii=False) for s in arr.to_pylist()], type=pa.large_string())


def _large(value: Any) -> Any:
    if isinstance(value, str):
        return pa.scalar(value, pa.large_string())
    return pc.cast(value, pa.large_string())


def _write_joined(fh, parts: list, sep: str, first: bool) -> bool:
    """Write element-wise joined strings, separated by ``sep``; returns whether nothing was written yet."""
    lines = pc.binary_join_element_wise(_large(sep), *[_large(p) for p in parts], _large(""))
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    if len(lines) == 0:
        return first
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64, count=len(lines) + 1, offset=lines.offset * 8)
    start = int(offsets[0]) + (len(sep.encode()) if first else 0)
    fh.write(memoryview(lines.buffers()[2])[start:int(offsets[-1])])
    return False


def _chunked(series: pd.Series) -> pa.ChunkedArray:
    """A string column as a large_string chunked array (zero-copy for arrow-backed pandas columns)."""
    arr = getattr(series.array, "_pa_array", None)
    if arr is None:
        arr = pa.chunked_array([pa.array(series.astype(str).to_numpy(dtype=object), type=pa.large_string())])
    if not isinstance(arr, pa.ChunkedArray):
        arr = pa.chunked_array([arr])
    return arr if arr.type == pa.large_string() else pc.cast(arr, pa.large_string())


def write_captions(result_or_df: CaptionResult | pd.DataFrame, parquet_path: Path, coco_json_path: Path,
                   *, chunk: int = 1 << 18) -> None:
    """Write the caption table as parquet and as COCO-style JSON.

    Parquet: image_id (string), caption_idx (int16), caption (string), sorted by image_id,
    caption_idx. COCO JSON: ``info``, ``images`` [{id, file_name}] with ids 1..n in image_id
    order, and ``annotations`` [{id, image_id, caption}] with ids 1..m in table order. Both are
    deterministic for the same table; written in chunks so memory stays flat at 2M images.
    """
    df = _as_frame(result_or_df)
    table = pa.table({"image_id": _chunked(df["image_id"]),
                      "caption_idx": pa.array(df["caption_idx"].to_numpy(np.int16)),
                      "caption": _chunked(df["caption"])})
    n = len(table)
    if n > 1:
        ids, idx = table.column("image_id"), table.column("caption_idx")
        head, tail = ids.slice(0, n - 1), ids.slice(1)
        ordered = pc.or_(pc.less(head, tail), pc.and_(pc.equal(head, tail),
                                                      pc.less(idx.slice(0, n - 1), idx.slice(1))))
        if not pc.all(ordered).as_py():
            table = table.take(pc.sort_indices(table, sort_keys=[("image_id", "ascending"),
                                                                 ("caption_idx", "ascending")]))
    parquet_path, coco_json_path = Path(parquet_path), Path(coco_json_path)
    parquet_path.parent.mkdir(parents=True, exist_ok=True)
    coco_json_path.parent.mkdir(parents=True, exist_ok=True)
    # reliability (issue 9): both files go to temporary names first and replace the outputs only when
    # both are complete, so a full disk (or a kill) mid-write never leaves a half or mismatched pair.
    tmp_parquet = parquet_path.with_name(parquet_path.name + ".tmp")
    tmp = coco_json_path.with_name(coco_json_path.name + ".tmp")
    try:
        pq.write_table(table, tmp_parquet, compression="zstd", row_group_size=1 << 20, store_schema=False)
        _write_coco(table, n, tmp, chunk)
        tmp_parquet.replace(parquet_path)
        tmp.replace(coco_json_path)
    finally:
        tmp_parquet.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def _write_coco(table: pa.Table, n: int, tmp: Path, chunk: int) -> None:
    """The COCO-style JSON of :func:`write_captions`, streamed in chunks into ``tmp``."""
    ids = table.column("image_id")
    new_img = np.ones(n, dtype=bool)
    if n > 1:
        new_img[1:] = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy()
    img_num = np.cumsum(new_img, dtype=np.int64)  # 1-based COCO image id of every annotation
    first_rows = np.flatnonzero(new_img)
    captions = table.column("caption")
    with open(tmp, "wb") as fh:
        fh.write(b'{"info": {"description": "dmf FineGPR-C style captions", "version": "1"},\n"images": [\n')
        first = True
        for s in range(0, len(first_rows), chunk):
            rows = first_rows[s:s + chunk]
            names = _json_strings(ids.take(pa.array(rows)).combine_chunks())
            nums = pa.array(np.arange(s + 1, s + 1 + len(rows), dtype=np.int64))
            first = _write_joined(fh, ['{"id": ', nums, ', "file_name": ', names, "}"], ",\n", first)
        fh.write(b'\n],\n"annotations": [\n')
        first = True
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            ann = pa.array(np.arange(s + 1, e + 1, dtype=np.int64))
            caps = _json_strings(captions.slice(s, e - s).combine_chunks())
            first = _write_joined(fh, ['{"id": ', ann, ', "image_id": ', pa.array(img_num[s:e]), ', "caption": ',
                                       caps, "}"], ",\n", first)
        fh.write(b"\n]}\n")


def read_finegpr_c(json_path: Path, manifest: pd.DataFrame, *, on_bad_rows: str = "fail") -> pd.DataFrame:
    """Read COCO-style captions (FineGPR-C or :func:`write_captions` output) as a caption table.

    ``images[].file_name`` is matched to the manifest's image_id, exactly or else by base name
    (base names must then be unique in the manifest). Captions of one image are numbered
    (caption_idx) in annotation id order. Images not in the manifest / annotations pointing at
    unknown images stop the read unless ``on_bad_rows == "skip"``; manifest images without a
    caption are logged and counted in ``frame.attrs["skipped"]``.
    """
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise CaptionInputError(f"{json_path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:  # reliability (issue 9): name the file instead of a bare codec error
        raise CaptionInputError(f"{json_path}: not UTF-8 text ({exc})") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise CaptionInputError(f"{json_path}: expected a COCO-style object with 'images' and 'annotations'")
    images = pd.DataFrame(data["images"])
    anns = pd.DataFrame(data["annotations"])
    for name, frame, cols in (("images", images, ["id", "file_name"]),
                              ("annotations", anns, ["image_id", "caption"])):
        missing = [c for c in cols if c not in frame.columns]
        if missing and len(frame):
            raise CaptionInputError(f"{json_path}: {name} entries lack key(s) {missing}")
        # reliability (issue 9): a key present in some entries only (or null) must not crash later
        if name == "images" and len(frame) and frame[cols].isna().any().any():
            lacking = frame[frame[cols].isna().any(axis=1)].head(_MAX_LISTED).to_dict("records")
            raise CaptionInputError(f"{json_path}: images entries lack 'id' or 'file_name', e.g. {lacking}")
    if not len(anns):
        raise CaptionInputError(f"{json_path}: no annotations")
    man_ids = manifest["image_id"].astype(str)
    exact = set(man_ids)
    file_names = images["file_name"].astype(str)
    if file_names.isin(exact).all():
        mapped = file_names
    else:
        base = man_ids.str.rsplit("/", n=1).str[-1]
        if base.duplicated().any():
            raise CaptionInputError(f"{json_path}: file names are not manifest image_ids and manifest base names "
                                    f"are not unique (e.g. {base[base.duplicated()].iloc[0]!r})")
        by_base = dict(zip(base, man_ids, strict=True))
        mapped = file_names.map(lambda f: f if f in exact else by_base.get(f.rsplit("/", 1)[-1]))
    skipped: dict[str, int] = {}
    unknown = mapped.isna().to_numpy()
    problems = []
    if unknown.any():
        problems.append(f"{int(unknown.sum())} image(s) not in the manifest: "
                        f"{file_names[unknown].head(_MAX_LISTED).tolist()}")
    skipped["images_not_in_manifest"] = int(unknown.sum())
    id_map = dict(zip(images["id"], mapped, strict=True))
    anns["image_id_str"] = anns["image_id"].map(id_map)
    bad_ann = anns["image_id_str"].isna().to_numpy() | anns["caption"].isna().to_numpy()
    n_bad_ann = int(bad_ann.sum() - (anns["image_id"].map(lambda i: i in id_map and id_map[i] is None).sum()
                                     if unknown.any() else 0))
    if n_bad_ann > 0:
        problems.append(f"{n_bad_ann} annotation(s) point at no image or have no caption, e.g. "
                        f"{anns[bad_ann].head(_MAX_LISTED).to_dict('records')}")
    skipped["annotations_bad"] = int(bad_ann.sum())
    if problems:
        message = f"{json_path}: " + " | ".join(problems)
        if on_bad_rows == "fail":
            raise CaptionInputError(message)
        log.warning("%s; skipping", message)
    anns = anns[~bad_ann]
    sort_cols = ["image_id_str", "id"] if "id" in anns.columns else ["image_id_str"]
    anns = anns.sort_values(sort_cols, kind="stable")
    out = pd.DataFrame({
        "image_id": anns["image_id_str"].astype(str).to_numpy(),
        "caption_idx": anns.groupby("image_id_str", sort=False).cumcount().astype("int16").to_numpy(),
        "caption": anns["caption"].astype(str).str.strip().to_numpy(),
    })
    without = int((~man_ids.isin(set(out["image_id"]))).sum())
    if without:
        log.warning("%s: %d manifest image(s) have no caption", json_path, without)
    skipped["manifest_images_without_caption"] = without
    out.attrs["skipped"] = skipped
    return out.reset_index(drop=True)
