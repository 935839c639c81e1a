"""Every kernel the sampler can launch, compiled ahead of time for named GPU targets — no GPU needed.

    python -m cfgengine.kernels.aot --arch 80,90 [--cases main|all] [--json out.json]

Each case calls the public launcher (`guided_step(..., impl="triton")`) on small CPU tensors with
the kernel objects swapped for recorders, so the arguments and constexprs recorded are exactly the
ones a real launch passes. Each recorded launch is specialised the way Triton's JIT would specialise
it (`native_specialize_impl`: 16-byte aligned pointers, integers divisible by 16, ints equal to 1
as constants) and compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`,
which runs Triton's own ptxas. One line per (arch, specialisation): registers and spills (ptxas -v)
and the widest global load and store in the PTX. Exit 1 on a compile failure, any spill, or fp32
storage not moved with 128-bit vectors.

Run it with TRITON_INTERPRET unset: an interpreted kernel cannot be compiled.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

ARCHS = {"80": 80, "90": 90}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SAMPLE_SHAPE = (3, 16, 16)  # 768 elements: a multiple of 16, as a real image row is
BATCH = 4
# kernels whose only stores are a few fp32 partials per row (no storage tensor): loads must still
# be 128-bit vectors, stores need not be
PARTIALS_KERNELS = ("_row_stats_kernel",)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: the JIT function, its runtime arguments and launch options."""

    kernel: object
    args: tuple
    kwargs: dict


@dataclasses.dataclass(frozen=True)
class Case:
    """One way the sampler calls the step: a name and the call that makes it."""

    name: str
    dtype: torch.dtype
    call: Callable[[], object]


class _Recorder:
    """Stands in for a JIT function: `recorder[grid](*args, **kwargs)` records instead of running."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


@contextmanager
def recorded() -> Iterator[list[Launch]]:
    """Swap every JIT function of kernels/triton_step.py for a recorder while the block runs."""
    from triton.runtime.jit import JITFunction

    from cfgengine.kernels import launch, triton_step

    launches: list[Launch] = []
    kernels = {name: obj for name, obj in vars(triton_step).items()
               if isinstance(obj, JITFunction)}
    saved = launch.require_triton
    launch.require_triton = lambda device: None  # CPU tensors stand in for device ones
    try:
        for name, kernel in kernels.items():
            setattr(triton_step, name, _Recorder(kernel, launches))
        yield launches
    finally:
        for name, kernel in kernels.items():
            setattr(triton_step, name, kernel)
        launch.require_triton = saved


def record(case: Case) -> list[Launch]:
    """The launches one call of `case` makes."""
    with recorded() as launches:
        case.call()
    if not launches:
        raise RuntimeError(f"case {case.name} launched no kernel")
    return launches


def source(launch: Launch):
    """(ASTSource, options) of a launch, specialised as Triton's JIT specialises it."""
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    fn = launch.kernel
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages", "maxnreg")
               if k in launch.kwargs}
    values = dict(zip(fn.arg_names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k not in options})
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False,
                                           not param.do_not_specialize, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = key
        elif key == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), options


@dataclasses.dataclass(frozen=True)
class Report:
    arch: int
    case: str
    kernel: str
    registers: int
    spill_bytes: int
    widest_load: int
    widest_store: int
    needs_vectors: bool

    @property
    def ok(self) -> bool:
        stores = self.widest_store >= 128 or self.kernel in PARTIALS_KERNELS
        vectorised = self.widest_load >= 128 and stores
        return self.spill_bytes == 0 and (vectorised or not self.needs_vectors)

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"sm_{self.arch} {self.case:<44} {self.kernel:<26} regs {self.registers:3d}  "
                f"spills {self.spill_bytes:4d} B  ld {self.widest_load:3d}b  "
                f"st {self.widest_store:3d}b  {verdict}")


_WIDTHS = {"b8": 8, "b16": 16, "b32": 32, "b64": 64, "u8": 8, "u16": 16, "u32": 32, "u64": 64,
           "s32": 32, "s64": 64, "f32": 32, "f16": 16, "bf16": 16}


