"""The fused Triton step kernel against its torch reference and the rng.py noise definition.

Runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py) with impl="triton"; on a machine with a GPU
the same tests run the compiled kernel on it, and the GPU-only checks run too (they skip on CPU).
Every test seeds its own inputs; comparisons are ‖Δ‖/‖ref‖ against the reference, never sums.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from scipy import stats

import cfgengine.kernels.step as dispatch
from cfgengine import rng
from cfgengine.kernels import CounterNoise, RowState, guided_step
from cfgengine.tables import coefficient_table as sampler_table

pytestmark = pytest.mark.skipif(not dispatch.triton_installed(),
                                reason="triton is not installed (non-Linux)")
launch = pytest.importorskip("cfgengine.kernels.launch")


def coefficient_table(*args, **kwargs) -> torch.Tensor:
    """The sampler's table as the step takes it, [T, 6]: a zero c_p column is appended while
    cfgengine.tables still builds [T, 5] (ancestral and DDIM have c_p = 0)."""
    table = sampler_table(*args, **kwargs)
    if table.shape[1] == 5:
        table = torch.cat([table, torch.zeros_like(table[:, :1])], dim=1)
    return table


SHAPE = (3, 17, 19)  # D = 969: not a power of two, not a multiple of 4
BATCH = 3
FP32_TOL = 2e-6
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def on_test_device():
    """Tensor factories in these tests allocate on DEVICE: the kernel under test lives there."""
    with torch.device(DEVICE):
        yield


def make_inputs(seed: int, batch: int = BATCH, shape=SHAPE, dtype=torch.float32, guided=True):
    """Random eps2 [2B|B, *S], z [B, *S], given noise, per-row w, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)  # on CPU, so every device sees the same inputs
    randn = lambda rows: torch.randn(rows, *shape, generator=gen, device="cpu").to(DEVICE, dtype)
    eps2, z, noise = randn(2 * batch if guided else batch), randn(batch), randn(batch)
    w = torch.rand(batch, generator=gen, device="cpu").to(DEVICE) * 4.0  # the paper's w ∈ [0, 4]
    return eps2, z, noise, w


def poisoned(like: torch.Tensor, rows: int | None = None, dtype=None) -> torch.Tensor:
    """A NaN-filled output buffer, so a value the kernel fails to write shows up."""
    shape = (like.shape[0] if rows is None else rows,) + tuple(like.shape[1:])
    return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def run_step(impl: str, eps2, z, w, table, step, **kwargs):
    """guided_step into a poisoned 2B-row out and a poisoned kept x̂ (tables with c_p = 0: never
    read); returns (z', x̂, out) and checks that every element was written and the halves of out
    agree."""
    out, x_hat = poisoned(z, 2 * z.shape[0]), poisoned(z, dtype=torch.float32)
    ret = guided_step(eps2, z, w, table, step, out=out, state=RowState(x_hat=x_hat), impl=impl,
                      **kwargs)
    assert ret.data_ptr() == out.data_ptr()
    for t in (out, x_hat):
        assert not t.isnan().any(), "an output element was left unwritten"
    assert torch.equal(out[: z.shape[0]], out[z.shape[0]:]) and torch.equal(out[: z.shape[0]], ret)
    return ret, x_hat, out


