"""The `POST /v1/samples` request (docs/design.md, serving): its JSON schema, and its validation
against the served model and the server's limits, ending in a `Job` the scheduler runs.

Every choice a request names (sampler, grid, guidance rule) is checked against what the installed
cfgengine provides, so new samplers, grids and rules become servable without touching this file.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cfgengine import guidance, schedule
from cfgengine.conditioning import check_prompts
from cfgengine.tables import SAMPLERS, check_sampler_args

FORMATS = ("npy", "npz", "png")
GRIDS = schedule.GRIDS
RULES = guidance.RULE_NAMES


class RequestError(Exception):
    """A request the client got wrong (or that the server cannot take now): HTTP `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class GuidanceSpec(BaseModel):
    """A guidance rule by name with its parameters, e.g. {"rule": "cfg", "interval": [-1, 3]}."""

    model_config = ConfigDict(extra="allow")
    rule: str = "cfg"

    @model_validator(mode="after")
    def _finite_parameters(self):
        for name, value in (self.model_extra or {}).items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, (int, float)) and not is_number(item):
                    raise ValueError(f"guidance {name} must be a finite number (as float32)")
        return self


class SampleRequest(BaseModel):
    """Same meaning and defaults as the keywords of `cfgengine.sample`; w is the paper's
    (diffusers' guidance_scale = 1 + w). `deadline_s` counts from arrival (default: the server's)."""

    model_config = ConfigDict(extra="forbid")
    labels: list[Any] | None = Field(None, description="class ids in [0, K) (class models)",
                                     examples=[[0, 3]])
    prompt: list[str] | str | None = Field(None, description="prompts, one sample each (models "
                                           "conditioned on prompts)")
    negative_prompt: list[str] | str | None = Field(
        None, description="each prompt's null branch (default \"\"), or one for all")
    w: Any = Field(0.3, description="guidance weight: a number, or one per sample")
    steps: Any = 256
    sampler: str = "ancestral"
    v: Any = 0.3
    eta: Any = Field(None, description="η; null: the sampler's (0 for ddim, 1 for the ancestral "
                                       "and SDE samplers)")
    grid: str = "cosine"
    seed: Any = 0
    guidance: GuidanceSpec | None = None
    format: Literal["npy", "npz", "png"] = "npy"
    deadline_s: Any = None

    @field_validator("labels", mode="before")
    @classmethod
    def _label_list(cls, value):
        if value is None:
            return value
        if not isinstance(value, list) or any(not is_integer(x) for x in value):
            raise ValueError("labels must be a list of integer class ids")
        return value

    @field_validator("steps", "seed", mode="before")
    @classmethod
    def _integers(cls, value, info):
        if not is_integer(value):
            raise ValueError(f"{info.field_name} must be an integer")
        return value

    @field_validator("w", "v", "eta", "deadline_s", mode="before")
    @classmethod
    def _numbers(cls, value, info):
        if value is None and info.field_name in ("deadline_s", "eta"):
            return value
        values = value if isinstance(value, list) and info.field_name == "w" else [value]
        if not values or any(not is_number(x) for x in values):
            raise ValueError(f"{info.field_name} must be a finite number (as float32)"
                             + (" or a list of them" if info.field_name == "w" else ""))
        return value


def is_integer(value) -> bool:
    """A JSON integer (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number (not a bool, complex or string) that stays finite as float32, the precision
    it is sampled at: 1e39 or 10**400 would become inf there."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float64
        return False
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(value)))


@dataclass(frozen=True)
class Combo:
    """What selects a coefficient table: every request with the same combo shares one."""

    steps: int
    sampler: str
    v: float
    eta: float | None
    grid: str


@dataclass(frozen=True)
class Limits:
    """The server's bounds on one request."""

    num_classes: int
    max_rows: int
    max_steps: int = 1000
    deadline_s: float = 600.0
    guidance_embedded: bool = False  # the model answers ε̃_w itself: a row costs one row
    conditioning: str = "class"  # the model's (ModelInfo.conditioning): labels or prompts


@dataclass(eq=False)
class Job:
    """One validated request: what to sample, and how to answer it (set by the HTTP side)."""

    labels: torch.Tensor | None  # int64 [N] (class models)
    w: torch.Tensor  # float32 [N]
    combo: Combo
    seed: int
    rule: Any  # a guidance rule object, or None for the kernel's default (eq. 6)
    format: str
    deadline: float  # time.monotonic() after which the request is answered 504
    cancelled: bool = False
    on_done: Any = None  # callable(outcome): a Tensor [N, *S] or a RequestError
    embedded: bool = False  # a guidance-distilled model: no null rows
    prompts: tuple[list[str], list[str]] | None = None  # (prompts, negative prompts) [N] each

    @property
    def rows(self) -> int:
        return len(self.w)

    @property
    def cost(self) -> int:
        """Rows against --max-rows: two per guided row (conditional + null), one per w = 0 row;
        one per row of a guidance-distilled model (and CFG(refresh) still counts its refresh
        steps' two)."""
        return self.rows + (0 if self.embedded else len(self.guided_rows))

    @property
    def guided(self) -> bool:
        return bool(self.guided_rows)

    @functools.cached_property
    def guided_rows(self) -> list[int]:
        """Indices of the rows with w ≠ 0 (they get a null row while guided)."""
        return [i for i, w in enumerate(self.w.tolist()) if w != 0]

    @property
    def interval(self):
        return getattr(self.rule, "interval", None)


def check_request(body: SampleRequest, limits: Limits) -> Job:
    """The Job for a schema-valid body, or RequestError(422) naming the first bad field."""
    labels, prompts = _check_condition(body, limits)
    w = _check_w(body.w, len(labels), "labels") if labels is not None \
        else _check_w(body.w, len(prompts[0]), "prompts")
    combo = _check_combo(body, limits)
    if not 0 <= body.seed < 2**63:
        raise RequestError(422, f"seed must be in [0, 2^63), got {body.seed}")
    deadline_s = limits.deadline_s if body.deadline_s is None else float(body.deadline_s)
    if not 0 < deadline_s <= limits.deadline_s:
        raise RequestError(422, f"deadline_s must be in (0, {limits.deadline_s:g}]")
    job = Job(labels, w, combo, body.seed, _check_rule(body.guidance, limits), body.format,
              deadline=time.monotonic() + deadline_s, embedded=limits.guidance_embedded,
              prompts=prompts)
    if job.cost > limits.max_rows:
        twice = "" if job.embedded else " (guided rows count twice)"
        raise RequestError(422, f"this request needs {job.cost} rows{twice}; "
                                f"the server's --max-rows is {limits.max_rows}")
    return job


def _check_condition(body: SampleRequest, limits: Limits):
    """(labels, None) for a class model, (None, (prompts, negative prompts)) for a prompt model."""
    if limits.conditioning != "text":
        if body.prompt is not None or body.negative_prompt is not None:
            raise RequestError(422, "this model is class-conditional: send labels, not prompt")
        if body.labels is None:
            raise RequestError(422, "labels is required: the class ids to sample")
        return _check_labels(body.labels, limits), None
    if body.labels is not None:
        raise RequestError(422, "this model is conditioned on prompts: send prompt, not labels")
    if body.prompt is None:
        raise RequestError(422, "prompt is required: the prompts to sample")
    try:
        return None, check_prompts(body.prompt, body.negative_prompt,
                                   names=("prompt", "negative_prompt"))
    except ValueError as err:
        raise RequestError(422, str(err)) from None


def _check_labels(labels: list[int], limits: Limits) -> torch.Tensor:
    if not labels:
        raise RequestError(422, "labels is empty: nothing to sample")
    bad = [k for k in labels if not 0 <= k < limits.num_classes]
    if bad:
        raise RequestError(422, f"label {bad[0]} is outside [0, {limits.num_classes})")
    return torch.tensor(labels, dtype=torch.int64)


def _check_w(w, count: int, what: str) -> torch.Tensor:
    if isinstance(w, list) and len(w) != count:
        raise RequestError(422, f"w has {len(w)} values for {count} {what}")
    return torch.tensor(w, dtype=torch.float32).expand(count).clone()


def _check_combo(body: SampleRequest, limits: Limits) -> Combo:
    if body.sampler not in SAMPLERS:
        raise RequestError(422, f"sampler must be one of {', '.join(SAMPLERS)}, "
                                f"got {body.sampler!r}")
    if body.grid not in GRIDS:
        raise RequestError(422, f"grid must be one of {', '.join(GRIDS)}, got {body.grid!r}")
    if not 2 <= body.steps <= limits.max_steps:
        raise RequestError(422, f"steps must be in [2, {limits.max_steps}], got {body.steps}")
    try:
        check_sampler_args(body.steps, body.sampler, body.v, body.eta)
    except ValueError as err:
        raise RequestError(422, str(err)) from None
    eta = None if body.eta is None else float(body.eta)
    return Combo(body.steps, body.sampler, float(body.v), eta, body.grid)


def _check_rule(spec: GuidanceSpec | None, limits: Limits):
    """The guidance rule object named by `spec` (None: the kernel's default, eq. 6); a
    guidance-distilled model takes plain CFG only."""
    if spec is None or (spec.rule == "cfg" and not spec.model_extra):
        return None
    if spec.rule not in RULES:
        names = ", ".join(RULES) or "cfg (without parameters)"
        raise RequestError(422, f"guidance rule must be one of {names}, got {spec.rule!r}")
    params = dict(spec.model_extra)
    if isinstance(params.get("interval"), list):
        params["interval"] = tuple(params["interval"])
    try:
        rule = RULES[spec.rule](**params)
        if limits.guidance_embedded:
            guidance.check_embedded_rule(rule)
        return rule
    except (TypeError, ValueError) as err:
        raise RequestError(422, f"guidance {spec.rule}: {err}") from None
