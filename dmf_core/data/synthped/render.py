"""SynthPed drawing: identities, backgrounds, the 2.5-D pedestrian renderer, weather and light.

numpy + PIL (no torch), so the generator starts fast. FineGPR's codes (attribute columns and
codes, scene types, viewpoint angles) come from :mod:`dmf_core.data.captions`, which puts the
same codes into words. Everything is deterministic: an identity is a pure function of
``(seed, namespace, pid)`` and an image a pure function of the identity, the condition codes and
the ``numpy.random.Generator`` handed in.

Geometry. The person is drawn in a 2.5-D body frame: a point with lateral offset ``L`` (positive
= the person's right) and forward offset ``F`` lands at image x ``cx - cos(a) * L + sin(a) * F``
and depth ``cos(a) * F + sin(a) * L`` (towards the camera), where ``a`` is the viewpoint angle
(0 deg = the camera sees the front; 90 deg = it sees the person's right side, so the person
walks to the image right; 180 deg = the back). Parts are painted back to front by depth, so the
face, glasses and chest logo show from the front only, a backpack from the back, the torso
narrows in profile and the far arm and leg are hidden behind the body.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dmf_core.data.captions.attributes import ATTRIBUTE_CODES, ATTRIBUTE_COLUMNS
from dmf_core.data.captions.codes import ILLUMINATION, N_VIEWPOINTS, SCENE, WEATHER, viewpoint_angle


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from its parts, stable across processes and Python versions."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def rng_for(*parts: object) -> np.random.Generator:
    return np.random.default_rng(stable_seed(*parts))


# Base shades of the 9 FineGPR colours (RGB) and how far an identity's shade may move.
_BASE_RGB = {
    1: (28, 28, 32), 2: (232, 232, 228), 3: (186, 32, 38), 4: (112, 52, 142), 5: (128, 128, 130),
    6: (226, 196, 42), 7: (38, 72, 172), 8: (42, 132, 62), 9: (118, 76, 40),
}

RGB = tuple[int, int, int]


def named_shade(code: int, rng: np.random.Generator) -> RGB:
    """A shade that still reads as FineGPR colour ``code`` (jittered in HSV)."""
    r, g, b = (c / 255.0 for c in _BASE_RGB[code])
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if code == 1:  # black
        v = rng.uniform(0.07, 0.19)
        s = rng.uniform(0.0, 0.25)
    elif code == 2:  # white
        v = rng.uniform(0.86, 0.98)
        s = rng.uniform(0.0, 0.07)
    elif code == 5:  # gray
        v = rng.uniform(0.40, 0.62)
        s = rng.uniform(0.0, 0.06)
    else:
        h = (h + rng.uniform(-0.025, 0.025)) % 1.0
        s = float(np.clip(s * rng.uniform(0.8, 1.1), 0.35, 1.0))
        v = float(np.clip(v * rng.uniform(0.8, 1.12), 0.3, 1.0))
    rr, gg, bb = colorsys.hsv_to_rgb(h, s, v)
    return (int(rr * 255), int(gg * 255), int(bb * 255))


_SKIN = ((250, 218, 180), (236, 192, 150), (222, 170, 120), (196, 138, 92), (150, 98, 62),
         (104, 66, 42))
_HAIR = ((22, 18, 18), (58, 38, 26), (98, 64, 36), (196, 160, 96), (128, 58, 30), (40, 30, 30))
_OLD_HAIR = ((170, 170, 165), (212, 212, 206), (140, 136, 130))
_DARK_SHOES = ((20, 20, 22), (52, 34, 22), (40, 40, 46), (70, 46, 30))
_LIGHT_SHOES = ((238, 238, 234), (214, 200, 170), (196, 198, 204), (226, 214, 190))
_ACCESSORY = ((30, 30, 34), (96, 60, 34), (150, 40, 40), (40, 60, 110), (180, 150, 110),
              (70, 90, 60), (210, 210, 205))
PATTERNS: tuple[str, ...] = ("plain", "hstripes", "vstripe", "logo", "checks", "twotone")


def _jitter(rgb: RGB, rng: np.random.Generator, amount: float) -> RGB:
    return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _contrast_color(rgb: RGB, rng: np.random.Generator) -> RGB:
    """A pattern colour that stands out against ``rgb``."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    choices = [c for c in _BASE_RGB.values() if abs(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] - lum) > 60]
    base = choices[int(rng.integers(len(choices)))] if choices else (255 - rgb[0], 255 - rgb[1], 255 - rgb[2])
    return _jitter(base, rng, 18)


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """One person: the 13 FineGPR attributes plus the fine detail that makes them unique."""

    pid: int
    namespace: str
    attributes: dict[str, int]
    skin: RGB
    hair_rgb: RGB
    upper_rgb: RGB
    lower_rgb: RGB
    shoe_rgb: RGB
    height_scale: float
    width_scale: float
    head_scale: float
    pattern: str
    pattern_rgb: RGB
    pattern_period: int  # stripe/check period in 1/100 body heights
    logo_y: float  # chest logo height, fraction of the torso
    logo_back: bool
    hair_style: int  # 0 plain, 1 ponytail/bun, 2 side parting (long hair: 0 straight, 1 ponytail)
    hat_kind: int  # 0 cap, 1 beanie, 2 brimmed
    hat_rgb: RGB
    bag_kind: int  # 0 backpack, 1 shoulder bag, 2 handbag
    bag_side: int  # +1 person's right, -1 left
    bag_rgb: RGB
    glasses_rgb: RGB
    trousers: int  # 0 long, 1 shorts (lower colour to the knee)
    belt: bool
    sleeve_rgb: RGB  # arm colour of long sleeves ("twotone" pattern differs from the torso)
    extra: dict[str, float] = field(default_factory=dict)


def _bern(rng: np.random.Generator, p: float) -> int:
    """FineGPR yes/no code: 1 with probability p, else 2."""
    return 1 if rng.random() < p else 2


_UPPER_P = np.array([0.20, 0.12, 0.10, 0.08, 0.12, 0.08, 0.12, 0.08, 0.10])
_LOWER_P = np.array([0.20, 0.08, 0.08, 0.08, 0.12, 0.08, 0.20, 0.08, 0.08])


