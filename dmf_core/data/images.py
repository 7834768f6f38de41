"""The decompression-bomb guard every image decode path goes through.

A file of a few hundred bytes can declare a 200000x200000 image; a decoder that trusts the
declaration allocates the whole pixel buffer (torchvision's decoder asked for 120 GB) before it
finds out the data is not there. So the declared size is read first, from the header alone,
with PIL (``Image.open`` is lazy), and checked against PIL's limit ``Image.MAX_IMAGE_PIXELS``;
only an image within the limit reaches a decoder (PIL's ``load()``, TorchCodec's decoders in
``dmf_core.data.loading.loader``). PIL itself only *warns* between 1x and 2x the limit; here that
is refused too.

The check is a plain ``width * height > limit`` comparison with no ``warnings`` machinery, so it
is safe in thread pools (``warnings.catch_warnings`` mutates process-global state and is not).

This module imports only PIL (packing and verification start without torch).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default decompression-bomb limit


def pixel_limit() -> int:
    """PIL's current limit; its default when someone switched the guard off (None): the data
    stages never decode an image without the guard."""
    limit = Image.MAX_IMAGE_PIXELS
    return int(limit) if limit is not None else DEFAULT_MAX_IMAGE_PIXELS


def _refused(name: str, what: str) -> Image.DecompressionBombError:
    """The one error type (PIL's own) for every refusal, so existing handlers catch it."""
    return Image.DecompressionBombError(
        f"{name}: {what}; images over {pixel_limit()} pixels (PIL.Image.MAX_IMAGE_PIXELS) are "
        f"refused as possible decompression bombs, not decoded")


def check_pixels(width: int, height: int, name: str) -> None:
    """Raise DecompressionBombError naming ``name`` when ``width x height`` exceeds the limit."""
    if width * height > pixel_limit():
        raise _refused(name, f"its header declares {width}x{height} = {width * height} pixels")


def open_checked(source: bytes | str | Path, name: str = "image") -> Image.Image:
    """Open ``source`` (encoded bytes or a path) lazily, header only, and check its declared size.

    The returned image has no pixels yet: ``load()`` (or any other decoder) may run on the same
    data safely. Raises DecompressionBombError naming ``name`` for an image over the limit, and
    whatever PIL raises for data that is not an image.
    """
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        im = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses at open beyond 2x its limit (the warning is raised when a caller turned
        # warnings into errors): the same refusal, naming the image.
        raise _refused(name, f"PIL: {str(exc).rstrip('.')}") from None
    try:
        check_pixels(im.width, im.height, name)
    except Image.DecompressionBombError:
        im.close()
        raise
    return im


def decode_rgb(source: bytes | str | Path, name: str = "image") -> Image.Image:
    """Decode ``source`` fully to an RGB PIL image, after :func:`open_checked`; raises on bad data."""
    im = open_checked(source, name)
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")
