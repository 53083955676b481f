"""A trained series model: everything needed to query the deformation, the predicted image and
the propagated labelmap at any time, saved to and loaded from one file."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import save_atomically
from .cubic_lookup import padded_coefficients
from .deformation import Deformation
from .errors import InputError
from .geometry import Grid
from .metrics import labels_present
from .networks import RefNet
from .preprocessing import Calibration, IntensityWindow
from .presets import Preset


#: version of the model file's layout; a file of another version is refused with one line
MODEL_FORMAT = 1


def labels_in(labelmap: np.ndarray) -> list[int]:
    """The labels (> 0) that at least one voxel of a labelmap holds, in increasing order (metrics.labels_present)."""
    return [int(label) for label in labels_present(labelmap) if label > 0]


@dataclass
class SeriesModel:
    """Trained Def-Net(s) and prior, with the reference grid, times and intensity window.

    `reference` is the reference image in its own units and pixel type; `follow_ups` the other
    scans on the reference grid (in their units, per scanned time; a scan already on that grid is
    the image as read, not a copy, so the scans are held once); `views` the
    fields of view (bool, reference grid) of the follow-ups that do not cover the whole reference
    grid; `labelmap` the reference segmentation on the same grid, if one was given; `calibrations` the
    follow-ups whose CT numbers the fit calibrated onto the reference's (the predicted images blend them so);
    `acquired` the follow-ups resampled onto the reference grid (on grids of their own, or pre-aligned), as acquired
    on their own grids (their padding extended over): the predicted images carry these (`carried`, through their
    pre-alignments), not their copies, which a second interpolation blurs; `prealignments` the follow-ups'
    pre-alignments (4 x 4, reference LPS mm -> the time-t scan's), through which each was fitted.
    """

    preset: Preset
    grid: Grid
    reference_time: float
    time_range: tuple[float, float]
    window: IntensityWindow
    prior_kind: str
    deformation: Deformation
    ref_net: RefNet | None
    reference: sitk.Image
    follow_ups: dict[float, sitk.Image]
    views: dict[float, np.ndarray]
    labelmap: np.ndarray | None
    calibrations: dict[float, Calibration] = field(default_factory=dict)
    acquired: dict[float, sitk.Image] = field(default_factory=dict)
    prealignments: dict[float, np.ndarray] = field(default_factory=dict)

    def normalised_time(self, t: float) -> float:
        """User time -> [0, 1] over the scanned range (outside it for extrapolation)."""
        return normalise_time(t, self.time_range)

    @property
    def device(self) -> torch.device:
        """The device the model's Def-Net(s) compute on."""
        return next(self.deformation.parameters()).device

    @property
    def scanned_times(self) -> list[float]:
        """Every scanned time, in increasing order."""
        return sorted([self.reference_time, *self.follow_ups])

    def scan(self, t: float) -> sitk.Image:
        """The scan at scanned time t on the reference grid, in its own units (not a copy)."""
        return self.reference if t == self.reference_time else self.follow_ups[t]

    def carried(self, t: float) -> sitk.Image:
        """The scan at scanned time t that the predicted images carry: as acquired when it lies on a grid of its own
        or was pre-aligned (a 2 mm follow-up of a 3 mm reference's chest: the held-out image 30.5 dB against 25.4 from
        its copy on the reference grid; read through its pre-alignment, prealignments), else the scan on the reference
        grid."""
        return self.acquired[t] if t in self.acquired else self.scan(t)

    @cached_property
    def structures(self) -> list[int]:
        """The labels the reference labelmap holds ([] without one), found once for every time point written."""
        return labels_in(self.labelmap) if self.labelmap is not None else []

    def coefficients(self, t: float) -> np.ndarray:
        """The padded cubic B-spline coefficients (float32, cubic_lookup.padded_coefficients) of the scan the predicted
        images carry at scanned time t (`carried`), from which they are resampled: the reference's are kept once made
        (every scanned time's predicted image reads them), another scan's are made anew."""
        if t == self.reference_time:
            return self._reference_coefficients
        return padded_coefficients(sitk.GetArrayViewFromImage(self.carried(t)), np.float32)

    @cached_property
    def _reference_coefficients(self) -> np.ndarray:
        return padded_coefficients(sitk.GetArrayViewFromImage(self.reference), np.float32)

    def identity_at(self, t: float) -> bool:
        """Whether the map at user time t is the identity by construction (the anchored reference time)."""
        return self.deformation.identity_at(self.normalised_time(t))

    def displacement_grid(self, t: float, inverse: bool = False) -> torch.Tensor:
        """Displacement [1, 3, D, H, W] (grid_sample units) on the displacement grid (Deformation.displacement)
        at user time t, to be interpolated trilinearly (inverse: reference points -> time-t points)."""
        with torch.no_grad():
            return self.deformation.displacement([self.normalised_time(t)], chunk=65536, inverse=inverse)

    def save(self, path: str | Path) -> None:
        """Write the model atomically (a reader sees the old file or the whole new one); fields of view one bit a
        voxel, labels one byte a voxel when all are below 256."""
        save_atomically({
            "format": MODEL_FORMAT, "preset": self.preset.to_dict(), "grid": self.grid.to_dict(),
            "reference_time": self.reference_time, "time_range": list(self.time_range),
            "window": [self.window.low, self.window.high], "prior_kind": self.prior_kind,
            "velocity_shape": list(self.deformation.shapes[0]),   # the coarsest level's
            "pairwise_times": self.deformation.pairwise_times,
            "deformation": self.deformation.state_dict(),
            "ref_net": self.ref_net.state_dict() if self.ref_net is not None else None,
            "reference": _tensor_view(self.reference),
            "follow_ups": [[t, _tensor_view(a)] for t, a in self.follow_ups.items()],
            "views": [[t, torch.from_numpy(np.packbits(a))] for t, a in self.views.items()],
            "labelmap": torch.from_numpy(_smallest(self.labelmap)) if self.labelmap is not None else None,
            "calibrations": [[t, asdict(c)] for t, c in self.calibrations.items()],
            "acquired": [[t, Grid.of(a).to_dict(), _tensor_view(a)] for t, a in self.acquired.items()],
            "prealignments": [[t, m.tolist()] for t, m in self.prealignments.items()],
        }, Path(path))

    @classmethod
    def load(cls, path: str | Path, device: torch.device) -> "SeriesModel":
        """The model saved at `path`; InputError when the file is missing or damaged."""
        try:
            data = torch.load(path, map_location=device, weights_only=True)
        except FileNotFoundError:
            raise InputError(f"model file not found: {path}: give the folder of a complete training run") from None
        except Exception as error:  # torch raises many types for a damaged file
            raise InputError(f"model file {path} is damaged ({type(error).__name__}): train the run again") from None
        found = data.get("format", 1)   # files written before the version was recorded are format 1
        if found != MODEL_FORMAT:
            raise InputError(f"model file {path} is of format {found}, this STNeRP reads format {MODEL_FORMAT}: "
                             "train the run again with this version")
        preset = Preset(**data["preset"])
        generator = torch.Generator().manual_seed(0)  # every random buffer is overwritten by the state
        deformation = Deformation(preset, tuple(data["velocity_shape"]), data["pairwise_times"], generator,
                                  normalise_time(data["reference_time"], tuple(data["time_range"])))
        deformation.load_state_dict(data["deformation"])
        ref_net = None
        if data["ref_net"] is not None:
            ref_net = new_ref_net(preset, generator)
            ref_net.load_state_dict(data["ref_net"])
            ref_net.to(device)
        labelmap = data["labelmap"]
        grid = Grid.from_dict(data["grid"])
        return cls(preset, grid, data["reference_time"],
                   tuple(data["time_range"]), IntensityWindow(*data["window"]), data["prior_kind"],
                   deformation.to(device), ref_net, grid.image(data["reference"].cpu().numpy()),
                   {float(t): grid.image(a.cpu().numpy()) for t, a in data["follow_ups"]},
                   {float(t): _view(a.cpu().numpy(), grid.shape) for t, a in data["views"]},
                   labelmap.cpu().numpy() if labelmap is not None else None,
                   {float(t): Calibration.from_dict(c) for t, c in data.get("calibrations", [])},
                   {float(t): Grid.from_dict(g).image(a.cpu().numpy()) for t, g, a in data.get("acquired", [])},
                   {float(t): np.asarray(m) for t, m in data.get("prealignments", [])})


def _smallest(labelmap: np.ndarray) -> np.ndarray:
    """The labels as uint8 when they all are below 256 (one byte a voxel), else as int32 (torch has no uint16)."""
    return labelmap.astype(np.uint8 if labelmap.max(initial=0) < 256 else np.int32, copy=False)


def _view(stored: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A field of view's mask [z, y, x] as model.pt stores it: bits (np.packbits), or one bool a voxel (files
    written before)."""
    if stored.dtype == np.bool_:
        return stored
    return np.unpackbits(stored, count=int(np.prod(shape))).reshape(shape).astype(bool)


def _tensor_view(image: sitk.Image) -> torch.Tensor:
    """The image's voxels [z, y, x] as a tensor sharing its buffer (no copy; read-only: use it only
    while the image lives, here to save it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(sitk.GetArrayViewFromImage(image))


def normalise_time(t: float, time_range: tuple[float, float]) -> float:
    """User time -> [0, 1] over time_range = (first, last scanned time)."""
    low, high = time_range
    return (t - low) / (high - low)


def new_ref_net(preset: Preset, generator: torch.Generator) -> RefNet:
    """An untrained Ref-Net of the preset's size."""
    return RefNet(preset.ref_width, preset.ref_depth, preset.ref_fourier_width, preset.ref_sigma,
                  preset.omega, generator)
