"""A short, real demonstration: an MLP on scikit-learn's bundled digits, with and without BN.

Run with ``python -m batchnorm.demo`` (``make demo``). Trains the same 3-layer sigmoid network
twice from the same initial weights, once with :class:`batchnorm.BatchNorm1d` before each
sigmoid, and prints the test accuracy of both every few steps.
"""

from __future__ import annotations

import torch
from torch import nn

from batchnorm import BatchNorm1d


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1], split 80/20; returns ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(data.target, dtype=torch.long)  # (1797,)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def _mlp(use_bn: bool, seed: int) -> nn.Sequential:
    """3 hidden layers of 100 sigmoid units, Gaussian init std 0.1, BN before each sigmoid."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width_in = 64
    for _ in range(3):
        linear = nn.Linear(width_in, 100, bias=not use_bn)
        nn.init.normal_(linear.weight, std=0.1)
        layers += [linear, BatchNorm1d(100) if use_bn else nn.Identity(), nn.Sigmoid()]
        width_in = 100
    layers.append(nn.Linear(width_in, 10))
    return nn.Sequential(*layers)


def main(steps: int = 600, every: int = 100, seed: int = 0) -> dict[str, list[float]]:
    """Trains both networks with SGD (batch 60, lr 0.5) and prints their accuracy curves.

    Args:
        steps: SGD steps per network.
        every: evaluate the test accuracy every this many steps.
        seed: seed of the data split, the weights and the batches.

    Returns:
        ``{"no BN": [...], "BN": [...]}``, test accuracy after each evaluation.
    """
    x_train, y_train, x_test, y_test = _digits(seed)
    curves: dict[str, list[float]] = {}
    for label, use_bn in (("no BN", False), ("BN", True)):
        model = _mlp(use_bn, seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        batches = torch.Generator().manual_seed(seed)
        curve = []
        for step in range(1, steps + 1):
            model.train()
            index = torch.randint(len(x_train), (60,), generator=batches)  # (60,)
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % every == 0:
                model.eval()
                with torch.no_grad():
                    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
                curve.append(accuracy)
        curves[label] = curve
    print(f"Test accuracy on scikit-learn digits every {every} steps (SGD, batch 60, lr 0.5):")
    print(f"{'step':>6} " + " ".join(f"{label:>7}" for label in curves))
    for i in range(steps // every):
        print(f"{(i + 1) * every:>6} " + " ".join(f"{c[i]:>7.3f}" for c in curves.values()))
    return curves


if __name__ == "__main__":
    main()
