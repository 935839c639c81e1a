"""A tiny guidance-distilled test net taking w, standing in for the distilled UNet in the export
and runner tests."""
from __future__ import annotations

import math

import torch
from torch import nn


class TinyDistilled(nn.Module):
    """ε̃_w(z, λ, labels, w): a conv whose output is shifted and scaled per row by embeddings of
    the label, λ and w — every input changes every output element."""

    num_classes, sample_shape, clip, guidance_embedded = 3, (2, 6, 6), 1.0, True

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():  # the same weights every time, the caller's RNG untouched
            torch.manual_seed(0)
            self.class_embed = nn.Embedding(self.num_classes + 1, 2)
            self.cond = nn.Linear(8, 4)
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(2), persistent=False)

    def forward(self, z, logsnr, labels, w):
        angles = torch.cat([(logsnr / 20)[:, None] * self.freqs, (w / 4)[:, None] * self.freqs], 1)
        feats = self.cond(torch.cat([angles.sin(), angles.cos()], 1))  # (N, 4)
        shift = self.class_embed(labels) + feats[:, :2]
        return self.conv(z) * (1 + feats[:, 2:, None, None]) + shift[:, :, None, None]