def sample_attributes(rng: np.random.Generator) -> dict[str, int]:
    """FineGPR-like marginals, rare values clamped to >= ~0.08 so small sets see every value."""
    gender = _bern(rng, 0.67)
    female = gender == 2
    hair = _bern(rng, 0.70 if female else 0.06)  # ~27% long overall
    age = int(rng.choice([1, 2, 3], p=[0.09, 0.82, 0.09]))
    glasses = _bern(rng, 0.10)
    short_sleeve = _bern(rng, 0.28)
    top_length = _bern(rng, 0.63)
    dress = _bern(rng, 0.30) if female else 2  # ~10% overall
    boots = _bern(rng, 0.35)
    hat = _bern(rng, 0.10)
    bag = _bern(rng, 0.10)
    shoe = _bern(rng, 0.63)
    upper = int(rng.choice(np.arange(1, 10), p=_UPPER_P))
    lower = int(rng.choice(np.arange(1, 10), p=_LOWER_P))
    return {
        "gender": gender, "hair": hair, "age": age, "glasses": glasses,
        "short_sleeve": short_sleeve, "top_length": top_length, "dress": dress, "boots": boots,
        "hat": hat, "bag": bag, "shoe_color": shoe, "upper_color": upper, "lower_color": lower,
    }


def check_attributes(attributes: dict[str, int]) -> None:
    for col in ATTRIBUTE_COLUMNS:
        if col not in attributes:
            raise ValueError(f"attributes: missing column {col!r}")
        hi = max(ATTRIBUTE_CODES[col])  # codes are 1..hi
        if not 1 <= int(attributes[col]) <= hi:
            raise ValueError(f"attributes[{col!r}] = {attributes[col]!r}: expected 1..{hi}")


def sample_identity(seed: int, namespace: str, pid: int,
                    attributes: dict[str, int] | None = None) -> Identity:
    """The person ``pid`` of data set ``namespace``: pure function of its arguments.

    ``attributes`` overrides the sampled 13 attributes (the fine detail is still drawn from
    ``(seed, namespace, pid)``), e.g. to make two persons with equal attributes.
    """
    rng = rng_for("synthped-identity", seed, namespace, pid)
    attrs = sample_attributes(rng)
    detail = rng_for("synthped-detail", seed, namespace, pid)
    if attributes is not None:
        check_attributes(attributes)
        attrs = {c: int(attributes[c]) for c in ATTRIBUTE_COLUMNS}
    r = detail
    upper = named_shade(attrs["upper_color"], r)
    lower = named_shade(attrs["lower_color"], r)
    hair_rgb = _OLD_HAIR[int(r.integers(len(_OLD_HAIR)))] if attrs["age"] == 3 else _HAIR[int(r.integers(len(_HAIR)))]
    shoes = _DARK_SHOES if attrs["shoe_color"] == 1 else _LIGHT_SHOES
    pattern = PATTERNS[int(r.integers(len(PATTERNS)))]
    sleeve = upper
    if pattern == "twotone":
        sleeve = _contrast_color(upper, r)
    return Identity(
        pid=int(pid),
        namespace=str(namespace),
        attributes=attrs,
        skin=_jitter(_SKIN[int(r.integers(len(_SKIN)))], r, 10),
        hair_rgb=_jitter(hair_rgb, r, 12),
        upper_rgb=upper,
        lower_rgb=lower,
        shoe_rgb=_jitter(shoes[int(r.integers(len(shoes)))], r, 10),
        height_scale=float(r.uniform(0.92, 1.05)),
        width_scale=float(r.uniform(0.86, 1.16)),
        head_scale=float(r.uniform(0.92, 1.1)),
        pattern=pattern,
        pattern_rgb=_contrast_color(upper, r),
        pattern_period=int(r.integers(4, 8)),
        logo_y=float(r.uniform(0.2, 0.55)),
        logo_back=bool(r.random() < 0.4),
        hair_style=int(r.integers(3)),
        hat_kind=int(r.integers(3)),
        hat_rgb=_jitter(_ACCESSORY[int(r.integers(len(_ACCESSORY)))], r, 15),
        bag_kind=int(r.integers(3)),
        bag_side=1 if r.random() < 0.5 else -1,
        bag_rgb=_jitter(_ACCESSORY[int(r.integers(len(_ACCESSORY)))], r, 15),
        glasses_rgb=_jitter((20, 20, 24), r, 15),
        trousers=1 if (r.random() < 0.15 and attrs["dress"] == 2) else 0,
        belt=bool(r.random() < 0.35),
        sleeve_rgb=sleeve,
    )


# ---------------------------------------------------------------------------------------------
# Domain styles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainStyle:
    """How one camera network looks: the domain gap between SynthPed data sets.

    ``render_scale`` renders at ``scale * (height, width)`` and resizes to the output size, so a
    style below 1 is blurry/low-resolution and one above 1 is supersampled and crisp.
    ``view_dirs`` are the walking directions (deg, 0 = towards the camera) a camera may see;
    each camera gets one, and a person is seen along it or the opposite way.
    """

    name: str
    cameras: int
    background: str  # background family: finegpr | campus | indoor | mixed
    render_scale: float
    blur: float  # Gaussian blur radius at the output size
    jpeg_quality: int
    noise: float  # sensor noise sigma (0..255 scale)
    cast_strength: float  # per-camera colour cast spread
    saturation: float
    view_dirs: tuple[int, ...]
    view_jitter: float  # deg
    weathers: tuple[int, ...]
    illuminations: tuple[int, ...]
    bbox_jitter: float  # relative box shift/scale jitter (detector boxes)
    person_scale: tuple[float, float] = (0.80, 0.92)


CLEAN = DomainStyle(
    name="finegpr", cameras=N_VIEWPOINTS, background="finegpr", render_scale=1.5, blur=0.0, jpeg_quality=95,
    noise=0.0, cast_strength=0.0, saturation=1.0, view_dirs=tuple(range(0, 360, 10)),
    view_jitter=0.0, weathers=tuple(WEATHER), illuminations=tuple(ILLUMINATION),
    bbox_jitter=0.02, person_scale=(0.84, 0.9),
)