def widest(ptx: str, op: str) -> int:
    """The widest global access of kind `op` ("ld" or "st") in bits: vector count × element."""
    best = 0
    for vec, elem in re.findall(rf"\b{op}\.global(?:\.\w+)*?(?:\.v(\d))?\.(b\d+|u\d+|s\d+|f\d+|bf16)\b",
                                ptx):
        best = max(best, int(vec or 1) * _WIDTHS.get(elem, 0))
    return best


def resources(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) of the PTX's kernel by Triton's own ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        # Triton's own ptxas flags (triton/backends/nvidia/compiler.py), so the figures are the
        # ones of the cubin Triton builds
        done = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={gpu}", path, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr.strip().splitlines()[:2]}")
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr))
    return registers, spills


def compile_launch(launch: Launch, case: Case, arch: int) -> Report:
    """Compile one recorded launch for sm_`arch` and read its figures of merit."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, options = source(launch)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    registers, spills = resources(ptx, arch)
    return Report(arch, case.name, launch.kernel.__name__, registers, spills, widest(ptx, "ld"),
                  widest(ptx, "st"), needs_vectors=case.dtype == torch.float32)


# ---------------------------------------------------------------------------------------------
# The cases: every way the sampler, the CUDA-graph loop and the server call the step.
# ---------------------------------------------------------------------------------------------


RULES = ("cfg", "rescale", "zero_star", "apg", "refresh")


def _rule(name: str):
    from cfgengine.guidance import APG, CFG, ZeroStar

    return {"cfg": CFG(), "rescale": CFG(rescale=0.7), "zero_star": ZeroStar(),
            "apg": APG(eta=0.5, momentum=-0.5, norm_threshold=2.0), "refresh": CFG(refresh=2)}[name]


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How one call of the step is made: storage dtype, guided or not, given or in-kernel noise,
    step and w as Python scalars ("scalar"), 0-d device tensors ("0d", the CUDA-graph loop) or
    per-row tensors ("rows", serving), z' into both halves of a [2B] `out` ("out2"), x̂ kept in
    the RowState, the guidance rule, the threshold (a number or "dynamic") and a DPM-Solver++(2M)
    table (c_p ≠ 0: the kept x̂ is read as x̂_prev), or `history` x̂ of earlier steps kept (2: DPM++
    3M SDE, 3: UniPC order 3, their 7- and 8-column tables)."""

    dtype: torch.dtype
    guided: bool = True
    noise: bool = False
    mode: str = "scalar"
    out2: bool = False
    x_hat: bool = False
    rule: str = "cfg"
    clip: str = "1.0"
    dpmpp: bool = False
    history: int = 0

    @property
    def name(self) -> str:
        parts = [DTYPE_NAMES[self.dtype], "guided" if self.guided else "unguided",
                 "noise-given" if self.noise else "noise-in-kernel", self.mode]
        parts += [flag for flag, on in (("out2", self.out2), ("x_hat", self.x_hat),
                                        ("dpmpp", self.dpmpp)) if on]
        parts += [] if self.rule == "cfg" else [self.rule]
        parts += [] if self.clip == "1.0" else [f"clip={self.clip}"]
        parts += [f"history={self.history}"] if self.history else []
        return " ".join(parts)


def _step_call(o: StepOptions) -> Callable[[], object]:
    from cfgengine.guidance import DynamicThreshold
    from cfgengine.kernels import CounterNoise, RowState, guided_step

    def call():
        gen = torch.Generator().manual_seed(0)
        z = torch.randn((BATCH, *SAMPLE_SHAPE), generator=gen).to(o.dtype)
        eps2 = torch.randn(((2 if o.guided else 1) * BATCH, *SAMPLE_SHAPE), generator=gen)
        table = _table(o)
        step, w, seed = {"scalar": (3, 0.7, 5),
                         "0d": (torch.tensor(3), torch.tensor(0.7), torch.tensor(5)),
                         "rows": (torch.arange(BATCH) % 7, torch.rand(BATCH), 5)}[o.mode]
        kept = max(o.history, int(o.dpmpp or o.x_hat))  # x̂ of that many earlier steps
        names = (["momentum"] * (o.rule == "apg") + ["delta"] * (o.rule == "refresh")
                 + ["x_hat", "x_hat_2", "x_hat_3"][:kept])
        ids = torch.arange(BATCH) + 2**33 if o.mode == "rows" else None
        return guided_step(
            eps2.to(o.dtype), z, w, table, step, impl="triton", rule=_rule(o.rule),
            clip=DynamicThreshold() if o.clip == "dynamic" else float(o.clip),
            state=RowState.zeros_like(z, names),
            noise=torch.randn_like(z) if o.noise else CounterNoise(seed, ids),
            out=torch.empty_like(eps2.to(o.dtype)) if o.out2 else None)
    return call


