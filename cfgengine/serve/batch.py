"""The running batch of the serving scheduler (docs/design.md, per-row form): rows of many
requests at different steps of different tables, advanced by ONE network call and one fused step
per scheduler step.

Each row carries its own index into one concatenated coefficient table (its request's table
offset + its step), w, seed and sample id (its request's own 0..N−1). The network gets the
conditional rows of every row plus null rows only for the rows guided at this step, so a w = 0
row costs one row and a guided row two. The step runs once per run of rows that share a seed and
a guidance rule (the kernel takes one seed and one rule per call); rows outside their rule's
interval step with w = 0, and between CFG(refresh=k)'s refresh steps with w and the Δ each row
keeps. A guidance-distilled net gets w per row instead and no null rows (a row costs one row).
The noise is drawn explicitly
at each row's own key (seed, sample id, t + 1), because the kernel would key in-kernel noise by
the concatenated-table index instead of the request's t.
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field, replace

import torch

from cfgengine import rng
from cfgengine.conditioning import cat_rows, encode_rows
from cfgengine.guidance import doubled_batch, null_labels
from cfgengine.kernels import RowState, guided_step
from cfgengine.backends import check_rows, prepare
from cfgengine.schedule import logsnr_grid
from cfgengine.serve.schema import Combo, Job
from cfgengine.tables import StepPlan, step_plan



class Engine:
    """The served model ready to run (the Sampler's own preparation, `cfgengine.backends.prepare`):
    its facts and the net that computes ε for every row it is given."""

    def __init__(self, model, *, device=None, backend=None):
        prepared = prepare(model, device=device, backend=backend)
        if prepared.info.conditioning == "text" and prepared.info.encode is None:
            raise ValueError(f"{prepared.info.name} is a prompt model without a prompt encoder "
                             "(an exported file): serve its source folder, which encodes prompts")
        if prepared.backend == "cudagraph":  # a captured graph has a fixed batch; serving's changes
            prepared = replace(prepared, backend="torch")
        self.model = prepared
        self.info, self.device, self.backend = prepared.info, prepared.device, prepared.backend
        self.num_classes, self.sample_shape = self.info.num_classes, self.info.sample_shape

    def eps(self, z, logsnr, labels, null_rows, w, null=None):
        """(ε_c [B], ε_u [B]) from ONE network call on B + G rows (G = len(null_rows)); rows not
        guided get ε_u = ε_c, so their guided ε̃ is ε_c exactly. `null`: every row's null branch
        (prompt models: its encoded negative prompt), else the null label. A guidance-embedded
        net answers ε̃_w for every row from B rows, given `w` (0 where a row is not guided)."""
        if self.info.guidance_embedded:
            eps = self.model.eps(z, logsnr, labels, False, w=w)  # the Sampler's own call
            return eps, eps
        null = null_labels(null_rows, self.info.null_label) if null is None else null[null_rows]
        batch = doubled_batch(z, logsnr, labels, null, rows=null_rows)
        eps = check_rows(self.model.net(*batch), batch[0].shape[0], self.info.name)
        eps_c = eps[: z.shape[0]]
        return eps_c, eps_c.index_copy(0, null_rows, eps[z.shape[0]:])


@dataclass
class Tables:
    """One (combo, rule)'s step plan, its float32 table and λ on the device, and on the host
    which steps add noise and which run the null rows."""

    plan: StepPlan
    table: torch.Tensor
    logsnr: torch.Tensor
    noisy: list[bool]


class TableBank:
    """Step plans per (combo, rule), built once as `cfgengine.sample` builds them, and the
    concatenation of their tables for the running batch. At most `max_tables` are kept, the least
    recently used dropped first: clients choose combos, so an unbounded cache would grow with
    every distinct request (members keep their own tables)."""

    def __init__(self, engine: Engine, max_tables: int = 64):
        self.engine, self.max_tables = engine, max_tables
        self._tables: collections.OrderedDict[tuple, Tables] = collections.OrderedDict()

    def get(self, combo: Combo, rule) -> Tables:
        key = (combo, rule)
        if key in self._tables:
            self._tables.move_to_end(key)
        else:
            self._tables[key] = self._build(combo, rule)
            while len(self._tables) > self.max_tables:
                self._tables.popitem(last=False)
        return self._tables[key]

    def __len__(self) -> int:
        return len(self._tables)

    def _build(self, combo: Combo, rule) -> Tables:
        facts = self.engine.info
        own = combo.grid == "cosine" and facts.grid is not None and facts.steps_to is not None
        plan = step_plan(combo_logsnr(combo, facts), combo.sampler, v=combo.v, eta=combo.eta,
                         rule=rule, final_logsnr=facts.final_logsnr,
                         targets=facts.steps_to(combo.steps) if own else None)
        table, logsnr = plan.on(self.engine.device)
        return Tables(plan, table, logsnr, [not quiet for quiet in plan.quiet])

    def concat(self, keys: list[tuple]):
        """(table, λ, offset per key) of the distinct (combo, rule) `keys`, in first-seen order."""
        unique = list(dict.fromkeys(keys))
        parts = [self.get(*key) for key in unique]
        offsets = dict(zip(unique, itertools.accumulate([0] + [len(p.noisy) for p in parts])))
        return (torch.cat([p.table for p in parts]), torch.cat([p.logsnr for p in parts]),
                offsets)


def combo_logsnr(combo: Combo, facts) -> torch.Tensor:
    """The float64 λ grid `cfgengine.sample` uses for this combo and model."""
    if combo.grid == "cosine" and facts.grid is not None:
        return facts.grid(combo.steps).to(torch.float64)
    return logsnr_grid(combo.steps, *facts.logsnr_range, grid=combo.grid)


@dataclass(eq=False)
class Member:
    """A request inside the running batch: its job, its step t, and its rows' z between
    compositions."""

    job: Job
    tables: Tables
    t: int = 0
    z: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # per-row state the step keeps (x̂_prev, APG m)
    cond: object = None  # its rows' conditions on the device: class ids or prompt rows
    null: object = None  # prompt models: its rows' null branches (negative prompts)

    def guided_now(self) -> bool:
        """Whether this request's w applies at its current step (its plan: the interval)."""
        return self.job.guided and self.tables.plan.guided[self.t]

    def doubled_now(self) -> bool:
        """Whether this request's null rows run at its current step (its plan: the interval,
        the refresh steps; never for a guidance-embedded net)."""
        return self.guided_now() and self.tables.plan.doubled[self.t] \
            and not self.job.embedded

    @property
    def done(self) -> bool:
        return self.t >= self.tables.plan.rows


@dataclass(frozen=True)
class Run:
    """Consecutive rows [start, stop) stepped by one `guided_step` call: `guided`, w applies
    (else w = 0); `doubled`, their null rows ran."""

    start: int
    stop: int
    seed: int
    rule: object
    guided: bool
    doubled: bool
    noisy: bool


class RunningBatch:
    """The rows on the device. `compose` lays out a new set of members (at a step boundary);
    `step` advances every row one step and returns the members that finished."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.bank = TableBank(engine)
        self.members: list[Member] = []
        self.extra: dict[str, torch.Tensor] = {}  # per-row state buffers, by RowState field
        self._runs_key = None
        self._zero_noise = None

    @property
    def rows(self) -> int:
        return sum(m.job.rows for m in self.members)

    def admit(self, job: Job) -> Member:
        """A member for `job` at t = 0 with z_0 ~ N(0, I) keyed (seed, sample id, 0); a prompt
        job's prompts are encoded here, once."""
        device = self.engine.device
        ids = torch.arange(job.rows, device=device)
        z = rng.randn_like_rows(job.seed, ids, 0, self.engine.sample_shape)
        tables = self.bank.get(job.combo, job.rule)
        if job.prompts is None:
            cond, null = job.labels.to(device), None
        else:
            cond, null = (encode_rows(self.engine.info, texts, device) for texts in job.prompts)
        return Member(job, tables, z=z, extra={name: torch.zeros_like(z)
                                               for name in tables.plan.state},
                      cond=cond, null=null)

    def compose(self, members: list[Member]) -> None:
        """Lay out `members` (rows grouped by seed and rule, so each group is one slice) and
        build the per-row device tensors; a host→device copy only when the batch changes."""
        self._save_rows()
        self.members = sorted(members, key=lambda m: (m.job.seed, repr(m.job.rule)))
        if not self.members:
            return
        device, jobs = self.engine.device, [m.job for m in self.members]
        self.table, self.logsnr, offsets = self.bank.concat([(j.combo, j.rule) for j in jobs])
        self.z = torch.cat([m.z for m in self.members])
        self.z_next = torch.empty_like(self.z)
        self.labels = cat_rows([m.cond for m in self.members])
        self.null = None if self.members[0].null is None else \
            cat_rows([m.null for m in self.members])
        self.w = torch.cat([j.w for j in jobs]).to(device)
        self.sample_ids = torch.cat([torch.arange(j.rows) for j in jobs]).to(device)
        self.t = torch.cat([torch.full((j.rows,), m.t) for j, m in
                            zip(jobs, self.members)]).to(device)
        offset = torch.cat([torch.full((j.rows,), offsets[(j.combo, j.rule)]) for j in jobs])
        self.index = self.t + offset.to(device)  # row → row of the concatenated table
        names = set().union(*(m.extra for m in self.members))
        self.extra = {name: torch.cat([m.extra.get(name, torch.zeros_like(m.z))
                                       for m in self.members]) for name in names}
        self._runs_key = None

    def _save_rows(self) -> None:
        """Give each current member its own copy of its rows before the layout changes."""
        start = 0
        for m in self.members:
            stop = start + m.job.rows
            m.z = self.z[start:stop].clone()
            m.extra = {name: t[start:stop].clone() for name, t in self.extra.items()}
            start = stop

    def step(self) -> list[Member]:
        """One network call on B + G rows, one fused step per run; returns finished members."""
        runs, null_rows, w = self._runs()
        logsnr = self.logsnr.index_select(0, self.index)
        eps_c, eps_u = self.engine.eps(self.z, logsnr, self.labels, null_rows, w, self.null)
        for run in runs:
            self._step_run(run, eps_c, eps_u, w)
        self.z, self.z_next = self.z_next, self.z
        self.t += 1
        self.index += 1
        for m in self.members:
            m.t += 1
        return [m for m in self.members if m.done]

    def _step_run(self, run: Run, eps_c, eps_u, w) -> None:
        rows = slice(run.start, run.stop)
        eps2 = torch.cat([eps_c[rows], eps_u[rows]]) if run.doubled else eps_c[rows]
        ids = self.sample_ids[rows]
        if run.noisy:
            noise = rng.randn_like_rows(run.seed, ids, self.t[rows] + 1, self.engine.sample_shape)
        else:
            noise = self._zeros(run.stop - run.start)
        state = RowState(**self.extra).rows(rows)
        guided_step(eps2, self.z[rows], w[rows], self.table, self.index[rows],
                    rule=run.rule, clip=self.engine.info.clip, state=state, noise=noise,
                    out=self.z_next[rows])

    def _zeros(self, count: int) -> torch.Tensor:
        if self._zero_noise is None or self._zero_noise.shape[0] < count:
            self._zero_noise = torch.zeros_like(self.z)
        return self._zero_noise[:count]

    def _runs(self):
        """The runs of this step, the rows that need a null row and each row's w at this step (0
        where not guided), rebuilt only when a member's guided/doubled/noisy state changes (a
        guidance interval boundary, a refresh step, the last step)."""
        state = [(m.guided_now(), m.doubled_now(), m.tables.noisy[m.t]) for m in self.members]
        if state != self._runs_key:
            self._runs_key = state
            self._cached = self._build_runs(state)
        return self._cached

    def _build_runs(self, state):
        runs, null_rows, start = [], [], 0
        guided_rows = torch.zeros(self.rows, dtype=torch.bool)
        for m, (guided, doubled, noisy) in zip(self.members, state):
            stop = start + m.job.rows
            guided_rows[start:stop] = guided
            if doubled:  # null rows only for the rows with w ≠ 0
                null_rows.extend(start + i for i in m.job.guided_rows)
            key = (m.job.seed, m.job.rule, guided, doubled)
            if runs and (runs[-1].seed, runs[-1].rule, runs[-1].guided, runs[-1].doubled) == key:
                last = runs.pop()
                runs.append(replace(last, stop=stop, noisy=last.noisy or noisy))
            else:
                runs.append(Run(start, stop, m.job.seed, m.job.rule, guided, doubled, noisy))
            start = stop
        w = torch.where(guided_rows.to(self.w.device), self.w, 0.0)
        return runs, torch.tensor(null_rows, dtype=torch.int64, device=self.engine.device), w

    def rows_of(self, member: Member) -> torch.Tensor:
        """The member's current z (after its last step: its x̂)."""
        start = 0
        for m in self.members:
            if m is member:
                return self.z[start:start + m.job.rows]
            start += m.job.rows
        raise KeyError("not a member of the running batch")
