"""SynthPed: the embedded, procedurally rendered person re-ID data set.

Writes a FineGPR-format pretraining set (``write_finegpr``: 36 viewpoints, 7 weathers, 7
illuminations, 9 scenes, the 13 FineGPR ID attributes in ``attributes.csv``) and Market-1501-format
target domains (``write_market_domain``) whose cameras, light, backgrounds, resolution, blur and
viewpoint mix follow a :class:`DomainStyle` from :data:`STYLES`. numpy + PIL draw the images and
``attributes.csv`` is written by :func:`~dmf_core.data.captions.attributes.write_attributes`, next to
the reader the captions stage uses; same arguments, same bytes. See docs/synthped.md. Drawing lives in
:mod:`dmf_core.data.synthped.render`.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from dmf_core.data.captions.attributes import ATTRIBUTE_COLUMNS, write_attributes
from dmf_core.data.captions.codes import ILLUMINATION, N_VIEWPOINTS, SCENE, WEATHER, angle_to_viewpoint
from dmf_core.data.synthped.render import (
    CLEAN,
    STYLES,
    DomainStyle,
    Identity,
    render_person,
    rng_for,
    sample_identity,
)

__all__ = [
    "STYLES", "DomainStyle", "Identity", "FINEGPR_NAME_RE", "MARKET_NAME_RE", "contact_sheet", "finegpr_pids",
    "render_person", "sample_identity", "write_finegpr", "write_market_domain",
]

log = logging.getLogger(__name__)

FINEGPR_NAME_RE = r"^(\d{4})_c(\d{2})_w(\d{2})_l(\d{2})_p(\d{2})\.jpg$"
MARKET_NAME_RE = r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$"

_Jobs = dict[str, Callable[[], bytes]]  # relative path -> its bytes, rendered when written


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality), optimize=False, progressive=False)
    return buf.getvalue()


def _progress(items: list, desc: str) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, disable=None, leave=False)


def _write_jobs(root: Path, jobs: _Jobs, desc: str) -> None:
    """Render and write ``relative path -> bytes`` jobs in sorted order."""
    for rel in _progress(sorted(jobs), desc):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jobs[rel]())


def _check_positive(**kw: int) -> None:
    for k, v in kw.items():
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"SynthPed: {k}={v!r}, expected a positive integer")


# ---------------------------------------------------------------------------------------------
# FineGPR format
# ---------------------------------------------------------------------------------------------


def finegpr_pids(ids: int) -> list[int]:
    """FineGPR-style non-contiguous person ids: 1, 3, 5, ..."""
    return [2 * i + 1 for i in range(ids)]


def _finegpr_combos(rng: np.random.Generator, k: int) -> list[tuple[int, int, int]]:
    """``k`` distinct (viewpoint, weather, illumination) codes spread evenly over the viewpoints."""
    total = N_VIEWPOINTS * len(WEATHER) * len(ILLUMINATION)
    if k > total:
        raise ValueError(f"images_per_id={k}: at most {total} distinct (viewpoint, weather, illumination)")
    off = int(rng.integers(N_VIEWPOINTS))
    seen: set[tuple[int, int, int]] = set()
    out = []
    for i in range(k):
        v = (off + (i * N_VIEWPOINTS) // k if k <= N_VIEWPOINTS else off + i) % N_VIEWPOINTS + 1
        while True:
            combo = (v, int(rng.integers(1, len(WEATHER) + 1)), int(rng.integers(1, len(ILLUMINATION) + 1)))
            if combo not in seen:
                break
        seen.add(combo)
        out.append(combo)
    return out


def write_finegpr(out_dir: Path, *, ids: int, images_per_id: int, height: int, width: int, seed: int,
                  namespace: str = "synthped") -> None:
    """FineGPR layout: ``FineGPR/<IIII>/<IIII>_cCC_wWW_lLL_pPP.jpg`` + ``attributes.csv``.

    Person ids are 1, 3, 5, ... (non-contiguous like FineGPR); each gets ``images_per_id``
    distinct (viewpoint, weather, illumination) combinations spread over the 36 viewpoints,
    the scene drawn per image. Clean, supersampled renders (FineGPR is high quality).
    """
    _check_positive(ids=ids, images_per_id=images_per_id, height=height, width=width)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs: _Jobs = {}
    rows = []
    for pid in finegpr_pids(ids):
        ident = sample_identity(seed, namespace, pid)
        rows.append({"pid": pid, **ident.attributes})
        rng = rng_for("synthped-finegpr-combos", seed, namespace, pid)
        for v, w, il in _finegpr_combos(rng, images_per_id):
            p = int(rng.integers(1, len(SCENE) + 1))
            rel = f"FineGPR/{pid:04d}/{pid:04d}_c{v:02d}_w{w:02d}_l{il:02d}_p{p:02d}.jpg"

            def job(ident=ident, v=v, w=w, il=il, p=p, rel=rel) -> bytes:
                r = rng_for("synthped-finegpr-image", seed, namespace, rel)
                img = render_person(ident, viewpoint=v, weather=w, illumination=il, scene=p, height=height,
                                    width=width, style=None, rng=r)
                return _encode(img, CLEAN.jpeg_quality)

            jobs[rel] = job
    _write_jobs(out_dir, jobs, f"SynthPed {namespace}")
    write_attributes(pd.DataFrame(rows, columns=["pid", *ATTRIBUTE_COLUMNS]), out_dir / "attributes.csv")
    log.info("SynthPed %s: %d ids, %d images -> %s", namespace, ids, len(jobs), out_dir)


# ---------------------------------------------------------------------------------------------
# Market-1501 format
# ---------------------------------------------------------------------------------------------


def _camera_plan(seed: int, name: str, st: DomainStyle, cam: int) -> dict:
    r = rng_for("synthped-camera", seed, name, cam)
    seqs = {}
    for sq in range(1, 7):
        seqs[sq] = (int(r.choice(st.weathers)), int(r.choice(st.illuminations)))
    return {
        "scene": cam,  # every camera looks at its own background
        "dir": float(st.view_dirs[(cam - 1 + int(r.integers(len(st.view_dirs)))) % len(st.view_dirs)]),
        "seqs": seqs,
    }


def _person_tracks(rng: np.random.Generator, st: DomainStyle, test: bool) -> dict[int, int]:
    """camera -> number of images for one person (10..14 in all, >= 2 per camera for test ids)."""
    cams = st.cameras
    n_cams = cams if cams <= 2 else int(rng.integers(2, min(cams, 5) + 1))
    chosen = sorted(int(c) + 1 for c in rng.choice(cams, size=n_cams, replace=False))
    total = int(rng.integers(10, 15))
    base = 2 if test else 1
    counts = {c: base for c in chosen}
    for _ in range(max(0, total - base * n_cams)):
        counts[chosen[int(rng.integers(n_cams))]] += 1
    return counts


def _crop_resize(img: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int]) -> Image.Image:
    w, h = img.size
    x0, y0, x1, y1 = box
    x0, x1 = sorted((int(np.clip(x0 * w, 0, w - 2)), int(np.clip(x1 * w, 2, w))))
    y0, y1 = sorted((int(np.clip(y0 * h, 0, h - 2)), int(np.clip(y1 * h, 2, h))))
    return img.crop((x0, y0, max(x1, x0 + 2), max(y1, y0 + 2))).resize(size, Image.Resampling.BILINEAR)


_MARKET_SPLITS = ("bounding_box_train", "query", "bounding_box_test")
_GalleryFrame = tuple[Identity, int, int, float]  # who, camera, sequence, walking angle


def _market_style(name: str, style: str) -> DomainStyle:
    """The :data:`STYLES` entry ``style``, if its cameras fit Market's one-digit camera field."""
    if style not in STYLES:
        raise ValueError(f"SynthPed domain {name!r}: style {style!r} unknown, expected one of {sorted(STYLES)}")
    st = STYLES[style]
    if st.cameras > 9:
        raise ValueError(f"style {style!r}: {st.cameras} cameras do not fit Market's one-digit camera field")
    return st


