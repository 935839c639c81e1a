"""The UNet is a Denoiser (docs/design.md §3): shapes, dtypes, conditioning on λ and the null label K,
no leakage across the batch, and exportable with torch.export."""
import pytest
import torch

from cfgengine.unet import PRESETS, UNet, parameter_count, preset


def _tiny(num_classes: int = 3, seed: int = 0) -> UNet:
    """The tiny preset with every parameter random: zero-initialised output layers would hide
    the dependence on the inputs that these tests check."""
    torch.manual_seed(seed)
    net = UNet(preset("tiny", num_classes=num_classes, image_size=8, in_channels=2))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _inputs(n: int, net: UNet, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *net.sample_shape, generator=gen)
    logsnr = torch.empty(n).uniform_(-20, 20, generator=gen)
    labels = torch.randint(net.num_classes + 1, (n,), generator=gen)  # includes the null label
    return z, logsnr, labels


def test_tiny_preset_is_small_and_a_denoiser():
    net = _tiny()
    assert parameter_count(net) < 100_000
    assert (net.num_classes, net.sample_shape, net.clip) == (3, (2, 8, 8), 1.0)
    assert net.class_embed.num_embeddings == net.num_classes + 1  # row K is the null label


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_has_input_shape_and_dtype(dtype):
    net = _tiny()
    z, logsnr, labels = _inputs(5, net)
    eps = net(z.to(dtype), logsnr, labels)
    assert eps.shape == z.shape and eps.dtype == dtype and torch.isfinite(eps).all()


def test_fresh_network_predicts_zero():
    """Zero-initialised residual branches and output conv: training starts from ε_θ = 0."""
    net = UNet(preset("tiny", num_classes=3, image_size=8, in_channels=2))
    z, logsnr, labels = _inputs(4, net)
    assert torch.equal(net(z, logsnr, labels), torch.zeros_like(z))


def test_output_depends_on_logsnr_and_label():
    net = _tiny()
    z, logsnr, labels = _inputs(6, net)
    base = net(z, logsnr, labels)
    null = torch.full_like(labels, net.num_classes)
    assert (net(z, logsnr + 1.0, labels) - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    changed = labels != null
    assert (net(z, logsnr, null) - base)[changed].abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_rows_do_not_interact():
    """Sample i's ε must not depend on the other rows (the doubled batch relies on it)."""
    net = _tiny()
    z, logsnr, labels = _inputs(7, net)
    full = net(z, logsnr, labels)
    single = torch.cat([net(z[i:i + 1], logsnr[i:i + 1], labels[i:i + 1]) for i in range(7)])
    torch.testing.assert_close(full, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_at_its_resolution(name):
    size = 2 ** (len(PRESETS[name].channel_mult) + 1)
    net = UNet(preset(name, num_classes=2, image_size=size, in_channels=1))
    z = torch.randn(2, 1, size, size)
    assert net(z, torch.zeros(2), torch.tensor([0, 2])).shape == z.shape


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="divisible"):
        UNet(preset("default", image_size=18))
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


def test_torch_export_matches_eager():
    """No data-dependent Python control flow: torch.export traces it and agrees with eager."""
    net = _tiny()
    z, logsnr, labels = _inputs(3, net)
    program = torch.export.export(net, (z, logsnr, labels))
    torch.testing.assert_close(program.module()(z, logsnr, labels), net(z, logsnr, labels))
