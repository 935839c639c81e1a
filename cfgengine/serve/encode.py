"""Response bodies of `POST /v1/samples`: npy (the float32 [N, *S] samples, exactly what
`cfgengine.sample` returns), npz (uint8 NHWC `arr_0` + labels, the ADM evaluator layout, for
images; float32 points otherwise) and png (one row of images)."""
from __future__ import annotations

import io

import numpy as np
import torch

from cfgengine.figures import image_grid, to_uint8_images

MEDIA_TYPES = {"npy": "application/x-npy", "npz": "application/x-npz", "png": "image/png"}


def encode(x_hat: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, fmt: str) -> bytes:
    """The response body for samples `x_hat` [N, *S] in format `fmt`."""
    buffer = io.BytesIO()
    if fmt == "npy":
        np.save(buffer, x_hat.numpy().astype(np.float32))
    elif fmt == "npz":
        arr = to_uint8_images(x_hat) if x_hat.dim() == 4 else x_hat.numpy()
        np.savez(buffer, arr_0=arr, labels=labels.numpy(), w=w.numpy())
    else:
        from PIL import Image

        Image.fromarray(image_grid(to_uint8_images(x_hat), rows=1).squeeze(-1)).save(
            buffer, format="png")
    return buffer.getvalue()