def _table(o: StepOptions) -> torch.Tensor:
    """An 8-row float32 table: ancestral, DPM-Solver++(2M), or the sampler keeping o.history x̂."""
    from cfgengine.samplers import sampler_rows
    from cfgengine.schedule import logsnr_grid
    from cfgengine.tables import coefficient_table

    if not o.history:
        return coefficient_table(8, "dpmpp_2m" if o.dpmpp else "ancestral")
    sampler, options = {2: ("dpmpp_3m_sde", {}), 3: ("unipc", {"order": 3})}[o.history]
    return sampler_rows(sampler, logsnr_grid(8), **options).table.float()


def _case(o: StepOptions) -> Case:
    return Case(o.name, o.dtype, _step_call(o))


def cases(which: str = "all") -> list[Case]:
    """"main": what the sampler launches most — each dtype guided or not at scalar and 0-d step
    with in-kernel noise, plus (fp32) every rule, the dynamic threshold and the dpmpp term; "all":
    every combination of the plain step's options, every rule × step mode × threshold, and the
    dpmpp term, for each storage dtype."""
    dtypes = tuple(DTYPE_NAMES)
    if which == "main":
        plain = [StepOptions(d, g, mode=m, out2=g and m == "0d")
                 for d, g, m in itertools.product(dtypes, (True, False), ("scalar", "0d"))]
        extra = [StepOptions(torch.float32, rule=r) for r in RULES[1:]]
        extra += [StepOptions(torch.float32, guided=False, rule="refresh")]  # Δ read back
        extra += [StepOptions(torch.float32, clip="dynamic"),
                  StepOptions(torch.float32, guided=True, dpmpp=True, x_hat=True),
                  StepOptions(torch.float32, history=2), StepOptions(torch.float32, history=3)]
        return [_case(o) for o in plain + extra]
    plain = [StepOptions(d, g, n, m, o, x) for d, g, n, m, o, x in itertools.product(
        dtypes, (True, False), (False, True), ("scalar", "0d", "rows"), (False, True),
        (False, True)) if not (o and not g)]
    rules = [StepOptions(d, mode=m, rule=r, clip=c) for d, r, m, c in itertools.product(
        dtypes, RULES[1:], ("scalar", "0d", "rows"), ("1.0", "dynamic"))]
    rules += [StepOptions(d, False, mode=m, rule="refresh")
              for d, m in itertools.product(dtypes, ("scalar", "0d", "rows"))]
    dpmpp = [StepOptions(d, mode=m, dpmpp=True) for d, m in itertools.product(dtypes,
                                                                             ("scalar", "0d"))]
    return [_case(o) for o in plain + rules + dpmpp]


def run(archs: list[int], which: str, progress: Callable[[str], None] = print) -> list[Report]:
    """Compile every case for every arch; one report per (arch, recorded launch)."""
    reports = []
    for case in cases(which):
        for launch in record(case):
            for arch in archs:
                report = compile_launch(launch, case, arch)
                progress(report.line())
                reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="80,90", help="comma list of 80, 90 (default: 80,90)")
    parser.add_argument("--cases", choices=("main", "all"), default="all")
    parser.add_argument("--json", default=None, help="also write the reports as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET (an interpreted kernel cannot be compiled)",
              file=sys.stderr)
        return 2
    try:
        archs = [ARCHS[a.strip()] for a in args.arch.split(",") if a.strip()]
    except KeyError as err:
        print(f"aot: --arch takes 80 and/or 90, got {err}", file=sys.stderr)
        return 2
    try:
        reports = run(archs, args.cases)
    except Exception as err:  # a compile failure is the finding: one line, exit 1
        print(f"aot: compile failed: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"ok": r.ok} for r in reports], f, indent=1)
    failed = [r for r in reports if not r.ok]
    print(f"{len(reports)} specialisations compiled, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
