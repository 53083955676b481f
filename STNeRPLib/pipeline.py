"""A whole run: fit ST-NeRP to a checked series and write every output with its metrics."""
from __future__ import annotations

import csv
import math
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from . import compiling
from .checkpoint import Checkpoint
from .contract import EXTRAPOLATION_LIMIT
from .deformation import Deformation
from .errors import InputError
from .geometry import Grid
from .metrics import map_points, target_registration_error
from .model import SeriesModel, labels_in, new_ref_net, normalise_time
from .networks import RefNet
from .preprocessing import (CALIBRATION_TOLERANCE_HU, CT_WINDOW, FAR_MM, SHIFT_VOXEL_MM, Calibration,
                            IntensityWindow, Padding, PaddingCandidate, apparent_shift_mm, block_shape,
                            confirmed_padding, extended, farthest_displacement_mm, find_padding,
                            follow_up_calibrations, intensity_method, on_grid, padding_candidate, prealignment,
                            rigid_estimate, same_grid, smoothed, turn_degrees)
from .presets import Options, Preset
from .priors import ImagePrior, evaluate_on_grid
from .progress import Reporter
from .record import RunRecord
from .sampling import BODY_LEVEL, BODY_MARGIN_MM, OwnVoxels, body_voxels, structure_bands
from .series import Series
from .training import Progress, Target, fit_deformation, fit_reference, keep_below
from .outputs import TimePoint, write_metrics_table, write_time_point
from .warping import affine_matrix

if TYPE_CHECKING:
    from collections.abc import Sequence


class Placed(NamedTuple):
    """_placed's result: a follow-up on the reference grid, the voxels there inside its field of view without its
    padding (None: all), its padding (find_padding), and the scan it was resampled from (its padding extended over;
    None when it lies on the reference grid and is taken itself)."""

    image: sitk.Image
    inside: np.ndarray | None
    padding: Padding | None
    source: sitk.Image | None


