"""The prior Def-Net deforms: interpolation of a volume on the reference grid, and which prior a
preset asks for."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from STNeRPLib.integration import identity_grid
from STNeRPLib.presets import Options
from STNeRPLib.presets import DEFAULT, PAPER
from STNeRPLib import compiling, priors
from STNeRPLib.priors import ImagePrior, evaluate_on_grid

SHAPE = (9, 11, 13)  # D, H, W


def smooth_volume(shift_x: float = 0.0) -> np.ndarray:
    """An analytic smooth volume sampled at the voxel centres, moved by shift_x voxels along x."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    x = x + shift_x
    return np.sin(1.5 * x + 0.3 * y) + np.cos(0.7 * y - 0.5 * z) + 0.5 * np.sin(1.3 * x - 0.8 * z)


def to_unit(index_xyz: np.ndarray) -> torch.Tensor:
    """Voxel indices (x, y, z) -> grid_sample coordinates in [-1, 1]."""
    extent = np.array(SHAPE[::-1]) - 1
    return torch.from_numpy(2 * index_xyz / extent - 1).float()


@pytest.fixture(params=["kernel", *priors.LAYOUTS])
def cubic_layout(request, monkeypatch):
    """Every look-up of the cubic prior: numba's kernel (on the padded coefficients), and torch's passes on each layout
    of their table, 4 x 4 x 4 cubes, 4 x 4 (y, x) blocks and runs of 4, each the only one the budget allows."""
    if request.param != "kernel":
        monkeypatch.setattr(compiling, "numba", None)
        monkeypatch.setattr(priors, "LAYOUTS", priors.LAYOUTS[priors.LAYOUTS.index(request.param):])
    return request.param


