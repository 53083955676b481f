"""Scaling and squaring: diffeomorphic on random smooth velocities, exact for translations, and
integrating -v gives the inverse."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from STNeRPLib.integration import compose, identity_grid, sample, scaling_and_squaring
from STNeRPLib.presets import DEFAULT, PAPER


def smooth_velocity(shape, amplitude, seed):
    """A random smooth velocity: coarse noise upsampled, in grid_sample units."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=generator)
    return amplitude * F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def jacobian_determinants(displacement):
    """det(I + du/dx) on the grid, in grid units (numpy central differences)."""
    u = displacement[0].numpy()                        # [3 (x,y,z), D, H, W]
    shape = u.shape[1:]
    steps = [2 / (n - 1) for n in shape]               # z, y, x spacing in grid units
    jac = np.zeros(shape + (3, 3))
    for row in range(3):
        dz, dy, dx = np.gradient(u[row], *steps)
        jac[..., row, :] = np.stack([dx, dy, dz], axis=-1)
    return np.linalg.det(jac + np.eye(3))


def test_zero_velocity_is_identity():
    assert torch.equal(scaling_and_squaring(torch.zeros(1, 3, 5, 6, 7), 7), torch.zeros(1, 3, 5, 6, 7))


def test_constant_velocity_is_a_translation():
    velocity = torch.zeros(1, 3, 8, 8, 8)
    velocity[:, 0], velocity[:, 2] = 0.1, -0.05
    assert torch.allclose(scaling_and_squaring(velocity, 7), velocity, atol=1e-6)


@pytest.mark.parametrize("steps", sorted({DEFAULT.squaring_steps, PAPER.squaring_steps}))
def test_no_folding_on_random_smooth_velocities(steps):
    for seed in range(5):
        velocity = smooth_velocity((24, 24, 24), 0.3, seed)
        assert jacobian_determinants(velocity).min() < -1                 # used as a displacement it folds...
        det = jacobian_determinants(scaling_and_squaring(velocity, steps))
        assert det.min() > 0, f"seed {seed}: folded"                      # ...its exponential does not


def test_the_default_squaring_steps_integrate_a_one_node_motion_within_0_004_node_of_the_converged_exponential():
    """The series' motion is up to about one node of the velocity grid (15 mm on 16 mm); there the default's
    steps are 0.002-0.003 node from 12 steps' exponential (4 steps: 0.004-0.005, the paper's 7: 0.0006)."""
    node = 2 / 23
    for seed in range(5):
        velocity = smooth_velocity((24, 24, 24), 0.03, seed)
        converged = scaling_and_squaring(velocity, 12)
        assert converged.abs().max() > 0.8 * node
        error = (scaling_and_squaring(velocity, DEFAULT.squaring_steps) - converged).abs().max() / node
        assert error < 0.004, f"seed {seed}: {error:.4f} node"


def test_negative_velocity_gives_the_inverse():
    velocity = smooth_velocity((32, 32, 32), 0.15, seed=7)
    forward = scaling_and_squaring(velocity, 7)
    backward = scaling_and_squaring(-velocity, 7)
    residual = compose(forward, backward)[:, :, 4:-4, 4:-4, 4:-4].abs() / (2 / 31)   # in voxels
    assert forward.abs().max() > 5 * 2 / 31                             # a deformation of > 5 voxels...
    assert residual.mean() < 0.02 and residual.max() < 0.25             # ...undone (measured: 0.009, 0.18)


def test_sample_matches_grid_values_at_grid_points():
    volume = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)
    points = identity_grid((4, 5, 6)).reshape(1, -1, 3)
    assert torch.allclose(sample(volume, points)[0, :, 0], volume.reshape(-1), atol=1e-4)


@pytest.mark.parametrize("threads", [2, 3])
def test_many_points_sampled_on_several_threads_take_each_points_one_thread_value(threads):
    """sample shares one batch of PARALLEL_POINTS or more points (here not a multiple of the threads, some
    beyond the grid) among torch's threads as batches of its own: every point's value is the one it has on
    one thread, bit for bit, and in its place."""
    from STNeRPLib.integration import PARALLEL_POINTS

    volume = smooth_velocity((9, 11, 10), 1.0, seed=5)
    points = torch.rand(1, PARALLEL_POINTS + 7, 3, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = sample(volume, points)
        torch.set_num_threads(threads)
        shared = sample(volume, points)
    finally:
        torch.set_num_threads(before)
    assert shared.shape == (1, PARALLEL_POINTS + 7, 3)
    assert torch.equal(shared, alone)


def test_fixed_point_inverse_leaves_each_point_within_tolerance_whatever_points_it_is_inverted_with():
    """warping.invert stops each point once converged: every point's forward map returns it to
    where it started to within INVERSE_TOLERANCE, and a point's result does not depend on the batch."""
    from STNeRPLib.warping import INVERSE_TOLERANCE, invert

    shape = (12, 14, 10)
    velocity = smooth_velocity(shape, 0.08, seed=3)
    forward, start = scaling_and_squaring(velocity, 7), scaling_and_squaring(-velocity, 7)
    c = torch.rand(1, 4000, 3, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    w = invert(forward, start, c)
    residual = (w + sample(forward, c + w)).abs().max()
    start_error = (sample(start, c) + sample(forward, c + sample(start, c))).abs().max()
    assert start_error > 100 * INVERSE_TOLERANCE     # exp(-v) alone is not the inverse here
    assert residual <= INVERSE_TOLERANCE
    alone = torch.cat([invert(forward, start, c[:, i:i + 500]) for i in range(0, 4000, 500)], dim=1)
    assert torch.equal(alone, w)
