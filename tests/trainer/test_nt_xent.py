"""NT-Xent against a plain float64 loop over anchors, and its gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.losses import nt_xent_loss


def reference_nt_xent(z_a: np.ndarray, z_b: np.ndarray, temperature: float) -> float:
    """SimCLR Eq. 1 written out: for each of the 2N anchors, -log(exp(s_pos/T) / sum_{k != i} exp(s_ik/T))."""
    z = [np.asarray(v, dtype=np.float64) for v in (*z_a, *z_b)]
    z = [v / math.sqrt(sum(x * x for x in v)) for v in z]
    two_n, n = len(z), len(z_a)
    total = 0.0
    for i in range(two_n):
        positive = (i + n) % two_n
        sims = {k: float(sum(a * b for a, b in zip(z[i], z[k]))) / temperature for k in range(two_n) if k != i}
        denominator = sum(math.exp(s) for s in sims.values())
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / two_n


@pytest.mark.parametrize(
    ("n", "d", "temperature"), [(1, 3, 0.5), (2, 3, 0.1), (5, 16, 0.5), (8, 7, 1.0), (16, 32, 0.07)]
)
def test_matches_float64_loop_on_random_inputs(n: int, d: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(n * 100 + d)
    z_a, z_b = torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)
    expected = reference_nt_xent(z_a.numpy(), z_b.numpy(), temperature)
    assert nt_xent_loss(z_a.double(), z_b.double(), temperature).item() == pytest.approx(expected, rel=1e-6)
    assert nt_xent_loss(z_a, z_b, temperature).item() == pytest.approx(expected, rel=1e-5)  # float32 path


def test_matches_float64_loop_on_real_images(photos: np.ndarray) -> None:
    # Two "views" of 12 real photo patches: the pixels and their horizontal mirror, flattened.
    x = photos[:12].astype(np.float64) / 255 - 0.5  # [12, 32, 32, 3]
    z_a, z_b = x.reshape(12, -1)[:, ::16], x[:, :, ::-1].reshape(12, -1)[:, ::16]
    expected = reference_nt_xent(z_a, z_b, 0.2)
    got = nt_xent_loss(torch.from_numpy(z_a.copy()), torch.from_numpy(z_b.copy()), 0.2).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_perfectly_separated_views_give_the_minimum() -> None:
    # Orthogonal images, identical views: loss -> log(1 + (2N-2) exp(-1/T) / exp(1/T)) at s_pos=1, s_neg=0.
    n, t = 4, 0.5
    z = torch.eye(n, dtype=torch.float64)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert nt_xent_loss(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-12)


def test_stable_at_tiny_temperature_and_scale_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    loss = nt_xent_loss(z_a, z_b, 1e-3)
    assert torch.isfinite(loss)
    assert nt_xent_loss(z_a * 1e3, z_b * 1e-3, 0.3).item() == pytest.approx(
        nt_xent_loss(z_a, z_b, 0.3).item(), rel=1e-5
    )


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(2)
    z_a = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    z_b = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, 0.3), (z_a, z_b))


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        nt_xent_loss(torch.zeros(3, 4), torch.zeros(2, 4), 0.5)