def pick_device(name: str) -> torch.device:
    """'auto' takes CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available: use --device auto or cpu")
    return torch.device(name)


def fit(reference: sitk.Image, reference_time: float, follow_ups: list[tuple[float, sitk.Image]],
        segmentation: sitk.Image | None, options: Options, reporter: Reporter,
        losses: list[tuple[str, int, float]] | None = None, checkpoint: Checkpoint | None = None
        ) -> SeriesModel:
    """Fit Ref-Net (or take the image as prior) and Def-Net to a series.

    Returns the model; its `prealignments` hold, per follow-up time, the 4x4 affine pre-alignment (reference points
    -> time-t image points) through which that image was fitted, if any. `losses`, if given,
    receives (stage, iteration, loss) of every training iteration. With a checkpoint, training
    starts from its state, saves into it and holds SIGINT/SIGTERM to the iteration's end. The preset is
    resolved for the segmentation's presence and the number of scans (Preset.for_segmentation, for_scans) and
    the model keeps it so.
    """
    count, requested = 1 + len(follow_ups), options.preset.for_segmentation(segmentation is not None)
    options = replace(options, preset=requested.for_scans(count))
    if options.temporal and options.preset.def_time_sigma != requested.def_time_sigma:
        reporter.message(f"{count} scans, fewer than {requested.time_sigma_halved_below}: Def-Net's time scale halved "
                         f"to {options.preset.def_time_sigma:g}")
    progress = reporter.progress if losses is None else _logged(reporter.progress, losses)
    device = pick_device(options.device)
    generator = _seeded(options.seed)
    window = _window(reference, follow_ups, options.intensity, reporter)
    times = [reference_time] + [t for t, _ in follow_ups]
    time_range = (min(times), max(times))
    scans = _onto_reference_grid(reference, follow_ups, options, window, reporter)
    sigma = options.preset.smoothing_sigma
    fitted = smoothed(reference, sigma)
    calibrations = _calibrations(reference, scans, window, options.preset, reporter)
    targets = _targets(fitted, reference_time, scans._replace(
        images={t: smoothed(image, sigma) for t, image in scans.images.items()},
        own={t: own._replace(scan=smoothed(own.scan, sigma, like=reference)) for t, own in scans.own.items()}),
        window, time_range, calibrations)
    reference_volume = _tensor(window.normalise(sitk.GetArrayViewFromImage(fitted)), device)
    labelmap = sitk.GetArrayFromImage(segmentation) if segmentation is not None else None
    bands = structure_bands(labelmap, reference.GetSpacing()) \
        if labelmap is not None and options.preset.structure_points > 0 else None
    if bands is not None:
        reporter.message(f"guided by the segmentation: {options.preset.structure_points:.0%} of the voxels drawn about "
                         f"its {len(bands)} structures, Def-Net's loss {options.preset.similarity}")
    if device.type == "cpu" and compiling.numba is None:
        reporter.message("numba is not in use (not installed, or STNERP_NUMBA=0): training and the outputs sample "
                         "with torch's kernels, numpy carries the labels and SimpleITK resamples the predicted "
                         "images, the same numbers more slowly (pip install numba)")
    with checkpoint.holding_signals() if checkpoint is not None else nullcontext():
        ref_net = _fit_ref_net(reference_volume, options, progress, generator, checkpoint)
        prior = _prior(reference_volume, ref_net, options)
        deformation = _new_deformation(Grid.of(reference), options, targets, generator, device)
        fit_deformation(deformation, prior, targets, options.preset, progress, generator, checkpoint,
                        reporter.message, bands, _body(targets, window, options.preset, reporter))
    if options.preset.adaptive_levels and options.preset.velocity_levels > 1:
        reporter.message(f"velocity levels kept: {deformation.kept} of {options.preset.velocity_levels} "
                         "(a finer level is kept where it lowers the loss)")
    model = SeriesModel(options.preset, Grid.of(reference), reference_time, time_range, window,
                        cast(str, options.prior), deformation, ref_net, reference, scans.images, scans.views,
                        labelmap, calibrations, {t: own.scan for t, own in scans.own.items()}, scans.prealignments)
    return model


def _window(reference: sitk.Image, follow_ups: list[tuple[float, sitk.Image]], requested: str,
            reporter: Reporter) -> IntensityWindow:
    """The intensity window of the series (preprocessing.intensity_method), said when it was chosen for the user."""
    method = intensity_method(requested, reference, follow_ups)
    window = IntensityWindow.for_image(reference, method)
    if requested == "auto":
        reporter.message(f"intensities: the CT window, {window.low:g} to {window.high:g} HU (the scans are in "
                         "Hounsfield units)" if method == "ct" else
                         f"intensities: the reference's 0.5th to 99.5th percentiles, {window.low:g} to "
                         f"{window.high:g} (the scans are not in Hounsfield units)")
    return window


def _body(targets: list[Target], window: IntensityWindow, preset: Preset, reporter: Reporter) -> np.ndarray | None:
    """With preset.body_mask, the voxels Def-Net draws from (sampling.body_voxels of every scan as fitted); None
    without it or when every voxel is used (def_points 0)."""
    if not preset.body_mask or preset.def_points <= 0:
        return None
    scans = [sitk.GetArrayViewFromImage(target.scan) for target in targets]
    body = body_voxels(scans, float(window.restore(np.float32(BODY_LEVEL))), targets[0].scan.GetSpacing(),
                       insides=[target.inside for target in targets],
                       calibrations=[target.calibration for target in targets])
    reporter.message(f"voxels drawn within {BODY_MARGIN_MM:g} mm of the body: "
                     f"{len(body) / scans[0].size:.0%} of the grid")
    return body


class _Resampled(NamedTuple):
    """Follow-ups on the reference grid, by time: the scans there (a scan already on that grid is
    itself, in its own pixel type; others resampled), the masks of the voxels inside each scan's field
    of view (only for scans that do not cover the whole grid), the 4x4 affine pre-alignments
    (reference points -> time-t image points; of the follow-ups pre-aligned), every resampled follow-up as acquired,
    as the fit compares it (OwnVoxels: its scan is Placed.source, SeriesModel.acquired); and the mask of the
    reference's own field of view, without its padding (None: all of the grid)."""

    images: dict[float, sitk.Image]
    views: dict[float, np.ndarray]
    prealignments: dict[float, np.ndarray]
    own: dict[float, OwnVoxels]
    reference_view: np.ndarray | None = None

    def fitted(self, t: float) -> np.ndarray | None:
        """The voxels at which the fit compares the follow-up at time t (None: all): inside its field of view and
        the reference's."""
        return _both(self.views.get(t), self.reference_view)