def test_cubic_matches_scipy_bspline_inside_and_border_outside(cubic_layout):
    volume = np.random.default_rng(0).standard_normal(SHAPE)
    prior = ImagePrior(torch.from_numpy(volume).float(), "cubic")
    index = np.random.default_rng(1).uniform(-2, np.array(SHAPE[::-1]) + 1, (400, 3))
    clamped = np.clip(index, 0, np.array(SHAPE[::-1]) - 1)
    expected = ndimage.map_coordinates(volume, clamped[:, ::-1].T, order=3, mode="mirror")
    np.testing.assert_allclose(prior(to_unit(index)).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_prior_reproduces_the_volume_at_voxel_centres(interpolation):
    volume = torch.from_numpy(np.random.default_rng(2).standard_normal(SHAPE)).float()
    prior = ImagePrior(volume, interpolation)
    np.testing.assert_allclose(evaluate_on_grid(prior, SHAPE).numpy(), volume.numpy(), atol=1e-5)


def test_cubic_gradient_matches_finite_differences(cubic_layout):
    prior = ImagePrior(torch.from_numpy(smooth_volume()).double(), "cubic")
    c = (identity_grid(SHAPE, dtype=torch.float64).reshape(-1, 3)[::7] * 0.9 + 0.013).requires_grad_(True)
    prior(c).sum().backward()
    step = 1e-6
    for axis in range(3):
        offset = torch.zeros(3, dtype=torch.float64)
        offset[axis] = step
        numeric = (prior(c.detach() + offset) - prior(c.detach() - offset)) / (2 * step)
        np.testing.assert_allclose(c.grad[:, axis].numpy(), numeric.numpy(), rtol=1e-4, atol=1e-6)


def test_cubic_gradient_is_zero_where_the_border_value_holds():
    prior = ImagePrior(torch.from_numpy(smooth_volume()).float(), "cubic")
    c = torch.tensor([[1.3, 0.2, -0.1], [0.1, -1.2, 0.3], [0.0, 0.4, 1.5], [0.2, 0.1, -0.3]], requires_grad=True)
    prior(c).sum().backward()
    assert torch.all(c.grad[[0, 1, 2], [0, 1, 2]] == 0)      # each point outside along one axis only
    assert torch.all(c.grad[3] != 0) and torch.all(c.grad[:3].sum(dim=1) != 0)


def test_cubic_look_ups_of_any_size_in_turn_give_each_its_own_values(cubic_layout):
    """The look-up's workspace is kept between calls: a smaller call after a larger, then a larger again, reads
    only its own points, and a value returned earlier is not overwritten."""
    volume = np.random.default_rng(3).standard_normal(SHAPE)
    prior = ImagePrior(torch.from_numpy(volume).float(), "cubic")
    points = [to_unit(np.random.default_rng(4 + k).uniform(0, np.array(SHAPE[::-1]) - 1, (n, 3)))
              for k, n in enumerate((300, 7, 1000))]
    values = [prior(c) for c in points]
    for c, value in zip(points, values):
        alone = ImagePrior(torch.from_numpy(volume).float(), "cubic")(c)          # a workspace of its own
        np.testing.assert_array_equal(value.numpy(), alone.numpy())


def test_cubic_values_are_the_same_with_and_without_a_gradient():
    prior = ImagePrior(torch.from_numpy(smooth_volume()).float(), "cubic")
    c = identity_grid(SHAPE).reshape(-1, 3)[::5] * 0.97 + 0.011
    with torch.no_grad():
        plain = prior(c)
    np.testing.assert_array_equal(prior(c.clone().requires_grad_(True)).detach().numpy(), plain.numpy())


def test_torchs_cubic_table_takes_the_longest_runs_within_the_budget(monkeypatch):
    monkeypatch.setattr(compiling, "numba", None)
    depth, height, width = SHAPE
    cubes, blocks = depth * height * width * 64, (depth + 3) * height * width * 16   # coefficients of each layout
    monkeypatch.setattr(priors, "TABLE_BYTES", cubes * 4)
    assert ImagePrior(torch.zeros(SHAPE), "cubic").entries.shape == (depth * height * width, 64)
    monkeypatch.setattr(priors, "TABLE_BYTES", cubes * 4 - 1)
    assert ImagePrior(torch.zeros(SHAPE), "cubic").entries.shape == ((depth + 3) * height * width, 16)
    monkeypatch.setattr(priors, "TABLE_BYTES", blocks * 4 - 1)
    assert ImagePrior(torch.zeros(SHAPE), "cubic").entries.shape[1] == 4


def test_runs_of_4_are_read_from_the_padded_coefficients_themselves(monkeypatch):
    """Beyond the budget of 4 x 4 blocks the table is the spline's coefficients padded by 1 before and 2 after along
    each axis, no copy of them: 4 bytes a (padded) voxel, a quarter of a table of separate runs, and so counted.
    They are what numba's kernel reads, whatever the budget (here cubes would fit it)."""
    volume = torch.from_numpy(np.random.default_rng(5).standard_normal(SHAPE)).float()
    padded = tuple(n + 3 for n in SHAPE)
    coefficients = ndimage.spline_filter(volume.double().numpy(), order=3, mode="mirror")
    expected = np.pad(coefficients, [(1, 2)] * 3, mode="reflect").astype(np.float32)
    with monkeypatch.context() as patched:
        patched.setattr(compiling, "numba", None)
        patched.setattr(priors, "LAYOUTS", priors.LAYOUTS[-1:])
        torchs = ImagePrior(volume, "cubic")
        assert priors.table_bytes(SHAPE) == np.prod(padded) * 4
    kernels = ImagePrior(volume, "cubic")
    for prior in (torchs, kernels):
        assert prior.table.shape == (np.prod(padded),)
        np.testing.assert_array_equal(prior.table.numpy().reshape(padded), expected)
    assert priors.table_bytes(SHAPE) == np.prod(padded) * 4


def best_shift(interpolation: str, true_shift: float) -> float:
    """The x shift (voxels) minimising the MSE between the prior moved by it and the moved volume,
    over the interior voxels: the sub-voxel bias of a registration against this prior."""
    prior = ImagePrior(torch.from_numpy(smooth_volume()).float(), interpolation)
    target = smooth_volume(true_shift)[2:-2, 2:-2, 2:-3]
    z, y, x = np.meshgrid(*(np.arange(2, n - 2 - (i == 2)) for i, n in enumerate(SHAPE)), indexing="ij")
    centres = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(np.float64)
    candidates = np.linspace(true_shift - 0.3, true_shift + 0.3, 601)
    losses = [np.mean((prior(to_unit(centres + [s, 0, 0])).numpy() - target.reshape(-1)) ** 2) for s in candidates]
    return float(candidates[int(np.argmin(losses))])


def test_cubic_prior_has_less_sub_voxel_bias_than_trilinear():
    cubic, linear = best_shift("cubic", 0.3), best_shift("linear", 0.3)
    assert abs(cubic - 0.3) < 0.01, cubic
    assert abs(linear - 0.3) > 3 * abs(cubic - 0.3), (linear, cubic)


def test_unknown_interpolation_is_refused():
    with pytest.raises(ValueError, match="linear"):
        ImagePrior(torch.zeros(SHAPE), "nearest")


def test_options_take_the_presets_prior_unless_given():
    assert Options(DEFAULT).prior == DEFAULT.prior == "image"
    assert Options(PAPER).prior == PAPER.prior == "refnet"
    assert PAPER.prior_interpolation == "linear", "the paper's 'w/o prior' samples trilinearly"
    assert Options(DEFAULT, prior="refnet").prior == "refnet"
    assert Options(DEFAULT).to_dict()["prior"] == "image"
