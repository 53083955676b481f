"""Random Fourier feature encoding of coordinates (Tancik et al. 2020; paper eq. 2)."""
from __future__ import annotations

import math

import torch
from torch import nn


class FourierFeatures(nn.Module):
    """gamma(p) = [cos(2 pi B p), sin(2 pi B p)] with fixed B ~ N(0, sigma^2), B of shape (width, d).

    Expects coordinates in [0, 1] (the paper's normalised grid and time); returns 2 * width features.
    `sigma` is one value for every coordinate, or one per coordinate.
    """

    B: torch.Tensor

    def __init__(self, in_features: int, width: int, sigma: float | tuple[float, ...],
                 generator: torch.Generator) -> None:
        super().__init__()
        scale = torch.as_tensor(sigma, dtype=torch.float32).expand(in_features)
        self.register_buffer("B", torch.randn(width, in_features, generator=generator) * scale)

    @property
    def out_features(self) -> int:
        """Number of features gamma(p) has: 2 * width."""
        return 2 * self.B.shape[0]

    def forward(self, p: torch.Tensor, columns: int | None = None) -> torch.Tensor:
        """gamma(p) for p (N, d); with `columns` k, of the first k coordinates alone (p is (N, k))."""
        projection = (2 * math.pi) * p @ self.B[:, :columns].T
        return torch.cat([torch.cos(projection), torch.sin(projection)], dim=-1)
