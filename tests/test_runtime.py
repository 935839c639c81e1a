"""Backends of the Sampler: every backend that runs here gives eager's samples for the same seed;
precision; NaN detection; the CUDA-graph loop on a GPU (skipped with a reason on CPU)."""
import pytest
import torch

import cfgengine
from cfgengine import toy
from cfgengine.unet import UNet, preset

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


@pytest.fixture(scope="module")
def tiny_unet():
    """A tiny UNet whose zero-initialised output layers are randomised, so ε is not all zero."""
    torch.manual_seed(0)
    net = UNet(preset("tiny", num_classes=3, image_size=8, in_channels=1)).eval()
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.normal_(0, 0.1)
    return net


LABELS = torch.tensor([0, 2, 1, 1, 0])
W = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.3])


@torch.no_grad()
def test_compile_backend_equals_eager(tiny_unet):
    eager = cfgengine.sample(tiny_unet, LABELS, w=W, steps=6, seed=4, backend="torch")
    compiled = cfgengine.sample(tiny_unet, LABELS, w=W, steps=6, seed=4, backend="compile")
    assert rel_err(compiled, eager) < 1e-4


@torch.no_grad()
def test_bf16_network_stays_close_to_fp32(tiny_unet):
    fp32 = cfgengine.sample(tiny_unet, LABELS, w=W, steps=6, seed=4)
    bf16 = cfgengine.sample(tiny_unet, LABELS, w=W, steps=6, seed=4, precision="bf16")
    assert 0 < rel_err(bf16, fp32) < 0.1


def test_auto_backend_on_cpu_is_onnxruntime_when_installed_else_eager(tiny_unet):
    from cfgengine.backends import onnxruntime as ort_backend

    want = "onnxruntime" if ort_backend.available() else "torch"
    assert cfgengine.Sampler(tiny_unet, device="cpu").backend == want
    mixture = toy.image_mixture()  # a plain-callable Denoiser, not an nn.Module: no export
    assert cfgengine.Sampler(mixture, device="cpu").backend == "torch"


@pytest.mark.parametrize("kwargs,message", [
    ({"backend": "tensorflow"}, "backend must be one of"),
    ({"backend": "cudagraph", "device": "cpu"}, "needs a CUDA device"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"device": "tpu"}, "not a device"),
])
def test_bad_sampler_settings_raise(tiny_unet, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cfgengine.Sampler(tiny_unet, **kwargs)


class Exploding(torch.nn.Module):
    """A Denoiser whose ε overflows to inf, as an fp16 network can."""

    num_classes, sample_shape, clip = 2, (3,), None

    def forward(self, z, logsnr, labels):
        return z * float("inf")


def test_non_finite_output_is_reported_with_the_precision():
    with pytest.raises(FloatingPointError, match="precision bf16"):
        cfgengine.sample(Exploding(), torch.tensor([0, 1]), steps=3, precision="bf16")


@needs_cuda
@torch.no_grad()
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_cudagraph_equals_eager_on_gpu(tiny_unet, precision, tol):
    net = tiny_unet.cuda()
    labels = LABELS.cuda()
    eager = cfgengine.sample(net, labels, w=W, steps=16, seed=1, backend="torch",
                             precision=precision)
    graph = cfgengine.sample(net, labels, w=W, steps=16, seed=1, backend="cudagraph",
                             precision=precision)
    assert rel_err(graph, eager) < tol


@needs_cuda
@torch.no_grad()
def test_cudagraph_loop_never_syncs_and_replays_draw_fresh_noise(tiny_unet):
    engine = cfgengine.Sampler(tiny_unet.cuda(), backend="cudagraph")
    labels = LABELS.cuda()
    engine.sample(labels, w=W, steps=8, seed=0)  # capture outside the checked region
    call = engine._call(8, "ancestral", 0.3, 0.0, "cosine", None, None, None, "auto", 1, None)
    ids = torch.arange(len(labels), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = engine._sample_chunk(call, engine.plan(call), labels, W.cuda(), ids, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    second = engine.sample(labels, w=W, steps=8, seed=2)
    assert rel_err(second, first) > 1e-2
    assert torch.equal(first, engine.sample(labels, w=W, steps=8, seed=1))
