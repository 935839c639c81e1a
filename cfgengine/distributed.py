"""Many processes under torchrun (docs/design.md, "torchrun"): `torchrun … --no-python cfgengine
sample|eval|train …` runs one process per rank with the flags of a single process.

torchrun (or any launcher of torch's env:// rendezvous) sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `init` joins the group with gloo for CPU tensors and, where this torch
has CUDA, nccl for CUDA tensors (one group, a backend per device type). Without those variables
every helper here is the single-process identity (rank 0 of 1), so the commands run one code path.

sample/eval split the sample ids 0..N−1 into contiguous shards, one per rank (the noise of sample i
is keyed by i, so a shard is the same numbers a single process draws for those rows); rank 0
gathers and writes. Only rank 0 writes files and shows progress.

Agreement: every command starts with a vote on a digest of its flags, and `sample` then on the
model's digest (cfgengine.provenance: weights, config, code); ranks started with different
`--classes`, `--w`, `--seed` or model files stop with one line before anything is written.

Failure: the ranks run the same sequence of collectives, and every collective here starts with a
vote (one all-reduce) on whether some rank has failed. A rank whose command raises casts a
"failed" vote in place of its next collective: the lowest failing rank reports its error (one
line, exit code 2), its peers stop silently at that vote — before rank 0 writes anything. A rank
that dies without voting (killed, or failing inside DDP's own all-reduces) breaks its peers'
collectives; they wait quietly for torchrun to stop them and report only if it does not.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what env:// rendezvous needs
PEER_GRACE_S = 10.0  # how long a rank whose peer vanished waits for torchrun to stop it


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files, prints results and shows progress."""
        return self.rank == 0


class PeerFailed(Exception):
    """Another rank failed (it reports the error); this rank stops without a word."""


@dataclass
class _Status:
    """How this process stands in the failure protocol (module docstring)."""

    voted: bool = False  # a vote has already reported a failure
    reporter: bool = False  # this rank reports the job's error
    lockstep: bool = False  # inside `lockstep()`: votes cannot be matched


_world = World()
_status = _Status()


def launched() -> bool:
    """Whether torchrun (or another env:// launcher) started this process."""
    return all(name in os.environ for name in ENV)


def world() -> World:
    """The current job's World (rank 0 of 1 outside torchrun or before `init`)."""
    return _world


def is_main() -> bool:
    return _world.main


def init() -> World:
    """Join torchrun's process group (once); a no-op for a single process."""
    global _world, _status
    _status = _Status()
    if not launched() or dist.is_initialized():
        return _world
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # nccl needs each rank on its own device
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    _world = World(dist.get_rank(), dist.get_world_size(), local_rank)
    # torchrun stops the other ranks with SIGTERM: unwind (atomic writes clean up) and go quietly
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return _world


def close() -> None:
    """Leave the process group joined by `init`."""
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def local_device(device: str | None) -> str | None:
    """A device name for this rank: bare `cuda` (or train's `auto` on a CUDA machine) becomes
    `cuda:LOCAL_RANK` under torchrun, one GPU per process; anything else is kept."""
    if _world.size == 1 or device is None:
        return device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{_world.local_rank}"
    return device


# ---------------------------------------------------------------------------------------------
# Votes and the command wrapper


def _vote(failed: bool) -> int:
    """The lowest rank that has failed, or the world size when none has (one int64 all-reduce)."""
    if not dist.is_initialized():
        return _world.rank if failed else _world.size
    flag = torch.tensor([_world.rank if failed else _world.size], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return int(flag)


def _meet(error: Exception | None) -> None:
    """One vote, `error` being this rank's failure (or None). Returns when no rank failed; else
    raises `error` on the lowest failing rank (it reports) and PeerFailed on the others."""
    first = _vote(error is not None)
    if first == _world.size:
        return
    _status.voted = True
    if first != _world.rank:
        raise PeerFailed
    _status.reporter = True
    raise error


def agree() -> None:
    """Meet the other ranks; PeerFailed if one of them has failed."""
    _meet(None)


def on_main(write: Callable):
    """`write()` on rank 0 (its result there, None elsewhere), then every rank meets: if it
    raised, rank 0 reports the error and the others stop."""
    if _world.size == 1:
        return write()
    result, error = None, None
    if _world.main:
        try:
            result = write()
        except Exception as err:  # every kind: the peers must hear of it at the vote
            error = err
    _meet(error)
    return result


@contextmanager
def lockstep():
    """A region where peers may sit in collectives this rank cannot match with a vote (DDP's
    gradient all-reduces): an error inside is reported by the rank that hit it, unvoted; its
    peers' collectives then break and torchrun stops them."""
    _status.lockstep = True
    yield
    _status.lockstep = False  # not reached on an error: the command wrapper must not vote


def command(run: Callable) -> Callable:
    """Wrap a subcommand's `run(args)` for torchrun: join the group, vote at the end, and turn a
    failure on any rank into one reported error (see the module docstring)."""
    @functools.wraps(run)
    def wrapper(args) -> int:
        joined = not dist.is_initialized()  # a caller that joined the group itself keeps it
        init()
        try:
            return _run_voting(run, args)
        finally:
            if joined:
                close()
    return wrapper


def _run_voting(run: Callable, args) -> int:
    try:
        agree_on("the command's flags", vars(args))
        result = run(args)
        agree()  # a rank that failed after the last collective still stops the job
        return result
    except PeerFailed:
        return 0  # the failing rank reports; torchrun names it as the root cause
    except Exception as err:
        return _lost_peer(err) if _broken_collective(err) else _report(err)


def _broken_collective(err: Exception) -> bool:
    """Whether `err` is a collective that broke (a peer vanished): torch raises DistError, or,
    from inside autograd (DDP's gradient all-reduce), a RuntimeError carrying gloo's or NCCL's
    message."""
    if _world.size == 1:
        return False
    text = str(err)
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and ("gloo/transport" in text or "NCCL" in text))