def _both(view: np.ndarray | None, other: np.ndarray | None) -> np.ndarray | None:
    """The voxels inside both of two views (bool [z, y, x]; None: all of the grid)."""
    return view if other is None else other if view is None else view & other


def _seeded(seed: int) -> torch.Generator:
    """The generator of every random draw of a fit (Fourier features, sampling), and torch's global
    seed (the networks' initial weights): a fit is reproducible from its seed."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _onto_reference_grid(reference: sitk.Image, follow_ups: list[tuple[float, sitk.Image]], options: Options,
                         window: IntensityWindow, reporter: Reporter) -> _Resampled:
    """Each follow-up resampled onto the reference grid (through its pre-alignment, _prealignment: an affine with
    --prealign affine, a rigid transform with auto when it lies far from the reference; beyond the scan, the reference's
    background), its field of view there without its padding (find_padding), said; the reference's own field of view
    without its padding (_reference_padding), said. A follow-up that does not overlap the reference's anatomy is
    refused."""
    padding = _reference_padding(reference, follow_ups, window)
    resampled = _Resampled({}, {}, {}, {}, None if padding is None else ~padding.runs)
    for t, image in follow_ups:
        placed = _placed(image, reference, None, window)
        transform = _prealignment(reference, t, image, placed, options.prealign, window, resampled.reference_view,
                                  reporter)
        if transform is not None:
            resampled.prealignments[t] = affine_matrix(transform)
            placed = _placed(image, reference, transform, window)
        elif placed.source is not None:
            reporter.message(f"time {t:g} is on another grid than the reference's: fitted at its own voxels")
        if placed.source is not None:
            resampled.own[t] = OwnVoxels.of(placed.source, reference, _scanned_view(placed.padding),
                                            resampled.reference_view, resampled.prealignments.get(t))
        _keep(resampled, t, image, reference, placed, reporter)
    if padding is not None:
        _check_anatomy_overlap(resampled, padding.value)
        reporter.message(f"the reference: {np.mean(padding.runs):.0%} of its grid is padding ({padding.value:g}) "
                         "outside its field of view, left out of the fit")
    return resampled


def _keep(resampled: _Resampled, t: float, image: sitk.Image, reference: sitk.Image, placed: Placed,
          reporter: Reporter) -> None:
    """Put the follow-up at time t into `resampled` as `placed` on the reference grid, its padding said; refused when
    it covers none of the grid."""
    resampled.images[t], inside, padding = placed.image, placed.inside, placed.padding
    if padding is not None:
        reporter.message(f"time {t:g}: {np.mean(padding.where):.0%} of the reference grid is padding "
                         f"({padding.value:g}) outside the scan's field of view, left out of the fit")
    if inside is not None:
        _check_overlap(inside, t, image, reference)
        resampled.views[t] = inside


def _placed(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None,
            window: IntensityWindow) -> Placed:
    """The follow-up on the reference grid through `transform` (beyond the scan, the reference's background), the
    voxels there inside its field of view without its padding (None: all), its padding (find_padding) and, when it is
    resampled, the scan resampled (its padding extended over: no step at its field of view's edge for the cubic
    B-spline to spread inward)."""
    background = float(sitk.GetArrayViewFromImage(reference).min())
    padding = find_padding(image, reference, window, transform)
    resampled = not same_grid(image, reference, transform)
    source = extended(image, padding.runs) if resampled and padding is not None else image
    placed, inside = on_grid(source, reference, transform, background)
    if padding is not None:
        inside = ~padding.where if inside is None else inside & ~padding.where
    return Placed(placed, inside, padding, source if resampled else None)


def _prealignment(reference: sitk.Image, t: float, image: sitk.Image, as_it_lies: Placed, prealign: str,
                  window: IntensityWindow, reference_view: np.ndarray | None,
                  reporter: Reporter) -> sitk.Transform | None:
    """The follow-up's pre-alignment (reference points -> its points; preprocessing.prealignment, started from its
    apparent_shift_mm `as_it_lies` on the reference grid, its padding and the reference's left out), said: an affine
    with --prealign affine, a rigid transform with auto when its rigid_estimate (a fraction of the pre-alignment's
    time) carries the reference's anatomy further than FAR_MM (a follow-up moved or turned). None when it is fitted as
    it lies: with --prealign none (one further than FAR_MM said, with the way out), or auto and none so far, or nothing
    to measure (no anatomy of the reference's in the follow-up's field of view: it is refused after, _check_overlap or
    _check_anatomy_overlap)."""
    placed, inside, padding = as_it_lies.image, as_it_lies.inside, as_it_lies.padding
    shift = apparent_shift_mm(reference, placed, window, reference_view, inside)
    if prealign == "affine":
        reporter.message(f"affine pre-alignment of time {t:g}")
        return prealignment(reference, image, shift, window, reference_view=reference_view,
                            image_view=_scanned_view(padding))
    shared = _both(inside, reference_view)
    if shared is not None and not shared.any():
        return None
    estimate = rigid_estimate(reference, placed, shift, window, shared)
    anatomy = _anatomy_points(reference, window, reference_view, shared)
    if farthest_displacement_mm(estimate, anatomy) <= FAR_MM:
        return None
    if prealign == "none":
        reporter.message(f"{_lies(t, estimate, anatomy)}, further than a fit without pre-alignment follows well: check "
                         "the scans' positions, or give --prealign auto (the panel's Pre-alignment: auto)")
        return None
    transform = prealignment(reference, image, shift, window, rigid=True, reference_view=reference_view,
                             image_view=_scanned_view(padding))
    reporter.message(f"{_lies(t, transform, anatomy)}: pre-aligned by a rigid transform first")
    return transform


def _scanned_view(padding: Padding | None) -> np.ndarray | None:
    """The follow-up's field of view without its `padding` (find_padding's), bool [z, y, x] on its own grid; None
    without padding."""
    return None if padding is None else ~padding.runs


def _lies(t: float, transform: sitk.AffineTransform, anatomy: np.ndarray) -> str:
    """How far the rigid `transform` carries the reference's `anatomy` (LPS mm [n, 3]) onto the follow-up at time t."""
    moved = ", ".join(f"{v:+.0f}" for v in transform.GetTranslation())
    return (f"time {t:g}: its anatomy lies up to {farthest_displacement_mm(transform, anatomy):.0f} mm from the "
            f"reference's (moved {moved} mm LPS, turned {turn_degrees(transform):.1f}°)")


