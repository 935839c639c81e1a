"""Ahead-of-time compilation of the step kernels for sm_90 (no GPU needed): every main
specialisation compiles with Triton's own ptxas, spills nothing, and moves fp32 with 128-bit
vectors; the report logic flags what it must."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from cfgengine.kernels import aot  # noqa: E402


def test_main_specialisations_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "cfgengine.kernels.aot", "--arch", "90",
                           "--cases", "main", "--json", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    reports = json.loads(out.read_text())
    assert {r["case"] for r in reports} == {c.name for c in aot.cases("main")}
    for r in reports:
        assert r["arch"] == 90 and r["ok"] and r["spill_bytes"] == 0 and r["registers"] > 0
        assert r["widest_load"] == 128
        assert r["widest_store"] == 128 or r["kernel"] in aot.PARTIALS_KERNELS
    assert {r["kernel"] for r in reports} == {"_guided_step_kernel", "_row_stats_kernel"}


def test_widest_reads_vector_widths_from_ptx():
    ptx = "ld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd1];\n ld.global.b16 %h, [%rd2];\n" \
          "st.global.v2.b32 [%rd3], {%r5, %r6};\n @%p1 st.global.b32 [%rd4], %r7;"
    assert aot.widest(ptx, "ld") == 128 and aot.widest(ptx, "st") == 64
    assert aot.widest("mov.u32 %r1, 0;", "ld") == 0


@pytest.mark.parametrize("spills, load, needs, ok", [(0, 128, True, True), (8, 128, True, False),
                                                     (0, 32, True, False), (0, 32, False, True)])
def test_report_fails_on_spills_and_scalar_fp32_access(spills, load, needs, ok):
    report = aot.Report(90, "case", "kernel", 40, spills, load, 128, needs_vectors=needs)
    assert report.ok is ok and ("ok" if ok else "FAIL") in report.line()
    partials = aot.Report(90, "case", "_row_stats_kernel", 40, 0, 128, 32, needs_vectors=True)
    assert partials.ok and not aot.Report(90, "c", "k", 40, 0, 128, 32, needs_vectors=True).ok


def test_all_cases_cover_every_option_and_names_are_unique():
    names = [c.name for c in aot.cases("all")]
    # plain options, rules (rescale, zero_star, apg, refresh) × modes × thresholds × dtypes,
    # refresh's unguided Δ-reading step × modes × dtypes, dpmpp
    assert len(names) == len(set(names)) == 108 + 72 + 9 + 6
    for word in ("fp32", "bf16", "fp16", "unguided", "noise-given", "rows", "0d", "out2", "x_hat",
                 "rescale", "zero_star", "apg", "clip=dynamic", "dpmpp", "refresh"):
        assert any(word in n for n in names), word


def test_bad_arch_and_interpreter_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert aot.main(["--arch", "75"]) == 2
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--arch", "90"]) == 2
    assert capsys.readouterr().err.count("\n") == 2
