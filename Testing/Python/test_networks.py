"""SIREN's sine activation as one operation, and Def-Net with time folded into its first layer: the
same numbers and derivatives as the plain computation."""
import pytest
import torch

from STNeRPLib.networks import DefNet, ScaledSine


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


def _row_by_row(net: DefNet, c: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The network as its definition reads: the Fourier features of each (c, t) row, then the SIREN."""
    rows = [(c + 1) / 2]
    if net.temporal:
        rows = [torch.cat([(c + 1) / 2, t.expand(len(c), 1)], dim=1) for t in times]
    return torch.stack([net.mlp(net.encoding(p)) for p in rows])


@pytest.mark.parametrize("temporal", [True, False])
def test_def_net_folding_time_into_its_first_layer_is_the_row_by_row_network(temporal):
    net = DefNet(32, 3, 16, 2.0, 0.5, 10.0, temporal=temporal, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        net.mlp[-1].weight.mul_(100.0)             # SIREN's small output layer would hide a difference
    c = torch.rand(500, 3, generator=torch.Generator().manual_seed(4)) * 2 - 1
    times = torch.tensor([0.0, 0.37, 1.0]) if temporal else torch.tensor([0.5])
    folded = net(c, times, chunk=128)
    folded.square().sum().backward()
    folded_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    expected = _row_by_row(net, c, times)
    expected.square().sum().backward()
    assert folded.shape == (len(times), 500, 3)
    assert float(expected.detach().abs().max()) > 0.1
    torch.testing.assert_close(folded, expected, rtol=0, atol=2e-5)
    for got, wanted in zip(folded_grads, (p.grad for p in net.parameters())):
        torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-4)
