"""FineGPR's rendering-condition codes (FACTS §4.2): weather, illumination, scene, viewpoint.

One definition for the captions, which put them into words, and the SynthPed renderer, which
draws them. A code is the number in a FineGPR file name ``IIII_cCC_wWW_lLL_pPP.jpg``; each table
maps code -> word, codes from 1. The identity-level attribute codes (FACTS §4.3) are in
:mod:`dmf_core.data.captions.attributes`.

Pure Python (no numpy, no pandas): the renderer imports it.
"""

from __future__ import annotations

WEATHER: dict[int, str] = {1: "sunny", 2: "clouds", 3: "overcast", 4: "foggy", 5: "neutral", 6: "blizzard",
                           7: "snowlight"}
ILLUMINATION: dict[int, str] = {1: "midnight", 2: "dawn", 3: "forenoon", 4: "noon", 5: "afternoon", 6: "dusk",
                                7: "night"}
#: scene (background) code -> its type; FineGPR's nine scenes are urban or wild.
SCENE: dict[int, str] = {1: "urban", 2: "urban", 3: "wild", 4: "urban", 5: "wild", 6: "urban", 7: "urban",
                         8: "wild", 9: "urban"}
SCENE_TYPES: tuple[str, ...] = ("urban", "wild")
#: viewpoint codes are 1..N_VIEWPOINTS, 10 degrees apart.
N_VIEWPOINTS = 36


def viewpoint_angle(code: int) -> int:
    """FineGPR viewpoint code c01..c36 -> angle in degrees, 0 = front (c28), 90 = right (c01)."""
    if not 1 <= int(code) <= N_VIEWPOINTS:
        raise ValueError(f"viewpoint code {code!r}: expected 1..{N_VIEWPOINTS}")
    return ((int(code) - 28) * 10) % 360


def angle_to_viewpoint(angle: float) -> int:
    """Angle in degrees (0 = front) -> the nearest FineGPR viewpoint code 1..36."""
    return (int(round(angle / 10.0)) % N_VIEWPOINTS + 27) % N_VIEWPOINTS + 1
