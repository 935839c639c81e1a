"""What the three exported-artifact backends share: the backend contract of docs/design.md (call
shape (z[B], logsnr[B], labels[B]) → eps2[2B], `num_classes`, `sample_shape`, `clip`,
`logsnr_range`, `returns_doubled`) plus the B-row entry `denoiser` (the plain net: the sampler
calls it outside the guidance interval, at w = 0 and for unconditional samples), input checking
against the artifact's metadata, optional-dependency imports."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch

from cfgengine.export.metadata import ExportMeta


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or ValueError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{module} is not installed (pip install 'cfgengine[{extra}]')") from None


class Backend:
    """A loaded export. Subclasses implement `run` on checked, contiguous inputs on `device`."""

    returns_doubled = True
    backend_name = "exported"

    def __init__(self, meta: ExportMeta, path: str | Path, device: torch.device | str):
        self.meta = meta
        self.path = Path(path)
        self.device = torch.device(device)
        self.num_classes = meta.num_classes
        self.sample_shape = meta.sample_shape
        self.clip = meta.clip
        self.class_names = meta.class_names
        self.precision = meta.precision
        self.logsnr_range = meta.logsnr_range

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps2 [2B, *S]: rows 0..B−1 conditional, B..2B−1 null, from ONE run of the artifact on
        the doubled batch; same dtype as z."""
        self.check_inputs(z, logsnr, labels, self.meta.max_batch)
        null = torch.full_like(labels, self.num_classes)
        return self._run(torch.cat([z, z]), torch.cat([logsnr, logsnr]),
                         torch.cat([labels, null])).to(z.dtype)  # (2B, *S)

    def denoiser(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε [B, *S] for B rows as they are (labels may be the null label): the B-row entry."""
        self.check_inputs(z, logsnr, labels, 2 * self.meta.max_batch)
        return self._run(z, logsnr, labels).to(z.dtype)

    def _run(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.run(self._prepare(z, torch.float32), self._prepare(logsnr, torch.float32),
                        self._prepare(labels, torch.int64))

    def run(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε for every row of checked, contiguous fp32/int64 inputs on `device`."""
        raise NotImplementedError

    def _prepare(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.detach().to(self.device, dtype).contiguous()

    def check_inputs(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor,
                     max_batch: int) -> None:
        """ValueError for shapes the artifact was not built for (shape metadata only: no sync)."""
        batch, meta = z.shape[0], self.meta
        if tuple(z.shape[1:]) != meta.sample_shape:
            raise ValueError(f"{self.path}: z has sample shape {tuple(z.shape[1:])}, the model "
                             f"was exported for {meta.sample_shape}")
        if tuple(logsnr.shape) != (batch,) or tuple(labels.shape) != (batch,):
            raise ValueError(f"{self.path}: logsnr and labels must be [{batch}], got "
                             f"{tuple(logsnr.shape)} and {tuple(labels.shape)}")
        if not meta.min_batch <= batch <= max_batch:
            raise ValueError(f"{self.path}: batch {batch} is outside the exported range "
                             f"[{meta.min_batch}, {max_batch}]; pass batch_size= to sample "
                             "or re-export with a larger --max-batch")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, device={str(self.device)!r})"