STYLES: dict[str, DomainStyle] = {
    # Market-1501: 6 outdoor campus cameras in summer daylight, low-resolution DPM boxes.
    "market": DomainStyle(
        name="market", cameras=6, background="campus", render_scale=0.6, blur=0.5, jpeg_quality=75,
        noise=4.0, cast_strength=0.10, saturation=0.9, view_dirs=(0, 45, 90, 135, 200, 270, 315),
        view_jitter=25.0, weathers=(1, 2, 5), illuminations=(3, 4, 5), bbox_jitter=0.07,
        person_scale=(0.78, 0.95),
    ),
    # CUHK03: indoor campus camera pairs c1/c2, mostly frontal/back views, warm indoor light.
    "cuhk": DomainStyle(
        name="cuhk", cameras=2, background="indoor", render_scale=0.8, blur=0.8, jpeg_quality=85,
        noise=3.0, cast_strength=0.14, saturation=0.75, view_dirs=(0, 180),
        view_jitter=20.0, weathers=(5,), illuminations=(4, 5, 7), bbox_jitter=0.05,
        person_scale=(0.82, 0.95),
    ),
    # MSMT17: many indoor+outdoor cameras, morning/noon/afternoon, crisp boxes, strong casts.
    "msmt": DomainStyle(
        name="msmt", cameras=8, background="mixed", render_scale=1.0, blur=0.0, jpeg_quality=90,
        noise=2.0, cast_strength=0.18, saturation=1.05, view_dirs=(0, 30, 90, 150, 180, 240, 300),
        view_jitter=30.0, weathers=(1, 2, 3, 5), illuminations=(2, 3, 4, 5, 6), bbox_jitter=0.05,
        person_scale=(0.8, 0.93),
    ),
}


@functools.lru_cache(maxsize=256)
def camera_cast(style_name: str, camera: int, strength: float) -> tuple[float, float, float]:
    """A fixed per-camera RGB gain (white balance / sensor) of strength ``strength``."""
    if strength <= 0:
        return (1.0, 1.0, 1.0)
    r = rng_for("synthped-cast", style_name, camera)
    g = 1.0 + r.uniform(-strength, strength, size=3)
    g = g / g.mean() * r.uniform(1.0 - strength / 2, 1.0 + strength / 2)
    return (float(g[0]), float(g[1]), float(g[2]))


# ---------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------


