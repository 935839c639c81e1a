"""Tiny random-weight pipeline folders to try cfgengine's prompt models without downloading
anything (docs/models.md) and for its tests: a StableDiffusionPipeline folder and a
StableDiffusion3Pipeline folder (no T5 by default), each saved by the real diffusers pipeline, with
CLIP tokenizers from a small byte-level vocabulary written here. Weights are random but seeded, so
a folder is the same wherever it is built.

    python -m cfgengine.families.tiny sd tiny-sd
    python -m cfgengine.families.tiny sd3 tiny-sd3 [--t5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

MAX_LENGTH = 12  # the CLIP tokenizers' model_max_length
MERGES = (("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"))
T5_PIECES = ("▁a", "▁cat", "▁dog", "s", "▁two", "▁blurry")


def _libraries():
    from cfgengine.export.artifact import require  # the optional-dependency import, one place

    return require("diffusers", "diffusers"), require("transformers", "diffusers")


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's table: printable bytes keep their
    character, the others move to 256 + k)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + k) for k in range(len(moved))]


def tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over the 256 byte symbols (alone and word-final), a few merges and CLIP's
    two special tokens; its vocab.json and merges.txt are written to `folder`."""
    transformers = _libraries()[1]
    folder.mkdir(parents=True)
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in MERGES),
              "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n"
                                                                  for a, b in MERGES))
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=MAX_LENGTH)


def tiny_text_encoder(tokenizer, hidden: int = 16, seed: int = 3, projection: int | None = None):
    """A 2-layer CLIP text encoder for `tokenizer`; with `projection`, a
    CLIPTextModelWithProjection (SD3's CLIP-L/G) of that pooled width."""
    transformers = _libraries()[1]
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=MAX_LENGTH,
        bos_token_id=len(tokenizer) - 2, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, projection_dim=projection or hidden)
    if projection is None:
        return transformers.CLIPTextModel(config).eval()
    return transformers.CLIPTextModelWithProjection(config).eval()


def tiny_unet():
    """A UNet2DConditionModel on 4×4×4 latents with 16-wide cross-attention."""
    diffusers = _libraries()[0]
    torch.manual_seed(4)
    return diffusers.UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=4).eval()


def tiny_vae(shift_factor: float | None = None):
    """An AutoencoderKL: 8×8 RGB ↔ 4×4×4 latents, scaling factor 0.5 (and `shift_factor`)."""
    diffusers = _libraries()[0]
    torch.manual_seed(2)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=8, scaling_factor=0.5,
        shift_factor=shift_factor).eval()


def tiny_sd3_transformer(pooled: int):
    """An SD3Transformer2DModel on 4×4×4 latents (2×2 patches) with 48-wide joint attention."""
    diffusers = _libraries()[0]
    torch.manual_seed(5)
    return diffusers.SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
        caption_projection_dim=16, pooled_projection_dim=pooled, pos_embed_max_size=4).eval()


def tiny_t5():
    """(T5 tokenizer, T5EncoderModel) of a few word pieces, 48 wide (the joint attention's
    width). The tokenizer is built from its pieces with transformers ≥ 5 (no sentencepiece)."""
    transformers = _libraries()[1]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0),
              *((p, -1.0 - k / 10) for k, p in enumerate(T5_PIECES))]
    try:
        tokenizer = transformers.T5TokenizerFast(vocab=pieces, extra_ids=0)
    except TypeError:
        raise ValueError("a tiny T5 tokenizer needs transformers ≥ 5 (it is built from its "
                         "word pieces); build the folder without --t5") from None
    torch.manual_seed(6)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=48, d_kv=8, d_ff=32,
                                   num_layers=1, num_heads=2)
    return tokenizer, transformers.T5EncoderModel(config).eval()


def _save(pipe, path: Path, index: dict | None = None) -> None:
    """pipe.save_pretrained into a folder beside `path` (with `index`'s entries added to its
    model_index.json), renamed onto it when whole: a failure or a kill leaves no half-written
    folder. ValueError in one line if `path` exists."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists; name a new folder")
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        pipe.save_pretrained(work)
        if index:
            written = json.loads((work / "model_index.json").read_text())
            (work / "model_index.json").write_text(json.dumps({**written, **index}, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(work, 0o777 & ~umask)  # mkdtemp's 0700 would hide the folder from others
        os.replace(work, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_sd_folder(path: str | Path, **scheduler) -> Path:
    """A StableDiffusionPipeline folder of tiny random nets at `path` (8×8 images, 4×4×4
    latents); `scheduler`: DDIMScheduler settings over Stable Diffusion's training schedule,
    trailing spacing ending at ᾱ = 1 unless given."""
    diffusers = _libraries()[0]
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = tiny_tokenizer(Path(vocab) / "clip")
    ddim = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, clip_sample=False, **{"set_alpha_to_one": True, "steps_offset": 1,
                                              "timestep_spacing": "trailing", **scheduler})
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=tiny_unet(), scheduler=ddim, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    _save(pipe, Path(path))
    return Path(path)


def build_sd3_folder(path: str | Path, *, t5: bool = False, **scheduler) -> Path:
    """A StableDiffusion3Pipeline folder of tiny random nets at `path` (8×8 images, 4×4×4
    latents): CLIP-L (16 wide) and CLIP-G (24 wide) with 8-wide projections, no T5 (its entries
    [null, null] in model_index.json, as a folder saved without it) unless `t5`, and a VAE with
    scaling and shift factors; `scheduler`: FlowMatchEulerDiscreteScheduler settings (shift 3
    unless given)."""
    diffusers, _ = _libraries()
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = tiny_tokenizer(Path(vocab) / "clip")
    tokenizer_3, text_encoder_3 = tiny_t5() if t5 else (None, None)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(pooled=16),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **scheduler}),
        vae=tiny_vae(shift_factor=0.1),
        text_encoder=tiny_text_encoder(tokenizer, 16, seed=7, projection=8), tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(tokenizer, 24, seed=8, projection=8),
        tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    # save_pretrained leaves absent components out; published folders say [null, null]
    _save(pipe, Path(path), None if t5 else dict(text_encoder_3=[None, None],
                                                  tokenizer_3=[None, None]))
    return Path(path)


def _quiet() -> None:
    """A command's output is its one line: no progress bars or warnings from the libraries."""
    for library in _libraries():
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cfgengine.families.tiny",
        description="Write a tiny random-weight Stable Diffusion (sd) or SD3 (sd3) pipeline "
                    "folder that cfgengine.load and `cfgengine sample --ckpt` read.")
    parser.add_argument("kind", choices=("sd", "sd3"))
    parser.add_argument("path", type=Path, help="the folder to write (must not exist)")
    parser.add_argument("--t5", action="store_true", help="sd3: with a tiny T5 text encoder")
    args = parser.parse_args(argv)
    _quiet()
    try:
        if args.kind == "sd3":
            build_sd3_folder(args.path, t5=args.t5)
        elif args.t5:
            raise ValueError("--t5 is for sd3 folders")
        else:
            build_sd_folder(args.path)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