def _anatomy_points(reference: sitk.Image, window: IntensityWindow, reference_view: np.ndarray | None,
                    view: np.ndarray | None) -> np.ndarray:
    """LPS mm [n, 3] of the reference's body inside `view` (bool [z, y, x]; None: all of the grid), one voxel a block
    of SHIFT_VOXEL_MM (preprocessing.block_shape): sampling.body_voxels without a margin in the reference's own field
    of view `reference_view`, each row filled between the body's edges, so the lungs count, which a CBCT's field of
    view may hold without those edges."""
    z, y, x = block_shape(reference, SHIFT_VOXEL_MM)
    blocks = sitk.GetArrayViewFromImage(reference)[::z, ::y, ::x]
    spacing = tuple(s * k for s, k in zip(reference.GetSpacing(), (x, y, z)))
    body = np.zeros(blocks.shape, bool)
    body.flat[body_voxels([blocks], float(window.restore(np.float32(BODY_LEVEL))), spacing, margin_mm=0.0,
                          insides=[None if reference_view is None else reference_view[::z, ::y, ::x]])] = True
    if view is not None:
        body &= view[::z, ::y, ::x]
    index = np.argwhere(body) * (z, y, x)
    return Grid.of(reference).to_physical(index[:, ::-1].astype(float))


def _reference_padding(reference: sitk.Image, follow_ups: list[tuple[float, sitk.Image]],
                       window: IntensityWindow) -> PaddingCandidate | None:
    """The reference's padding (its padding_candidate), which holds no anatomy for Def-Net to carry onto the
    follow-ups nor for an affine pre-alignment to match: confirmed by the first follow-up that holds something else
    there inside its own field of view (without its own padding), each as scanned, on its own grid; None when none
    does."""
    candidate = padding_candidate(reference)
    if candidate is None:
        return None
    for _, image in follow_ups:
        own = find_padding(image, reference, window)
        seen = None if own is None else ~own.runs
        if confirmed_padding(candidate, reference, image, window, seen=seen) is not None:
            return candidate
    return None


