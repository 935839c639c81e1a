"""Paper eq. 6 (`guided_eps`) and the doubled-batch GuidedDenoiser (docs/design.md §3)."""
from __future__ import annotations

import pytest
import torch

from cfgengine import GuidedDenoiser, guided_eps, toy


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def eps_pair(batch: int, shape=(3, 5), seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((batch, *shape), generator=gen, dtype=dtype),
            torch.randn((batch, *shape), generator=gen, dtype=dtype))


@pytest.mark.parametrize("w", [0.0, 0.3, 4.0, -0.5])
def test_guided_eps_scalar_w_is_eq6(w):
    eps_c, eps_u = eps_pair(7)
    ref = (1 + w) * eps_c.double() - w * eps_u.double()
    assert rel_err(guided_eps(eps_c, eps_u, w), ref) < 1e-6


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-14),
                                        (torch.bfloat16, 2e-2)])
def test_guided_eps_per_sample_w_is_eq6_rowwise(dtype, tol):
    eps_c, eps_u = eps_pair(5, seed=1, dtype=dtype)
    w = torch.tensor([0.0, 0.1, 0.3, 1.0, 4.0])
    out = guided_eps(eps_c, eps_u, w)
    assert out.dtype == dtype and out.shape == eps_c.shape
    for i in range(5):
        ref = (1 + w[i].item()) * eps_c[i].double() - w[i].item() * eps_u[i].double()
        assert rel_err(out[i], ref) < tol


def test_guided_eps_zero_w_is_conditional():
    eps_c, eps_u = eps_pair(4, seed=2)
    assert torch.equal(guided_eps(eps_c, eps_u, 0.0), eps_c)
    assert torch.equal(guided_eps(eps_c, eps_u, torch.zeros(4)), eps_c)


class CountingNet(torch.nn.Module):
    """A Denoiser whose output depends on z, λ and the label; counts calls and records labels."""

    num_classes = 3
    sample_shape = (2, 3)
    clip = 1.0

    def __init__(self):
        super().__init__()
        self.calls: list[torch.Tensor] = []
        self.table = torch.nn.Parameter(torch.randn(self.num_classes + 1, 6,
                                                    generator=torch.Generator().manual_seed(0)))

    def forward(self, z, logsnr, labels):
        self.calls.append(labels.clone())
        bias = self.table[labels].reshape(-1, *self.sample_shape)
        return torch.tanh(z) * logsnr.reshape(-1, 1, 1) + bias


def denoiser_inputs(batch: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, 2, 3), generator=gen)
    logsnr = torch.rand(batch, generator=gen) * 40 - 20
    labels = torch.randint(0, 3, (batch,), generator=gen)
    return z, logsnr, labels


@pytest.mark.parametrize("batch", [1, 5])
def test_guided_denoiser_makes_one_doubled_forward(batch):
    net = CountingNet()
    z, logsnr, labels = denoiser_inputs(batch)
    GuidedDenoiser(net)(z, logsnr, labels)
    assert len(net.calls) == 1
    seen = net.calls[0]
    assert seen.shape == (2 * batch,)
    assert torch.equal(seen[:batch], labels)
    assert torch.equal(seen[batch:], torch.full((batch,), 3))


@pytest.mark.parametrize("batch", [1, 5])
def test_guided_denoiser_equals_separate_cond_and_null_forwards(batch):
    net = CountingNet()
    z, logsnr, labels = denoiser_inputs(batch, seed=4)
    with torch.no_grad():
        eps2 = GuidedDenoiser(net)(z, logsnr, labels)
        cond = net(z, logsnr, labels)
        null = net(z, logsnr, torch.full_like(labels, 3))
    assert eps2.shape == (2 * batch, 2, 3)
    torch.testing.assert_close(eps2[:batch], cond, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps2[batch:], null, rtol=1e-6, atol=1e-6)


def test_guided_denoiser_on_the_mixture_oracle(gmm):
    z, logsnr, _ = denoiser_inputs(4, seed=5)
    z = z[:, 0, :2].contiguous()
    labels = torch.tensor([0, 4, 2, 1])
    eps2 = GuidedDenoiser(gmm)(z, logsnr, labels)
    torch.testing.assert_close(eps2[:4], gmm(z, logsnr, labels))
    torch.testing.assert_close(eps2[4:], gmm(z, logsnr, torch.full((4,), 5)))


def test_guided_denoiser_carries_attributes():
    guided = GuidedDenoiser(CountingNet())
    assert (guided.num_classes, guided.sample_shape, guided.clip) == (3, (2, 3), 1.0)
    z, lam, labels = torch.zeros(4, 2, 3), torch.zeros(4), torch.tensor([0, 1, 2, 0])
    assert guided(z, lam, labels).shape[0] == 8  # the doubled batch: one forward of 2B rows
    assert isinstance(guided, torch.nn.Module)


def test_guided_denoiser_without_clip_attribute_has_none():
    class NoClip:
        num_classes = 2
        sample_shape = [4]

        def __call__(self, z, logsnr, labels):
            return z

    guided = GuidedDenoiser(NoClip())
    assert guided.clip is None and guided.sample_shape == (4,)
    assert GuidedDenoiser(toy.image_mixture()).clip == 1.0


def test_guided_denoiser_registers_a_module_net():
    net = CountingNet()
    params = list(GuidedDenoiser(net).parameters())
    assert len(params) == 1 and params[0] is net.table
