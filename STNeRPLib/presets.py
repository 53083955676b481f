"""Hyperparameter presets: the paper's exact settings, and a default designed for a CPU."""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict, replace


AUTO_LEVELS = 2
"""Velocity levels tried by `--velocity-levels auto` (a third, 8 mm, level was not better: docs/presets.md)."""
LEVEL_TRIAL = 200
"""Def-Net iterations a finer velocity level is trained before adaptive_levels decides (in a short fit, at
most half of the iterations from its switch-on to the end). A count, not a share of the fit: the trial's
loss ratio depends on how many iterations the level has learnt, not on how long the fit is. With a fifth of
the fit, the shrinking tumour (5 fractions, series seeds 0 and 1) gave 0.893 / 0.906 at 1000 iterations but
0.946 / 0.933 at 600 and 0.968 / 0.956 at 400, and at 0.946 the level was dropped and the tumour lost
(lowest Dice 0.566); with 200 iterations, 0.890 / 0.880 at 600 (docs/presets.md)."""
LEVEL_WINDOW = 0.5
"""Fraction of a finer level's trial, its last iterations, whose training losses with the level and
without it (the same drawn voxels) are summed for adaptive_levels' decision: one look at the end moved
the ratio by up to 0.05 from one check to the next, 50 iterations apart (docs/presets.md)."""
LEVEL_GAIN = 0.06
"""Relative fall of the summed trial loss (LEVEL_WINDOW) that a finer velocity level must bring to be kept
(adaptive_levels), with that level's displacement refined by cubic B-spline (displacement_spacing 8, as in
DEFAULT). Loss with the 16 mm level / without it, preset study at series seeds 0 and 1: breathing phantom
0.997, chest 0.954-0.956, shrinking tumour 0.911-0.929, sliding abdomen 0.642-0.665; 0.94 sits in the gap
between the chest, which the level does not help, and the shrinking tumour (docs/presets.md). With the rate held
for half the fit (lr_hold 0.5, seeds 0-2): breathing 0.998-0.999, chest 0.957-0.959, shrinking tumour 0.888-0.912,
abdomen 0.695-0.755; still in the gap, nearer the tumour."""
LEVEL_GAIN_TRILINEAR = 0.03
"""The same with the displacement trilinear between the velocity nodes (displacement_spacing 0, the default
until 2026-12-02): breathing 0.997-0.999, chest 0.991-0.992, shrinking tumour 0.936-0.950, abdomen
0.750-0.771; 0.97 sits in the gap between the smooth motions and the shrinking tumour."""
CHARBONNIER_EPSILON = 0.01
"""Where the Charbonnier penalty (`similarity` "charbonnier") turns from squared to absolute error, in
normalised intensity (0.01: 15 HU in the CT window). Swept with two velocity levels on series seed 1
(docs/presets.md): mean TRE on the shrinking tumour 0.336 / 0.324 / 0.357 mm and the sliding abdomen
0.725 / 0.720 / 0.736 mm at 0.003 / 0.01 / 0.03."""
MAX_SMOOTHING_SIGMA = 3.0
"""The most smoothing_sigma (`--smoothing-sigma`) a run accepts, in voxels: beyond it the fit would see the
anatomy itself blurred, not only detail finer than the grid resolves."""
LABEL_INTERPOLATIONS = ("nearest", "linear")
"""How the reference segmentation is carried to each time (Preset.label_interpolation; warping.propagate_labels)."""