STEP_CASES = {
    "first step, int": lambda T: 0,
    "middle step, int": lambda T: T // 2,
    "last step (no noise)": lambda T: T - 1,
    "0-d tensor step": lambda T: torch.tensor(T // 2),
    "per-row steps": lambda T: torch.tensor([0, T - 1, T // 2]),
}


@pytest.mark.parametrize("step_case", STEP_CASES)
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("given_noise", [False, True])
def test_kernel_matches_reference(step_case, clip, given_noise):
    eps2, z, noise, w = make_inputs(seed=11)
    table = coefficient_table(9, "ancestral", v=0.3)
    step = STEP_CASES[step_case](table.shape[0])
    kwargs = dict(clip=clip, noise=noise if given_noise else CounterNoise(1234))
    got = run_step("triton", eps2, z, w, table, step, **kwargs)
    want = run_step("torch", eps2, z, w, table, step, **kwargs)
    for g, r in zip(got, want):
        assert rel_err(g, r) <= FP32_TOL


@pytest.mark.parametrize("w", [0.3, torch.tensor(2.0), torch.tensor([0.0, 0.1, 4.0])])
def test_guidance_weight_forms(w):
    eps2, z, _, _ = make_inputs(seed=12)
    table = coefficient_table(6, "ddim", eta=0.5)
    w = w.to(DEVICE) if isinstance(w, torch.Tensor) else w
    got = guided_step(eps2, z, w, table, 2, noise=CounterNoise(5), impl="triton")
    want = guided_step(eps2, z, w, table, 2, noise=CounterNoise(5), impl="torch")
    assert rel_err(got, want) <= FP32_TOL


def test_guidance_off_with_b_rows_of_eps():
    eps, z, _, _ = make_inputs(seed=13, guided=False)
    table = coefficient_table(6, "ancestral")
    got = run_step("triton", eps, z, 3.0, table, 1, clip=1.0, noise=CounterNoise(2))  # ε̃ = ε
    want = run_step("torch", eps, z, 0.0, table, 1, clip=1.0, noise=CounterNoise(2))
    for g, r in zip(got, want):
        assert rel_err(g, r) <= FP32_TOL


def torch_step_in(dtype, eps2, z, w, row, noise, clip):
    """The step computed by plain torch ops in `dtype` (how an unfused pipeline would run it)."""
    alpha, sigma, c_z, c_x, s, _ = row.to(dtype).unbind()
    eps_c, eps_u = eps2.chunk(2)
    eps = eps_c + w * (eps_c - eps_u)
    x_hat = ((z - sigma * eps) / alpha).clamp(-clip, clip)
    return c_z * z + c_x * x_hat + s * noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_storage_dtypes_within_twice_plain_torch_error(dtype):
    eps2, z, noise, _ = make_inputs(seed=14, dtype=dtype)
    table, step, w = coefficient_table(9, "ancestral"), 5, 0.7
    truth = guided_step(eps2.float(), z.float(), w, table, step, clip=1.0, noise=noise.float(),
                        impl="torch")
    got = guided_step(eps2, z, w, table, step, clip=1.0, noise=noise, impl="triton")
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(got, truth) <= FP32_TOL
    else:
        plain = torch_step_in(dtype, eps2, z, w, table[step], noise, 1.0)
        assert rel_err(got, truth) <= 2 * rel_err(plain, truth)


def test_out_of_2b_rows_returns_its_first_half():
    eps2, z, _, w = make_inputs(seed=15)
    table = coefficient_table(5, "ancestral")
    out2 = poisoned(z, 2 * BATCH)
    got = guided_step(eps2, z, w, table, 1, out=out2, impl="triton")
    assert got.data_ptr() == out2.data_ptr() and torch.equal(out2[:BATCH], out2[BATCH:])
    assert rel_err(got, guided_step(eps2, z, w, table, 1, impl="torch")) <= FP32_TOL


@pytest.mark.parametrize("batch, shape, config", [
    (5, SHAPE, launch.LaunchConfig(block_rows=2, block_d=64, num_warps=4)),  # tails, both axes
    (37, (2,), None),  # toy 2-d samples: many rows per tile
    (4, (1,), launch.LaunchConfig(block_rows=1, block_d=16, num_warps=4)),
])
def test_tiles_and_tails(batch, shape, config, monkeypatch):
    monkeypatch.setattr(launch, "MAX_GRID_ROWS", 2)  # the kernel's row loop must cover the rest
    eps2, z, _, w = make_inputs(seed=16, batch=batch, shape=shape)
    table = coefficient_table(7, "ancestral")
    steps = torch.arange(batch) % table.shape[0]
    out = poisoned(z)
    launch.guided_step_triton(eps2, z, w, table, steps, clip=1.0, noise=CounterNoise(9), out=out,
                              config=config)
    want = guided_step(eps2, z, w, table, steps, clip=1.0, noise=CounterNoise(9), impl="torch")
    assert rel_err(out, want) <= FP32_TOL


def test_given_noise_is_not_read_where_s_is_zero():
    eps2, z, noise, w = make_inputs(seed=17)
    table = coefficient_table(5, "ddim", eta=0.0)  # s = 0 on every row
    noise[:] = float("nan")
    got = guided_step(eps2, z, w, table, 2, noise=noise, impl="triton")
    want = guided_step(eps2, z, w, table, 2, impl="torch")
    assert rel_err(got, want) <= FP32_TOL


def test_step_off_the_table_gives_nan_rows_not_a_fault():
    eps2, z, _, w = make_inputs(seed=18)
    table = coefficient_table(5, "ancestral")
    got = guided_step(eps2, z, w, table, torch.tensor([1, 5, -1]), impl="triton")
    assert not got[0].isnan().any() and got[1:].isnan().all()


# --- in-kernel noise: the rng.py definition, and its statistics ---------------------------------

def kernel_noise(seed, sample_ids, steps, numel: int) -> torch.Tensor:
    """The kernel's n, exposed by a table whose rows are (α, σ, c_z, c_x, s) = (1, 0, 0, 0, 1) and
    zero inputs: x̂ = 0, so z' = n. `steps` (Tensor[B]) picks the Philox k = step + 1."""
    batch = sample_ids.shape[0]
    table = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]]).repeat(int(steps.max()) + 1, 1)
    zeros = torch.zeros(batch, numel)
    return guided_step(zeros.repeat(2, 1), zeros, 0.0, table, steps,
                       noise=CounterNoise(seed, sample_ids), impl="triton")


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, torch.tensor(2**33 + 1)])
def test_in_kernel_noise_is_rng_noise(seed):
    seed = seed.to(DEVICE) if isinstance(seed, torch.Tensor) else seed
    ids = torch.tensor([0, 1, 2**32 + 5, 123456789012])  # high words exercised
    steps = torch.tensor([0, 3, 1, 2])
    got = kernel_noise(seed, ids, steps, 1001)
    want = rng.randn(seed, ids, steps + 1, 1001)
    assert rel_err(got, want) <= 1e-5
    assert (got - want).abs().max() <= 1e-4