def _report(error: Exception) -> int:
    """This rank failed outside a vote: vote now (unless it already did, or cannot), so that one
    rank reports; 0 when a peer reports instead."""
    if not (_status.voted or _status.lockstep):
        try:
            _meet(error)
        except PeerFailed:
            return 0
        except dist.DistError:
            pass  # the peers are gone: report our own error
    _status.reporter = True
    raise error


def _lost_peer(err: Exception) -> int:
    """A collective broke because a peer died without voting: that peer, or torchrun, reports it.
    Wait for torchrun's SIGTERM; say one line only if it never comes."""
    time.sleep(PEER_GRACE_S)
    first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
    print(f"cfgengine: error: rank {_world.rank} lost its peers: {first_line}", file=sys.stderr)
    return 2


def reports_errors() -> bool:
    """Whether this process prints a user error that escaped before the ranks met: under torchrun
    every rank parses the same command line, so rank 0 speaks for all of them."""
    return not launched() or _status.reporter or os.environ.get("RANK") == "0"


# ---------------------------------------------------------------------------------------------
# Sharding and collectives


def shard(count: int, rank: int | None = None) -> slice:
    """The contiguous rows [start, stop) of 0..count−1 that `rank` (default: this one) handles;
    shard sizes differ by at most one."""
    rank = _world.rank if rank is None else rank
    return slice(count * rank // _world.size, count * (rank + 1) // _world.size)


def sample_ids(count: int) -> torch.Tensor:
    """This rank's global sample ids (what keys their noise, rng.py)."""
    rows = shard(count)
    return torch.arange(rows.start, rows.stop)


def gather_rows(part: np.ndarray | torch.Tensor | None, count: int):
    """Rank 0: the rows of every rank's shard of a `count`-row array, in id order (the type of
    `part`); other ranks: None. `part` holds this rank's `shard(count)` rows (None stays None)."""
    agree()
    if part is None or _world.size == 1:
        return part
    numpy = isinstance(part, np.ndarray)
    local = torch.from_numpy(np.ascontiguousarray(part)) if numpy else part.detach().cpu()
    sizes = [shard(count, r).stop - shard(count, r).start for r in range(_world.size)]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: len(local)] = local  # gloo gathers equal shapes: pad to the largest shard
    parts = [torch.empty_like(padded) for _ in sizes] if _world.main else None
    dist.gather(padded, parts, dst=0)
    if not _world.main:
        return None
    rows = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return rows.numpy() if numpy else rows


