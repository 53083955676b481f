"""The report's figures (matplotlib, Agg): slices of det J, |u| and contours per time point, det J
histograms per structure, and curves over time. Each function returns PNG bytes."""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ParamSpec, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 90
# The slices figure's margins and gaps (fractions of the figure, of an axes): room for the suptitle,
# each axes' title, tick labels and axis names, and the colour bars beside the first two columns. A fixed
# layout: matplotlib's constrained layout took half the figure's time (0.45 of 0.90 s a time point).
SLICES_GRID = {"left": 0.06, "right": 0.97, "top": 0.94, "bottom": 0.05, "wspace": 0.45, "hspace": 0.3}
COLOURS = plt.get_cmap("tab10")


FONT = "DejaVu Sans"
"""The figures' font (matplotlib's own); names with characters it lacks get fallbacks (font_families)."""

Arguments = ParamSpec("Arguments")


@functools.cache
def _characters(path: str) -> frozenset[int]:
    """The code points a font file has glyphs of their own for: none when it cannot be read, or when it is a
    last-resort font, which maps every code point of a Unicode block to one placeholder (matplotlib ships one:
    1 114 112 code points, 371 glyphs), so its text reads as boxes."""
    try:
        charmap = FT2Font(path).get_charmap()
    except (OSError, RuntimeError):
        return frozenset()
    return frozenset(charmap) if 2 * len(set(charmap.values())) >= len(charmap) else frozenset()


def font_families(texts: Iterable[str]) -> list[str]:
    """FONT, then for the characters of `texts` it lacks (a structure named in Chinese, Japanese, Korean, …) the
    installed fonts that have them, in matplotlib's font list order: matplotlib draws each character in the first
    family that has it."""
    needed = {ord(c) for text in texts for c in text if c.isprintable() and not c.isspace()}
    needed -= _characters(font_manager.findfont(FONT))
    families = [FONT]
    for name, path in _installed_fonts() if needed else ():
        found = needed & _characters(path)
        if found and name not in families:
            families.append(name)
            needed -= found
        if not needed:
            break
    return families


def _installed_fonts() -> Iterator[tuple[str, str]]:
    """(family, file) of the fonts matplotlib knows, then of the system's fonts it does not (installed after it
    cached its list, which it never reads again), each added to it when first given."""
    known = set()
    for entry in font_manager.fontManager.ttflist:
        known.add(entry.fname)
        yield entry.name, entry.fname
    for path in sorted(set(font_manager.findSystemFonts()) - known):
        if _characters(path):
            font_manager.fontManager.addfont(path)
            yield font_manager.fontManager.ttflist[-1].name, path


def _texts(values: Iterable[object]) -> Iterable[str]:
    """The strings among `values` and the values of the dicts among them (structure names, titles)."""
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            yield from (v for v in value.values() if isinstance(v, str))


def _in_their_fonts(draw: Callable[Arguments, bytes]) -> Callable[Arguments, bytes]:
    """`draw` with its text in font_families of the strings and names it is given."""
    @functools.wraps(draw)
    def drawn(*args: Arguments.args, **kwargs: Arguments.kwargs) -> bytes:
        with plt.rc_context({"font.family": font_families(_texts([*args, *kwargs.values()]))}):
            return draw(*args, **kwargs)
    return drawn


@dataclass
class Plane:
    """One slice through the focus point: arrays [rows, columns] in index order, their extent in mm
    (left, right, bottom, top for imshow), axis names, and which row is drawn at the top."""

    name: str
    jacobian: np.ndarray
    magnitude: np.ndarray
    image: np.ndarray
    labels: np.ndarray | None
    extent: tuple[float, float, float, float]
    xlabel: str
    ylabel: str
    origin: str


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return buffer.getvalue()


def jacobian_norm(planes: list[Plane]) -> TwoSlopeNorm:
    """Diverging colour scale centred at det J = 1, symmetric about 1, at least 1 +- 0.1."""
    values = np.concatenate([p.jacobian.ravel() for p in planes])
    span = max(0.1, float(np.max(np.abs(values - 1))))
    return TwoSlopeNorm(vcenter=1.0, vmin=1.0 - span, vmax=1.0 + span)


