"""The rows a sampling call conditions on, for prompt models (`ModelInfo.conditioning == "text"`):
each row's prompt and its null branch — the row's negative prompt, "" by default — encoded once
per call by the model's `encode` (each distinct string once) into `TextCondition` rows.

A model without an encoder (an exported prompt model: the file holds the denoiser only) takes
rows already encoded: `prompts` and `negative_prompts` as TextConditions of N rows each, made by
the source model's `info.encode` (any prompt model takes them so)."""
from __future__ import annotations

import torch

from cfgengine.model import ModelInfo, TextCondition


def check_conditioning(facts: ModelInfo, labels, prompts, negative_prompts) -> None:
    """One line when the call conditions the model the wrong way: labels for a prompt model,
    prompts for a class model, negative prompts without prompts."""
    text = facts.conditioning == "text"
    if not text and isinstance(prompts, TextCondition):
        raise ValueError(f"{facts.name} is a class-conditional model: pass labels, not prompt "
                         "rows")
    if text and labels is not None:
        raise ValueError(f"{facts.name} is conditioned on prompts: pass prompts=[...], not labels")
    if not text and (prompts is not None or negative_prompts is not None):
        raise ValueError(f"{facts.name} is a class-conditional model: pass labels, not prompts")
    if negative_prompts is not None and prompts is None:
        raise ValueError("negative_prompts need prompts (one negative prompt per prompt)")


def prompt_rows(facts: ModelInfo, prompts, negative_prompts, n: int | None,
                device: torch.device) -> tuple[TextCondition | None, TextCondition, int]:
    """(cond, null, N) for a prompt model: `cond` the N prompts' rows (None for unconditional
    sampling: `prompts=None`, n rows of the null branch alone), `null` the rows of the null branch.
    A str stands for one prompt; a str negative prompt serves every row."""
    if prompts is None:
        if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("prompts=None samples unconditionally: it needs n ≥ 1 samples")
        return None, encode_rows(facts, [""] * n, device), n
    if n is not None:
        raise ValueError("n is only for unconditional sampling (prompts=None)")
    if isinstance(prompts, TextCondition):
        return encoded_rows(facts, prompts, negative_prompts, device)
    prompts, negatives = check_prompts(prompts, negative_prompts)
    return encode_rows(facts, prompts, device), encode_rows(facts, negatives, device), \
        len(prompts)


def check_prompts(prompts, negative_prompts, names=("prompts", "negative_prompts")):
    """(prompts, negative prompts) as two lists of N strings; a str stands for one prompt, a str
    negative prompt (or None: "") serves every row. `names` name the two in errors."""
    prompts = _check_texts(names[0], [prompts] if isinstance(prompts, str) else prompts)
    if not prompts:
        raise ValueError(f"{names[0]} is empty: nothing to sample")
    negatives = [""] * len(prompts) if negative_prompts is None else negative_prompts
    if isinstance(negatives, str):
        negatives = [negatives] * len(prompts)
    negatives = _check_texts(names[1], negatives)
    if len(negatives) != len(prompts):
        raise ValueError(f"{names[1]} has {len(negatives)} entries for {len(prompts)} "
                         f"{names[0]} (one per prompt, or one string for all)")
    return prompts, negatives


def encoded_rows(facts: ModelInfo, prompts: TextCondition, negatives, device: torch.device
                 ) -> tuple[TextCondition, TextCondition, int]:
    """(cond, null, N) of prompt rows the caller encoded; the null rows are `negatives` (a
    TextCondition of as many rows), or the empty prompt's encoded by the model's encoder."""
    count = len(prompts)
    if count == 0:
        raise ValueError("prompts is empty: nothing to sample")
    if negatives is None:
        negatives = encode_rows(facts, [""] * count, device)
    if not isinstance(negatives, TextCondition):
        raise ValueError("prompts given as encoded rows (a TextCondition) take negative_prompts "
                         "as encoded rows too")
    if len(negatives) != count or negatives.row_shapes() != prompts.row_shapes():
        raise ValueError(f"negative_prompts rows {negatives.row_shapes()} × {len(negatives)} do "
                         f"not match the prompt rows {prompts.row_shapes()} × {count} (one "
                         "encoded negative prompt per prompt)")
    return prompts.to(device), negatives.to(device), count


def encode_rows(facts: ModelInfo, texts: list[str], device: torch.device) -> TextCondition:
    """The TextCondition of `texts`, row i for texts[i]: each distinct string encoded once."""
    if facts.encode is None:
        raise ValueError(f"{facts.name} has no prompt encoder (an exported prompt model): pass "
                         "prompts and negative_prompts as TextCondition rows encoded by the "
                         "source model (cfgengine.load(folder).info.encode)")
    distinct = list(dict.fromkeys(texts))
    encoded = facts.encode(distinct)
    if len(encoded) != len(distinct):
        raise ValueError(f"{facts.name}: encode returned {len(encoded)} rows for "
                         f"{len(distinct)} prompts")
    where = {text: i for i, text in enumerate(distinct)}
    rows = torch.tensor([where[text] for text in texts], device=encoded.embeddings.device)
    return encoded[rows].to(device)


def cat_rows(parts: list):
    """The rows of several calls as one: class ids, or TextConditions field by field."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    fields = zip(*(part.fields() for part in parts))
    return TextCondition(*(None if column[0] is None else torch.cat(column) for column in fields))


def _check_texts(name: str, texts) -> list[str]:
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a list of strings")
    return list(texts)
