"""The bottom layer every layer may import: the fused activations and their derivatives.

Written in TorchScript's subset of Python (no postponed annotations, plain ``if`` chains), because
the modules' ``torch.jit.script`` branch calls :func:`activate`.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activate", "activation_derivative"]

#: Activations the fused path applies after the normalization (and the residual add).
ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu")


def activate(u: torch.Tensor, activation: str | None, negative_slope: float) -> torch.Tensor:
    """``act(u)`` for an activation name (``None``: identity), with PyTorch's definitions."""
    if activation is None:
        return u
    if activation == "relu":
        return torch.relu(u)
    if activation == "leaky_relu":
        return F.leaky_relu(u, negative_slope)
    if activation == "silu":
        return F.silu(u)
    return F.gelu(u)  # exact (erf) GELU


def activation_derivative(
    u: torch.Tensor, activation: str | None, negative_slope: float
) -> torch.Tensor:
    """``act'(u)`` elementwise, by PyTorch's conventions (ReLU' = [u > 0]).

    SiLU' = σ(u)·(1 + u·(1 − σ(u))); GELU' = Φ(u) + u·φ(u) (Hendrycks & Gimpel, 2016).
    """
    if activation is None:
        return torch.ones_like(u)
    if activation == "relu":
        return (u > 0).to(u.dtype)
    if activation == "leaky_relu":
        return torch.where(u > 0, 1.0, negative_slope).to(u.dtype)
    if activation == "silu":
        sig = torch.sigmoid(u)
        return sig * (1 + u * (1 - sig))
    cdf = 0.5 * (1 + torch.erf(u * (1 / math.sqrt(2))))  # Φ(u)
    pdf = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)  # φ(u)
    return cdf + u * pdf
