"""Under one fixed memory cap, the largest GPT-style model that trains dense against the largest that
trains 90% sparse with rigl_ds.

Every probe is its own job: ``--world`` gloo ranks (or NCCL GPUs), ZeRO-3 bf16, a GPT-2 of ``--layers``
blocks at one width built under ``deepspeed.zero.Init`` (no rank ever holds the whole model), AdamW,
three optimizer steps (for RigL: the mask update at step 0, then two steps that create the optimizer
state). Dense is DeepSpeed's own ZeRO-3 (fp32 master, fp32 moments). Sparse is RigL at 90% ERK with
``compact_optimizer_state`` and ``compact_master_weights``.

The cap is enforced, not estimated: each job runs in a memory cgroup whose hard limit is the cap
(cgroup v1 ``memory.limit_in_bytes`` or v2 ``memory.max``; needs root), so a job that needs more is
killed by the kernel. Without cgroup access the script says so and compares each job's measured peak
(the sum of its processes' peak RSS) with the cap instead. Widths are searched by bisection per mode
(memory grows with width), so a run is about 2 x log2(widths) jobs.

    python bench/memory_cap.py                          # cap 4 GiB, 2 ranks, GPT-2 4 layers
    python bench/memory_cap.py --cap-gib 6 --layers 6 --max-width 4096
    python bench/memory_cap.py --modes dense sparse packed           # packed storage too
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


# -- one job ---------------------------------------------------------------------------------------
def _ds_config(mode: str) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if mode == "sparse":
        config["rigl"] = {
            "method": "rigl",
            "sparsity": 0.9,
            "delta_t": 100,
            "end_step": 1,
            "compact_optimizer_state": True,
            "compact_master_weights": True,
        }
    if mode == "packed":  # the same RigL 90% ERK, masked weights held as their active values only
        config["rigl"] = {"method": "rigl", "sparsity": 0.9, "delta_t": 100, "end_step": 1, "storage": "packed"}
    return config


def _worker(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    import ranks
    import torch
    import torch.distributed as dist

    device = ranks.join(rank, world, store, args.backend)
    import torch._dynamo  # noqa: F401  (imported inside zero.Init, which patches Tensor.__new__, it fails)
    import transformers
    from transformers import GPT2LMHeadModel  # resolve the lazy import outside zero.Init too

    import rigl_ds

    config = _ds_config(args.mode)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=max(1, args.width // 64),
        n_positions=args.seq,
        vocab_size=args.vocab,
    )
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(config)  # noqa: F841  (kept alive: tells transformers that ZeRO-3 is on)
    # transformers then builds under deepspeed.zero.Init and initialises the partitioned weights itself.
    model = GPT2LMHeadModel._from_config(cfg)
    n_params = sum(p.ds_numel for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
    losses = []
    for step in range(3):
        x = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(step)).to(device)
        loss = engine(x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    Path(args.report).with_suffix(f".rank{rank}").write_text(json.dumps({"peak_rss": peak}))
    if rank == 0:
        Path(args.report).write_text(json.dumps({"params": n_params, "losses": losses}))
    dist.destroy_process_group()


def run_job(args: argparse.Namespace) -> None:
    import ranks

    ranks.spawn(_worker, args.world, args)


# -- the cap ---------------------------------------------------------------------------------------
class MemoryCgroup:
    """A fresh memory cgroup with a hard limit, for one job; None from ``create`` without access."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @classmethod
    def create(cls, limit: int) -> Optional["MemoryCgroup"]:
        name = f"rigl_ds_cap_{os.getpid()}_{time.monotonic_ns()}"
        v2 = Path("/sys/fs/cgroup")
        candidates = []
        controllers = v2 / "cgroup.controllers"
        if controllers.is_file() and "memory" in controllers.read_text().split():
            candidates.append((v2 / name, 2))
        if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").is_file():
            candidates.append((Path("/sys/fs/cgroup/memory") / name, 1))
        for path, version in candidates:
            try:
                path.mkdir()
                if version == 1:
                    (path / "memory.limit_in_bytes").write_text(str(limit))
                    swap = path / "memory.memsw.limit_in_bytes"
                    if swap.is_file():
                        swap.write_text(str(limit))  # no escape into swap
                else:
                    (path / "memory.max").write_text(str(limit))
                    (path / "memory.swap.max").write_text("0")
                return cls(path, version)
            except OSError:
                try:
                    path.rmdir()
                except OSError:
                    pass
        return None

    def enter(self) -> None:
        """Moves the calling process (a job's child, before exec) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> Optional[int]:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        f = self.path / name
        return int(f.read_text()) if f.is_file() else None

    def oom_killed(self) -> bool:
        if self.version == 1:
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1]) > 0
            return int((self.path / "memory.failcnt").read_text()) > 0
        for line in (self.path / "memory.events").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1]) > 0
        return False

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def probe(args: argparse.Namespace, mode: str, width: int, cap: int) -> dict:
    """One job at ``width``; whether it trained under the cap, its peak and its parameter count."""
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--job",
            mode,
            "--width",
            str(width),
            "--report",
            str(report),
            "--layers",
            str(args.layers),
            "--vocab",
            str(args.vocab),
            "--seq",
            str(args.seq),
            "--world",
            str(args.world),
            "--backend",
            args.backend,
        ]
        group = MemoryCgroup.create(cap) if not args.no_cgroup else None
        start = time.time()
        try:
            proc = subprocess.run(
                cmd, preexec_fn=group.enter if group else None, capture_output=True, text=True, timeout=args.timeout
            )
        except subprocess.TimeoutExpired as exc:  # a job thrashing at the cap: not a result to build on
            proc = subprocess.CompletedProcess(cmd, -9, exc.stdout or "", f"timed out after {args.timeout:g} s")
        seconds = time.time() - start
        rss = sum(json.loads(Path(d, f).read_text())["peak_rss"] for f in os.listdir(d) if f.startswith("report.rank"))
        out = {"mode": mode, "width": width, "seconds": round(seconds, 1), "enforced": group is not None}
        if report.is_file():
            out.update(json.loads(report.read_text()))
        if group is not None:
            out["peak"] = group.peak()
            oom = group.oom_killed()
            group.remove()
            out["ok"] = proc.returncode == 0
            out["result"] = "trains" if out["ok"] else ("over the cap (OOM-killed)" if oom else "failed")
        else:
            out["peak"] = rss or None
            out["ok"] = proc.returncode == 0 and rss <= cap
            out["result"] = "trains" if out["ok"] else ("over the cap (measured)" if proc.returncode == 0 else "failed")
        if out["result"] == "failed":
            out["stderr"] = proc.stderr[-2000:]
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap-gib", type=float, default=4.0, help="the memory cap for the whole job (all ranks)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--min-width", type=int, default=256)
    p.add_argument("--max-width", type=int, default=3072)
    p.add_argument("--step", type=int, default=128, help="widths are multiples of this (64 per head)")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--timeout", type=float, default=900, help="seconds per job")
    p.add_argument("--no-cgroup", action="store_true", help="measure peaks instead of enforcing the cap")
    p.add_argument("--json", type=Path, default=None, help="also write every probe here")
    # Internal: one job.
    p.add_argument(
        "--modes",
        nargs="+",
        default=["dense", "sparse"],
        choices=["dense", "sparse", "packed"],
        help='sparse: RigL 90%% with compact state and masters ("masked" storage); packed: "storage": "packed"',
    )
    p.add_argument("--job", choices=["dense", "sparse", "packed"], help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        args.mode = args.job
        run_job(args)
        return
    from tqdm import tqdm

    cap = int(args.cap_gib * 2**30)
    widths = list(range(args.min_width, args.max_width + 1, args.step))
    probes, best = [], {}
    bar = tqdm(desc="memory cap probes", unit="job")
    for mode in args.modes:
        lo, hi, found = 0, len(widths) - 1, None  # bisection for the last width that trains
        while lo <= hi:
            mid = (lo + hi) // 2
            bar.set_postfix_str(f"{mode} width {widths[mid]}")
            r = probe(args, mode, widths[mid], cap)
            probes.append(r)
            bar.update()
            if r["ok"]:
                found, lo = r, mid + 1
            else:
                if r["result"] == "failed":
                    bar.write(f"{mode} width {widths[mid]} failed (not memory):\n{r.get('stderr', '')}")
                hi = mid - 1
        best[mode] = found
    bar.close()
    how = "enforced by a memory cgroup" if probes and probes[0]["enforced"] else "measured peak RSS, not enforced"
    print(
        f"\ncap {args.cap_gib:g} GiB for the whole job ({how}); {args.world} ranks ({args.backend}), ZeRO-3 bf16, "
        f"GPT-2 {args.layers} layers, vocab {args.vocab}, 3 optimizer steps of 1 x {args.seq} tokens"
    )
    print(f"{'mode':>7} | {'width':>5} | {'params':>12} | {'peak GiB':>8} | {'s':>5} | result")
    for r in probes:
        peak = f"{r['peak'] / 2**30:.2f}" if r.get("peak") else "-"
        params = f"{r['params']:,}" if "params" in r else "-"
        print(f"{r['mode']:>7} | {r['width']:>5} | {params:>12} | {peak:>8} | {r['seconds']:>5} | {r['result']}")
    labels = {"dense": "dense", "sparse": "sparse 90% (masked, compact)", "packed": "sparse 90% (packed)"}
    for mode in args.modes:
        r = best.get(mode)
        print(
            f"largest that trains, {labels[mode]}: "
            + (f"width {r['width']}, {r['params']:,} parameters" if r else "none in the range (lower --min-width)")
        )
    d = best.get("dense")
    for mode in args.modes:
        r = best.get(mode)
        if mode != "dense" and d and r:
            print(f"{labels[mode]} / dense parameters under the same cap: {r['params'] / d['params']:.2f}x")
    for mode, r in best.items():
        if r and r["width"] == widths[-1]:
            print(f"note: {mode} trained at the largest width tried; raise --max-width to find its limit")
    if args.json:
        args.json.write_text(json.dumps({"cap": cap, "probes": probes, "best": best}, indent=1))


if __name__ == "__main__":
    main()