def all_reduce_sum(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """The float64 sum over ranks of `values` (every rank gets it): sums of features and of their
    outer products add exactly as well as float64 can, whatever the shard sizes."""
    agree()
    total = torch.as_tensor(np.asarray(values, dtype=np.float64)).clone()
    if _world.size > 1:
        dist.all_reduce(total)
    return total.numpy()


def gather_states(state: torch.Tensor) -> list[torch.Tensor] | None:
    """Rank 0: every rank's byte state (e.g. a generator's), in rank order; others: None."""
    if _world.size == 1:
        return [state]
    parts = [torch.empty_like(state) for _ in range(_world.size)] if _world.main else None
    dist.gather(state.contiguous(), parts, dst=0)
    return parts


def check_identical(tensors, what: str) -> None:
    """RuntimeError unless `tensors` hold the same values on every rank (a float64 checksum of
    each, compared by min and max all-reduces)."""
    if _world.size == 1:
        return
    agree()
    if not _same_everywhere(torch.stack([t.detach().double().sum().cpu() for t in tensors])):
        raise RuntimeError(f"{what} differ between ranks")


def agree_on(what: str, record) -> None:
    """ValueError (one line; every rank raises it, rank 0 reports) unless every rank holds the
    same `record` (JSON-able data, or a function making it: called under torchrun only),
    compared by 240 bits of its SHA-256."""
    if _world.size == 1:
        return
    from cfgengine import provenance

    agree()
    digest = provenance.digest(provenance.plain(record() if callable(record) else record))
    words = torch.tensor([int(digest[i:i + 15], 16) for i in range(0, 60, 15)], dtype=torch.int64)
    if not _same_everywhere(words):
        raise ValueError(f"the ranks disagree on {what}: start every rank with the same command "
                         "line and model files (nothing was written)")


def _same_everywhere(values: torch.Tensor) -> bool:
    """Whether every rank holds the same `values` (one MIN and one MAX all-reduce)."""
    low, high = values.clone(), values.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return torch.equal(low, high)


# ---------------------------------------------------------------------------------------------
# Sampling over ranks


PER_ROW = ("prompts", "negative_prompts", "init")  # sampler options with one entry per row


def sample_shard(engine, labels: torch.Tensor | None, w: torch.Tensor, **options) -> torch.Tensor:
    """`engine.sample` (a Sampler) on this rank's shard of the rows of `w` (and of `labels`, or of
    the per-row `prompts` / `negative_prompts`), with their global sample ids (`sample_ids` of all
    rows, default 0..N−1): x̂ [shard rows, *S] on the CPU (empty when the shard is)."""
    rows = shard(len(w))
    if rows.stop == rows.start:
        return torch.empty((0, *(options.get("shape") or engine.info.sample_shape)))
    all_ids = options.pop("sample_ids", None)
    ids = torch.arange(rows.start, rows.stop) if all_ids is None else all_ids[rows]
    for name in PER_ROW:
        if options.get(name) is not None:
            options[name] = options[name][rows]
    labels = None if labels is None else labels[rows]
    return engine.sample(labels, w=w[rows], sample_ids=ids, **options).cpu()


def sample_rows(engine, labels: torch.Tensor | None, w: torch.Tensor,
                **options) -> torch.Tensor | None:
    """All rows sampled across the ranks (`sample_shard` each), gathered in id order on rank 0
    (None elsewhere): what one process's `engine.sample(labels, w=w, …)` gives."""
    return gather_rows(sample_shard(engine, labels, w, **options), len(w))


# ---------------------------------------------------------------------------------------------
# Training: DDP, a data shard and RNG streams per rank

STREAMS = ("data", "noise")  # train.py's two generators, seeded seed + 0 and seed + 1


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel around `model` (gradients averaged over ranks; it broadcasts rank
    0's weights at the start), or `model` itself for one process."""
    if _world.size == 1:
        return model
    agree()  # its constructor broadcasts: a rank that failed before must have said so
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    net.num_classes = model.num_classes  # the loss reads it (null label K)
    return net


def shard_dataset(dataset):
    """This rank's part of a finite dataset (every world-size-th example, so each class keeps its
    share); a procedural dataset is unchanged — the per-rank RNG streams make its draws differ."""
    from cfgengine.data import ArrayDataset

    if _world.size == 1 or not isinstance(dataset, ArrayDataset):
        return dataset
    rows = slice(_world.rank, None, _world.size)
    return ArrayDataset(dataset.x[rows], dataset.y[rows], dataset.info)


def stream_seed(seed: int, stream: int, rank: int, step: int = 0) -> int:
    """Seed of a rank's RNG stream: rank 0 at step 0 keeps one process's seed + stream; other
    ranks (and streams re-derived on resume at another world size) mix (seed, stream, rank,
    step) through numpy's SeedSequence, so no two ranks share a stream."""
    if rank == 0 and step == 0:
        return seed + stream
    return int(np.random.SeedSequence((seed, stream, rank, step)).generate_state(1, np.uint64)[0])


def seed_streams(data_rng: torch.Generator, noise_rng: torch.Generator, seed: int) -> None:
    """Give this rank its own data and noise streams (rank 0's are a single process's)."""
    for stream, generator in enumerate((data_rng, noise_rng)):
        generator.manual_seed(stream_seed(seed, stream, _world.rank))


def rank_streams(data_rng: torch.Generator, noise_rng: torch.Generator) -> dict:
    """For the checkpoint (every rank calls it; a gather): {"ranks": [per-rank {data, noise,
    torch} states]} on rank 0 of several; {} for one process or on the other ranks."""
    if _world.size == 1:
        return {}
    agree()
    states = [gather_states(s) for s in (data_rng.get_state(), noise_rng.get_state(),
                                          torch.get_rng_state())]
    if not _world.main:
        return {}
    return {"ranks": [dict(zip((*STREAMS, "torch"), per_rank)) for per_rank in zip(*states)]}


def restore_streams(data_rng: torch.Generator, noise_rng: torch.Generator, contents: dict,
                    seed: int) -> None:
    """After train.restore (rank 0's states everywhere): a rank the checkpoint has continues its
    own streams (resume at the same world size is exact); a rank it lacks starts fresh streams
    derived from (seed, rank, step)."""
    saved = contents["rng"].get("ranks", [])
    if _world.rank < len(saved):
        data_rng.set_state(saved[_world.rank]["data"])
        noise_rng.set_state(saved[_world.rank]["noise"])
        torch.set_rng_state(saved[_world.rank]["torch"])
    elif _world.rank > 0:
        for stream, generator in enumerate((data_rng, noise_rng)):
            generator.manual_seed(stream_seed(seed, stream, _world.rank, int(contents["step"])))
