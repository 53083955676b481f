"""SIREN's sine activation as one operation: the same numbers and derivatives as torch's own."""
import torch

from STNeRPLib.networks import ScaledSine


def test_scaled_sine_matches_torch_in_value_and_derivative():
    z = (torch.randn(3600, 128, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_(True)
    out = ScaledSine.apply(z, 10.0)
    weight = torch.rand(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    expected = torch.sin(10.0 * z.detach())
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-7)
    torch.testing.assert_close(z.grad, weight * 10.0 * torch.cos(10.0 * z.detach()), rtol=0, atol=4e-6)


def test_scaled_sine_passes_gradcheck_in_double_precision():
    z = torch.randn(40, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ScaledSine.apply(x, 30.0), (z,))


def test_scaled_sine_takes_a_dtype_numpy_lacks():
    z = torch.linspace(-1, 1, 64, dtype=torch.bfloat16, requires_grad=True)
    out = ScaledSine.apply(z, 10.0)
    out.sum().backward()
    torch.testing.assert_close(out, torch.sin(10.0 * z.detach()))
    torch.testing.assert_close(z.grad, 10.0 * torch.cos(10.0 * z.detach()))