def _check_anatomy_overlap(resampled: _Resampled, value: float) -> None:
    """Refuse a follow-up that overlaps only the reference's padding (of `value`)."""
    for t in resampled.images:
        if not cast(np.ndarray, resampled.fitted(t)).any():
            raise InputError(f"the follow-up image at time {t:g} overlaps only the reference's padding ({value:g}), "
                             "no anatomy of the reference to register it to: check its origin, or choose as the "
                             "reference a scan that covers it")


def _calibrations(reference: sitk.Image, scans: _Resampled, window: IntensityWindow, preset: Preset,
                  reporter: Reporter) -> dict[float, Calibration]:
    """With preset.calibrate_intensities, the calibration of each CT follow-up whose numbers differ from the
    reference's by more than CALIBRATION_TOLERANCE_HU (follow_up_calibrations) by a scale within 0.5 to 2 (else no
    line was found), said; Def-Net fits it in the reference's numbers. Contrast taken up or washed out by large
    organs fires it too (the fit takes part of it for a scale, an offset and a bias): that lessened the squared
    error's loss on the sliding abdomen, but LNCC lost none, so the message names it where the fit is not LNCC already
    (docs/presets.md, *Follow-ups with a contrast change*)."""
    if not preset.calibrate_intensities or (window.low, window.high) != CT_WINDOW:
        return {}
    found = follow_up_calibrations(reference, {t: (image, scans.fitted(t)) for t, image in scans.images.items()})
    calibrations = {t: c for t, c in found.items()
                    if c is not None and c.change > CALIBRATION_TOLERANCE_HU and 0.5 <= c.scale <= 2.0}
    hint = "" if preset.similarity == "lncc" else ("; if contrast changed between the scans instead, the lncc "
                                                   "similarity fits better (--similarity lncc)")
    for t, c in calibrations.items():
        reporter.message(f"time {t:g}: CT numbers {c.change:.0f} HU off the reference's (scale {c.scale:.3f}, offset "
                         f"{c.offset:+.0f} HU, a smooth bias of {c.bias_range[0]:+.0f} to {c.bias_range[1]:+.0f} HU, "
                         f"as a CBCT's): fitted in the reference's numbers{hint}")
    return calibrations


def _targets(reference: sitk.Image, reference_time: float, scans: _Resampled, window: IntensityWindow,
             time_range: tuple[float, float], calibrations: dict[float, Calibration]) -> list[Target]:
    """What Def-Net fits: the reference first, then every follow-up, at normalised times (intensities
    calibrated and normalised by `window` where sampled); a follow-up resampled onto the reference grid at its own
    voxels (OwnVoxels)."""
    return [Target(normalise_time(reference_time, time_range), reference, window, scans.reference_view)] + [
        Target(normalise_time(t, time_range), image, window, scans.fitted(t), calibrations.get(t), scans.own.get(t))
        for t, image in scans.images.items()]


def _fit_ref_net(reference: torch.Tensor, options: Options, progress: Progress, generator: torch.Generator,
                 checkpoint: Checkpoint | None) -> RefNet | None:
    """Ref-Net fitted to the normalised reference and frozen, when it is the prior (else None)."""
    if options.prior != "refnet":
        return None
    ref_net = new_ref_net(options.preset, generator).to(reference.device)
    fit_reference(ref_net, reference, options.preset, progress, generator, checkpoint)
    return ref_net.requires_grad_(False)


def _prior(reference: torch.Tensor, ref_net: RefNet | None, options: Options) -> nn.Module:
    """What Def-Net deforms: Ref-Net itself, or a volume (the reference, or Ref-Net's rendering)
    interpolated as the preset says."""
    if not options.prior_is_volume:
        return cast(RefNet, ref_net)
    volume = reference if ref_net is None else evaluate_on_grid(ref_net, cast("tuple[int, int, int]", reference.shape))
    return ImagePrior(volume, options.preset.prior_interpolation)


def _new_deformation(grid: Grid, options: Options, targets: list[Target], generator: torch.Generator,
                     device: torch.device) -> Deformation:
    """An untrained Def-Net on the preset's velocity grid: one network of (x, t), or with pairwise
    training ("w/o t") one network of x per target time."""
    pairwise = None if options.temporal else [target.time for target in targets]
    return Deformation(options.preset, velocity_shape(grid, options.preset), pairwise, generator,
                       targets[0].time).to(device)


