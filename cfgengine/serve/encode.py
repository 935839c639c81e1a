"""Response bodies of `POST /v1/samples`: npy (the float32 [N, *S] samples, exactly what
`cfgengine.sample` returns), npz (uint8 NHWC `arr_0` + labels, the ADM evaluator layout, for
images; float32 points otherwise) and png (the N samples side by side in one row, 1 px white
between them; grey, RGB or RGBA models)."""
from __future__ import annotations

import io

import numpy as np
import torch

from cfgengine.figures import image_grid, to_uint8_images

MEDIA_TYPES = {"npy": "application/x-npy", "npz": "application/x-npz", "png": "image/png"}
PNG_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def png_problem(sample_shape) -> str | None:
    """Why samples of `sample_shape` cannot be a PNG (None: they can)."""
    if len(sample_shape) != 3:
        return "format png needs an image model; use npy or npz"
    if sample_shape[0] not in PNG_CHANNELS:
        return (f"format png needs 1, 3 or 4 channels, this model has {sample_shape[0]}; "
                "use npy or npz")
    return None


def encode(x_hat: torch.Tensor, labels: torch.Tensor | None, w: torch.Tensor, fmt: str) -> bytes:
    """The response body for samples `x_hat` [N, *S] in format `fmt`."""
    buffer = io.BytesIO()
    if fmt == "npy":
        np.save(buffer, x_hat.numpy().astype(np.float32))
    elif fmt == "npz":
        arr = to_uint8_images(x_hat) if x_hat.dim() == 4 else x_hat.numpy()
        labelled = {} if labels is None else {"labels": labels.numpy()}  # prompt models: none
        np.savez(buffer, arr_0=arr, w=w.numpy(), **labelled)
    else:
        from PIL import Image

        grid = image_grid(to_uint8_images(x_hat), rows=1)
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="png")
    return buffer.getvalue()
