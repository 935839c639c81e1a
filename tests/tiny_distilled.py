"""The tiny guidance-distilled UNet (w-embedding, cfgengine/unet.py) of the export and runner
tests, with every layer re-drawn: the zero-initialised output conv and residual branches of a fresh
UNet would make every output 0 and every parity test vacuous."""
from __future__ import annotations

import torch

from cfgengine.unet import UNet, preset


def tiny_distilled() -> UNet:
    """3 classes, 1×8×8 samples, forward(z, logsnr, labels, w); the same weights every call, the
    caller's RNG untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = UNet(preset("tiny", num_classes=3, image_size=8, in_channels=1,
                          guidance_embedding=True))
        for module in net.modules():
            if module is not net and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return net.eval().requires_grad_(False)