def _logged(progress: Progress, losses: list[tuple[str, int, float]]) -> Progress:
    """`progress` that also appends (stage, iteration, loss) to `losses`."""
    def logged(stage: str, iteration: int, total: int, loss: float) -> None:
        losses.append((stage, iteration, loss))
        progress(stage, iteration, total, loss)
    return logged


def write_losses(losses: list[tuple[str, int, float]], path: Path) -> None:
    """losses.csv: stage, iteration, loss (mean squared error of normalised intensities)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stage", "iteration", "loss"])
        writer.writerows(losses)


def _check_overlap(inside: np.ndarray, t: float, image: sitk.Image, reference: sitk.Image) -> None:
    """Refuse a follow-up that covers no voxel of the reference grid (nothing to register)."""
    if inside.any():
        return
    raise InputError(f"the follow-up image at time {t:g} does not overlap the reference in space: it spans "
                     f"{_extent(image)} mm, the reference {_extent(reference)} mm (LPS); check their origins "
                     "or use --prealign affine")


def _extent(image: sitk.Image) -> str:
    """The image's voxel-centre bounding box in LPS mm, as text."""
    grid = Grid.of(image)
    corners = grid.to_physical(np.array([[i, j, k] for i in (0, grid.size[0] - 1) for j in (0, grid.size[1] - 1)
                                         for k in (0, grid.size[2] - 1)], dtype=float))
    low, high = corners.min(axis=0), corners.max(axis=0)
    return " x ".join(f"[{a:.0f}, {b:.0f}]" for a, b in zip(low, high))


def check_query_times(times: list[float], time_range: tuple[float, float], reporter: Reporter,
                      scanned: Sequence[float] = ()) -> None:
    """Refuse a time that is not finite, lies more than EXTRAPOLATION_LIMIT times the scanned span
    outside the scanned range, is asked twice or is a `scanned` time (written anyway; its folder
    would be overwritten); warn (stderr) about each time outside the scanned range."""
    low, high = time_range
    span = high - low
    repeated = [t for k, t in enumerate(times) if t in times[:k] or t in scanned]
    if repeated:
        raise InputError(f"time {repeated[0]:g} is asked for twice, or is a scanned time (whose outputs are "
                         "written anyway): give each time once")
    for t in times:
        if not math.isfinite(t):
            raise InputError(f"time {t} is not a finite number: give each time as a number (phase or days)")
        outside = max(low - t, t - high, 0.0)
        if outside > EXTRAPOLATION_LIMIT * span:
            raise InputError(f"time {t:g} is {outside / span:.3g} scanned spans outside the scanned times "
                             f"{low:g}..{high:g}; at most {EXTRAPOLATION_LIMIT:g} spans are allowed: give a "
                             f"time within {low - EXTRAPOLATION_LIMIT * span:g}..{high + EXTRAPOLATION_LIMIT * span:g}")
        if outside > 0:
            reporter.message(f"warning: time {t:g} is outside the scanned times {low:g}..{high:g} "
                             f"({outside / span:.3g} spans): the model extrapolates there")


def velocity_shape(grid: Grid, preset: Preset) -> tuple[int, int, int]:
    """(D, H, W) of the velocity grid: the image grid, or about velocity_spacing mm apart (>= 4 points)."""
    if preset.velocity_spacing <= 0:
        return grid.shape
    extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
    counts = np.maximum(4, np.ceil(extent / preset.velocity_spacing).astype(int) + 1)
    return cast("tuple[int, int, int]", tuple(int(n) for n in np.minimum(counts, grid.size)[::-1]))


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)


def run_training(series: Series, options: Options, folder: Path, reporter: Reporter,
                 predict_times: Sequence[float] = (), record: RunRecord | None = None,
                 checkpoint_every: int = 0) -> RunRecord:
    """Fit the series and write every output into `folder`; the record ends 'complete'.

    With checkpoint_every > 0, training is checkpointed into the folder every that many iterations
    and on SIGINT/SIGTERM. Whatever an earlier attempt left in the folder is taken up: a checkpoint
    is trained on from, a saved model and the time points already in the record are kept (outputs
    resume at the first missing time point; the short-range scheme at its first pair not written).
    """
    record = record or RunRecord(folder, "train", {}, options.to_dict())
    times = [t for t, _ in series.images]
    check_query_times(list(predict_times), (min(times), max(times)), reporter, times)
    device = pick_device(options.device)
    record.set(device=str(device))
    if options.scheme == "short":
        if predict_times:
            raise InputError("predicting new times needs the long-range scheme: drop --predict-times "
                             "or use --scheme long")
        _run_short_range(series, options, folder, reporter, record, checkpoint_every)
    else:
        _run_long_range(series, options, folder, reporter, record, list(predict_times),
                        _checkpoint(folder, checkpoint_every))
    return _complete(record, folder)