def _bg_urban(d: ImageDraw.ImageDraw, r: np.random.Generator, h: int, w: int, light: bool) -> int:
    ground = int(h * r.uniform(0.58, 0.72))
    sky = tuple(int(v) for v in _jitter((150, 185, 225), r, 20))
    d.rectangle([0, 0, w, ground], fill=sky)
    x = 0
    while x < w:
        bw = int(r.uniform(0.25, 0.7) * w / 2)
        top = int(r.uniform(0.0, 0.35) * h)
        base = (200, 190, 175) if light else (120, 110, 100)
        col = _jitter(base, r, 45)
        d.rectangle([x, top, x + bw, ground], fill=col)
        win = _jitter((70, 90, 110) if r.random() < 0.6 else (210, 200, 150), r, 20)
        step_y = max(4, h // 14)
        step_x = max(4, w // 12)
        for yy in range(top + 3, ground - step_y, step_y):
            for xx in range(x + 2, x + bw - step_x // 2, step_x):
                d.rectangle([xx, yy, xx + step_x // 2, yy + step_y // 2], fill=win)
        x += bw + int(r.integers(0, 4))
    pave = _jitter((150, 148, 140) if light else (95, 95, 98), r, 20)
    d.rectangle([0, ground, w, h], fill=pave)
    d.line([0, ground, w, ground], fill=_jitter((90, 90, 90), r, 20), width=max(1, h // 60))
    y, step = ground + 3, 3
    line = _jitter(pave, r, 25)
    while y < h:
        d.line([0, y, w, y], fill=line, width=1)
        step += 2
        y += step
    for _ in range(int(r.integers(0, 3))):  # poles / trees
        px = int(r.uniform(0, w))
        d.rectangle([px, int(h * 0.1), px + max(1, w // 60), ground], fill=(60, 60, 60))
    return ground


def _bg_wild(d: ImageDraw.ImageDraw, r: np.random.Generator, h: int, w: int) -> int:
    ground = int(h * r.uniform(0.5, 0.66))
    d.rectangle([0, 0, w, ground], fill=_jitter((160, 195, 230), r, 20))
    hill = _jitter((90, 120, 110), r, 25)
    pts = [(0, ground)]
    for i in range(9):
        pts.append((i * w / 8, ground - r.uniform(0.05, 0.25) * h))
    pts.append((w, ground))
    d.polygon(pts, fill=hill)
    grass = _jitter((80, 130, 60), r, 30)
    d.rectangle([0, ground, w, h], fill=grass)
    for _ in range(int(r.integers(3, 8))):
        tx = r.uniform(0, w)
        ty = ground + r.uniform(-0.05, 0.05) * h
        tr = r.uniform(0.06, 0.14) * h
        d.rectangle([tx - tr * 0.12, ty - tr, tx + tr * 0.12, ty + tr * 0.4], fill=(80, 56, 36))
        d.ellipse([tx - tr, ty - 2.6 * tr, tx + tr, ty - 0.6 * tr], fill=_jitter((40, 95, 40), r, 25))
    path = _jitter((160, 140, 110), r, 20)
    cxp = r.uniform(0.3, 0.7) * w
    d.polygon([(cxp - 0.05 * w, ground), (cxp + 0.05 * w, ground), (cxp + 0.4 * w, h), (cxp - 0.4 * w, h)],
              fill=path)
    return ground


def _bg_indoor(d: ImageDraw.ImageDraw, r: np.random.Generator, h: int, w: int) -> int:
    ground = int(h * r.uniform(0.62, 0.76))
    wall = _jitter((200, 190, 170), r, 30)
    d.rectangle([0, 0, w, ground], fill=wall)
    d.rectangle([0, 0, w, int(h * 0.06)], fill=_jitter((235, 235, 225), r, 10))  # ceiling lights
    x = int(r.uniform(0, w / 4))
    while x < w:
        kind = r.random()
        ww = int(r.uniform(0.12, 0.3) * w)
        if kind < 0.45:  # door
            d.rectangle([x, int(ground - 0.45 * h), x + ww, ground], fill=_jitter((120, 90, 60), r, 25))
        elif kind < 0.7:  # notice board / poster
            y0 = int(h * r.uniform(0.15, 0.3))
            d.rectangle([x, y0, x + ww, y0 + int(0.18 * h)], fill=_jitter((90, 120, 160), r, 60))
        else:  # pillar
            d.rectangle([x, 0, x + ww // 2, ground], fill=_jitter(wall, r, 25))
        x += ww + int(r.uniform(0.1, 0.4) * w)
    floor = _jitter((150, 150, 150), r, 25)
    d.rectangle([0, ground, w, h], fill=floor)
    d.rectangle([0, ground - max(1, h // 40), w, ground], fill=_jitter((70, 60, 50), r, 20))
    tile = _jitter(floor, r, 25)
    for yy in range(ground + 4, h, max(4, h // 18)):
        d.line([0, yy, w, yy], fill=tile)
    for xx in range(0, w, max(6, w // 10)):
        d.line([xx, ground, xx + (xx - w / 2) * 0.6, h], fill=tile)
    return ground


@functools.lru_cache(maxsize=512)
def background(family: str, variant: int, h: int, w: int) -> tuple[np.ndarray, int]:
    """A panorama ``(h, 2*w, 3)`` uint8 for one scene (read-only, cached) and its ground row."""
    r = rng_for("synthped-bg", family, variant, h, w)
    pw = 2 * w
    img = Image.new("RGB", (pw, h))
    d = ImageDraw.Draw(img)
    if family == "finegpr":
        kind = SCENE[(variant - 1) % len(SCENE) + 1]
        ground = _bg_wild(d, r, h, pw) if kind == "wild" else _bg_urban(d, r, h, pw, light=variant % 2 == 0)
    elif family == "campus":
        ground = _bg_wild(d, r, h, pw) if variant % 4 == 3 else _bg_urban(d, r, h, pw, light=True)
    elif family == "indoor":
        ground = _bg_indoor(d, r, h, pw)
    elif family == "mixed":
        ground = _bg_indoor(d, r, h, pw) if variant % 2 else _bg_urban(d, r, h, pw, light=variant % 4 == 0)
    else:
        raise ValueError(f"background family {family!r}: expected finegpr, campus, indoor or mixed")
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + r.normal(0.0, 5.0, size=arr.shape).astype(np.float32)
    out = np.clip(arr, 0, 255).astype(np.uint8)
    out.setflags(write=False)
    return out, ground


# ---------------------------------------------------------------------------------------------
# Weather and illumination
# ---------------------------------------------------------------------------------------------

# (bg fog, global fog, saturation, contrast, snow fraction)
_WEATHER = {
    1: (0.00, 0.00, 1.15, 1.12, 0.0),
    2: (0.10, 0.00, 0.90, 1.00, 0.0),
    3: (0.22, 0.05, 0.70, 0.90, 0.0),
    4: (0.60, 0.28, 0.65, 0.80, 0.0),
    5: (0.00, 0.00, 1.00, 1.00, 0.0),
    6: (0.45, 0.22, 0.70, 0.85, 0.030),
    7: (0.18, 0.05, 0.85, 0.95, 0.008),
}
# RGB gain, offset
_LIGHT = {
    1: ((0.30, 0.34, 0.50), 0.02),
    2: ((0.92, 0.74, 0.76), 0.02),
    3: ((1.00, 1.00, 0.96), 0.00),
    4: ((1.10, 1.10, 1.08), 0.02),
    5: ((1.05, 0.96, 0.82), 0.00),
    6: ((0.92, 0.64, 0.48), 0.00),
    7: ((0.50, 0.46, 0.38), 0.03),
}


def _apply_weather_bg(bg: np.ndarray, weather: int, ground: int) -> np.ndarray:
    fog = _WEATHER[weather][0]
    out = bg.astype(np.float32) * (1.0 / 255.0)
    if weather in (6, 7):  # snow on the ground
        amt = 0.65 if weather == 6 else 0.4
        out[ground:] = out[ground:] * (1 - amt) + amt * 0.95
    if fog > 0:
        h = out.shape[0]
        ramp = np.linspace(1.0, 0.7, h, dtype=np.float32)[:, None, None] * fog
        out = out * (1 - ramp) + ramp * 0.82
    return out


def _grade(img: np.ndarray, weather: int, illumination: int, rng: np.random.Generator,
           cast: tuple[float, float, float], saturation: float) -> np.ndarray:
    _, gfog, sat, contrast, snow = _WEATHER[weather]
    if gfog > 0:
        img = img * (1 - gfog) + gfog * 0.8
    sat = sat * saturation
    if sat != 1.0:
        grey = img.mean(axis=2, keepdims=True)
        img = grey + (img - grey) * sat
    if contrast != 1.0:
        img = (img - 0.5) * contrast + 0.5
    gain, off = _LIGHT[illumination]
    g = np.array([gain[0] * cast[0], gain[1] * cast[1], gain[2] * cast[2]], dtype=np.float32)
    img = img * g + off
    if snow > 0:
        h, w = img.shape[:2]
        flakes = rng.random((h, w)) < snow
        if weather == 6:  # streaks: flakes two pixels tall
            flakes[1:] |= flakes[:-1]
        img[flakes] = 0.92 * g.max() + 0.05
    return img


# ---------------------------------------------------------------------------------------------
# The pedestrian
# ---------------------------------------------------------------------------------------------


def _quad(d: ImageDraw.ImageDraw, p0: tuple[float, float], p1: tuple[float, float], w0: float,
          w1: float, fill: RGB) -> None:
    """A limb from p0 to p1 with half-widths w0, w1 (horizontal offsets: limbs are near-vertical)."""
    (x0, y0), (x1, y1) = p0, p1
    d.polygon([(x0 - w0, y0), (x0 + w0, y0), (x1 + w1, y1), (x1 - w1, y1)], fill=fill)


# Heights down the body, as fractions of the body height from the top of the head.
_Y_WAIST, _Y_CROTCH, _Y_KNEE, _Y_ANKLE = 0.47, 0.56, 0.75, 0.955


def _shade(col: RGB, k: float) -> RGB:
    """``col`` darkened by the factor ``k`` (parts turned away from the light, trims)."""
    return tuple(int(v * k) for v in col)  # type: ignore[return-value]


class _Body:
    """One identity placed in the image: its pose and proportions in pixels.

    ``x(lat, fwd)`` and ``y(f)`` map the 2.5-D body frame (module docstring) to image coordinates;
    lengths in body heights are turned into pixels by ``unit``. Every part painter reads this.
    """

    def __init__(self, ident: Identity, angle_deg: float, cx: float, y_sole: float, unit: float,
                 stride: float) -> None:
        a = ident.attributes
        rad = math.radians(angle_deg)
        self.ident, self.cx, self.y_sole, self.unit, self.stride = ident, cx, y_sole, unit, stride
        self.cos, self.sin = math.cos(rad), math.sin(rad)
        self.abs_cos, self.abs_sin = abs(self.cos), abs(self.sin)
        female = a["gender"] == 2
        teen, old = a["age"] == 1, a["age"] == 3
        ws = ident.width_scale * (0.9 if teen else 1.0)
        self.head_h = (0.145 if teen else 0.13) * ident.head_scale
        head_w = (0.088 if female else 0.096) * ident.head_scale * (1.05 if teen else 1.0)
        self.stoop = 0.025 if old else 0.0
        self.y_shoulder = self.head_h + 0.03
        # half-widths in body heights
        self.shoulder_hw = (0.118 if female else 0.138) * ws
        self.waist_hw = (0.088 if female else 0.105) * ws
        self.hip_hw = (0.112 if female else 0.104) * ws
        self.y_top_end = 0.66 if a["top_length"] == 1 else 0.51
        self.leg_lat = 0.052 * ws
        self.leg_hw = 0.042 * ws
        self.arm_hw = 0.03 * ws
        # the torso leans forward from the hips when stooped; its half-widths in pixels
        self.torso_x = cx + self.sin * self.stoop * unit
        self.torso_top_hw = self.half_width(self.shoulder_hw)
        self.torso_bottom_hw = self.half_width(max(self.waist_hw, self.hip_hw)
                                               * (1.08 if a["top_length"] == 1 else 1.0))
        # the head's box in pixels
        self.head_x = self.torso_x + self.sin * 0.01 * unit
        self.head_top, self.head_bottom = self.y(0.0), self.y(self.head_h)
        self.head_rx = head_w * unit / 2 * (0.92 + 0.08 * self.abs_sin) * 1.05

    def x(self, lat: float, fwd: float) -> float:
        return self.cx - self.cos * lat * self.unit + self.sin * fwd * self.unit

    def y(self, f: float) -> float:
        return self.y_sole - (1.0 - f) * self.unit

    def half_width(self, half_w: float, depth_ratio: float = 0.6) -> float:
        """Seen half-width in pixels of a part ``half_w`` wide and ``depth_ratio`` as deep."""
        return (self.abs_cos * half_w + self.abs_sin * half_w * depth_ratio) * self.unit


def _paint_leg(d: ImageDraw.ImageDraw, b: _Body, side: int, fwd: float, k: float) -> None:
    """One leg from the hip to the foot ``fwd`` ahead: skin, trousers or shorts, boot shaft, shoe."""
    ident, a, u = b.ident, b.ident.attributes, b.unit
    hx, ax = b.x(side * b.leg_lat, 0.0), b.x(side * b.leg_lat * 1.05, fwd)
    lw = b.half_width(b.leg_hw, 1.1)
    trouser_end = _Y_KNEE + 0.02 if ident.trousers == 1 else _Y_ANKLE
    if a["dress"] == 1:
        trouser_end = _Y_CROTCH
    _quad(d, (hx, b.y(_Y_CROTCH - 0.03)), (ax, b.y(_Y_ANKLE)), lw, lw * 0.75, _shade(ident.skin, k))
    if trouser_end > _Y_CROTCH:
        t = (trouser_end - (_Y_CROTCH - 0.03)) / (_Y_ANKLE - (_Y_CROTCH - 0.03))
        ex = hx + (ax - hx) * t
        _quad(d, (hx, b.y(_Y_CROTCH - 0.03)), (ex, b.y(trouser_end)), lw * 1.05,
              lw * (1.0 - 0.2 * t) * 1.05, _shade(ident.lower_rgb, k))
    if a["boots"] == 1:
        bx = hx + (ax - hx) * 0.7
        _quad(d, (bx, b.y(0.83)), (ax, b.y(_Y_ANKLE)), lw * 0.95, lw * 0.95, _shade(ident.shoe_rgb, k))
    foot_len = (0.03 + 0.045 * b.abs_sin) * u
    fx = ax + b.sin * 0.025 * u
    d.ellipse([fx - max(lw, foot_len), b.y(_Y_ANKLE) - 0.01 * u, fx + max(lw, foot_len), b.y(1.0)],
              fill=_shade(ident.shoe_rgb, k))


def _paint_pelvis(d: ImageDraw.ImageDraw, b: _Body) -> None:
    """Hips in the lower colour (a skirt down to the knee for a dress), and the belt."""
    cx, waist, hw = b.cx, b.half_width(b.waist_hw), b.half_width(b.hip_hw)
    lower = b.ident.lower_rgb
    if b.ident.attributes["dress"] == 1:
        d.polygon([(cx - waist, b.y(_Y_WAIST)), (cx + waist, b.y(_Y_WAIST)),
                   (cx + hw * 1.45, b.y(_Y_KNEE)), (cx - hw * 1.45, b.y(_Y_KNEE))], fill=lower)
        return
    d.polygon([(cx - waist, b.y(_Y_WAIST)), (cx + waist, b.y(_Y_WAIST)),
               (cx + hw, b.y(_Y_CROTCH)), (cx - hw, b.y(_Y_CROTCH))], fill=lower)
    if b.ident.belt:
        d.rectangle([cx - waist, b.y(_Y_WAIST + 0.01), cx + waist, b.y(_Y_WAIST + 0.025)], fill=(30, 26, 22))


def _paint_torso(d: ImageDraw.ImageDraw, b: _Body) -> None:
    """The top from the shoulders to where it ends, the neck above it, and the top's pattern."""
    tx, u = b.torso_x, b.unit
    y0, y1 = b.y(b.y_shoulder), b.y(b.y_top_end)
    d.polygon([(tx - b.torso_top_hw, y0), (tx + b.torso_top_hw, y0), (b.cx + b.torso_bottom_hw, y1),
               (b.cx - b.torso_bottom_hw, y1)], fill=b.ident.upper_rgb)
    nw = 0.025 * u
    d.rectangle([tx - nw + b.sin * 0.01 * u, b.y(b.head_h - 0.01), tx + nw + b.sin * 0.01 * u, y0 + 1],
                fill=b.ident.skin)
    _paint_top_pattern(d, b)


def _paint_top_pattern(d: ImageDraw.ImageDraw, b: _Body) -> None:
    """Stripes, checks, a chest (or back) logo or a contrasting yoke over the torso."""
    ident, tx, u, c, ac = b.ident, b.torso_x, b.unit, b.cos, b.abs_cos
    top_hw, bot_hw = b.torso_top_hw, b.torso_bottom_hw
    y0, y1 = b.y(b.y_shoulder), b.y(b.y_top_end)
    pc, per = ident.pattern_rgb, ident.pattern_period / 100.0

    def span(yy: float) -> tuple[float, float]:  # the torso's left and right edge at image row yy
        t = (yy - y0) / max(1e-6, (y1 - y0))
        hw = top_hw + (bot_hw - top_hw) * t
        xc = tx + (b.cx - tx) * t
        return xc - hw, xc + hw

    if ident.pattern in ("hstripes", "checks"):
        f = b.y_shoulder + per * 0.6
        while f < b.y_top_end - 0.01:
            xa, xb = span(b.y(f))
            d.rectangle([xa, b.y(f), xb, b.y(f + per * 0.45)], fill=pc)
            f += per * (1.0 if ident.pattern == "hstripes" else 1.4)
        if ident.pattern == "checks":
            for k in (-1, 1):
                xx = tx + k * top_hw * 0.45 * ac
                if ac > 0.3:
                    d.rectangle([xx - 0.012 * u, y0, xx + 0.012 * u, y1], fill=pc)
    elif ident.pattern == "vstripe" and ac > 0.25:
        bw = 0.03 * u * ac
        d.rectangle([tx - bw, y0, tx + bw, y1], fill=pc)
    elif ident.pattern == "logo":
        visible = c > 0.2 or (ident.logo_back and c < -0.2)
        if visible:
            ly = b.y(b.y_shoulder + (b.y_top_end - b.y_shoulder) * ident.logo_y * 0.7)
            lw_, lh = 0.06 * u * ac, 0.06 * u
            lx = tx + b.sin * (b.shoulder_hw * 0.6) * u * (1 if c > 0 else -1)
            d.rectangle([lx - lw_, ly - lh / 2, lx + lw_, ly + lh / 2], fill=pc)
    elif ident.pattern == "twotone":  # contrasting yoke across the shoulders
        xa, xb = span(b.y(b.y_shoulder + 0.06))
        d.polygon([(tx - top_hw, y0), (tx + top_hw, y0), (xb, b.y(b.y_shoulder + 0.06)),
                   (xa, b.y(b.y_shoulder + 0.06))], fill=pc)


def _paint_arm(d: ImageDraw.ImageDraw, b: _Body, side: int, swing: float, k: float) -> None:
    """One arm swung ``swing`` forward: sleeve (short or long), skin, hand and a handbag in it."""
    ident, a, u = b.ident, b.ident.attributes, b.unit
    lat = b.shoulder_hw - 0.015
    p_sh = (b.x(side * lat, 0.0) + b.sin * b.stoop * u, b.y(b.y_shoulder + 0.02))
    p_el = (b.x(side * (lat + 0.012), swing * 0.5), b.y(0.34))
    p_wr = (b.x(side * (lat + 0.018), swing), b.y(0.50))
    aw = max(1.0, b.half_width(b.arm_hw, 1.0))
    sleeve = _shade(ident.sleeve_rgb, k)
    if a["short_sleeve"] == 1:
        mid = ((p_sh[0] + p_el[0]) / 2, (p_sh[1] + p_el[1]) / 2)
        _quad(d, p_sh, p_el, aw * 0.85, aw * 0.8, _shade(ident.skin, k))
        _quad(d, p_el, p_wr, aw * 0.8, aw * 0.7, _shade(ident.skin, k))
        _quad(d, p_sh, mid, aw * 1.1, aw * 1.05, sleeve)
    else:
        _quad(d, p_sh, p_el, aw, aw * 0.95, sleeve)
        _quad(d, p_el, p_wr, aw * 0.95, aw * 0.85, sleeve)
    hr = 0.022 * u
    d.ellipse([p_wr[0] - hr, p_wr[1] - hr * 0.4, p_wr[0] + hr, p_wr[1] + hr * 1.4], fill=_shade(ident.skin, k))
    if a["bag"] == 1 and ident.bag_kind == 2 and side == ident.bag_side:  # handbag
        bw, bh = (0.035 + 0.025 * b.abs_sin) * u, 0.08 * u
        d.rectangle([p_wr[0] - bw, p_wr[1] + hr, p_wr[0] + bw, p_wr[1] + hr + bh],
                    fill=_shade(ident.bag_rgb, k))


def _paint_backpack(d: ImageDraw.ImageDraw, b: _Body) -> None:
    u = b.unit
    bx = b.torso_x - b.sin * (b.shoulder_hw * 0.6 + 0.03) * u
    bw = (b.abs_cos * 0.085 + b.abs_sin * 0.05) * u
    d.rectangle([bx - bw, b.y(b.y_shoulder + 0.01), bx + bw, b.y(0.40)], fill=b.ident.bag_rgb)
    d.rectangle([bx - bw, b.y(0.32), bx + bw, b.y(0.34)], fill=_shade(b.ident.bag_rgb, 0.6))


def _paint_backpack_straps(d: ImageDraw.ImageDraw, b: _Body) -> None:
    for k in (-1, 1):
        xx = b.torso_x + k * b.torso_top_hw * 0.5
        d.line([xx, b.y(b.y_shoulder), xx, b.y(0.36)], fill=_shade(b.ident.bag_rgb, 0.7),
               width=max(2, int(0.02 * b.unit)))


def _shoulder_bag_lat(b: _Body) -> float:
    """How far out (body heights) the shoulder bag hangs beside the hip."""
    return b.hip_hw + 0.035


def _paint_shoulder_bag(d: ImageDraw.ImageDraw, b: _Body) -> None:
    bx = b.x(b.ident.bag_side * _shoulder_bag_lat(b), 0.0)
    bw = (b.abs_cos * 0.05 + b.abs_sin * 0.065) * b.unit
    d.rectangle([bx - bw, b.y(0.44), bx + bw, b.y(0.56)], fill=b.ident.bag_rgb)


def _paint_shoulder_strap(d: ImageDraw.ImageDraw, b: _Body) -> None:
    """The shoulder bag's strap, across the chest from the other shoulder."""
    side = b.ident.bag_side
    x0 = b.x(-side * b.shoulder_hw * 0.75, 0.0) + b.sin * b.stoop * b.unit
    x1 = b.x(side * _shoulder_bag_lat(b), 0.0)
    d.line([x0, b.y(b.y_shoulder), x1, b.y(0.45)], fill=_shade(b.ident.bag_rgb, 0.65),
           width=max(2, int(0.018 * b.unit)))


def _paint_long_hair(d: ImageDraw.ImageDraw, b: _Body) -> None:
    """Long hair falling to the shoulders (or a ponytail ending in a tip), behind the head."""
    ident, rx = b.ident, b.head_rx
    lx = b.head_x - b.sin * rx * 0.55
    lw_ = rx * (1.2 if b.abs_cos > 0.5 else 1.0)
    end = b.y_shoulder + (0.17 if ident.hair_style == 0 else 0.10)
    d.polygon([(lx - lw_, b.y(b.head_h * 0.35)), (lx + lw_, b.y(b.head_h * 0.35)),
               (lx + lw_ * 1.1, b.y(end)), (lx - lw_ * 1.1, b.y(end))], fill=ident.hair_rgb)
    if ident.hair_style == 1:  # ponytail tip
        d.ellipse([lx - rx * 0.5, b.y(end) - rx * 0.5, lx + rx * 0.5, b.y(end + 0.05)], fill=ident.hair_rgb)


def _paint_head(d: ImageDraw.ImageDraw, b: _Body) -> None:
    """The head with its hair on top and at the back, a bun, then the face and the hat."""
    ident, a, c, s = b.ident, b.ident.attributes, b.cos, b.sin
    hcx, hy0, hy1, rx = b.head_x, b.head_top, b.head_bottom, b.head_rx
    d.ellipse([hcx - rx, hy0, hcx + rx, hy1], fill=ident.skin)
    hair = ident.hair_rgb
    cap = 0.34 if a["hair"] == 1 or ident.hair_style != 2 else 0.28  # a side parting shows more forehead
    d.chord([hcx - rx, hy0, hcx + rx, hy0 + 2 * cap * (hy1 - hy0)], 180, 360, fill=hair)
    bwf = (1 - c) / 2  # how much of the back of the head shows
    if bwf > 0.02:
        bx = hcx - s * rx * (1 - bwf)
        d.ellipse([bx - rx * bwf, hy0, bx + rx * bwf, hy1 - (hy1 - hy0) * 0.12], fill=hair)
    if a["hair"] == 2 and ident.hair_style == 1 and c < 0.6:  # bun
        bx = hcx - s * rx * 0.9
        d.ellipse([bx - rx * 0.4, hy0 + rx * 0.1, bx + rx * 0.4, hy0 + rx * 0.9], fill=hair)
    _paint_face(d, b)
    if a["hat"] == 1:
        _paint_hat(d, b)


def _paint_face(d: ImageDraw.ImageDraw, b: _Body) -> None:
    """Eyes or glasses and the mouth from the front; an eye or the glasses' temple in profile."""
    ident, u, c, s = b.ident, b.unit, b.cos, b.sin
    hcx, hy0, hy1, rx = b.head_x, b.head_top, b.head_bottom, b.head_rx
    glasses = ident.attributes["glasses"] == 1
    ey = hy0 + (hy1 - hy0) * 0.5
    if c > 0.25:
        fx = hcx + s * rx * 0.45
        ed = rx * 0.45 * c
        er = 0.006 * u
        if glasses:  # two dark lenses joined by a bridge, wider than the eyes
            gr = 0.016 * u
            d.rectangle([fx - ed - gr * 1.3, ey - gr, fx + ed + gr * 1.3, ey + gr], fill=ident.glasses_rgb)
            d.rectangle([fx - gr * 0.5, ey + gr * 0.1, fx + gr * 0.5, ey + gr], fill=ident.skin)
        else:
            for k in (-1, 1):
                ex = fx + k * ed
                d.rectangle([ex - er, ey - er, ex + er, ey + er], fill=(70, 45, 40))
        d.rectangle([fx - ed * 0.6, ey + (hy1 - hy0) * 0.24, fx + ed * 0.6, ey + (hy1 - hy0) * 0.27],
                    fill=(150, 70, 60))  # mouth
    elif c > -0.25 and glasses:  # profile: temple arm + lens edge
        fx = hcx + s * rx * 0.75
        d.line([hcx - s * rx * 0.1, ey, fx, ey], fill=ident.glasses_rgb, width=max(1, int(0.015 * u)))
        d.rectangle([fx - 1, ey - 1.5, fx + 1, ey + 1.5], fill=ident.glasses_rgb)
    elif c > -0.25:  # profile eye
        fx = hcx + s * rx * 0.7
        d.rectangle([fx - 0.6, ey - 0.6, fx + 0.6, ey + 0.6], fill=(40, 30, 30))


def _paint_hat(d: ImageDraw.ImageDraw, b: _Body) -> None:
    """A cap with its brim towards the face, a beanie or a brimmed hat."""
    hc, kind = b.ident.hat_rgb, b.ident.hat_kind
    hcx, hy0, rx = b.head_x, b.head_top, b.head_rx
    hh = b.head_bottom - hy0
    if kind == 0:  # cap
        d.chord([hcx - rx * 1.05, hy0 - hh * 0.08, hcx + rx * 1.05, hy0 + hh * 0.9], 180, 360, fill=hc)
        bx = hcx + b.sin * rx * 0.9
        bl = rx * (0.55 + 0.6 * b.abs_sin)
        d.rectangle([bx - bl, hy0 + hh * 0.36, bx + bl, hy0 + hh * 0.46], fill=_shade(hc, 0.75))
    elif kind == 1:  # beanie
        d.chord([hcx - rx * 1.08, hy0 - hh * 0.15, hcx + rx * 1.08, hy0 + hh * 1.0], 180, 360, fill=hc)
        d.rectangle([hcx - rx * 1.08, hy0 + hh * 0.38, hcx + rx * 1.08, hy0 + hh * 0.5], fill=_shade(hc, 0.8))
    else:  # brimmed hat
        d.rectangle([hcx - rx * 0.85, hy0 - hh * 0.25, hcx + rx * 0.85, hy0 + hh * 0.3], fill=hc)
        d.rectangle([hcx - rx * 1.6, hy0 + hh * 0.24, hcx + rx * 1.6, hy0 + hh * 0.36], fill=_shade(hc, 0.8))


_Layer = tuple[float, Callable[[], None]]


def _layers(d: ImageDraw.ImageDraw, b: _Body) -> list[_Layer]:
    """Every visible part as (depth, painter); a larger depth is nearer the camera.

    Legs sit behind everything, arms in front of or behind the torso by side, a backpack in
    front only when the person faces away, long hair behind the head from the front.
    """
    ident, a, c, s = b.ident, b.ident.attributes, b.cos, b.sin
    layers: list[_Layer] = []

    def add(depth: float, paint: Callable[..., None], *args: float) -> None:
        layers.append((depth, functools.partial(paint, d, b, *args)))

    for side in (1, -1):
        fwd = b.stride * side
        depth = c * fwd + s * side * b.leg_lat
        far = depth < -0.01 and b.abs_sin > 0.5  # seen side-on, the far leg is in shadow
        add(-100 + depth, _paint_leg, side, fwd, 0.8 if far else 1.0)
    add(-50, _paint_pelvis)
    add(0, _paint_torso)
    for side in (1, -1):
        swing = -b.stride * side * 0.9
        depth = s * side
        behind = depth < -0.5  # the far arm in profile, behind the torso and in shadow
        add(-10 + depth if behind else 10 + depth, _paint_arm, side, swing, 0.8 if behind else 1.0)
    if a["bag"] == 1 and ident.bag_kind == 0:  # backpack: its straps show on the chest from the front
        add(20 if -c > 0.3 else -30, _paint_backpack)
        if c > 0.3:
            add(5, _paint_backpack_straps)
    elif a["bag"] == 1 and ident.bag_kind == 1:  # shoulder bag (a handbag is painted with its arm)
        depth = s * ident.bag_side
        add(15 + depth if depth > -0.5 else -20, _paint_shoulder_bag)
        add(6, _paint_shoulder_strap)
    if a["hair"] == 1:
        add(-40 if c > 0 else 30, _paint_long_hair)
    add(25, _paint_head)
    return layers


def _draw_person(d: ImageDraw.ImageDraw, ident: Identity, angle_deg: float, cx: float, y_sole: float,
                 unit: float, stride: float) -> None:
    body = _Body(ident, angle_deg, cx, y_sole, unit, stride)
    # painter's algorithm, back to front; sorted() is stable, so equal depths keep _layers' order
    for _, paint in sorted(_layers(d, body), key=lambda layer: layer[0]):
        paint()


def render_person(identity: Identity | None, *, viewpoint: int, weather: int, illumination: int, scene: int,
                  height: int, width: int, style: DomainStyle | None, rng: np.random.Generator,
                  camera: int = 0, angle: float | None = None) -> Image.Image:
    """One RGB image of ``identity`` at ``height x width``.

    viewpoint/weather/illumination/scene are FineGPR codes (1-based). ``style=None`` renders a
    clean FineGPR-like image; a :class:`DomainStyle` applies its resolution, background family,
    per-``camera`` colour cast, blur and noise. ``angle`` (deg, 0 = front) overrides the
    viewpoint code with a continuous angle. The random generator drives the pose (stride),
    the box placement, the background crop and snow.
    """
    if not (1 <= weather <= 7 and 1 <= illumination <= 7 and scene >= 1):
        raise ValueError(f"weather {weather}, illumination {illumination}, scene {scene}: expected codes "
                         "w01..w07, l01..l07, p01..")
    st = style or CLEAN
    ang = float(viewpoint_angle(viewpoint) if angle is None else angle)
    rh = max(16, int(round(height * st.render_scale)))
    rw = max(8, int(round(width * st.render_scale)))
    pano, ground = background(st.background, int(scene), rh, rw)
    off = int(rng.integers(0, pano.shape[1] - rw + 1))
    bg = _apply_weather_bg(pano[:, off:off + rw], weather, ground)
    canvas = Image.fromarray(np.clip(bg * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(canvas)
    j = st.bbox_jitter
    scale = rng.uniform(*st.person_scale) * (1 + rng.uniform(-j, j))
    cx = rw * (0.5 + rng.uniform(-j, j))
    y_sole = rh * (0.975 + rng.uniform(-j / 2, j / 3))
    stride = float(rng.uniform(-0.09, 0.09)) * abs(math.sin(math.radians(ang))) ** 0.5
    if identity is not None:  # None: the empty scene (distractor boxes)
        age_scale = {1: 0.86, 2: 1.0, 3: 0.96}[identity.attributes["age"]]
        unit = rh * scale * identity.height_scale * age_scale
        _draw_person(d, identity, ang, cx, y_sole, unit, stride)
    if (rh, rw) != (height, width):
        resample = Image.Resampling.LANCZOS if rh > height else Image.Resampling.BILINEAR
        canvas = canvas.resize((width, height), resample)
    img = np.asarray(canvas, dtype=np.float32) * (1.0 / 255.0)
    cast = camera_cast(st.name, int(camera), st.cast_strength)
    img = _grade(img, weather, illumination, rng, cast, st.saturation)
    if st.noise > 0:
        img = img + rng.normal(0.0, st.noise / 255.0, size=img.shape).astype(np.float32)
    out = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    if st.blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(st.blur))
    return out
