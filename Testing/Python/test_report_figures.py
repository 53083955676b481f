"""The report's figures draw structure names in any script an installed font has: ROI names come from planning
systems in Chinese, Japanese, Korean, Cyrillic, …, and matplotlib's default font (DejaVu Sans) has no CJK glyphs, so
they were drawn as empty boxes."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from matplotlib import font_manager
from matplotlib.ft2font import FT2Font

from STNeRPLib import report_figures

NAMES = {1: "肿瘤 GTV", 2: "右肺", 3: "肝臓 liver"}


def _draws(path: str, text: str) -> bool:
    """Whether the font file has a glyph of its own for each character of `text`: distinct, none the missing glyph
    (a last-resort font maps a whole Unicode block to one placeholder)."""
    try:
        font = FT2Font(path)
    except (OSError, RuntimeError):
        return False
    glyphs = [font.get_char_index(ord(c)) for c in text]
    return 0 not in glyphs and len(set(glyphs)) == len(set(text))


def _font_for(text: str) -> str | None:
    """An installed font file (the system's) that draws every character of `text`, if any."""
    return next((path for path in font_manager.findSystemFonts() if _draws(path, text)), None)


def test_structure_names_in_cjk_are_drawn_with_an_installed_font_that_has_them():
    if _font_for("肿瘤右肺肝臓") is None:
        pytest.skip("no installed font has CJK glyphs (apt-get install fonts-droid-fallback, as setup.sh does)")
    edges = np.linspace(0.5, 1.5, 11)
    histograms = {label: np.arange(10.0) + label for label in NAMES}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = report_figures.jacobian_histograms(histograms, edges, NAMES, "det J 直方图")
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert png.startswith(b"\x89PNG") and not missing, missing
    fallbacks = report_figures.font_families(NAMES.values())[1:]
    for name in fallbacks:                  # real glyphs, not a last-resort font's one placeholder per block
        path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
        assert _draws(path, "肿瘤右肺"), name


def test_latin_names_need_no_other_font():
    assert report_figures.font_families(["GTV", "Lung_R", "det J (reference volume / time-t volume)"]) == \
        ["DejaVu Sans"]