class _MarketCameras:
    """The camera network of one Market-format domain: each camera's plan, and its frames as JPEG bytes.

    A frame is a pure function of its relative path ``rel`` (it seeds the frame's generator), so
    jobs can be rendered in any order.
    """

    def __init__(self, seed: int, name: str, st: DomainStyle, height: int, width: int) -> None:
        self.seed, self.name, self.style, self.height, self.width = seed, name, st, height, width
        self.plans = {cam: _camera_plan(seed, name, st, cam) for cam in range(1, st.cameras + 1)}

    def render(self, ident: Identity | None, cam: int, seq: int, angle: float, rel: str) -> Image.Image:
        """Frame ``rel`` of ``ident`` (None: the empty scene) by camera ``cam`` in its sequence ``seq``."""
        r = rng_for("synthped-market-image", self.seed, self.name, rel)
        w, il = self.plans[cam]["seqs"][seq]
        return render_person(ident, viewpoint=angle_to_viewpoint(angle), weather=w, illumination=il,
                             scene=self.plans[cam]["scene"], height=self.height, width=self.width,
                             style=self.style, rng=r, camera=cam, angle=angle)

    def frame(self, ident: Identity, cam: int, seq: int, angle: float, rel: str) -> bytes:
        return _encode(self.render(ident, cam, seq, angle, rel), self.style.jpeg_quality)

    def junk(self, ident: Identity, cam: int, seq: int, angle: float, rel: str,
             box: tuple[float, float, float, float]) -> bytes:
        """A bad box of ``ident``: cut to ``box``, or shifted right when ``box`` ends past the frame."""
        img = self.render(ident, cam, seq, angle, rel)
        if box[2] > 1.0:  # shifted box: half the person, the rest background
            canvas = self.render(None, cam, seq, angle, rel + "/bg")
            shift = int(box[0] * self.width)
            canvas.paste(img.crop((0, 0, self.width - shift, self.height)), (shift, 0))
            img = canvas
        else:
            img = _crop_resize(img, box, (self.width, self.height))
        return _encode(img, self.style.jpeg_quality)

    def distractor(self, stranger: Identity | None, cam: int, seq: int, angle: float, rel: str,
                   box: tuple[float, float, float, float]) -> bytes:
        img = self.render(stranger, cam, seq, angle, rel)
        return _encode(_crop_resize(img, box, (self.width, self.height)), self.style.jpeg_quality)