@_in_their_fonts
def time_point_slices(planes: list[Plane], names: dict[int, str], title: str, image_kind: str) -> bytes:
    """Rows: the planes; columns: det J (diverging at 1), |u| (mm), contours over the image."""
    figure, axes = plt.subplots(len(planes), 3, figsize=(11, 3.4 * len(planes)), squeeze=False,
                                gridspec_kw=SLICES_GRID)
    norm = jacobian_norm(planes)
    magnitude_max = max(float(p.magnitude.max()) for p in planes) or 1.0
    for row, plane in zip(axes, planes):
        common = {"extent": plane.extent, "origin": plane.origin, "interpolation": "nearest"}
        jac = row[0].imshow(plane.jacobian, cmap="RdBu_r", norm=norm, **common)
        mag = row[1].imshow(plane.magnitude, cmap="viridis", vmin=0, vmax=magnitude_max, **common)
        low, high = np.percentile(plane.image, [1, 99])
        row[2].imshow(plane.image, cmap="gray", vmin=low, vmax=high if high > low else low + 1, **common)
        if plane.labels is not None:
            _contours(row[2], plane, names)
        for ax, what in zip(row, ("det J", "|u| (mm)", f"structures over the {image_kind}")):
            ax.set_title(f"{plane.name}: {what}", fontsize=9)
            ax.set_xlabel(plane.xlabel, fontsize=8)
            ax.set_ylabel(plane.ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
        figure.colorbar(jac, ax=row[0], shrink=0.9).ax.tick_params(labelsize=7)
        figure.colorbar(mag, ax=row[1], shrink=0.9).ax.tick_params(labelsize=7)
    figure.suptitle(title)
    return _png(figure)


def _contours(ax: Axes, plane: Plane, names: dict[int, str]) -> None:
    labels = cast(np.ndarray, plane.labels)
    rows, columns = labels.shape
    left, right, bottom, top = plane.extent
    # voxel centres in mm, matching imshow's extent and origin (row 0 at `top` when origin is upper)
    first, last = (top, bottom) if plane.origin == "upper" else (bottom, top)
    x = left + (np.arange(columns) + 0.5) * (right - left) / columns
    y = first + (np.arange(rows) + 0.5) * (last - first) / rows
    handles = []
    for label in np.unique(labels[labels > 0])[::-1]:     # the lowest label (tumour) on top
        mask = labels == label
        if not mask.all():
            colour = COLOURS(label % 10)
            ax.contour(x, y, mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
            handles.append(plt.Line2D([], [], color=colour, label=names[label]))
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.6)


@_in_their_fonts
def jacobian_histograms(histograms: dict[int, np.ndarray], edges: np.ndarray, names: dict[int, str],
                        title: str) -> bytes:
    """det J histogram per structure (fraction of its voxels per bin), a line at det J = 1."""
    figure, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    centres = (edges[:-1] + edges[1:]) / 2
    for label, counts in histograms.items():
        total = counts.sum()
        if total:
            ax.step(centres, counts / total, where="mid", color=COLOURS(label % 10), label=names[label])
    ax.axvline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("det J (reference volume / time-t volume)")
    ax.set_ylabel("fraction of voxels")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _png(figure)


@_in_their_fonts
def volumes_over_time(times: np.ndarray, volumes: dict[int, np.ndarray], written: dict[int, list],
                      reference_index: int, names: dict[int, str]) -> bytes:
    """Structure volume against time: the model's curve, and the propagated labelmaps' volumes at
    the written time points (circles); left in mL, right relative to the reference time."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    for label, curve in volumes.items():
        colour = COLOURS(label % 10)
        base = curve[reference_index]
        left.plot(times, curve, color=colour, label=names[label])
        right.plot(times, 100 * curve / base, color=colour, label=names[label])
        if written.get(label):
            t, v = (np.asarray(a) for a in zip(*written[label]))
            left.plot(t, v, "o", color=colour, mfc="none")
            right.plot(t, 100 * v / base, "o", color=colour, mfc="none")
    left.plot([], [], "o", color="grey", mfc="none", label="propagated labelmap at a written time")
    left.set_ylabel("volume (mL)")
    left.set_yscale("log")
    right.set_ylabel("volume (% of the reference)")
    for ax in (left, right):
        ax.set_xlabel("time")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    return _png(figure)


@_in_their_fonts
def centroid_trajectory(times: np.ndarray, centroid: np.ndarray, scanned_times: list[float], name: str) -> bytes:
    """Centroid of one structure against time, per LPS axis, relative to the reference time."""
    figure, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
    for axis, text in enumerate(("L (x: + towards patient left)", "P (y: + towards posterior)",
                                 "S (z: + towards superior)")):
        ax.plot(times, centroid[:, axis], label=text)
    for t in scanned_times:
        ax.axvline(t, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("time (dotted: scanned)")
    ax.set_ylabel("centroid shift (mm, LPS)")
    ax.set_title(f"{name}: centroid relative to the reference", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(figure)


@_in_their_fonts
def motion_and_jacobian(times: np.ndarray, max_motion: dict[int, np.ndarray], mean_jacobian: dict[int, np.ndarray],
                        scanned_times: list[float], names: dict[int, str]) -> bytes:
    """Max |u| (mm) and mean det J per structure against time."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
    for label in max_motion:
        colour = COLOURS(label % 10)
        left.plot(times, max_motion[label], color=colour, label=names[label])
        right.plot(times, mean_jacobian[label], color=colour, label=names[label])
    for ax in (left, right):
        for t in scanned_times:
            ax.axvline(t, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("time (dotted: scanned)")
        ax.grid(alpha=0.3)
    left.set_ylabel("max |u| in the structure (mm)")
    right.set_ylabel("mean det J in the structure")
    right.axhline(1.0, color="k", lw=0.8)
    left.legend(fontsize=7)
    return _png(figure)


@_in_their_fonts
def loss_curves(losses: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Training loss (MSE of normalised intensities) per stage against iteration."""
    figure, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
    for stage, (iterations, values) in losses.items():
        ax.plot(iterations, values, lw=0.8, label=stage)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (MSE, normalised intensity)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(figure)