def _checkpoint(folder: Path, every: int) -> Checkpoint | None:
    """The run's checkpoint.pt (holding a saved state, if an earlier attempt left one); None for every 0."""
    return Checkpoint(folder / "checkpoint.pt", every) if every > 0 else None


def _complete(record: RunRecord, folder: Path) -> RunRecord:
    """Write the metrics table and mark the run complete."""
    write_metrics_table(record.data["time_points"], folder / "metrics.csv")
    record.set(metrics_table="metrics.csv")
    record.finish("complete")
    return record


def _run_long_range(series: Series, options: Options, folder: Path, reporter: Reporter, record: RunRecord,
                    predict_times: list[float], checkpoint: Checkpoint | None) -> None:
    if predict_times and not options.temporal:
        raise InputError("a pairwise (w/o t) model cannot predict new times: drop --predict-times "
                         "or train with continuous time")
    if record.data.get("model"):              # resumed after training: outputs only
        model = SeriesModel.load(folder / record.data["model"], pick_device(options.device))
    else:
        losses: list[tuple[str, int, float]] = []
        model = fit(series.reference, series.reference_time, series.follow_ups, series.segmentation, options, reporter,
                    losses, checkpoint)
        model.save(folder / "model.pt")
        write_losses(losses, folder / "losses.csv")
        record.set(model="model.pt", intensity_window=[model.window.low, model.window.high], losses="losses.csv",
                   prealignments=[[t, m.tolist()] for t, m in model.prealignments.items()],
                   **_fit_facts(model, losses))
    prealignments = model.prealignments       # saved with the model: the same whether resumed or not
    if checkpoint is not None:              # the saved model supersedes it
        checkpoint.remove()
    if predict_times and prealignments:
        reporter.message(f"the predicted times lie in the reference's position: the pre-alignment of time"
                         f"{'s' if len(prealignments) > 1 else ''} {', '.join(f'{t:g}' for t in prealignments)} is "
                         "not carried to them")
    points = [TimePoint(t, Grid.of(image), image, prealignments.get(t)) for t, image in series.images]
    points += [TimePoint(t, model.grid) for t in predict_times]
    written = {entry["time"] for entry in record.data["time_points"]}
    for index, point in enumerate(points, 1):
        if point.time not in written:
            record.add_time_point(_said(write_time_point(model, point, folder, series).entry, reporter))
        reporter.progress("outputs", index, len(points))


def _said(entry: dict, reporter: Reporter) -> dict:
    """The entry of a time point, its structures lost in propagation said in the log."""
    if entry.get("labels_lost"):
        labels = ", ".join(f"label {label}" for label in entry["labels_lost"])
        reporter.message(f"time {entry['time']:g}: {labels} of the segmentation lost: no voxel of the propagated "
                         "labelmap holds it (a structure about a voxel in size can fall between voxel centres)")
    return entry


def _fit_facts(model: SeriesModel, losses: list[tuple[str, int, float]]) -> dict:
    """What a fit did, as run.json records it (for the whole run, or per pair in the short-range scheme):
    Def-Net iterations run, velocity levels kept, each adaptive trial's loss ratio and the bar it was
    judged against, Def-Net's Fourier scale of time as fitted (Preset.for_scans; None without a
    continuous time: one Def-Net per scan), and the follow-ups whose CT numbers it calibrated, how (HU)."""
    temporal = model.deformation.pairwise_times is None
    return {"defnet_iterations": _last_iteration(losses, "defnet"), "velocity_levels_kept": model.deformation.kept,
            "velocity_level_ratios": model.deformation.trial_ratios,
            "velocity_level_keep_below": keep_below(model.preset),
            "def_time_sigma": model.preset.def_time_sigma if temporal else None,
            "intensity_calibrations": [[t, {"scale": c.scale, "offset_hu": c.offset, "bias_hu": list(c.bias_range),
                                            "change_hu": c.change}] for t, c in model.calibrations.items()]}