def test_noise_of_a_row_does_not_depend_on_its_batch():
    ids, steps = torch.tensor([40, 9, 2**35, 3]), torch.tensor([2, 0, 5, 1])
    full = kernel_noise(99, ids, steps, 333)
    part = kernel_noise(99, ids[[2, 0]], steps[[2, 0]], 333)
    assert torch.equal(part, full[[2, 0]])


def test_noise_moments_are_standard_normal():
    samples = kernel_noise(2024, torch.arange(8), torch.full((8,), 3), 4096).flatten().double()
    samples = samples.cpu()
    n, checks = samples.numel(), 5
    z_crit = stats.norm.isf(1e-4 / (2 * checks))  # two-sided, Bonferroni over the checks
    assert abs(samples.mean().item()) * math.sqrt(n) <= z_crit
    assert abs(samples.var().item() - 1.0) * math.sqrt(n / 2) <= z_crit
    assert abs(stats.skew(samples.numpy())) * math.sqrt(n / 6) <= z_crit
    assert abs(stats.kurtosis(samples.numpy())) * math.sqrt(n / 24) <= z_crit
    assert stats.kstest(samples.numpy(), "norm").pvalue >= 1e-4 / checks


def test_noise_streams_are_uncorrelated():
    """Rows that differ in sample id or in step, and the four Philox lanes of one row."""
    numel = 8192
    ids, steps = torch.tensor([0, 1, 0, 2**32]), torch.tensor([4, 4, 5, 4])
    rows = kernel_noise(31, ids, steps, numel).double()  # (4, numel)
    lanes = rows[0].reshape(-1, 4).T  # (4, numel / 4): Philox outputs 0..3
    pairs = [(rows[0], rows[1]), (rows[0], rows[2]), (rows[0], rows[3]), (rows[1], rows[3])]
    pairs += [(lanes[a], lanes[b]) for a in range(4) for b in range(a + 1, 4)]
    z_crit = stats.norm.isf(1e-4 / (2 * len(pairs)))
    for a, b in pairs:
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(r) * math.sqrt(a.numel()) <= z_crit


