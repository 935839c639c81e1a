"""What the three exported-artifact backends share: the backend contract of DESIGN.md §3 (call
shape (z[B], logsnr[B], labels[B]) → eps2[2B], `num_classes`, `sample_shape`, `clip`,
`returns_doubled`), input checking against the artifact's metadata, optional-dependency imports."""
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

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps2 [2B, *S]: rows 0..B−1 conditional, B..2B−1 null; same dtype as z."""
        self.check_inputs(z, logsnr, labels)
        try:
            eps2 = self.run(self._prepare(z, torch.float32), self._prepare(logsnr, torch.float32),
                            self._prepare(labels, torch.int64))  # (2B, *S)
        except Exception as err:  # the runtime's own (often 70-line C++) errors: one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ValueError(f"{self.path}: the {self.backend_name} runtime failed on a batch of "
                             f"{z.shape[0]}: {first}") from err
        if tuple(eps2.shape) != (2 * z.shape[0], *self.sample_shape):
            raise ValueError(f"{self.path}: returned eps of shape {tuple(eps2.shape)} for a "
                             f"batch of {z.shape[0]}; a guided export returns "
                             f"{(2 * z.shape[0], *self.sample_shape)} (conditional + null rows)")
        return eps2.to(z.dtype)

    def run(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _prepare(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.detach().to(self.device, dtype).contiguous()

    def check_inputs(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> None:
        """ValueError for shapes the artifact was not built for (shape metadata only: no sync)."""
        batch, meta = z.shape[0], self.meta
        if tuple(z.shape[1:]) != meta.sample_shape:
            raise ValueError(f"{self.path}: z has sample shape {tuple(z.shape[1:])}, the model "
                             f"was exported for {meta.sample_shape}")
        if tuple(logsnr.shape) != (batch,) or tuple(labels.shape) != (batch,):
            raise ValueError(f"{self.path}: logsnr and labels must be [{batch}], got "
                             f"{tuple(logsnr.shape)} and {tuple(labels.shape)}")
        if not meta.min_batch <= batch <= meta.max_batch:
            raise ValueError(f"{self.path}: batch {batch} is outside the exported range "
                             f"[{meta.min_batch}, {meta.max_batch}]; sample in smaller batches "
                             "(--batch, or batch_size= in Python) or re-export with a larger "
                             "--max-batch")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, device={str(self.device)!r})"
