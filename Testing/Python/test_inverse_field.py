"""The exported inverse field (reference -> time t, on the reference grid): forward then inverse
returns time-t points to where they started, with and without affine pre-alignment, and it
carries reference landmarks onto the time-t landmarks as well as the forward field carries
time-t landmarks onto the reference ones."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib.model import SeriesModel
from STNeRPLib.warping import map_to_reference
from STNeRPLib.metrics import map_points, target_registration_error
from STNeRPLib.phantom import breathing_series, write_series
from worker_cli import stnerp


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    series = breathing_series(size=(48, 48, 40), spacing=(3.0, 3.0, 3.0), n_phases=3, noise_hu=0)
    return series, write_series(series, tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module", params=["none", "affine"])
def run(request, phantom, tmp_path_factory):
    series, files = phantom
    output = tmp_path_factory.mktemp("runs") / request.param
    args = ["train", "--reference", files["images"][0], "--output", output, "--iterations", "60",
            "--prior", "image", "--prealign", request.param, "--landmarks", files["landmarks"], "--no-report"]
    for path, t in zip(files["images"][1:], series.times[1:]):
        args += ["--follow-up", path, t]
    result = stnerp(*args)
    assert result.returncode == 0, result.stderr
    return series, output, json.loads((output / "run.json").read_text())


def fields(output, entry) -> tuple[sitk.Image, sitk.Image]:
    return (sitk.ReadImage(str(output / entry["displacement"])),
            sitk.ReadImage(str(output / entry["inverse_displacement"])))


def test_inverse_field_lies_on_the_reference_grid(run):
    series, output, record = run
    reference = series.images[0]
    for entry in record["time_points"]:
        _, inverse = fields(output, entry)
        assert inverse.GetNumberOfComponentsPerPixel() == 3
        assert inverse.GetSize() == reference.GetSize()
        assert np.allclose(inverse.GetOrigin(), reference.GetOrigin())
        assert np.allclose(inverse.GetSpacing(), reference.GetSpacing())
        assert np.allclose(inverse.GetDirection(), reference.GetDirection())


def body_points(image: sitk.Image, count: int = 400) -> np.ndarray:
    """LPS points of `count` voxel centres inside the body (> -500 HU), away from the border."""
    body = np.argwhere(sitk.GetArrayFromImage(image)[2:-2, 2:-2, 2:-2] > -500) + 2   # [z, y, x]
    chosen = body[np.linspace(0, len(body) - 1, count).astype(int)]
    return np.array([image.TransformIndexToPhysicalPoint([int(i) for i in v[::-1]]) for v in chosen])


def test_inverse_samples_invert_the_model_map_exactly(run):
    """At reference voxels r (no interpolation of the file): the model's forward map takes
    r + w(r) back to r."""
    series, output, record = run
    model = SeriesModel.load(output / record["model"], torch.device("cpu"))
    reference = series.images[0]
    for entry in record["time_points"][1:]:
        _, inverse = fields(output, entry)
        r = body_points(reference)
        index = np.array([reference.TransformPhysicalPointToIndex(tuple(p)) for p in r])
        w = sitk.GetArrayFromImage(inverse)[index[:, 2], index[:, 1], index[:, 0]]
        prealignment = np.array(entry["prealignment"]) if entry["prealignment"] else None
        back = map_to_reference(model, entry["time"], r + w, prealignment)
        assert np.linalg.norm(w, axis=1).max() > 2.0
        assert np.linalg.norm(back - r, axis=1).max() < 0.05


def test_forward_then_inverse_returns_points_inside_the_body(run):
    series, output, record = run
    for k, entry in enumerate(record["time_points"][1:], 1):
        forward, inverse = fields(output, entry)
        points = body_points(series.images[k])
        reference_points = map_points(forward, points)
        moved = np.linalg.norm(reference_points - points, axis=1).max()
        back = map_points(inverse, reference_points)
        error = np.linalg.norm(back - points, axis=1)
        assert moved > 2.0, moved                      # the test means something: points moved
        # Both files are sampled on 3 mm voxels and interpolated linearly; the model's map is
        # piecewise trilinear on its coarse velocity grid, so interpolation errs most at its kinks.
        assert np.quantile(error, 0.95) < 0.05 and error.mean() < 0.01 and error.max() < 0.15, (k, error.max(), moved)


def test_inverse_maps_reference_landmarks_to_time_t_landmarks(run):
    series, output, record = run
    for entry in record["time_points"][1:]:
        points, reference_points = series.landmarks[series.times.index(entry["time"])]
        _, inverse = fields(output, entry)
        inverse_tre = target_registration_error(map_points(inverse, reference_points), points)["tre_mean"]
        unregistered = target_registration_error(reference_points, points)["tre_mean"]
        forward_tre = entry["metrics"]["tre_mean"]
        assert inverse_tre < 0.5 * unregistered, (inverse_tre, unregistered)
        assert abs(inverse_tre - forward_tre) < 0.25 * unregistered, (inverse_tre, forward_tre)


def test_inverse_of_points_taken_in_chunks_equals_all_at_once(monkeypatch):
    from STNeRPLib import warping
    from STNeRPLib.integration import scaling_and_squaring
    velocity = torch.randn(1, 3, 6, 7, 8, generator=torch.Generator().manual_seed(0)) * 0.05
    forward, start = scaling_and_squaring(velocity, 7), scaling_and_squaring(-velocity, 7)
    c = torch.rand(1, 1000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    whole = warping.invert(forward, start, c)
    monkeypatch.setattr(warping, "INVERSE_CHUNK", 37)
    chunked = warping.invert(forward, start, c)
    assert chunked.shape == (1, 1000, 3)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    residual = (whole + warping.sample(forward, c + whole)).abs().max()
    assert residual < 1e-5, residual


def test_inverse_converges_where_the_map_expands_nearly_twofold():
    """A radial expansion about a point, u(x) = 0.9 d exp(-|d|^2 / 2 s^2) (d from the centre, grid_sample units; a
    shrunken tumour seen from its larger reference shape): grad u is 0.9 at the centre, where the plain iteration
    w <- -u(x + w) contracts by only 0.9 a step (on the shrinking tumour's fit it fell into a 2-cycle, up to 0.85 mm
    off). Every point must still come back to within 1e-5 units, as everywhere else."""
    from STNeRPLib import warping
    from STNeRPLib.integration import identity_grid

    x = identity_grid((33, 33, 33)).permute(0, 4, 1, 2, 3)               # [1, 3, D, H, W], (x, y, z) channels
    d = x - torch.tensor([0.1, -0.05, 0.0]).view(1, 3, 1, 1, 1)
    forward = 0.9 * d * torch.exp(-(d ** 2).sum(1, keepdim=True) / (2 * 0.3 ** 2))
    c = torch.rand(1, 4000, 3, generator=torch.Generator().manual_seed(2)) * 1.2 - 0.6
    w = warping.invert(forward, torch.zeros_like(forward), c)
    residual = (w + warping.sample(forward, c + w)).abs().amax(dim=2)
    assert residual.max() <= 2 * warping.INVERSE_TOLERANCE, residual.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["smooth", "expanding nearly twofold"])
def test_the_kernel_inverts_to_the_bit_as_torchs_passes(case, dtype, monkeypatch):
    """trilinear.inverse (numba, each point iterated on its own) gives warping's passes of torch's sampling to the bit:
    a smooth map from exp(-v), and the radial expansion whose points need the damped steps; points up to 20 % beyond
    the grid (sampled at its border)."""
    from STNeRPLib import compiling, trilinear, warping
    from STNeRPLib.integration import identity_grid, scaling_and_squaring

    generator = torch.Generator().manual_seed(3)
    if case == "smooth":
        velocity = torch.randn(1, 3, 6, 7, 8, generator=generator, dtype=dtype) * 0.05
        forward, start = scaling_and_squaring(velocity, 7), scaling_and_squaring(-velocity, 7)
    else:
        x = identity_grid((33, 33, 33)).permute(0, 4, 1, 2, 3).to(dtype)
        d = x - torch.tensor([0.1, -0.05, 0.0], dtype=dtype).view(1, 3, 1, 1, 1)
        forward = 0.9 * d * torch.exp(-(d ** 2).sum(1, keepdim=True) / (2 * 0.3 ** 2))
        start = torch.zeros_like(forward)
    c = torch.rand(1, 5000, 3, generator=generator, dtype=dtype) * 2.4 - 1.2
    assert trilinear.inverts(forward, start, c)
    calls = []
    kernel = trilinear._inverse
    monkeypatch.setattr(trilinear, "_inverse", lambda *arguments: calls.append(1) or kernel(*arguments))
    kernels = warping.invert(forward, start, c)
    with monkeypatch.context() as patched:
        patched.setattr(compiling, "numba", None)
        assert not trilinear.inverts(forward, start, c)
        torchs = warping.invert(forward, start, c)
    assert calls and kernels.dtype == dtype and torch.equal(kernels, torchs)
    assert (kernels - warping.sample(start, c)).abs().max() > 10 * warping.INVERSE_TOLERANCE     # it iterated


def test_a_start_not_a_number_inverts_as_torchs_passes_do(monkeypatch):
    """A diverged fit's field (not a number in the start): torch's sampling clips a coordinate not a number to the
    last node (border padding) and the point goes on from there; the kernel does the same, to the bit (it gave not a
    number, its index arithmetic fed a NaN's conversion to an integer)."""
    from STNeRPLib import compiling, warping
    from STNeRPLib.integration import scaling_and_squaring

    velocity = torch.randn(1, 3, 6, 7, 8, generator=torch.Generator().manual_seed(5)) * 0.05
    forward, start = scaling_and_squaring(velocity, 7), scaling_and_squaring(-velocity, 7)
    start[0, :, 2, 3, 4] = float("nan")
    c = torch.rand(1, 300, 3, generator=torch.Generator().manual_seed(6)) * 2 - 1
    kernels = warping.invert(forward, start, c)
    with monkeypatch.context() as patched:
        patched.setattr(compiling, "numba", None)
        torchs = warping.invert(forward, start, c)
    assert torch.isnan(warping.sample(start, c)).any(dim=2).sum() > 5          # points whose start is not a number
    assert torch.equal(kernels, torchs)


def oblique_or_not(direction: str):
    """A 13 x 11 x 9 reference grid (axis-aligned, or oblique with no zero entry and an axis flipped), a displacement
    that carries points beyond it, and two inverse maps on the displacement grid (one started from exp(-v), one
    from 0), as warping holds them."""
    from STNeRPLib import warping
    from STNeRPLib.geometry import Grid
    from STNeRPLib.integration import scaling_and_squaring

    rotation = sitk.VersorTransform((1.0, 2.0, 3.0), np.radians(40)).GetMatrix()
    matrix = np.eye(3) if direction == "axis-aligned" else np.reshape(rotation, (3, 3)) @ np.diag([-1, 1, 1])
    grid = Grid((13, 11, 9), (1.5, 2.0, 3.0), (-20.0, 31.0, 7.5), tuple(matrix.ravel()))
    generator = torch.Generator().manual_seed(7)
    displacement = torch.randn(1, 3, 4, 5, 6, generator=generator) * 0.3
    velocities = [torch.randn(1, 3, 4, 5, 6, generator=generator) * 0.05 for _ in range(2)]
    then = [warping.InverseMap(scaling_and_squaring(velocities[0], 5), scaling_and_squaring(-velocities[0], 5)),
            warping.InverseMap(scaling_and_squaring(velocities[1], 5), torch.zeros(1, 3, 3, 3, 3))]
    return grid, displacement, then


def on_kernels_and_torchs(monkeypatch, count: int, kernel_name: str, compute):
    """compute() on `count` threads by numba's kernels (the kernel `kernel_name` seen called), then by torch."""
    from STNeRPLib import compiling, threads, trilinear

    monkeypatch.setattr(threads, "_applied", threads.ThreadChoice(count, count, count, None, 0.0, count))
    calls = []
    kernel = getattr(trilinear, kernel_name)
    monkeypatch.setattr(trilinear, kernel_name, lambda *arguments: calls.append(1) or kernel(*arguments))
    kernels = compute()
    with monkeypatch.context() as patched:
        patched.setattr(compiling, "numba", None)
        torchs = compute()
    assert calls
    return kernels, torchs


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("direction", ["axis-aligned", "oblique, an axis flipped"])
def test_the_kernel_maps_the_reference_grids_voxels_to_the_bit_as_torch(direction, count, monkeypatch):
    """The outputs' voxels of the reference grid mapped by trilinear.mapped (each point in one pass) give torch's
    sampling, inversions and products to the bit: the continuous indices and mm displacements of c + u(c) and of
    c + u(c) + w through two inverse maps, a slab not starting at slice 0, points carried beyond the grid, on 1 and 2
    threads."""
    from STNeRPLib import warping

    grid, displacement, then = oblique_or_not(direction)
    kernels, torchs = on_kernels_and_torchs(
        monkeypatch, count, "_mapped", lambda: warping._on_reference_grid(grid, (2, 7), displacement, then))
    assert len(kernels) == len(torchs) == 3
    for mine, theirs in zip(kernels, torchs):
        assert mine.index.dtype == np.float64 and mine.mm.dtype == np.float32
        assert np.array_equal(mine.index, theirs.index) and np.array_equal(mine.mm, theirs.mm)
    beyond = (kernels[0].index < 0) | (kernels[0].index > np.array(grid.size) - 1)
    assert beyond.any(axis=1).sum() > 20                                    # carried beyond the grid
    assert np.abs(kernels[1].mm - kernels[0].mm).max() > 0.1                  # the inverses moved the points on


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("direction", ["axis-aligned", "oblique, an axis flipped"])
def test_the_kernel_writes_the_inverse_field_to_the_bit_as_torch(direction, count, monkeypatch):
    """inverse_displacement's slab on the reference grid by trilinear.inverse_in_mm (each point inverted and turned
    into mm in one pass) is torch's inversion and product to the bit, for both inverse maps, on 1 and 2 threads."""
    from STNeRPLib import warping

    grid, _, then = oblique_or_not(direction)
    count_points = 5 * grid.size[0] * grid.size[1]
    for inverse_t in then:
        def inverse_field() -> np.ndarray:
            out = np.full((count_points, 3), np.nan, np.float32)
            warping._inverse_on_reference_grid(grid, (2, 7), inverse_t, out)
            return out

        kernels, torchs = on_kernels_and_torchs(monkeypatch, count, "_inverse_in_mm", inverse_field)
        assert np.array_equal(kernels, torchs) and np.abs(kernels).max() > 0.1