def _person_jobs(cams: _MarketCameras, train_ids: int, test_ids: int) -> tuple[_Jobs, list[_GalleryFrame]]:
    """Every image of the data set's own persons, and the gallery's frames (junk boxes reuse them)."""
    st, seed, name = cams.style, cams.seed, cams.name
    jobs: _Jobs = {}
    gallery: list[_GalleryFrame] = []
    for pid in range(1, train_ids + test_ids + 1):
        test = pid > train_ids
        ident = sample_identity(seed, name, pid)
        rng = rng_for("synthped-market-tracks", seed, name, pid)
        counts = _person_tracks(rng, st, test)
        qcams = set(sorted(int(c) for c in rng.choice(sorted(counts), size=min(2, len(counts)), replace=False)))
        for cam, n in counts.items():
            seq = int(rng.integers(1, 7))
            heading = cams.plans[cam]["dir"] + (180.0 if rng.random() < 0.5 else 0.0)
            frame = int(rng.integers(1000, 150000))
            bb = 1 if rng.random() < 0.8 else int(rng.integers(2, 5))
            q_index = int(rng.integers(n)) if (test and cam in qcams) else -1
            for i in range(n):
                angle = (heading + rng.uniform(-st.view_jitter, st.view_jitter)) % 360.0
                frame += int(rng.integers(5, 60))
                sub = "bounding_box_train" if not test else ("query" if i == q_index else "bounding_box_test")
                rel = f"{sub}/{pid:04d}_c{cam}s{seq}_{frame:06d}_{bb:02d}.jpg"
                if sub == "bounding_box_test":
                    gallery.append((ident, cam, seq, angle))
                jobs[rel] = functools.partial(cams.frame, ident, cam, seq, angle, rel)
    return jobs, gallery


