"""Load generator for `cfgengine serve` (loopback only, bounded): a mixed workload sent all at once
against the same requests sent one by one, on one in-process server; throughput and p50/p99
latency, and the largest difference between the two modes' samples (the batch must not change
them).

    python -m cfgengine.bench.serve --ckpt default --requests 24 --rounds 3

Each round runs both modes back to back (alternating which goes first), so both see the same
machine load; the JSON (device, versions, date, load average) goes under bench/results/.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import io
import json
import statistics
import sys
import time

import numpy as np
import torch

from cfgengine.atomic import write_atomic
from cfgengine.bench.timing import _version, environment
from cfgengine.registry import load

W_VALUES = (0.0, 0.3, 1.0, 4.0)
STEPS = (8, 16, 24)
SAMPLERS = ("ancestral", "ddim")


def workload(count: int, num_classes: int, seed: int = 0) -> list[dict]:
    """`count` mixed requests: 1–2 classes each, w ∈ {0, 0.3, 1, 4}, T ∈ {8, 16, 24}, ancestral
    or DDIM (η = 0), each its own seed."""
    gen = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        labels = gen.integers(0, num_classes, size=int(gen.integers(1, 3))).tolist()
        requests.append(dict(labels=labels, w=W_VALUES[i % 4], steps=STEPS[i % 3],
                             sampler=SAMPLERS[(i // 3) % 2], seed=1000 + i))
    return requests


def post(client, url: str, body: dict) -> tuple[float, np.ndarray]:
    """(latency seconds, samples) of one request."""
    start = time.perf_counter()
    response = client.post(f"{url}/v1/samples", json=body, timeout=600)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"request failed: {response.status_code} {response.text}")
    return seconds, np.load(io.BytesIO(response.content))


def one_by_one(client, url: str, requests: list[dict]):
    start = time.perf_counter()
    results = [post(client, url, body) for body in requests]
    return time.perf_counter() - start, results


def all_at_once(client, url: str, requests: list[dict]):
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda body: post(client, url, body), requests))
    return time.perf_counter() - start, results


def summary(wall: float, results, requests: list[dict]) -> dict:
    """Throughput (samples/s, requests/s) and latency percentiles of one mode's run."""
    latencies = sorted(seconds for seconds, _ in results)
    samples = sum(len(r["labels"]) for r in requests)
    return dict(wall_s=round(wall, 4), samples_per_s=round(samples / wall, 3),
                requests_per_s=round(len(requests) / wall, 3),
                p50_s=round(float(np.percentile(latencies, 50)), 4),
                p99_s=round(float(np.percentile(latencies, 99)), 4))


def run_rounds(url: str, requests: list[dict], rounds: int, budget_s: float) -> dict:
    import httpx

    modes = {"one_by_one": one_by_one, "concurrent": all_at_once}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    max_diff, start = 0.0, time.perf_counter()
    limits = httpx.Limits(max_connections=len(requests) + 4)
    with httpx.Client(limits=limits) as client:
        post(client, url, requests[0])  # warm-up: tables, allocator, first-call costs
        for r in range(rounds):
            order = list(modes) if r % 2 == 0 else list(modes)[::-1]
            outputs = {}
            for name in order:
                wall, results = modes[name](client, url, requests)
                runs[name].append(summary(wall, results, requests))
                outputs[name] = [x for _, x in results]
            max_diff = max(max_diff, max(float(np.abs(a - b).max()) for a, b in
                                         zip(outputs["one_by_one"], outputs["concurrent"])))
            if time.perf_counter() - start > budget_s:
                break
    return dict(runs=runs, max_abs_diff_between_modes=max_diff)


def report(args, requests: list[dict], measured: dict, model) -> dict:
    """The result record: figures (median over rounds), the speed-up, and where they were taken."""
    median = {name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
              for name, runs in measured["runs"].items()}
    speedup = median["one_by_one"]["wall_s"] / median["concurrent"]["wall_s"]
    rounds = [round(a["wall_s"] / b["wall_s"], 3) for a, b in
              zip(measured["runs"]["one_by_one"], measured["runs"]["concurrent"])]
    env = environment(args.device or "cpu", "time.perf_counter, client side, wall clock")
    env.update(fastapi=_version("fastapi"), uvicorn=_version("uvicorn"), cpu_model=cpu_model())
    return dict(command=" ".join(["python -m cfgengine.bench.serve"] + sys.argv[1:]),
                environment=env, model=args.ckpt, sample_shape=list(model.sample_shape),
                max_rows=args.max_rows, requests=requests, median=median,
                speedup_concurrent_vs_one_by_one=round(speedup, 3), speedup_per_round=rounds,
                goal_speedup=1.5,
                **measured)


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), None)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from cfgengine.serve.app import create_app, serve_in_thread

    model = load(args.ckpt)
    requests = workload(args.requests, model.num_classes, args.seed)
    app = create_app(model, device=args.device, max_rows=args.max_rows,
                     max_queue=args.requests + 1)
    with serve_in_thread(app, "127.0.0.1") as url:  # loopback only
        measured = run_rounds(url, requests, args.rounds, args.budget)
    result = report(args, requests, measured, model)
    write_atomic(lambda tmp: open(tmp, "w").write(json.dumps(result, indent=1) + "\n"), args.out)
    print(json.dumps({"median": result["median"], "speedup": result[
        "speedup_concurrent_vs_one_by_one"], "max_abs_diff": result[
        "max_abs_diff_between_modes"]}, indent=1))
    print(f"-> {args.out}")
    return 0


def parse_args(argv):
    today = datetime.date.today().isoformat()
    p = argparse.ArgumentParser(prog="python -m cfgengine.bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="default", help="model name or file (default: default)")
    p.add_argument("--requests", type=int, default=24, help="requests per mode (≤ 256)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of both modes (≤ 10)")
    p.add_argument("--max-rows", type=int, default=64, help="the server's --max-rows")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--budget", type=float, default=600, help="stop starting rounds after this "
                                                             "many seconds")
    p.add_argument("--out", default=f"bench/results/serve-cpu-{today}.json")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 256 or not 1 <= args.rounds <= 10:
        p.error("--requests must be in [1, 256] and --rounds in [1, 10]")
    return args


if __name__ == "__main__":
    sys.exit(main())