@dataclass(frozen=True)
class Preset:
    """Network sizes, optimisation and integration settings of one run.

    `*_points` is the number of voxels sampled per image per iteration (0: every voxel,
    as the paper's objective). `velocity_spacing` is the spacing in mm of the grid on which
    Def-Net's velocity is evaluated and integrated (0: the reference image grid, as the paper).
    `prior` is what Def-Net deforms: "refnet" (Ref-Net, the paper) or "image" (the reference image
    itself, the paper's "w/o prior"). `prior_interpolation` samples a prior volume (the reference
    image, or Ref-Net's rendering when `prior_cache` is set) "linear" (trilinear, the paper) or
    "cubic" (cubic B-spline). `prior_cache` evaluates the frozen Ref-Net once on the reference grid
    and samples that while training Def-Net, instead of running Ref-Net at every sample.
    `omega` is the SIREN frequency factor of Ref-Net, `def_omega` that of Def-Net (30 in both,
    SIREN's default, in the paper); a lower `def_omega` makes the velocity smoother in space and time.
    `lr_final` is the fraction of the initial learning rate reached at the last iteration by a
    cosine decay (1.0: constant, as the paper). `lr_hold` is the fraction of Def-Net's iterations run at def_lr
    before that decay begins (0: it spans every iteration; stop_on_convergence holds the rate until the loss
    stops improving instead, and leaves it unread). `def_times` is the number of time points drawn
    at random per Def-Net iteration (0: every time point, as the paper's objective).
    `similarity` is Def-Net's loss: "mse" (mean squared intensity error, the paper's), "charbonnier" (the
    squared error below CHARBONNIER_EPSILON, the absolute error above: a large residual no smooth field
    removes, at skin that moves or organs that slide, pulls no harder for being large), or "lncc"
    (1 - mean squared local normalised cross-correlation over 3 x 3 x 3-voxel windows, voxels 2 apart:
    insensitive to a local linear change of intensity, as between CT and CBCT or with contrast).
    `anchor_reference` makes the reference time the identity exactly: the continuous-time velocity is
    Def-Net(x, t) - Def-Net(x, t_ref), so u(x, t_ref) = 0 (the paper has no anchor; on in DEFAULT:
    docs/presets.md gives the figures for and against).
    `velocity_levels` > 1 makes the velocity coarse to fine: each further level halves the grid spacing
    and adds a residual Def-Net (`level_width` wide, Fourier sigma `level_sigma` at the first finer
    level, doubled at each further one, output zero at its start) to the coarser velocity upsampled;
    the first finer level is switched on after `level_start` of Def-Net's iterations, the others evenly
    between then and the end (deformation.Deformation). The finer levels' Def-Nets learn at
    `level_lr_scale` x def_lr (1.0 before it existed; DEFAULT 3: each finer node sees few of an
    iteration's samples). The level_* values are the best measured (docs/presets.md); one level leaves
    them unread.
    `adaptive_levels` tries each finer level for LEVEL_TRIAL Def-Net iterations and keeps it only
    if, summed over the trial's last LEVEL_WINDOW, it lowers the mean squared error of the drawn voxels
    (whatever `similarity` trains: the bars are calibrated on it) by more than LEVEL_GAIN
    (LEVEL_GAIN_TRILINEAR without displacement_spacing) against the same fit without it on the same
    voxels; otherwise the fit goes on without it (and the levels above it).
    `stop_on_convergence` makes `def_iterations` the most Def-Net runs: its learning rate stays at
    `def_lr` until the loss stops improving (schedule.DecaySchedule), then falls to `lr_final` of it by
    a cosine over `decay_iterations` more, and the fit ends there (off: lr_hold, then the cosine).
    `displacement_spacing` > 0 refines the integrated displacement of a velocity made with finer levels, by
    cubic B-spline through the finest level's nodes, to a grid at most that many mm apart (that level's
    spacing divided by a whole factor), between whose nodes it is interpolated trilinearly in training and
    in every output. The coarsest level alone is never refined: it follows smooth motion, and refined it
    registered low-contrast tissue worse (docs/presets.md). 0 (as before it existed) interpolates every
    displacement trilinearly between the velocity grid's nodes.
    `label_interpolation` carries the segmentation to each time: "nearest" (the nearest reference voxel's
    label, the paper's eq. 7-8) or "linear" (label-wise trilinear, warping.propagate_labels: a boundary
    follows the half level of the structure's interpolated indicator, not the staircase of voxel faces;
    the default's).
    `average_last` > 0 makes Def-Net's weights the mean of its weights over the fit's last fraction
    `average_last` of iterations (Polyak-Ruppert tail averaging, averaging.WeightAverage; with
    stop_on_convergence, of the iterations once the end is known); 0: the last iteration's weights, as
    the paper.
    `structure_points` > 0 draws that fraction of each time's `def_points` from bands about the reference
    segmentation's structure boundaries (sampling.structure_bands), as many from each structure, the rest
    uniformly: a small structure's edge (a tumour's: ~0.2 % of the grid) then weighs in the fit as its
    contour does for the user. Without a segmentation every voxel is drawn uniformly (0, the paper's).
    `structure_similarity`, when set, is Def-Net's loss instead of `similarity` where voxels are drawn about
    a segmentation's structures (DEFAULT: "charbonnier", which alone lets a shrinking tumour go, and mse
    without a segmentation). `for_segmentation` resolves both for a series with or without one.
    `smoothing_sigma` > 0 smooths the reference and every follow-up by a Gaussian of that many voxels along each
    axis as Def-Net's fit (and Ref-Net's) sees them: the prior and the targets; every output carries the scans
    unsmoothed. 0: as scanned (the paper).
    `body_mask` draws Def-Net's uniform voxels (and LNCC's window centres) only within BODY_MARGIN_MM of the body,
    where any scan is above BODY_LEVEL of the intensity window (sampling.body_voxels), as many per mm³ there as
    over the whole grid: the air around the body, where a drawn voxel has no motion to follow, is not drawn
    (False: the whole grid, the paper's; with def_points 0 every voxel is used either way).
    `time_sigma_halved_below` > 0: a series of fewer scans (the reference among them) is fitted with half of
    def_time_sigma, so that a few scans are not given temporal frequencies they cannot pin down (between them
    the motion follows the scans instead of wiggling); `for_scans` resolves it. 0: def_time_sigma whatever the
    series (the paper's).
    `calibrate_intensities`: a CT follow-up whose CT numbers differ from the reference's (a CBCT: a scale, an
    offset, a cupping; preprocessing.intensity_calibration) is fitted in the reference's numbers, and so blended
    into a predicted image and scored by PSNR / SSIM (False: every scan as scanned, the paper's).
    """

    name: str
    ref_width: int
    ref_depth: int
    ref_fourier_width: int
    ref_sigma: float
    ref_lr: float
    ref_iterations: int
    ref_points: int
    def_width: int
    def_depth: int
    def_fourier_width: int
    def_sigma: float
    def_time_sigma: float
    def_lr: float
    def_iterations: int
    def_points: int
    velocity_spacing: float
    prior: str = "refnet"
    prior_interpolation: str = "linear"
    squaring_steps: int = 7
    omega: float = 30.0
    def_omega: float = 30.0
    prior_cache: bool = False
    lr_final: float = 1.0
    lr_hold: float = 0.0
    def_times: int = 0
    similarity: str = "mse"
    anchor_reference: bool = False
    velocity_levels: int = 1
    level_start: float = 0.2
    level_width: int = 16
    level_sigma: float = 4.0
    level_lr_scale: float = 1.0
    adaptive_levels: bool = False
    stop_on_convergence: bool = False
    decay_iterations: int = 300
    displacement_spacing: float = 0.0
    label_interpolation: str = "nearest"
    average_last: float = 0.0
    structure_points: float = 0.0
    structure_similarity: str | None = None
    smoothing_sigma: float = 0.0
    body_mask: bool = False
    time_sigma_halved_below: int = 0
    calibrate_intensities: bool = False

    def for_segmentation(self, segmented: bool) -> "Preset":
        """The preset as a fit of a series with (or without) a reference segmentation runs it: with one and
        structure_points, Def-Net's loss is structure_similarity where set; without one, every voxel is drawn
        uniformly. The result has no structure_similarity left, so resolving it again changes nothing."""
        if not segmented:
            return replace(self, structure_points=0.0, structure_similarity=None)
        if self.structure_points > 0 and self.structure_similarity:
            return replace(self, similarity=self.structure_similarity, structure_similarity=None)
        return replace(self, structure_similarity=None)

    def for_scans(self, scans: int) -> "Preset":
        """The preset as a fit of a series of `scans` scanned times (the reference among them) runs it: Def-Net's
        time scale resolved for the series' length (time_sigma_halved_below), which the result no longer holds, so
        resolving it again changes nothing."""
        if scans >= self.time_sigma_halved_below:
            return replace(self, time_sigma_halved_below=0)
        return replace(self, def_time_sigma=self.def_time_sigma / 2, time_sigma_halved_below=0)

    def level_iteration(self, level: int) -> int:
        """The Def-Net iteration from which velocity level `level` (0: the coarsest) is trained."""
        if level == 0:
            return 1
        first = self.level_start + (1 - self.level_start) * (level - 1) / (self.velocity_levels - 1)
        return int(round(first * self.def_iterations)) + 1

    def refinement(self, level: int) -> int:
        """The factor by which the displacement of a velocity whose finest level is `level` (0: the coarsest)
        is refined (displacement_spacing); 1 when it is not, always for the coarsest level alone."""
        if self.displacement_spacing <= 0 or self.velocity_spacing <= 0 or level == 0:
            return 1
        return max(1, math.ceil(self.velocity_spacing / 2 ** level / self.displacement_spacing - 1e-9))

    def level_trial(self, level: int) -> int:
        """With adaptive_levels, the Def-Net iterations finer level `level` (>= 1) is tried: LEVEL_TRIAL, or
        half of the iterations from its switch-on to the end if fewer (at least one)."""
        remaining = self.def_iterations - self.level_iteration(level) + 1
        return max(min(LEVEL_TRIAL, remaining // 2), 1)

    def level_decision(self, level: int) -> int:
        """With adaptive_levels, the Def-Net iteration after which finer level `level` (>= 1) is kept or
        dropped: the last of its trial (level_trial)."""
        return self.level_iteration(level) + self.level_trial(level) - 1

    def level_window(self, level: int) -> range:
        """With adaptive_levels, the Def-Net iterations whose losses decide finer level `level` (>= 1):
        the last LEVEL_WINDOW of its trial (at least one), ending at its decision."""
        decision = self.level_decision(level)
        length = max(int(round(LEVEL_WINDOW * self.level_trial(level))), 1)
        return range(max(decision - length + 1, self.level_iteration(level)), decision + 1)

    def levels_settled(self) -> int:
        """The Def-Net iteration from which the velocity levels no longer change: the finest one's
        switch-on, or with adaptive_levels the iteration after its decision."""
        finest = self.velocity_levels - 1
        if self.adaptive_levels and finest > 0:
            return self.level_decision(finest) + 1
        return self.level_iteration(finest)

    def to_dict(self) -> dict:
        """Every setting by name, as run.json's parameters and the model file store them (Preset(**d) reads it back)."""
        return asdict(self)

    def with_iterations(self, iterations: int) -> "Preset":
        """The same preset with both networks trained for `iterations` iterations."""
        return replace(self, ref_iterations=iterations, def_iterations=iterations)


PAPER = Preset(
    name="paper",
    ref_width=256, ref_depth=8, ref_fourier_width=256, ref_sigma=3.0, ref_lr=1e-4,
    ref_iterations=2000, ref_points=0,
    def_width=256, def_depth=8, def_fourier_width=256, def_sigma=3.0, def_time_sigma=3.0, def_lr=1e-5,
    def_iterations=2000, def_points=0,
    velocity_spacing=0.0,
)

DEFAULT = Preset(
    name="default",
    ref_width=128, ref_depth=4, ref_fourier_width=128, ref_sigma=3.0, ref_lr=1e-3,
    ref_iterations=600, ref_points=4096,
    def_width=128, def_depth=3, def_fourier_width=32, def_sigma=1.0, def_time_sigma=0.5, def_lr=1e-3,
    def_iterations=1000, def_points=4096,
    velocity_spacing=32.0, prior="image", prior_interpolation="cubic", prior_cache=True, lr_final=0.1,
    lr_hold=0.5, def_times=3, def_omega=10.0, anchor_reference=True, velocity_levels=AUTO_LEVELS, adaptive_levels=True,
    level_lr_scale=3.0, squaring_steps=5, displacement_spacing=8.0, label_interpolation="linear",
    average_last=0.25, structure_points=0.1, structure_similarity="charbonnier", body_mask=True,
    time_sigma_halved_below=5, calibrate_intensities=True,
)
"""Measured on the 96 x 96 x 64 breathing phantom (mean TRE over the nine follow-up phases, mm;
docs/presets.md): cubic B-spline sampling of the prior beat trilinear (Ref-Net's cached rendering
0.37 -> 0.31, the reference image 0.42 -> 0.33; trilinear blurs by sub-voxel position and its
gradient jumps at voxel faces); with Def-Net at omega 10 and width 128 the image beat Ref-Net's
rendering (0.23 vs 0.27) at no training cost; 1000 Def-Net iterations 0.19 (600: 0.23). A 16 or
24 mm velocity grid was no better than 32 mm; sigma 2 (0.63) and omega 15 (0.25) were worse.
The reference anchor won or tied every TRE and held-out image of the benchmark's five series (the
longitudinal held-out image -3.55 -> -0.02 dB against interpolation) for 3-10 % more wall time.
Adaptive levels (a 16 mm level kept where it lowers the loss by 5 %, one look; 3 %
summed over the trial's last half since) kept it on the shrinking tumour
(TRE 0.47 -> 0.39 mm, lowest Dice 0.52 -> 0.60, seed 0) and the sliding abdomen (0.95 -> 0.82 mm) and
dropped it on the breathing phantom and the chest (TRE and Dice as one level), for 20-25 % more time
there and 1.4-2x where kept. 5 squaring steps instead of the paper's 7 took 1-19 % off the fit with the
same TRE to 0.03 mm on the four study series at two seeds (a one-node motion integrates to within 0.003
node of the converged exponential; 7 steps: 0.0006). The kept 16 mm level's displacement refined by cubic
B-spline to 8 mm raised the shrinking tumour's lowest Dice 0.655 -> 0.754 and 0.622 -> 0.684 (seeds 0, 1)
and took the abdomen's TRE 0.81 -> 0.76 mm at seed 0, the rest as before; refining the 32 mm level alone as
well registered low-contrast tissue worse on the tests' 64 x 64 x 40 phantom (its last phase 3-5 dB lower).
Def-Net's weights averaged over the last quarter of iterations: breathing 0.17 -> 0.15 mm, longitudinal
0.35 -> 0.34 (its tumour's lowest Dice 0.752 -> 0.727), chest 0.239 -> 0.232, abdomen level (seed 1).
With a segmentation, a tenth of the voxels drawn about its structures and the Charbonnier penalty (benchmark
of 2026-12-03, seed 1): TRE lower on all five series (shrinking tumour 0.37 -> 0.30 mm, its Dice per fraction
0.94/0.88/0.76/0.69 -> 0.95/0.90/0.96/0.92; abdomen 0.89 -> 0.82), the longitudinal held-out image
+0.31 -> -0.13 dB against interpolation; without one, mse and uniform draws (Charbonnier alone lets the
tumour go: its lowest Dice 0.57).
Voxels drawn in and about the body only (body_mask), as densely as over the grid: the same TRE within 0.02 mm
and the same level decisions on the four study series at seeds 0 and 1, the phantoms' fits (42 % of the grid
air) 0.88-0.89 x the time.
Smoothing the scans the fit sees (smoothing_sigma 0.5 voxel) was measured and not taken (2026-12-03,
docs/presets.md): it lowered the mean TRE of the phantoms and the 3 mm chest by 20-30 % but raised the native
1.5 mm chest's (0.073 -> 0.081 mm, its max 0.71 -> 1.18) and the sliding abdomen's (0.820 -> 0.863).
Def-Net's rate held at def_lr for half the iterations before its cosine decay (lr_hold 0.5; 2026-12-04, series
seeds 0-2, docs/presets.md): mean TRE level or lower on 10 of the 12 series and seeds (the shrinking tumour 0.32 /
0.32 / 0.30 -> 0.28 / 0.30 / 0.31 mm, the abdomen 0.69 / 0.73 / 0.69 -> 0.66 / 0.74 / 0.68), the held-out image
higher on 10 of 12 (within 0.01 dB on the other two), in the same time.
Def-Net's time scale halved for a series of 4 scans or fewer (time_sigma_halved_below 5; 2026-12-04,
docs/presets.md): with 4 scans, the held-out image +1.2 dB on the shrinking tumour (seeds 1, 2), +5.6 dB on 5
breathing phases, +4.2 dB on 5 chest phases, the TRE at the scans within 0.01 mm; with 5 scans halving cost
0.01-0.03 mm of TRE, so 5 or more keep 0.5.
Ref-Net's settings apply with `--prior refnet`: more, smaller batches and a cosine learning-rate
decay fit the reference better per second."""

PRESETS = {preset.name: preset for preset in (DEFAULT, PAPER)}


@dataclass(frozen=True)
class Options:
    """How to fit: preset, prior ('refnet' or 'image'; None: the preset's), continuous time or
    pairwise ("w/o t"), scheme ('long': reference -> each; 'short': previous -> next), pre-alignment ('auto': a
    rigid transform of each follow-up lying further than preprocessing.FAR_MM from the reference; 'none';
    'affine': an affine transform of every one), intensity normalisation ('auto', 'ct' or 'percentile':
    preprocessing.intensity_method), device and seed."""

    preset: Preset
    prior: str | None = None
    temporal: bool = True
    scheme: str = "long"
    prealign: str = "auto"
    intensity: str = "auto"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prior is None:
            object.__setattr__(self, "prior", self.preset.prior)

    @property
    def prior_is_volume(self) -> bool:
        """Whether Def-Net deforms a volume on the reference grid (the reference image, or Ref-Net's
        cached rendering), sampled with the preset's prior_interpolation, rather than Ref-Net itself."""
        return self.prior == "image" or self.preset.prior_cache

    def to_dict(self) -> dict:
        """The options as a run.json's parameters record them, the preset with every setting."""
        return {"preset": self.preset.to_dict(), "prior": self.prior, "temporal": self.temporal,
                "scheme": self.scheme, "prealign": self.prealign, "intensity": self.intensity,
                "device": self.device, "seed": self.seed}