def _junk_jobs(cams: _MarketCameras, rng: np.random.Generator, gallery: list[_GalleryFrame]) -> _Jobs:
    """Junk (pid -1): partial or badly aligned boxes of test persons, ~4% of the gallery."""
    jobs: _Jobs = {}
    for k in range(max(1, int(round(0.04 * len(gallery))))):
        ident, cam, seq, angle = gallery[int(rng.integers(len(gallery)))]
        frame = int(rng.integers(150000, 999999))
        rel = f"bounding_box_test/-1_c{cam}s{seq}_{frame:06d}_{k % 90 + 10:02d}.jpg"
        kind = int(rng.integers(3))
        box = ((0.0, 0.0, 1.0, rng.uniform(0.35, 0.55)) if kind == 0 else
               (0.0, rng.uniform(0.45, 0.6), 1.0, 1.0) if kind == 1 else
               (rng.uniform(0.3, 0.5), 0.0, rng.uniform(1.3, 1.5), 1.0))
        jobs[rel] = functools.partial(cams.junk, ident, cam, seq, angle, rel, box)
    return jobs


def _distractor_jobs(cams: _MarketCameras, rng: np.random.Generator, n_gallery: int) -> _Jobs:
    """Distractors (pid 0000): background crops and partial people not in the data set, ~8%."""
    jobs: _Jobs = {}
    for k in range(max(2, int(round(0.08 * n_gallery)))):
        cam = int(rng.integers(1, cams.style.cameras + 1))
        seq = int(rng.integers(1, 7))
        frame = int(rng.integers(150000, 999999))
        rel = f"bounding_box_test/0000_c{cam}s{seq}_{frame:06d}_{k % 90 + 10:02d}.jpg"
        stranger = sample_identity(cams.seed, f"{cams.name}/distractor", k + 1) if k % 2 else None
        angle = float(rng.uniform(0, 360))
        box = (rng.uniform(0, 0.3), rng.uniform(0, 0.5), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        jobs[rel] = functools.partial(cams.distractor, stranger, cam, seq, angle, rel, box)
    return jobs


def write_market_domain(out_dir: Path, *, name: str, style: str, train_ids: int, test_ids: int, height: int,
                        width: int, seed: int) -> None:
    """Market-1501 layout: ``bounding_box_train``, ``query``, ``bounding_box_test``.

    Names ``PPPP_cCsS_FFFFFF_BB.jpg``. Train ids 1..train_ids, test ids after them. Each person is
    seen by 2-5 cameras (both for a 2-camera style) in 10-14 images; a test person gives one query
    per camera for up to two cameras and keeps the rest, including at least one image in each
    query camera, in the gallery. The gallery also holds junk (pid -1: partial/bad boxes of test
    persons) and distractors (pid 0000: background or partial crops of other people).
    """
    _check_positive(train_ids=train_ids, test_ids=test_ids, height=height, width=width)
    st = _market_style(name, style)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in _MARKET_SPLITS:
        (out_dir / sub).mkdir(exist_ok=True)
    cams = _MarketCameras(seed, name, st, height, width)
    jobs, gallery = _person_jobs(cams, train_ids, test_ids)
    extra = rng_for("synthped-market-extra", seed, name)  # junk first, then distractors: one stream
    jobs.update(_junk_jobs(cams, extra, gallery))
    jobs.update(_distractor_jobs(cams, extra, len(gallery)))
    _write_jobs(out_dir, jobs, f"SynthPed {name}")
    log.info("SynthPed %s (%s): %d train + %d test ids, %d images -> %s", name, style, train_ids, test_ids,
             len(jobs), out_dir)


# ---------------------------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------------------------


def contact_sheet(out_path: Path, *, seed: int = 0, height: int = 128, width: int = 64, cols: int = 8,
                  namespace: str = "synthped") -> Path:
    """A PNG grid of SynthPed samples (docs/img/synthped_samples.png): identities, viewpoints,
    weathers, illuminations, domains and look-alike pairs with equal attributes."""
    rows: list[tuple[str, list[Image.Image]]] = []

    def r(*k: object) -> np.random.Generator:
        return rng_for("contact", seed, *k)

    def clean(ident: Identity, v: int = 28, w: int = 5, il: int = 4, p: int = 1, key: object = 0) -> Image.Image:
        return render_person(ident, viewpoint=v, weather=w, illumination=il, scene=p, height=height,
                             width=width, style=None, rng=r(ident.pid, v, w, il, p, key))

    ids = [sample_identity(seed, namespace, 2 * i + 1) for i in range(cols)]
    rows.append(("identities, front, p01-p09", [clean(t, p=i % 9 + 1) for i, t in enumerate(ids)]))
    views = [28 + round(i * N_VIEWPOINTS / cols) for i in range(cols)]
    rows.append(("viewpoints 0..315 deg", [clean(ids[1], v=(v - 1) % N_VIEWPOINTS + 1, key="v") for v in views]))
    candidates = (sample_identity(seed, namespace, 2 * i + 1) for i in range(500))
    packer = next((t for t in candidates if t.attributes["bag"] == 1 and t.bag_kind == 0), ids[0])
    rows.append(("viewpoints (backpack)", [clean(packer, v=(v - 1) % N_VIEWPOINTS + 1, key="b") for v in views]))
    rows.append(("weather w01..w07", [clean(ids[2], v=30, w=min(i + 1, 7), p=3 if i == 7 else 2, key="w")
                                      for i in range(cols)]))
    rows.append(("illumination l01..l07", [clean(ids[3], v=26, il=min(i + 1, 7), p=4, key="l")
                                           for i in range(cols)]))
    dom: list[Image.Image] = [clean(ids[4], key="d")]
    for sname in ("market", "cuhk", "msmt"):
        st = STYLES[sname]
        for cam in (1, 2) if sname != "msmt" else (1, 2, 3):
            w, il = st.weathers[cam % len(st.weathers)], st.illuminations[cam % len(st.illuminations)]
            dom.append(render_person(ids[4], viewpoint=28, weather=w, illumination=il, scene=cam, height=height,
                                     width=width, style=st, rng=r("dom", sname, cam), camera=cam,
                                     angle=float(st.view_dirs[cam % len(st.view_dirs)])))
    rows.append(("domains: clean, market c1 c2, cuhk c1 c2, msmt", dom[:cols]))
    twins = []
    for i in range(cols // 2):
        a = sample_identity(seed, namespace, 1001 + i)
        b = sample_identity(seed, namespace, 2001 + i, attributes=a.attributes)
        twins += [clean(a, v=27, key="t"), clean(b, v=27, key="t")]
    rows.append(("pairs with equal 13 attributes", twins))

    label_h = 12
    sheet = Image.new("RGB", (cols * width, len(rows) * (height + label_h)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for ri, (label, imgs) in enumerate(rows):
        y = ri * (height + label_h)
        d.text((2, y), label, fill=(0, 0, 0))
        for ci, im in enumerate(imgs[:cols]):
            sheet.paste(im, (ci * width, y + label_h))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps the committed PNG small (the sensor noise does not compress)
    sheet = sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    sheet.save(out_path, format="PNG", optimize=True)
    return out_path


if __name__ == "__main__":  # pragma: no cover
    import sys

    logging.basicConfig(level=logging.INFO)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/img/synthped_samples.png")
    log.info("wrote %s", contact_sheet(target))
