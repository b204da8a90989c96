"""The sharded exact top-k (radix select, rigl_ds.select) against the obvious alternative:
all-gather the layer, torch.topk on every rank, keep the rank's slice of the mask.

Spawns gloo ranks on this machine (or NCCL ranks, one per GPU, with --backend nccl) and prints,
per layer size and for a whole-model RigL update on GPT-2-small-shaped weights (the 48 block
matrices, 84.9M entries, drop then grow): bytes each rank sends, wall time (slowest rank,
median of repeats), and both as ratios, all measured in the same run. The alternative also
materialises the whole layer on every rank; radix select never does.

    python bench/sharded_select.py                       # 2 and 4 ranks, 1e4 .. 5e7 entries, GPT-2 small
    python bench/sharded_select.py --world 2 --sizes 1e4 1e6 --no-model
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# GPT-2 small's masked weights per block (HF Conv1D shapes), 12 blocks.
GPT2_SMALL = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def _timed(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median over repeats of the slowest rank's wall time."""
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return statistics.median(times)


def _gather_topk(comm, scores: List[torch.Tensor], ks: List[int]) -> List[torch.Tensor]:
    """Baseline: one all_gather of every layer's shard (batched), torch.topk per whole layer, own slice."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    everyone = comm.all_gather_rows(flat)  # (world, local entries): the whole layers on every rank
    out, start = [], 0
    for s, k in zip(scores, ks):
        n = s.numel()
        whole = everyone[:, start : start + n].reshape(-1)
        chosen = torch.zeros_like(whole, dtype=torch.bool)
        if k:
            chosen[torch.topk(whole, k, sorted=False).indices] = True
        out.append(chosen[comm.rank * n : (comm.rank + 1) * n])
        start += n
    return out


def _worker(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    from rigl_ds.select import ShardedCollectives, radix_select_topk
    from rigl_ds.topk import select_topk

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{rank}") if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=world)
    comm = ShardedCollectives()
    say = print if rank == 0 else (lambda *a, **k: None)
    g = torch.Generator(device=device).manual_seed(1234 + rank)

    def compare(label: str, scores: List[torch.Tensor], ks: List[int], reps: int, pair: bool) -> None:
        n_total = sum(s.numel() for s in scores) * world
        offsets = [rank * s.numel() for s in scores]
        k_tensor = torch.tensor(ks)

        def radix() -> List[torch.Tensor]:
            if not pair:
                return radix_select_topk(
                    comm, scores, list(range(len(scores))), k_tensor, None, offsets, max_pool_size=n_total
                )
            # A RigL update: keep 70% of the active entries by |w|, grow 30% among the rest by |grad|.
            active = [s > args.active_cut for s in scores]
            n_active = comm.all_reduce_sum(torch.stack([a.sum() for a in active]).long()).cpu()
            drop = (n_active * 3) // 10
            keep = radix_select_topk(
                comm, scores, list(range(len(scores))), n_active - drop, active, offsets, max_pool_size=n_total
            )
            grads = [s.flip(0) for s in scores]
            return radix_select_topk(
                comm, grads, list(range(len(scores))), drop, [~m for m in keep], offsets, max_pool_size=n_total
            )

        def gathered() -> List[torch.Tensor]:
            if not pair:
                return _gather_topk(comm, scores, ks)
            active = [s > args.active_cut for s in scores]
            n_active = comm.all_reduce_sum(torch.stack([a.sum() for a in active]).long()).cpu()
            drop = (n_active * 3) // 10
            inf = float("-inf")
            keep = _gather_topk(
                comm, [torch.where(a, s, inf) for a, s in zip(active, scores)], (n_active - drop).tolist()
            )
            grads = [s.flip(0) for s in scores]
            return _gather_topk(comm, [torch.where(m, inf, gr) for m, gr in zip(keep, grads)], drop.tolist())

        results = {}
        for name, fn in (("radix", radix), ("gather", gathered)):
            before = comm.stats.copy()
            results[name] = fn()  # warm-up, and the bytes of one call
            sent = (comm.stats - before).bytes_sent
            calls = (comm.stats - before).collectives
            seconds = _timed(fn, reps, device)
            results[name + "_stats"] = (sent, calls, seconds)
        # Checks, not timed (single selections only; a whole update's second selection depends on
        # the first, so a tie settled differently there changes what follows). exact: equal to
        # rigl_ds.topk.select_topk on the gathered whole layer. topk: torch.topk chose the same
        # entries except among ties at the threshold, where its choice is unspecified (rand()'s
        # 2**-24 grid has many ties at 1e7 entries and more).
        flags = ["n/a", "n/a"]
        if not pair:
            whole = [comm.all_gather_rows(sc.reshape(-1)).reshape(-1) for sc in scores]
            want = select_topk(whole, list(range(len(whole))), k_tensor)
            ok = [
                all(
                    torch.equal(r, w[rank * sc.numel() : (rank + 1) * sc.numel()])
                    for r, w, sc in zip(results["radix"], want, scores)
                )
            ]
            threshold = min(float(w[m].min()) for w, m in zip(whole, want))
            ok.append(
                all(
                    bool((sc[r != gsel] == threshold).all())
                    for sc, r, gsel in zip(scores, results["radix"], results["gather"])
                )
            )
            votes = torch.tensor(ok, dtype=torch.long, device=device)
            dist.all_reduce(votes, op=dist.ReduceOp.MIN)
            flags = ["yes" if v else "NO" for v in votes.tolist()]
        (rb, rc, rt), (gb, gc, gt) = results["radix_stats"], results["gather_stats"]
        say(
            f"{label:>22} | {_fmt_bytes(rb):>9} in {rc:>2} | {_fmt_bytes(gb):>9} in {gc:>2} | "
            f"{gb / max(rb, 1):>9.0f}x | {rt * 1e3:>9.1f} | {gt * 1e3:>9.1f} | {gt / rt:>6.2f}x | "
            + f"{flags[0]:>5} {flags[1]:>5}",
            flush=True,
        )

    say(f"\n== {world} ranks, backend {args.backend}, {torch.get_num_threads()} threads per rank ==")
    say(
        f"{'case (entries)':>22} | {'radix bytes/rank, calls':>23} | {'gather bytes/rank':>17} | "
        f"{'bytes x':>10} | {'radix ms':>9} | {'gather ms':>9} | {'time x':>7} | exact  topk"
    )
    for size in args.sizes:
        n = int(float(size)) // world
        scores = [torch.rand(n, generator=g, device=device)]
        reps = 5 if n * world <= 1_000_000 else (3 if n * world <= 10_000_000 else 2)
        compare(f"1 layer, {int(float(size)):.0e}", scores, [int(float(size)) // 10], reps, pair=False)
    if args.model:
        # ZeRO-3 style: every rank holds an even 1/world of each weight.
        scores = [torch.randn(r * c // world, generator=g, device=device).abs() for r, c in GPT2_SMALL]
        compare("GPT-2 small update", scores, [], 2, pair=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes", nargs="+", default=["1e4", "1e5", "1e6", "1e7", "5e7"])
    p.add_argument("--no-model", dest="model", action="store_false", help="skip the GPT-2 small update")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--active-cut", type=float, default=1.645, help="|score| above this is active (about 10%%)")
    args = p.parse_args()
    for world in args.world:
        with tempfile.TemporaryDirectory() as d:
            mp.start_processes(
                _worker, args=(world, os.path.join(d, "store"), args), nprocs=world, start_method="spawn"
            )


if __name__ == "__main__":
    main()