def _last_iteration(losses: list[tuple[str, int, float]], stage: str) -> int | None:
    """The last iteration `stage` ran (None when it ran none: resumed after it); with stopping on
    convergence it may be below the preset's count."""
    return max((iteration for name, iteration, _ in losses if name == stage), default=None)


def _run_short_range(series: Series, options: Options, folder: Path, reporter: Reporter, record: RunRecord,
                     checkpoint_every: int) -> None:
    """Register each scan to the one before it (f_{t-1} -> f_t). Fields map time-t points to the
    previous scan; labelmaps and landmarks are carried along the chain from the reference.

    Resumable pair by pair: a pair whose time point is in the record is kept (its labelmap is read
    back to carry on), the first one missing trains from the checkpoint, if any. Each pair's fit
    starts from the seed, so a resumed run ends as an uninterrupted one."""
    images = series.images
    labelmap = sitk.GetArrayFromImage(series.segmentation) if series.segmentation is not None else None
    structures = labels_in(labelmap) if labelmap is not None else None     # lost along the chain: against these
    unchained = replace(series, landmarks={})      # TRE is measured along the chain, below
    done = {entry["time"]: entry for entry in record.data["time_points"]}
    losses = [row for row in _read_losses(folder / "losses.csv") if row[0].split("->")[-1] in
              {f"{t:g}" for t in done}]
    for index, ((t0, image0), (t1, image1)) in enumerate(zip(images, images[1:]), 1):
        if t1 in done:
            if labelmap is not None:
                labelmap = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / done[t1]["labelmap"])))
            continue
        reporter.message(f"short-range pair {index}/{len(images) - 1}: time {t0:g} -> {t1:g}")
        segmentation = _labelmap_image(labelmap, image0) if labelmap is not None else None
        pair: list[tuple[str, int, float]] = []
        checkpoint = _checkpoint(folder, checkpoint_every)
        model = fit(image0, t0, [(t1, image1)], segmentation, options, reporter, pair, checkpoint)
        losses += [(f"{stage} {t0:g}->{t1:g}", i, loss) for stage, i, loss in pair]
        write_losses(losses, folder / "losses.csv")
        record.set(losses="losses.csv")
        record.set(intensity_window=[model.window.low, model.window.high])
        point = TimePoint(t1, Grid.of(image1), image1, model.prealignments.get(t1))
        written = write_time_point(model, point, folder, unchained, structures)
        written.entry.update(reference_time=t0, **_fit_facts(model, pair))
        del model
        if t1 in series.landmarks:
            chain = [folder / e["displacement"] for e in [written.entry, *reversed(record.data["time_points"])]]
            written.entry["metrics"].update(_chained_tre(chain, *series.landmarks[t1]))
        labelmap = written.labelmap
        if checkpoint is not None:           # this pair is written: its checkpoint is done with
            checkpoint.remove()
        record.add_time_point(_said(written.entry, reporter))


def _read_losses(path: Path) -> list[tuple[str, int, float]]:
    """The rows of a losses.csv (none if it is not there)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [(stage, int(iteration), float(loss)) for stage, iteration, loss in list(csv.reader(handle))[1:]]


def _labelmap_image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def _chained_tre(chain: list[Path], points: np.ndarray, reference_points: np.ndarray) -> dict:
    """TRE of points carried through the chain of displacement files (newest first) back to the
    reference; one field in memory at a time."""
    for path in chain:
        points = map_points(sitk.ReadImage(str(path)), points)
    return target_registration_error(points, reference_points)


def run_prediction(model_path: Path, times: list[float], folder: Path, reporter: Reporter,
                   record: RunRecord) -> RunRecord:
    """Query a saved model at new times (no retraining) and write their outputs on the reference grid."""
    model = SeriesModel.load(model_path, pick_device("auto"))
    check_query_times(times, model.time_range, reporter)
    record.set(intensity_window=[model.window.low, model.window.high])
    if model.deformation.pairwise_times is not None:
        raise InputError("this model was trained pairwise (w/o t) and cannot predict new times: "
                         "train with continuous time")
    for index, t in enumerate(times, 1):
        record.add_time_point(_said(write_time_point(model, TimePoint(t, model.grid), folder, None).entry, reporter))
        reporter.progress("outputs", index, len(times))
    return _complete(record, folder)