# --- a whole sampling run ------------------------------------------------------------------------

def toy_eps2(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A smooth class-conditional ε stand-in: rows 0..B−1 conditional, B..2B−1 null (label K)."""
    shift = torch.cat([labels.float() + 1.0, torch.zeros_like(labels, dtype=torch.float32)])
    z2 = torch.cat([z, z])  # (2B, *S)
    return 0.8 * torch.tanh(z2) + 0.1 * shift.reshape(-1, *([1] * (z.dim() - 1)))


@pytest.mark.parametrize("sampler, kwargs", [("ancestral", dict(v=0.3)), ("ddim", dict(eta=0.5))])
def test_sampling_run_through_kernel_equals_reference(sampler, kwargs):
    steps, seed = 8, 77
    ids, labels = torch.tensor([0, 1, 2, 10**10]), torch.tensor([0, 3, 1, 2])
    table = coefficient_table(steps, sampler, **kwargs)
    w = torch.tensor([0.0, 0.3, 1.0, 4.0])
    results = {}
    for impl in ("triton", "torch"):
        z = rng.randn_like_rows(seed, ids, 0, (2, 5, 7))  # k = 0: z_0
        step = torch.zeros((), dtype=torch.int64)  # advanced in place, as a CUDA graph would
        x_hat = torch.empty_like(z)
        for _ in range(steps):
            z = guided_step(toy_eps2(z, labels), z, w, table, step, clip=1.0,
                            state=RowState(x_hat=x_hat), noise=CounterNoise(seed, ids), impl=impl)
            step += 1
        results[impl] = x_hat
        assert torch.equal(z, x_hat)  # the last row (α, σ, 0, 1, 0) makes z' = x̂
    assert rel_err(results["triton"], results["torch"]) <= 1e-5


# --- dispatch and errors -------------------------------------------------------------------------

def test_auto_takes_torch_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the kernel ran on CPU under impl='auto'")
    monkeypatch.setattr(launch, "launch_step", fail)
    eps2, z, _, w = (t.cpu() for t in make_inputs(seed=19))
    guided_step(eps2, z, w, coefficient_table(4, "ancestral", device="cpu"), 1, impl="auto")


def test_triton_impl_without_triton_says_so(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    eps2, z, _, w = make_inputs(seed=20)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        guided_step(eps2, z, w, coefficient_table(4, "ancestral"), 1, impl="triton")


def python_stdout(script: str) -> str:
    """What `script` prints, run in a fresh interpreter (imports start from nothing)."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_module_imports_and_runs_torch_without_triton():
    """Where Triton cannot be installed, the torch path works and impl="triton" says why not."""
    script = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from cfgengine.kernels import guided_step\n"
        "args = (torch.zeros(4, 3), torch.zeros(2, 3), 0.3, torch.zeros(3, 6) + 0.5, 1)\n"
        "guided_step(*args)\n"
        "try:\n"
        "    guided_step(*args, impl='triton')\n"
        "except RuntimeError as err:\n"
        "    print(err)\n")
    assert "needs the `triton` package" in python_stdout(script)


def test_cpu_step_does_not_import_triton():
    """The torch path (every CPU sampling run) leaves Triton unimported: the kernels' layers load
    on first use of impl="triton" or of a CUDA tensor."""
    script = (
        "import sys, torch\n"
        "import cfgengine\n"
        "from cfgengine.kernels import CounterNoise, RowState, guided_step\n"
        "z = torch.zeros(2, 3)\n"
        "guided_step(torch.zeros(4, 3), z, 0.3, torch.zeros(3, 6) + 0.5, 1,\n"
        "            state=RowState.zeros_like(z, ['x_hat']), noise=CounterNoise(3))\n"
        "print(sorted(m for m in sys.modules if m == 'triton' or m.endswith('.launch')))\n")
    assert python_stdout(script).strip() == "[]"


