"""Class-conditional UNet ε-predictor (ADM family: GroupNorm + SiLU residual blocks, self-attention at
low resolution), conditioned on the log-SNR λ and a class label whose row K is the null label ∅
(Ho & Salimans 2022, §3: one network serves ε_θ(z, c) and ε_θ(z, ∅)).

Forward has no data-dependent Python control flow, so torch.export / ONNX can trace it as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from cfgengine.schedule import LOGSNR_MAX


@dataclass(frozen=True)
class UNetConfig:
    """Architecture. `channel_mult[i]` scales `base_channels` at resolution image_size / 2**i;
    levels listed in `attention_levels` get self-attention after each residual block."""

    num_classes: int = 8
    image_size: int = 16
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    attention_levels: tuple[int, ...] = (2,)
    heads: int = 2
    groups: int = 8
    fourier_features: int = 16
    dropout: float = 0.0
    guidance_embedding: bool = False  # a guidance-distilled student: forward takes w per row

    @property
    def embed_dim(self) -> int:
        return 4 * self.base_channels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


# Named architectures (DiT-style table); dataset fields (classes, size, channels) are set per run.
PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(base_channels=8, channel_mult=(1, 2), attention_levels=(1,), heads=1,
                       groups=4, fourier_features=8),
    "small": UNetConfig(base_channels=24, channel_mult=(1, 2, 2), attention_levels=(2,)),
    "default": UNetConfig(),
    "base": UNetConfig(base_channels=64, channel_mult=(1, 2, 2, 2), blocks_per_level=2,
                       attention_levels=(2, 3), heads=4, groups=32),
}


def preset(name: str, **fields) -> UNetConfig:
    """The named preset with dataset fields (num_classes, image_size, in_channels) filled in."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **fields)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ≤ `groups` that divides `channels`."""
    return nn.GroupNorm(math.gcd(channels, groups), channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a residual branch's last layer, so every block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# w ∈ [0, GUIDANCE_SCALE] spans the guidance embedding's slowest half period
GUIDANCE_SCALE = 16.0


class FourierEmbedding(nn.Module):
    """Fourier features of s/scale at octave frequencies π·2^k, then a 2-layer MLP: the λ embedding
    (scale λmax, so λ/λmax ∈ [−1, 1]) and a distilled student's w embedding (Meng et al. 2023,
    whose last layer starts at zero so the student starts as its teacher's conditional ε)."""

    def __init__(self, features: int, dim: int, scale: float, zero_out: bool = False):
        super().__init__()
        self.scale = scale
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(features // 2), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
        if zero_out:
            _zero(self.mlp[2])

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        # fp32 phases even for half-precision weights: π·2^k·λ in fp16 would be off by ~0.3 rad
        angle = (s.float() / self.scale)[:, None] * self.freqs.float()  # (N, F/2)
        features = torch.cat([angle.sin(), angle.cos()], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (N, E)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, conditioning by scale-and-shift of the second norm (ADM's AdaGN)."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.cond = nn.Linear(embed_dim, 2 * c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (N, C, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, residual."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (N, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Stage(nn.Module):
    """One residual block, optionally followed by self-attention."""

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig, attend: bool):
        super().__init__()
        self.res = ResBlock(c_in, c_out, cfg.embed_dim, cfg.groups, cfg.dropout)
        self.attn = Attention(c_out, cfg.heads, cfg.groups) if attend else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """Denoiser ε_θ(z, λ, c): `forward(z[N, C, H, W], logsnr[N], labels[N]) -> eps` (same dtype as
    z); label `num_classes` is the null label ∅. With `config.guidance_embedding` it is a
    guidance-distilled student ε_θ(z, λ, c, w) ≈ (1+w)·ε(z, c) − w·ε(z, ∅) of one forward:
    `forward(z, logsnr, labels, w[N])`, and `guidance_embedded` is True."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.num_classes = config.num_classes
        self.sample_shape = config.sample_shape
        self.clip = 1.0
        self.guidance_embedded = config.guidance_embedding
        widths = [config.base_channels * m for m in config.channel_mult]
        self.logsnr_embed = FourierEmbedding(config.fourier_features, config.embed_dim, LOGSNR_MAX)
        self.class_embed = nn.Embedding(config.num_classes + 1, config.embed_dim)
        if config.guidance_embedding:  # absent otherwise: a plain UNet's state dict is unchanged
            self.guidance_embed = FourierEmbedding(config.fourier_features, config.embed_dim,
                                                   GUIDANCE_SCALE, zero_out=True)
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down, self.downsample = self._down_path(widths)
        mid = widths[-1]
        self.mid = nn.ModuleList([Stage(mid, mid, config, True), Stage(mid, mid, config, False)])
        self.up, self.upsample = self._up_path(widths)
        self.norm_out = _norm(widths[0], config.groups)
        self.conv_out = _zero(nn.Conv2d(widths[0], config.in_channels, 3, padding=1))

    def _down_path(self, widths: list[int]) -> tuple[nn.ModuleList, nn.ModuleList]:
        cfg, stages, resample = self.config, nn.ModuleList(), nn.ModuleList()
        c_in = widths[0]
        for level, width in enumerate(widths):
            attend = level in cfg.attention_levels
            for _ in range(cfg.blocks_per_level):
                stages.append(Stage(c_in, width, cfg, attend))
                c_in = width
            last = level == len(widths) - 1
            resample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, 2, padding=1))
        return stages, resample

    def _up_path(self, widths: list[int]) -> tuple[nn.ModuleList, nn.ModuleList]:
        cfg, stages, resample = self.config, nn.ModuleList(), nn.ModuleList()
        c_in = widths[-1]
        for level in reversed(range(len(widths))):
            attend = level in cfg.attention_levels
            for _ in range(cfg.blocks_per_level):
                stages.append(Stage(c_in + widths[level], widths[level], cfg, attend))
                c_in = widths[level]
            resample.append(nn.Identity() if level == 0 else _Upsample(c_in))
        return stages, resample

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor,
                w: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        emb = self.logsnr_embed(logsnr) + self.class_embed(labels)  # (N, E)
        if (w is not None) != self.guidance_embedded:
            raise ValueError("a guidance-distilled UNet takes w per row: net(z, logsnr, labels, w)"
                             if self.guidance_embedded else
                             "this UNet is not guidance-distilled: it takes no w")
        if w is not None:
            emb = emb + self.guidance_embed(w)
        h = self.conv_in(z.to(dtype))
        skips = []
        per_level = self.config.blocks_per_level
        for i, stage in enumerate(self.down):
            h = stage(h, emb)
            skips.append(h)
            if i % per_level == per_level - 1:
                h = self.downsample[i // per_level](h)
        for stage in self.mid:
            h = stage(h, emb)
        for i, stage in enumerate(self.up):
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
            if i % per_level == per_level - 1:
                h = self.upsample[i // per_level](h)
        eps = self.conv_out(F.silu(self.norm_out(h)))  # (N, C, H, W)
        return eps.to(z.dtype)


class _Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_config(cfg: UNetConfig) -> None:
    """Raise ValueError if the image size cannot be halved once per level or heads do not divide."""
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if cfg.image_size % factor:
        raise ValueError(f"image size {cfg.image_size} must be divisible by {factor} "
                         f"for {len(cfg.channel_mult)} resolution levels")
    if any(cfg.base_channels * m % cfg.heads for m in cfg.channel_mult):
        raise ValueError(f"heads={cfg.heads} must divide every level's channel count")


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
