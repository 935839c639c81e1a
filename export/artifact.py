"""What the three exported-artifact backends share: the denoiser contract of cfgengine.model (rows
in, rows out: (z[N], logsnr[N], labels[N]) → ε[N]; the sampler builds the doubled batch of a
guided step and calls it once on 2B rows), the artifact's `ModelInfo` from its metadata, input
checking against that metadata, optional-dependency imports. A guidance-distilled export also
takes w[N] (ModelInfo.guidance_embedded) and answers ε̃_w for each row. A prompt model's export
takes a TextCondition[N] in place of labels (conditioning "text"); it holds no prompt encoder, so
its ModelInfo has no `encode` and sampling it takes TextCondition rows the caller encoded
(cfgengine.conditioning)."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType

import torch

from cfgengine.export.metadata import ExportMeta
from cfgengine.export.program import MASK_DTYPE, text_inputs, text_tensors
from cfgengine.model import ModelInfo, TextCondition


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or ValueError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{module} is not installed (pip install 'cfgengine[{extra}]')") from None


class Backend:
    """A loaded export. Subclasses implement `run` on checked, contiguous inputs on `device`."""

    backend_name = "exported"

    def __init__(self, meta: ExportMeta, path: str | Path, device: torch.device | str):
        self.meta = meta
        self.path = Path(path)
        self.device = torch.device(device)
        self.info = ModelInfo(name=str(self.path), num_classes=meta.num_classes,
                              sample_shape=meta.sample_shape, clip=meta.clip,
                              logsnr_range=meta.logsnr_range, class_names=meta.class_names,
                              guidance_embedded=meta.guidance_embedded,
                              conditioning=meta.conditioning, backend=self.backend_name,
                              precision=meta.precision,
                              config=dataclasses.asdict(meta))  # its digest: the vote's
        self.num_classes, self.sample_shape = meta.num_classes, meta.sample_shape

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor, cond,
                 w: torch.Tensor | None = None) -> torch.Tensor:
        """ε [N, *S] for N rows as they are (`cond`: class ids, the null label among them, or a
        prompt model's TextCondition; a guided step passes its doubled batch of 2B rows), or ε̃_w
        for a guidance-embedded export (w [N] given); same dtype as z."""
        self.check_inputs(z, logsnr, cond, 2 * self.meta.max_batch)
        self.check_w(w, z.shape[0])
        return self._run(z, logsnr, cond, w).to(z.dtype)

    def _run(self, z: torch.Tensor, logsnr: torch.Tensor, cond,
             w: torch.Tensor | None = None) -> torch.Tensor:
        """One run on checked rows; the runtime's own (often 70-line C++) errors and a graph that
        does not return one row per input row become one line."""
        extra = () if w is None else (self._prepare(w, torch.float32),)
        try:
            eps = self.run(self._prepare(z, torch.float32), self._prepare(logsnr, torch.float32),
                           *self._condition(cond), *extra)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ValueError(f"{self.path}: the {self.backend_name} runtime failed on a batch of "
                             f"{z.shape[0]}: {first}") from err
        if tuple(eps.shape) != (z.shape[0], *self.sample_shape):
            raise ValueError(f"{self.path}: returned eps of shape {tuple(eps.shape)} for a batch "
                             f"of {z.shape[0]}; the graph must return one row per input row "
                             "(the conditional and the null rows of a guided step)")
        return eps

    def _condition(self, cond) -> tuple[torch.Tensor, ...]:
        """The graph inputs of checked `cond`: labels (int64), or a TextCondition's tensors
        (fp32; the mask int64)."""
        if self.meta.conditioning != "text":
            return (self._prepare(cond, torch.int64),)
        return tuple(self._prepare(t, MASK_DTYPE if t is cond.mask else torch.float32)
                     for t in text_tensors(cond))

    def run(self, z: torch.Tensor, logsnr: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """ε for every row of checked, contiguous inputs on `device`, in the graph's input order
        (program.input_names: labels or text inputs, then w for a guidance-embedded export)."""
        raise NotImplementedError

    def check_w(self, w: torch.Tensor | None, batch: int) -> None:
        """ValueError unless w [N] is given exactly when the export takes it."""
        if not self.meta.guidance_embedded:
            if w is not None:
                raise ValueError(f"{self.path}: this export is not guidance-distilled; it takes "
                                 "no w")
            return
        if w is None or tuple(w.shape) != (batch,):
            got = None if w is None else tuple(w.shape)
            raise ValueError(f"{self.path}: a guidance-distilled export needs w of shape "
                             f"[{batch}], got {got}")

    def _prepare(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.detach().to(self.device, dtype).contiguous()

    def check_inputs(self, z: torch.Tensor, logsnr: torch.Tensor, cond, max_batch: int) -> None:
        """ValueError for shapes the artifact was not built for (shape metadata only: no sync)."""
        batch, meta = z.shape[0], self.meta
        if tuple(z.shape[1:]) != meta.sample_shape:
            raise ValueError(f"{self.path}: z has sample shape {tuple(z.shape[1:])}, the model "
                             f"was exported for {meta.sample_shape}")
        if meta.conditioning == "text":
            self.check_text(cond, batch)
        elif not isinstance(cond, torch.Tensor) or tuple(cond.shape) != (batch,):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"{self.path}: labels must be [{batch}], got {got}")
        if tuple(logsnr.shape) != (batch,):
            raise ValueError(f"{self.path}: logsnr must be [{batch}], got {tuple(logsnr.shape)}")
        if not meta.min_batch <= batch <= max_batch:
            raise ValueError(f"{self.path}: batch {batch} is outside the exported range "
                             f"[{meta.min_batch}, {max_batch}]; sample in smaller batches "
                             "(--batch, or batch_size= in Python) or re-export with a larger "
                             "--max-batch")

    def check_text(self, cond, batch: int) -> None:
        """ValueError unless `cond` is a TextCondition of `batch` rows with exactly the text
        inputs (and per-row shapes) the prompt model was exported with."""
        want = _describe(batch, self.meta.text_inputs)
        if not isinstance(cond, TextCondition):
            got = type(cond).__name__
        else:
            got = _describe(len(cond), text_inputs(cond)) if len(cond) == batch \
                else f"{len(cond)} rows for {batch}"
        if got != want:
            raise ValueError(f"{self.path}: this prompt model's export takes a TextCondition of "
                             f"{want}; got {got}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, device={str(self.device)!r})"


def _describe(rows: int, inputs: tuple) -> str:
    """Text inputs as `name [rows, *shape]`, comma-separated."""
    return ", ".join(f"{name} {[rows, *shape]}" for name, shape in inputs)
