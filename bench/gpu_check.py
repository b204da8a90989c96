"""One-shot proof of rigl_ds's CUDA/NCCL path on one GPU (estimated 6-8 minutes on one H200; never run there yet).

Every test so far ran on CPU tensors over gloo. This script runs what only a GPU can show, in
sections, each printing ``[name] PASS|FAIL|SKIP <why>`` with its figures and appending one JSON
line to ``<out>/gpu_check.jsonl`` as soon as it finishes, so a run cut short still leaves the
sections it finished. Each section runs inside its own try/except: one failure stops nothing else.

Sections (``--sections a,b``; default all, in this order):

1. ``radix``: exact top-k on the device (``rigl_ds.topk.select_topk`` on whole tensors, and
   ``rigl_ds.select.radix_select_topk`` over 1, 2, 3 and 8 ranks simulated by threads, and
   over the real NCCL world-1 group through ``ShardedCollectives``) against the CPU reference,
   on random and tie-heavy scores in fp32, bf16 and fp16: results must be bit-identical. On CUDA
   also one LLaMA-7B block (7 layers, 202M entries): time and memory per entry of a selection.
   Without CUDA it compares CPU against CPU (so the plumbing is tested anywhere).
2. ``nccl``: one-rank NCCL DeepSpeed runs through ``rigl_ds.initialize``, ZeRO 0-3 x fp32 / bf16
   / fp16 (static loss scale), tiny GPT-2, RigL 80% ERK, updates at steps 0, 2, 4: exact per-pool
   counts, masked entries zero in the low-precision weights, the fp32 master and the Adam moments
   after every step, masks changed on exactly the update steps, shards on the GPU.
3. ``offload``: the same with ``offload_optimizer: cpu`` at ZeRO 2 and 3 (cluster-review A1).
4. ``pipeline``: two pipeline stages with ``train_batch`` (needs 2 GPUs: SKIP with fewer).
5. ``fp16_overflow``: ZeRO 2 and 3, fp16 and bf16 (whose ZeRO optimizers skip overflowed steps
   too), an inf put into one gradient at update step 2 (a masked weight's, then the embedding's):
   DeepSpeed skips the step, and rigl_ds must count no mask update there either (cluster-review
   C1; on CPU with --allow-cpu the bf16 embedding cases already fail this way).
6. ``snfs_resume``: SNFS saved at step 4, loaded into a fresh engine, continued to step 8: the
   gradient EMA must be on the GPU after the load and training must continue (cluster-review A3).
7. ``perf``: a LLaMA-shaped model of ~0.94B parameters (hidden 2048, 16 layers, intermediate 5504,
   vocab 32000) built from config under ``zero.Init``, ZeRO-3 bf16, micro-batch 4 x 1024: median
   step time and peak memory (``torch.cuda.max_memory_allocated``, reset per step) of dense, static
   90% ERK and RigL 90% ERK with one mask update, and their ratios.

Sections 2-7 print ``SKIP no CUDA`` without a GPU; ``--allow-cpu`` runs them on CPU over gloo at
toy sizes instead, to test this script's own plumbing (their figures then mean nothing).

What today's code (commit e7320c0) should show, from docs/cluster-review.md and a CPU run with
``--allow-cpu``: radix, nccl and perf PASS; offload FAIL with "No backend type associated with device
type cpu" (A1: the offloaded shards' histograms go to NCCL as CPU tensors); fp16_overflow FAIL in its
``embedding`` cases only (C1: an overflow outside the masked layers still gets a mask update; the CPU
run shows it in bf16 already); snfs_resume FAIL with the EMA on ``cpu`` after load (A3); pipeline
SKIP on one GPU. A FAIL elsewhere is news.

How to run it on a lent GPU (the device tool; see /work/.library/device/README.md). The GPU image
has torch 2.11 + CUDA 13 and transformers but no DeepSpeed, so its wheels travel with the tree:

1. Here, once, in the repository root with the project venv active (builds or fetches 7 wheels,
   about 5 MB, into ``.whl/`` and keeps that folder out of git through ``.git/info/exclude``)::

       bash bench/gpu_check.sh --fetch-wheels

2. The device tool's ``run`` with ``command="bash bench/gpu_check.sh"``, ``carry=[".whl"]`` and
   ``timeout_s=600``. The shell script installs the wheels with ``--no-deps`` (never replacing
   the image's torch), installs rigl_ds with ``--no-deps``, prints the versions, then runs this
   script under ``timeout 480`` with ``--out $OUT``; ``$OUT/gpu_check.jsonl`` and
   ``$OUT/gpu_check.log`` come back. Extra arguments pass through, e.g.
   ``bash bench/gpu_check.sh --sections nccl,perf`` to rerun two sections.

Here, without a GPU::

    python bench/gpu_check.py --out /tmp/gc                      # radix PASS (CPU vs CPU), the rest SKIP
    python bench/gpu_check.py --out /tmp/gc --allow-cpu --sections nccl,snfs_resume   # plumbing only

Exit status: 1 when any section FAILs, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checked-out rigl_ds, installed or not

import rigl_ds  # noqa: E402
from rigl_ds.select import ShardedCollectives, radix_select_topk  # noqa: E402
from rigl_ds.shards import Collectives  # noqa: E402
from rigl_ds.topk import select_topk  # noqa: E402

SECTIONS = ("radix", "nccl", "offload", "pipeline", "fp16_overflow", "snfs_resume", "perf")
#: RigL on the tiny model: updates at steps 0, 2, 4 of 6 (as the gloo tests, tests/ds_sim.py).
RIGL = {"method": "rigl", "sparsity": 0.8, "delta_t": 2, "begin_step": 0, "end_step": 8, "seed": 3}


# -- where the run happens and what it writes ------------------------------------------------------
@dataclass
class Context:
    device: torch.device
    cuda: bool  # a real GPU: figures mean something
    plumbing: bool  # --allow-cpu: CUDA sections run on CPU/gloo only to test this script
    out: Path
    args: argparse.Namespace

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda else "gloo"


@dataclass
class Outcome:
    status: str  # PASS, FAIL or SKIP
    reason: str = ""
    figures: Dict[str, Any] = field(default_factory=dict)


def passed_if(problems: List[str], figures: Dict[str, Any], ok_reason: str = "") -> Outcome:
    if problems:
        return Outcome(
            "FAIL", "; ".join(problems[:6]) + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""), figures
        )
    return Outcome("PASS", ok_reason, figures)


class Report:
    """One JSON line per section, written and flushed the moment the section ends."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu_check.jsonl"
        self.failed = False

    def write(self, entry: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def section(self, name: str, outcome: Outcome, seconds: float, ctx: Context) -> None:
        self.failed |= outcome.status == "FAIL"
        brief = {k: v for k, v in outcome.figures.items() if not isinstance(v, (list, dict))}
        print(
            f"[{name}] {outcome.status} {outcome.reason}".rstrip()
            + f"  ({seconds:.1f} s) {json.dumps(brief, default=str)}"
        )
        self.write(
            {
                "section": name,
                "status": outcome.status,
                "reason": outcome.reason,
                "seconds": round(seconds, 2),
                "device": describe_device(ctx),
                "plumbing": ctx.plumbing and not ctx.cuda,
                "figures": outcome.figures,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )


def log(msg: str) -> None:
    print(f"    {msg}", flush=True)


def describe_device(ctx: Context) -> str:
    if ctx.cuda:
        return f"{ctx.device} ({torch.cuda.get_device_name(ctx.device)})"
    return "cpu"


def environment(ctx: Context) -> Dict[str, Any]:
    env: Dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "rigl_ds": rigl_ds.__version__}
    env["cuda"] = torch.version.cuda
    if ctx.cuda:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as exc:  # noqa: BLE001 - a figure; the nccl section finds out for itself
            env["nccl"] = f"unknown: {exc}"
    for module in ("deepspeed", "transformers"):
        try:
            env[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 - reported, not hidden: the sections that need it fail by name
            env[module] = f"not importable: {type(exc).__name__}: {exc}"
    return env


# -- the process group -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(ctx: Context) -> None:
    """World-size-1 group: NCCL through ``deepspeed.init_distributed`` from the MASTER_* / RANK /
    WORLD_SIZE environment on a GPU, a gloo file store on CPU (no port, no DeepSpeed import)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if ctx.cuda:
        torch.cuda.set_device(0)
        try:
            import deepspeed
        except ImportError:  # the radix section needs no DeepSpeed; the sections that do fail by name
            dist.init_process_group("nccl", init_method="env://")
        else:
            deepspeed.init_distributed("nccl")
    else:
        store = Path(tempfile.mkdtemp(prefix="gpu_check_pg_")) / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# == 1. radix select ===============================================================================
class ThreadCollectives(Collectives):
    """Ranks as threads of this process exchanging tensors through shared slots (as
    tests/thread_world.py): many world sizes on one device, with the real radix code."""

    def __init__(self, world: "ThreadWorld", rank: int):
        super().__init__()
        self.world, self.rank, self.world_size = world, rank, world.size

    def _exchange(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        self.world.slots[self.rank] = tensor.clone()
        self.world.barrier.wait()
        everyone = list(self.world.slots)
        self.world.barrier.wait()  # nobody overwrites a slot before all have read it
        self.stats.collectives += 1
        return everyone

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor.copy_(torch.stack(self._exchange(tensor)).sum(0))
        return tensor

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(row))


class ThreadWorld:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: List[Any] = [None] * size


def run_threads(size: int, fn: Callable[[Collectives], Any]) -> List[Any]:
    world = ThreadWorld(size)
    results: List[Any] = [None] * size
    errors: List[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadCollectives(world, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            world.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]
    return results


@dataclass
class SelectionCase:
    name: str
    scores: List[torch.Tensor]  # CPU, whole layers
    pools: List[Any]  # int or per-entry long tensor (CPU)
    layer_pools: List[List[int]]
    k: torch.Tensor
    eligible: Optional[List[torch.Tensor]]


def random_cases(count: int, max_len: int, seed: int = 0) -> List[SelectionCase]:
    """Small cases over the whole input space: 1-4 layers, 1-3 pools (per layer or per entry),
    few score levels (heavy ties) or continuous ones, +-0 and +-inf, eligibility masks, k of 0,
    of every eligible entry, or random; fp32, bf16 and fp16."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for c in range(count):
        n_pools = int(torch.randint(1, 4, (), generator=g))
        levels = [1, 3, 50, 0][c % 4]  # 0: continuous normal scores
        dtype = (torch.float32, torch.bfloat16, torch.float16)[c % 3]
        scores, pools, layer_pools, eligible = [], [], [], []
        for _ in range(int(torch.randint(1, 5, (), generator=g))):
            n = int(torch.randint(0, max_len, (), generator=g))
            if levels:
                s = torch.randint(-levels, levels + 1, (n,), generator=g).float() / 7
            else:
                s = torch.randn(n, generator=g)
            s = torch.where(torch.rand(n, generator=g) < 0.2, -s, s)  # -0.0 beside +0.0
            if c % 5 == 0:
                s = torch.where(torch.rand(n, generator=g) < 0.03, float("inf"), s)
                s = torch.where(torch.rand(n, generator=g) < 0.03, float("-inf"), s)
            scores.append(s.to(dtype))
            if bool(torch.rand((), generator=g) < 0.5):
                pools.append(torch.randint(0, n_pools, (n,), generator=g))
                layer_pools.append(list(range(n_pools)))
            else:
                p = int(torch.randint(0, n_pools, (), generator=g))
                pools.append(p)
                layer_pools.append([p])
            eligible.append(torch.rand(n, generator=g) < 0.7)
        if c % 6 == 0:
            eligible = None
        n_eligible = torch.zeros(n_pools, dtype=torch.long)
        for i, s in enumerate(scores):
            e = torch.ones(s.numel(), dtype=torch.bool) if eligible is None else eligible[i]
            p = pools[i] if isinstance(pools[i], torch.Tensor) else torch.full((s.numel(),), pools[i])
            n_eligible += torch.bincount(p[e], minlength=n_pools)
        k = torch.tensor(
            [
                [0, int(m), int(torch.randint(0, int(m) + 1, (), generator=g))][(c + j) % 3]
                for j, m in enumerate(n_eligible)
            ]
        )
        cases.append(SelectionCase(f"random{c}", scores, pools, layer_pools, k, eligible))
    return cases


def large_cases(sizes: Sequence[int], seed: int = 1) -> List[SelectionCase]:
    """Layer-sized cases: random and tie-heavy scores in fp32 and bf16, per-layer pools (ERK), one
    global pool, and per-row-block pools (mask groups); k about 10% of each pool."""
    g = torch.Generator().manual_seed(seed)
    normal = [torch.randn(n, generator=g) for n in sizes]
    kinds = {
        "randn": lambda x: x,
        "quarters": lambda x: torch.round(x * 4) / 4,  # about 30 distinct values
        "constant": lambda x: torch.ones_like(x),  # every entry ties
        "magnitude": lambda x: x.abs(),  # non-negative, as |w| and |g| are
    }
    cases = []
    for kind, dtype in [
        ("randn", torch.float32),
        ("randn", torch.bfloat16),
        ("quarters", torch.float32),
        ("quarters", torch.bfloat16),
        ("constant", torch.float32),
        ("magnitude", torch.bfloat16),
    ]:
        scores = [kinds[kind](x).to(dtype) for x in normal]
        per_layer = list(range(len(sizes)))
        k = torch.tensor([n // 10 + 1 for n in sizes])
        cases.append(
            SelectionCase(f"{kind}_{str(dtype)[6:]}_per_layer", scores, per_layer, [[i] for i in per_layer], k, None)
        )
    scores = [x.abs().to(torch.bfloat16) for x in normal]
    cases.append(
        SelectionCase(
            "global_bf16", scores, [0] * len(sizes), [[0]] * len(sizes), torch.tensor([sum(sizes) // 10]), None
        )
    )
    blocks = 4  # each layer split into 4 contiguous blocks: pools 4i .. 4i+3
    pools = [torch.arange(n) * blocks // n + blocks * i for i, n in enumerate(sizes)]
    layer_pools = [list(range(blocks * i, blocks * (i + 1))) for i in range(len(sizes))]
    counts = torch.cat([torch.bincount(p - blocks * i, minlength=blocks) for i, p in enumerate(pools)])
    eligible = [torch.rand(n, generator=g) < 0.5 for n in sizes]
    eligible_counts = torch.cat(
        [torch.bincount((p - blocks * i)[e], minlength=blocks) for i, (p, e) in enumerate(zip(pools, eligible))]
    )
    scores = [(torch.round(x * 8) / 8).to(torch.float32) for x in normal]
    cases.append(
        SelectionCase(
            "blocks_eligible_fp32", scores, pools, layer_pools, torch.minimum(counts // 10, eligible_counts), eligible
        )
    )
    return cases


def even_cuts(n: int, world: int) -> List[Tuple[int, int]]:
    """ZeRO-3's cut: ceil(n / world) per rank, the last ranks short or empty."""
    part = -(-n // world) if n else 0
    return [(min(r * part, n), min((r + 1) * part, n)) for r in range(world)]


def random_cuts(n: int, world: int, g: torch.Generator) -> List[Tuple[int, int]]:
    points = sorted(torch.randint(0, n + 1, (world - 1,), generator=g).tolist())
    bounds = [0, *points, n]
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


def radix_sharded(
    case: SelectionCase, device: torch.device, world: int, cuts: List[List[Tuple[int, int]]]
) -> List[torch.Tensor]:
    """The radix selection with each layer cut into ``world`` ranges held by thread ranks on ``device``."""
    scores = [s.to(device) for s in case.scores]
    pools = [p.to(device) if isinstance(p, torch.Tensor) else p for p in case.pools]
    eligible = None if case.eligible is None else [e.to(device) for e in case.eligible]

    def rank_fn(comm: Collectives) -> List[torch.Tensor]:
        mine = [cuts[i][comm.rank] for i in range(len(scores))]
        return radix_select_topk(
            comm,
            [s[a:b] for s, (a, b) in zip(scores, mine)],
            [p if isinstance(p, int) else p[a:b] for p, (a, b) in zip(pools, mine)],
            case.k,
            None if eligible is None else [e[a:b] for e, (a, b) in zip(eligible, mine)],
            [a for a, _ in mine],
            layer_pools=case.layer_pools,
        )

    per_rank = run_threads(world, rank_fn)
    return [torch.cat([per_rank[r][i].cpu() for r in range(world)]) for i in range(len(scores))]


def radix_group(case: SelectionCase, device: torch.device, comm: ShardedCollectives) -> List[torch.Tensor]:
    """The radix selection over the real process group (world size 1: NCCL on a GPU)."""
    return [
        o.cpu()
        for o in radix_select_topk(
            comm,
            [s.to(device) for s in case.scores],
            [p.to(device) if isinstance(p, torch.Tensor) else p for p in case.pools],
            case.k,
            None if case.eligible is None else [e.to(device) for e in case.eligible],
            [0] * len(case.scores),
            layer_pools=case.layer_pools,
        )
    ]


def whole_on_device(case: SelectionCase, device: torch.device) -> List[torch.Tensor]:
    """The single-process reference code itself on the device (stage 0's whole-tensor path)."""
    out = select_topk(
        [s.to(device) for s in case.scores],
        [p.to(device) if isinstance(p, torch.Tensor) else p for p in case.pools],
        case.k,
        None if case.eligible is None else [e.to(device) for e in case.eligible],
    )
    return [o.cpu() for o in out]


def compare_case(
    case: SelectionCase, ctx: Context, worlds: Sequence[int], comm: ShardedCollectives, g: torch.Generator
):
    """Yields (variant, identical, error) for every way of selecting this case; an exception is that
    variant's result (error set, not identical), and the other variants still run."""
    want = select_topk(case.scores, case.pools, case.k, case.eligible)  # CPU reference

    def attempt(select: Callable[[], List[torch.Tensor]]) -> Tuple[bool, str]:
        try:
            got = select()
        except Exception as exc:  # noqa: BLE001 - reported as this variant's mismatch
            return False, f"{type(exc).__name__}: {str(exc)[:200]}"
        return len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), ""

    yield "whole", *attempt(lambda: whole_on_device(case, ctx.device))
    yield "group", *attempt(lambda: radix_group(case, ctx.device, comm))
    for world in worlds:
        cuts = [
            even_cuts(s.numel(), world) if world % 2 == 0 else random_cuts(s.numel(), world, g) for s in case.scores
        ]
        yield f"w{world}", *attempt(lambda: radix_sharded(case, ctx.device, world, cuts))  # noqa: B023 - called now


def llama7b_block(ctx: Context, comm: ShardedCollectives) -> Dict[str, Any]:
    """One LLaMA-7B block (q, k, v, o 4096x4096; gate, up, down 4096x11008): bf16 |gradient|-like
    scores, one pool per layer, keep 10%. Time, collectives and memory of one selection over NCCL,
    checked against the CPU reference. The memory figure is the selection's own transient, above the
    scores (cluster-review B1 estimates about 12 B per entry for a whole update step)."""
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    g = torch.Generator(device=ctx.device).manual_seed(7)
    scores = [torch.randn(math.prod(s), generator=g, device=ctx.device).abs().to(torch.bfloat16) for s in shapes]
    k = torch.tensor([s.numel() // 10 for s in scores])
    entries = sum(s.numel() for s in scores)
    release_memory()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    stats_before = comm.stats.copy()
    torch.cuda.synchronize()
    start = time.perf_counter()
    got = radix_select_topk(
        comm,
        scores,
        list(range(len(scores))),
        k,
        None,
        [0] * len(scores),
        layer_pools=[[i] for i in range(len(scores))],
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before
    spent = comm.stats - stats_before
    start = time.perf_counter()
    want = select_topk([s.cpu() for s in scores], list(range(len(scores))), k)
    cpu_seconds = time.perf_counter() - start
    identical = all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    counts_ok = [int(o.sum()) for o in got] == k.tolist()
    del scores, got
    release_memory()
    return {
        "entries": entries,
        "identical": identical and counts_ok,
        "seconds": round(seconds, 4),
        "cpu_reference_seconds": round(cpu_seconds, 2),
        "collectives": spent.collectives,
        "selection_transient_bytes_per_entry": round(peak / entries, 2),  # scores excluded
    }


def section_radix(ctx: Context) -> Outcome:
    ensure_process_group(ctx)
    comm = ShardedCollectives()
    g = torch.Generator().manual_seed(11)
    if ctx.cuda:
        small, max_len, worlds, sizes = ctx.args.radix_cases, 3000, (1, 2, 3, 8), (1 << 22, 1 << 21, 3_000_001)
    else:
        small, max_len, worlds, sizes = min(ctx.args.radix_cases, 30), 200, (1, 2, 3), (20_000, 10_000, 15_001)
    results: Dict[str, List[int]] = {}  # variant -> [identical, total]
    mismatches: List[str] = []
    timings = {}
    for case in random_cases(small, max_len) + large_cases(sizes):
        start = time.perf_counter()
        for variant, identical, error in compare_case(case, ctx, worlds, comm, g):
            tally = results.setdefault(variant, [0, 0])
            tally[0] += identical
            tally[1] += 1
            if not identical:
                mismatches.append(f"{case.name}/{variant}" + (f" ({error})" if error else ""))
        if not case.name.startswith("random"):
            timings[case.name] = round(time.perf_counter() - start, 2)
            log(f"{case.name}: {sum(s.numel() for s in case.scores)} entries, all variants {timings[case.name]} s")
    total = sum(t for _, t in results.values())
    identical = sum(i for i, _ in results.values())
    figures: Dict[str, Any] = {
        "cases": total,
        "identical": identical,
        "per_variant": {v: f"{i}/{t}" for v, (i, t) in results.items()},
        "mismatches": mismatches[:20],
        "large_case_seconds": timings,
        "backend": comm_backend(),
    }
    problems = (
        [f"{len(mismatches)} selections differ from the CPU reference: {', '.join(mismatches[:5])}"]
        if mismatches
        else []
    )
    if ctx.cuda and not ctx.args.no_scale:
        block = llama7b_block(ctx, comm)
        figures["llama7b_block"] = block
        log(f"LLaMA-7B block: {block}")
        if not block["identical"]:
            problems.append("the LLaMA-7B block's selection differs from the CPU reference")
    return passed_if(problems, figures, f"{identical}/{total} selections bit-identical to the CPU reference")


def comm_backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_initialized() else "none"


# == DeepSpeed runs on the tiny GPT-2 ==============================================================
def tiny_ds_config(
    stage: int, dtype: str, rigl: Optional[Dict[str, Any]], extra: Optional[Dict[str, Any]]
) -> Dict[str, Any]:
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 128}  # static: no warm-up overflows to blur the step count
    if rigl is not None:
        cfg["rigl"] = rigl
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def tiny_gpt2() -> torch.nn.Module:
    from rigl_ds.lm.models import build_model

    torch.manual_seed(0)
    zero = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic across a resume
    return build_model("gpt2", 64, n_layer=2, n_embd=32, n_head=2, n_positions=32, **zero)


def tiny_batch(step: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 64, (2, 16), generator=g).to(device)


def whole_masks(sparse) -> Dict[str, torch.Tensor]:
    """Every layer's mask on CPU (world size 1: this rank's shards cover each layer)."""
    out = {}
    for sh in sparse.shards:
        whole = torch.zeros(sh.layer.numel, dtype=torch.bool)
        whole[sh.offset : sh.offset + sh.numel] = sh.mask.cpu()
        out[sh.layer.name] = whole
    return out


def weight_copies(engine, stage: int, names: Sequence[str]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Each masked weight's low-precision tensor, fp32 master and Adam moments, whole, on CPU, read
    through DeepSpeed's own APIs (not rigl_ds's views)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = dict(engine.module.named_parameters())
    opt, basic = engine.optimizer, engine.basic_optimizer
    masters = {}
    if stage == 0 and hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        masters = {id(lp): m for g, mg in zip(opt.fp16_groups, opt.fp32_groups) for lp, m in zip(g, mg)}
    stepped = any(basic.state.values())
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for n in names:
        p = params[n]
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                entry = {"low_precision": p.detach().clone().float()}
        else:
            entry = {"low_precision": p.detach().clone().float()}
        if stage == 3 or getattr(p, "_hp_mapping", None) is not None:
            entry["fp32"] = safe_get_full_fp32_param(p).float()
            if stepped:
                for key in ("exp_avg", "exp_avg_sq"):
                    value = safe_get_full_optimizer_state(p, key)
                    if value is not None:
                        entry[key] = value.float()
        else:
            master = masters.get(id(p), p)
            entry["fp32"] = master.detach().clone().float()
            for key, v in basic.state.get(master, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == master.shape:
                    entry[key] = v.clone().float()
        out[n] = {k: v.reshape(-1).cpu() for k, v in entry.items()}
    return out


def expected_updates(rigl: Dict[str, Any], steps: Sequence[int]) -> List[int]:
    """The steps the config's update rule (rigl_ds.is_update_step) updates masks on."""
    begin, delta_t, end = rigl.get("begin_step", 0), rigl.get("delta_t", 100), rigl.get("end_step")
    last, out = begin - delta_t, []
    for t in steps:
        if rigl_ds.is_update_step(t, last, begin, end, delta_t):
            out.append(t)
            last = t
    return out


@dataclass
class TinyRun:
    """What one tiny DeepSpeed run showed, summed over its steps."""

    label: str
    layout: str = ""
    shard_devices: List[str] = field(default_factory=list)
    targets: List[int] = field(default_factory=list)
    count_errors: List[str] = field(default_factory=list)
    history: List[Tuple[int, int, int]] = field(default_factory=list)
    collectives: List[int] = field(default_factory=list)
    changed_steps: List[int] = field(default_factory=list)
    violations: Dict[str, int] = field(default_factory=dict)
    checked: List[str] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    skipped_steps: int = 0
    global_steps: int = 0
    controller_step: int = 0
    skipped_updates: int = 0
    ema_devices: List[str] = field(default_factory=list)
    final_masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    error: str = ""  # what stopped the run, if anything
    traceback: str = ""

    def summary(self) -> Dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "final_masks"}
        return {k: v for k, v in out.items() if v not in ("", [], {})}


def run_tiny(
    ctx: Context,
    label: str,
    stage: int,
    dtype: str,
    steps: int = 6,
    rigl: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
    inject_inf: Optional[Tuple[str, int]] = None,
    save: Optional[Tuple[int, str]] = None,
    load_dir: Optional[str] = None,
) -> TinyRun:
    """Trains the tiny GPT-2 through ``rigl_ds.initialize`` and checks every copy after every step.
    ``inject_inf=(param name or "first_masked", step)`` makes that parameter's gradient inf on that
    step; ``save=(step, dir)`` saves after that step; ``load_dir`` resumes before training. Never
    raises: an error is kept in ``run.error`` beside whatever the run showed before it."""
    run = TinyRun(label)
    engine = None
    try:
        import deepspeed  # noqa: F401  (fails here, by name, when the wheels are missing)

        ensure_process_group(ctx)
        model = tiny_gpt2()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        config = tiny_ds_config(stage, dtype, rigl or RIGL, extra)
        engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
        del model, optimizer  # the engine holds them; freed with it
        train_tiny(engine, run, stage, steps, inject_inf, save, load_dir)
    except Exception as exc:  # noqa: BLE001 - the run's result: checked by the section like any other figure
        run.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        run.traceback = "".join(traceback.format_exception(exc)[-3:])[-1500:]
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.destroy()
        del engine
        release_memory()
    return run


def train_tiny(
    engine,
    run: TinyRun,
    stage: int,
    steps: int,
    inject_inf: Optional[Tuple[str, int]],
    save: Optional[Tuple[int, str]],
    load_dir: Optional[str],
) -> None:
    """The steps of ``run_tiny``, filling ``run`` as they go (so an error keeps what came before)."""
    from rigl_ds.lm.models import lm_loss

    sparse = engine.rigl
    names = [sh.layer.name for sh in sparse.shards]
    run.layout = sparse.layout
    run.shard_devices = sorted({str(sh.device) for sh in sparse.shards if sh.numel})
    run.targets = sparse.plan.targets(sparse.config.sparsity).tolist()
    poison = {"on": False}
    if inject_inf is not None:
        target = names[0] if inject_inf[0] == "first_masked" else inject_inf[0]
        dict(engine.module.named_parameters())[target].register_hook(
            lambda grad: torch.full_like(grad, float("inf")) if poison["on"] else None
        )
    start = 0
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
        start = engine.global_steps
        method_state = sparse.controller.state_dict()["method_state"]
        run.ema_devices = sorted({str(t.device) for t in method_state.values()})
    previous = whole_masks(sparse)
    for step in range(start, steps):
        poison["on"] = inject_inf is not None and step == inject_inf[1]
        loss = lm_loss(engine, tiny_batch(step, engine.device))
        engine.backward(loss)
        engine.step()
        poison["on"] = False
        run.losses.append(round(float(loss.detach()), 4))
        masks = whole_masks(sparse)
        if any(not torch.equal(masks[n], previous[n]) for n in names):
            run.changed_steps.append(step)
        previous = masks
        counts = sparse.controller.active_counts().tolist()
        if counts != run.targets:
            run.count_errors.append(f"step {step}: {counts} != {run.targets}")
        for n, copies in weight_copies(engine, stage, names).items():
            for key, t in copies.items():
                run.violations[key] = run.violations.get(key, 0) + int((t[~masks[n]] != 0).sum())
        run.checked = sorted(run.violations)
        run.history = [(h.step, h.dropped, h.grown) for h in sparse.history]
        run.collectives = [h.collectives for h in sparse.history]
        run.skipped_steps = int(engine.skipped_steps)
        run.global_steps = int(engine.global_steps)
        run.controller_step = int(sparse.controller.step)
        run.skipped_updates = int(sparse.controller.skipped_updates)
        if save is not None and step + 1 == save[0]:
            engine.save_checkpoint(save[1])
    run.final_masks = previous


def tiny_problems(run: TinyRun, want_updates: List[int], on_gpu: bool, want_moments: bool = True) -> List[str]:
    """What a correct run shows: exact counts, zeros in every copy, masks moved on exactly the
    update steps (each moving as many in as out), finite losses, no DeepSpeed-skipped step."""
    if run.error:
        return [f"{run.label}: {run.error}"]
    problems = []
    if run.count_errors:
        problems.append(f"{run.label}: counts off the plan's targets ({run.count_errors[0]})")
    bad = {k: v for k, v in run.violations.items() if v}
    if bad:
        problems.append(f"{run.label}: non-zero masked entries {bad}")
    needed = {"low_precision", "fp32"} | ({"exp_avg", "exp_avg_sq"} if want_moments else set())
    if not needed <= set(run.checked):
        problems.append(f"{run.label}: copies not checked: {sorted(needed - set(run.checked))}")
    if [h[0] for h in run.history] != want_updates:
        problems.append(f"{run.label}: updates at steps {[h[0] for h in run.history]}, expected {want_updates}")
    if run.changed_steps != want_updates:
        problems.append(f"{run.label}: masks changed at steps {run.changed_steps}, expected {want_updates}")
    if any(h[1] == 0 or h[1] != h[2] for h in run.history):
        problems.append(
            f"{run.label}: an update moved nothing or grew a different count than it dropped: {run.history}"
        )
    if not all(math.isfinite(x) for x in run.losses):
        problems.append(f"{run.label}: non-finite loss {run.losses}")
    if run.skipped_steps:
        problems.append(f"{run.label}: DeepSpeed skipped {run.skipped_steps} steps")
    if on_gpu and any(not d.startswith("cuda") for d in run.shard_devices):
        problems.append(f"{run.label}: mask shards on {run.shard_devices}, expected the GPU")
    return problems


def run_cases(
    ctx: Context, cases: List[Tuple[str, Dict[str, Any]]], check: Callable[[TinyRun], List[str]]
) -> Tuple[List[str], Dict[str, Any]]:
    """Each case in turn (an error stops only its own case), checked by ``check``."""
    problems: List[str] = []
    runs: Dict[str, Any] = {}
    for label, kwargs in cases:
        start = time.perf_counter()
        run = run_tiny(ctx, label, **kwargs)
        found = check(run)
        runs[label] = {"ok": not found, **run.summary()}
        problems += found
        log(f"{label}: {'ok' if not found else found[0]} ({time.perf_counter() - start:.1f} s)")
    return problems, runs


# == 2. one-rank NCCL DeepSpeed ====================================================================
def section_nccl(ctx: Context) -> Outcome:
    dtypes = ("fp32", "bf16", "fp16") if ctx.cuda else ("fp32", "bf16")  # DeepSpeed refuses fp16 on CPU
    cases = [(f"zero{s}_{d}", dict(stage=s, dtype=d)) for s in (0, 1, 2, 3) for d in dtypes]
    want = expected_updates(RIGL, range(6))
    problems, runs = run_cases(ctx, cases, lambda r: tiny_problems(r, want, ctx.cuda))
    figures = {
        "runs": len(cases),
        "passed": sum(r["ok"] for r in runs.values()),
        "expected_updates": want,
        "cases": runs,
    }
    return passed_if(problems, figures, f"{len(cases)}/{len(cases)} runs exact")


# == 3. ZeRO-Offload ===============================================================================
def section_offload(ctx: Context) -> Outcome:
    def offload(stage: int) -> Dict[str, Any]:
        zero = {"stage": stage, "offload_optimizer": {"device": "cpu"}}
        return {"zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}

    cases = [
        (f"offload_zero{s}_{d}", dict(stage=s, dtype=d, extra=offload(s))) for s in (2, 3) for d in ("fp32", "bf16")
    ]
    want = expected_updates(RIGL, range(6))
    # The fp32 master (and so the mask shards) live on the CPU under offload: no GPU-device check.
    problems, runs = run_cases(ctx, cases, lambda r: tiny_problems(r, want, on_gpu=False))
    figures = {
        "runs": len(cases),
        "passed": sum(r["ok"] for r in runs.values()),
        "review": "cluster-review A1",
        "cases": runs,
    }
    return passed_if(problems, figures, f"{len(cases)}/{len(cases)} offload runs exact")


# == 4. pipeline ===================================================================================
PIPE_WIDTHS = [(16, 96), (96, 24), (24, 64), (64, 8)]


def _pipeline_rank(rank: int, world: int, port: int, use_cuda: bool, folder: str) -> None:
    """One pipeline stage in its own process; writes what it saw to ``folder/rank<r>.json``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    result: Dict[str, Any] = {}
    quiet()
    try:
        import deepspeed
        from deepspeed.pipe import PipelineModule

        if use_cuda:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)
        deepspeed.init_distributed("nccl" if use_cuda else "gloo")
        torch.manual_seed(0)
        layers: List[torch.nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(PIPE_WIDTHS):
            layers.append(torch.nn.Linear(fan_in, fan_out))
            if i + 1 < len(PIPE_WIDTHS):
                layers.append(torch.nn.ReLU())
        model = PipelineModule(layers, num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="type:Linear")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 1},
            "bf16": {"enabled": True},
            "steps_per_print": 10**9,
            "rigl": {**RIGL, "distribution": "erk"},
        }
        engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
        sparse = engine.rigl
        g = torch.Generator().manual_seed(7)
        data = iter(
            [
                (
                    torch.randn(2, PIPE_WIDTHS[0][0], generator=g).bfloat16(),
                    torch.randn(2, PIPE_WIDTHS[-1][1], generator=g).bfloat16(),
                )
                for _ in range(12)
            ]
        )
        params = dict(engine.module.named_parameters())
        violations = 0
        for _ in range(6):
            engine.train_batch(data)
            for sh in sparse.shards:
                mask = sh.mask.cpu()
                violations += int((params[sh.layer.name].detach().reshape(-1).float().cpu()[~mask] != 0).sum())
        result = {
            "stage_id": engine.stage_id,
            "history": [h.step for h in sparse.history],
            "pool_counts": sparse.controller.active_counts().tolist(),
            "targets": sparse.plan.targets(sparse.config.sparsity).tolist(),
            "violations": violations,
            "global_steps": engine.global_steps,
        }
    except Exception as exc:  # noqa: BLE001 - written for the parent, which reports it
        result = {"error": "".join(traceback.format_exception(exc)[-3:])[-1500:]}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    os._exit(0)  # see deepspeed-notes: avoids an abort at interpreter exit


def section_pipeline(ctx: Context) -> Outcome:
    if ctx.cuda and torch.cuda.device_count() < 2:
        return Outcome("SKIP", f"needs 2 GPUs (a pipeline stage per GPU), found {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    want = expected_updates(RIGL, range(6))
    with tempfile.TemporaryDirectory() as folder:
        procs = mp.start_processes(
            _pipeline_rank, args=(2, free_port(), ctx.cuda, folder), nprocs=2, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + 240
        with contextlib.suppress(Exception):
            while not procs.join(timeout=2) and time.monotonic() < deadline:
                pass
        for p in procs.processes:
            if p.is_alive():
                p.kill()
        ranks = []
        for r in range(2):
            path = Path(folder, f"rank{r}.json")
            ranks.append(json.loads(path.read_text()) if path.exists() else {"error": "no result (killed or crashed)"})
    problems = []
    for r, res in enumerate(ranks):
        if "error" in res:
            problems.append(f"stage {r}: {res['error'].strip().splitlines()[-1]}")
            continue
        if res["history"] != want:
            problems.append(f"stage {res['stage_id']}: updates at {res['history']}, expected {want}")
        if res["pool_counts"] != res["targets"]:
            problems.append(f"stage {res['stage_id']}: counts {res['pool_counts']} != targets {res['targets']}")
        if res["violations"]:
            problems.append(f"stage {res['stage_id']}: {res['violations']} non-zero masked entries")
    return passed_if(problems, {"stages": ranks, "expected_updates": want}, "2 stages updated on every update step")


# == 5. fp16 overflow ==============================================================================
def section_fp16_overflow(ctx: Context) -> Outcome:
    """An inf gradient at update step 2. Both DeepSpeed and rigl_ds must treat the step as not
    taken: DeepSpeed counts it in ``skipped_steps``, and rigl_ds leaves the masks as they were there,
    does not advance its schedule, and runs the update on the next step (cluster-review C1)."""
    # ZeRO-2/3 skip overflowed steps in bf16 too; DeepSpeed has no fp16 on CPU.
    dtypes = ("fp16", "bf16") if ctx.cuda else ("bf16",)
    at = 2
    cases = [
        (f"zero{s}_{d}_{where}", dict(stage=s, dtype=d, inject_inf=(param, at)))
        for d in dtypes
        for s in (2, 3)
        for where, param in (("masked_weight", "first_masked"), ("embedding", "transformer.wte.weight"))
    ]

    def check(run: TinyRun) -> List[str]:
        if run.error:
            return [f"{run.label}: {run.error}"]
        problems = []
        if run.skipped_steps != 1:
            problems.append(f"{run.label}: DeepSpeed skipped {run.skipped_steps} steps, expected 1")
        # rigl_ds's schedule counts applied steps only: the update due at the skipped step runs on the
        # next one, so updates stay at schedule steps 0, 2, 4, ... and the count is one behind DeepSpeed's.
        if run.controller_step != run.global_steps - run.skipped_steps:
            problems.append(
                f"{run.label}: rigl_ds counted {run.controller_step} steps, DeepSpeed applied "
                f"{run.global_steps - run.skipped_steps}"
            )
        if [h[0] for h in run.history] != expected_updates(RIGL, range(run.controller_step)):
            problems.append(f"{run.label}: updates at schedule steps {[h[0] for h in run.history]}")
        if at in run.changed_steps:
            problems.append(f"{run.label}: masks changed at overflow step {at}")
        if run.count_errors:
            problems.append(f"{run.label}: {run.count_errors[0]}")
        bad = {k: v for k, v in run.violations.items() if v}
        if bad:
            problems.append(f"{run.label}: non-zero masked entries {bad}")
        return problems

    problems, runs = run_cases(ctx, cases, check)
    figures = {"overflow_step": at, "review": "cluster-review C1", "dtypes": list(dtypes), "cases": runs}
    outcome = passed_if(problems, figures, "DeepSpeed and rigl_ds both skipped the overflow step")
    if not ctx.cuda:
        outcome.reason = f"bf16 only (no fp16 on CPU): {outcome.reason}"
    return outcome


# == 6. SNFS resume ================================================================================
def section_snfs_resume(ctx: Context) -> Outcome:
    snfs = {**RIGL, "method": "snfs"}
    want = expected_updates(snfs, range(8))
    problems: List[str] = []
    cases: Dict[str, Any] = {}
    for stage, dtype in ((2, "fp32"), (3, "bf16")):
        label = f"zero{stage}_{dtype}"
        with tempfile.TemporaryDirectory() as folder:
            straight = run_tiny(ctx, f"{label}_straight", stage, dtype, steps=8, rigl=snfs, save=(4, folder))
            resumed = run_tiny(ctx, f"{label}_resumed", stage, dtype, steps=8, rigl=snfs, load_dir=folder)
        found = tiny_problems(straight, want, ctx.cuda) + tiny_problems(resumed, [t for t in want if t >= 4], ctx.cuda)
        # The EMA is read right after the load, before the steps that would trip over its device.
        expected_device = set(straight.shard_devices) or {str(ctx.device)}
        if not resumed.ema_devices or not set(resumed.ema_devices) <= expected_device:
            found.append(
                f"{label}: SNFS gradient EMA on {resumed.ema_devices} after load, expected {sorted(expected_device)}"
            )
        same = None
        if straight.final_masks and resumed.final_masks:
            same = all(torch.equal(straight.final_masks[n], resumed.final_masks[n]) for n in straight.final_masks)
        cases[label] = {
            "straight": straight.summary(),
            "resumed": resumed.summary(),
            # A figure, not a criterion: GPU kernels may differ in the last bits between runs.
            "final_masks_equal_straight_run": same,
        }
        problems += found
        log(f"{label}: {(found or ['ok'])[0]}")
    return passed_if(
        problems,
        {"review": "cluster-review A3", "expected_updates": want, "cases": cases},
        "EMA on the training device after load; training continued",
    )


# == 7. figures at ~1B =============================================================================
def perf_shape(ctx: Context) -> Dict[str, Any]:
    if ctx.cuda:
        model = dict(
            hidden_size=2048,
            intermediate_size=5504,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
            max_position_embeddings=2048,
        )
        return {"model": model, "batch": 4, "seq": 1024, "steps": ctx.args.perf_steps, "update_at": 4}
    model = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=64,
    )
    return {"model": model, "batch": 2, "seq": 32, "steps": 4, "update_at": 2}


def perf_config(mode: str, shape: Dict[str, Any]) -> Dict[str, Any]:
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": shape["batch"],
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if mode == "static":
        config["rigl"] = {"method": "static", "sparsity": 0.9, "distribution": "erk"}
    elif mode == "rigl":
        u = shape["update_at"]
        config["rigl"] = {
            "method": "rigl",
            "sparsity": 0.9,
            "distribution": "erk",
            "delta_t": 100,
            "begin_step": u,
            "end_step": u + 100,
        }
    return config


def build_llama(config: Dict[str, Any], shape: Dict[str, Any], device: torch.device) -> Tuple[torch.nn.Module, str]:
    """The LLaMA-shaped model from config, built partitioned under ``zero.Init`` (as transformers
    does with ZeRO-3); if that fails, built whole on the device (the figures say which)."""
    import torch._dynamo  # noqa: F401  (imported before zero.Init patches Tensor.__new__; see deepspeed-notes)
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    cfg = LlamaConfig(**shape["model"], tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    try:
        hf_ds = HfDeepSpeedConfig(config)  # while alive, transformers builds under deepspeed.zero.Init
        try:
            return LlamaForCausalLM._from_config(cfg), "zero.Init"
        finally:
            del hf_ds
    except Exception as exc:  # noqa: BLE001 - fall back, and say so in the figures
        release_memory()
        with torch.device(device):
            return LlamaForCausalLM(
                cfg
            ), f"whole on {device} (zero.Init failed: {type(exc).__name__}: {str(exc)[:200]})"


def stream_syncs(engine, x: torch.Tensor) -> Optional[int]:
    """cudaStreamSynchronize calls in one training step (cluster-review B2), by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.name == "cudaStreamSynchronize")
    except Exception:  # noqa: BLE001 - an optional figure
        return None


def perf_phase(ctx: Context, mode: str, shape: Dict[str, Any]) -> Dict[str, Any]:
    """Builds the model and engine, then times ``steps`` steps one by one (peak memory reset per step)."""
    cuda = ctx.cuda
    release_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    config = perf_config(mode, shape)
    model, built = build_llama(config, shape, ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
    try:
        if cuda:
            torch.cuda.synchronize()
        out: Dict[str, Any] = {"build": built, "build_seconds": round(time.perf_counter() - start, 1)}
        out["params"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
        if cuda:
            out["build_peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
        sparse = getattr(engine, "rigl", None)
        if sparse is not None:
            out["masked_entries"] = sum(s.layer.numel for s in sparse.shards)
        g = torch.Generator().manual_seed(0)
        times, peaks = [], []
        for _ in range(shape["steps"]):
            x = torch.randint(0, shape["model"]["vocab_size"], (shape["batch"], shape["seq"]), generator=g).to(
                engine.device
            )
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else 0.0)
        update = shape["update_at"] if mode == "rigl" else None
        normal = [i for i in range(2, len(times)) if i != update]  # the first two steps warm up
        out["step_seconds"] = [round(t, 4) for t in times]
        out["median_step_seconds"] = round(statistics.median(times[i] for i in normal), 4) if normal else None
        out["peak_gib_normal_steps"] = round(max(peaks[i] for i in normal), 2) if normal else None
        if update is not None and update < len(times):
            out["update_step_seconds"] = round(times[update], 4)
            out["peak_gib_update_step"] = round(peaks[update], 2)
        if sparse is not None:
            out["history"] = [(h.step, h.dropped, h.grown, round(h.seconds, 3), h.collectives) for h in sparse.history]
            counts, targets = sparse.controller.active_counts().tolist(), sparse.plan.targets(0.9).tolist()
            out["counts_exact"] = counts == targets
        if cuda:
            out["stream_syncs_per_step"] = stream_syncs(engine, x)
        out["loss_last"] = round(float(loss.detach()), 4)
        return out
    finally:
        with contextlib.suppress(Exception):
            engine.destroy()
        del engine, optimizer, model
        release_memory()
        if cuda:
            log(f"{mode}: {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated after release")


def section_perf(ctx: Context) -> Outcome:
    ensure_process_group(ctx)
    shape = perf_shape(ctx)
    phases: Dict[str, Any] = {}
    problems: List[str] = []
    for mode in ("dense", "static", "rigl"):
        try:
            phases[mode] = perf_phase(ctx, mode, shape)
            log(f"{mode}: { ({k: v for k, v in phases[mode].items() if k != 'step_seconds'}) }")
        except Exception as exc:  # noqa: BLE001 - the next phase still runs
            phases[mode] = {"error": "".join(traceback.format_exception(exc)[-3:])[-1500:]}
            problems.append(f"{mode}: {type(exc).__name__}: {str(exc)[:300]}")
            log(f"{mode}: {problems[-1]}")
    rigl = phases.get("rigl", {})
    if "history" in rigl and [h[0] for h in rigl["history"]] != [shape["update_at"]]:
        problems.append(f"rigl: updates at {[h[0] for h in rigl['history']]}, expected [{shape['update_at']}]")
    for mode in ("static", "rigl"):
        if phases.get(mode, {}).get("counts_exact") is False:
            problems.append(f"{mode}: counts off the plan's targets")
    figures: Dict[str, Any] = {"shape": shape, "phases": phases}
    dense = phases.get("dense", {})
    for mode in ("static", "rigl"):
        other = phases.get(mode, {})
        for key, ratio in (("median_step_seconds", "step_time"), ("peak_gib_normal_steps", "peak_memory")):
            if dense.get(key) and other.get(key) is not None:
                figures[f"{mode}_over_dense_{ratio}"] = round(other[key] / dense[key], 3)
    if rigl.get("update_step_seconds") and rigl.get("median_step_seconds"):
        figures["rigl_update_step_over_normal_step"] = round(
            rigl["update_step_seconds"] / rigl["median_step_seconds"], 2
        )
    if rigl.get("peak_gib_update_step") is not None and rigl.get("peak_gib_normal_steps") is not None:
        figures["rigl_update_peak_extra_gib"] = round(rigl["peak_gib_update_step"] - rigl["peak_gib_normal_steps"], 2)
    return passed_if(problems, figures, "dense, static and RigL phases ran")


# == driver ========================================================================================
SECTION_FUNCTIONS: Dict[str, Callable[[Context], Outcome]] = {
    "radix": section_radix,
    "nccl": section_nccl,
    "offload": section_offload,
    "pipeline": section_pipeline,
    "fp16_overflow": section_fp16_overflow,
    "snfs_resume": section_snfs_resume,
    "perf": section_perf,
}
NEEDS_CUDA = {"nccl", "offload", "pipeline", "fp16_overflow", "snfs_resume", "perf"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for gpu_check.jsonl (default $OUT)"
    )
    parser.add_argument(
        "--sections", action="append", default=[], help=f"comma-separated, from: {', '.join(SECTIONS)} (default all)"
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run the CUDA sections on CPU/gloo at toy sizes (tests this script only)",
    )
    parser.add_argument(
        "--radix-cases", type=int, default=200, help="random selection cases on a GPU (30 at most on CPU)"
    )
    parser.add_argument(
        "--no-scale", action="store_true", help="skip the LLaMA-7B block selection in the radix section"
    )
    parser.add_argument(
        "--perf-steps", type=int, default=8, help="training steps per perf phase (the RigL update is step 4)"
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for group in args.sections for s in group.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; allowed: {', '.join(SECTIONS)}")
    args.sections = chosen
    if args.perf_steps < 6:
        parser.error("--perf-steps must be at least 6 (two warm-up steps, the update at step 4, steps after it)")
    return args


def quiet() -> None:
    """The device tool returns only the output's tail: keep it for the results, not the deprecation notes
    torch prints on every ZeRO collective or DeepSpeed's per-engine INFO lines."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    quiet()
    cuda = torch.cuda.is_available()
    if cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    ctx = Context(torch.device("cuda", 0) if cuda else torch.device("cpu"), cuda, args.allow_cpu, Path(args.out), args)
    report = Report(ctx.out)
    env = environment(ctx)
    print(f"gpu_check: {json.dumps(env)}", flush=True)
    report.write({"section": "env", "status": "INFO", "figures": env, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    statuses: Dict[str, str] = {}
    for name in args.sections:
        start = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        if name in NEEDS_CUDA and not cuda and not args.allow_cpu:
            outcome = Outcome("SKIP", "no CUDA")
        else:
            try:
                outcome = SECTION_FUNCTIONS[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one section's failure is its result; the rest still run
                tb = "".join(traceback.format_exception(exc))
                print(tb, flush=True)
                outcome = Outcome("FAIL", f"{type(exc).__name__}: {str(exc)[:400]}", {"traceback": tb[-3000:]})
        report.section(name, outcome, time.perf_counter() - start, ctx)
        statuses[name] = outcome.status
        sys.stdout.flush()
    print("gpu_check summary: " + " ".join(f"{n}={s}" for n, s in statuses.items()), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    os._exit(code)  # DeepSpeed's threads sometimes abort a normal interpreter exit (deepspeed-notes)