def test_row_state_allocates_and_selects_its_fields():
    z = torch.ones(4, 3, dtype=torch.bfloat16)
    state = RowState.zeros_like(z, ["momentum", "x_hat"])
    assert state.momentum.dtype == state.x_hat.dtype == torch.float32
    assert state.momentum.shape == z.shape and not state.momentum.any()
    part = state.rows(slice(1, 3))
    part.x_hat.fill_(2.0)  # views: a step on some rows updates the whole batch's state
    assert state.x_hat[1:3].eq(2.0).all() and not state.x_hat[0].any()
    assert RowState.zeros_like(z, ["x_hat"]).momentum is None
    with pytest.raises(ValueError, match="RowState has no field"):
        RowState.zeros_like(z, ["x_hat_prev"])


@pytest.mark.parametrize("bad", ["strided out", "int32 ids", "float step", "double eps"])
def test_launcher_rejects_bad_operands(bad):
    eps2, z, _, w = make_inputs(seed=21)
    kwargs = dict(step=1)
    if bad == "strided out":
        kwargs["out"] = torch.empty(BATCH, *SHAPE[::-1]).transpose(1, 3)
    elif bad == "int32 ids":
        kwargs["noise"] = CounterNoise(0, torch.arange(BATCH, dtype=torch.int32))
    elif bad == "float step":
        kwargs["step"] = torch.tensor(1.0)
    else:
        eps2 = eps2.double()
    with pytest.raises(ValueError):
        guided_step(eps2, z, w, coefficient_table(4, "ancestral"), impl="triton", **kwargs)


# --- GPU only ------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference_at_size(dtype):
    eps2, z, _, w = (t.cuda() for t in make_inputs(seed=30, batch=16, shape=(4, 64, 64),
                                                   dtype=dtype))
    table = coefficient_table(32, "ancestral", device="cuda")
    steps = torch.arange(16, device="cuda") % 32
    got = guided_step(eps2, z, w, table, steps, clip=1.0, noise=CounterNoise(3))
    truth = guided_step(eps2.float(), z.float(), w, table, steps, clip=1.0, noise=CounterNoise(3),
                        impl="torch")
    assert rel_err(got, truth) <= (FP32_TOL if dtype == torch.float32 else 1e-2)


@needs_cuda
def test_cuda_graph_replays_with_an_advancing_step():
    eps2, z, _, w = (t.cuda() for t in make_inputs(seed=31, batch=4, shape=(3, 32, 32)))
    table = coefficient_table(6, "ancestral", device="cuda")
    step, out = torch.zeros((), dtype=torch.int64, device="cuda"), torch.empty_like(z)
    guided_step(eps2, z, w, table, step, clip=1.0, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        guided_step(eps2, z, w, table, step, clip=1.0, out=out)
    for t in range(6):
        step.fill_(t)
        graph.replay()
        want = guided_step(eps2, z, w, table, t, clip=1.0, impl="torch")
        assert rel_err(out, want) <= 1e-5


@pytest.mark.skipif(sampler_table(2).shape[1] == 5,
                    reason="the sampler still builds [T, 5] tables; the step takes [T, 6]")
def test_full_sample_through_the_kernel_equals_the_reference(monkeypatch):
    """cfgengine.sample with every step run by the Triton kernel (interpreter on CPU)."""
    import functools

    import cfgengine
    import cfgengine.sampler as sampler_module

    model = cfgengine.load("gmm")
    labels = torch.tensor([0, 3, 1, 4, 2, 2, 0])
    w = torch.tensor([0.0, 0.3, 1.0, 4.0, 0.5, 2.0, 1.5])
    reference = cfgengine.sample(model, labels, w=w, steps=12, seed=3)
    monkeypatch.setattr(sampler_module, "guided_step", functools.partial(guided_step,
                                                                          impl="triton"))
    fused = cfgengine.sample(model, labels, w=w, steps=12, seed=3)
    assert ((fused - reference).norm() / reference.norm()) < 1e-5
