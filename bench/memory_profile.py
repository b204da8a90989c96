"""Peak memory per rank in each phase of a DeepSpeed training run, dense against each sparse storage mode.

Phases: model build (under ``deepspeed.zero.Init`` at ZeRO-3), engine init (``rigl_ds.initialize``,
which for the sparse modes includes the mask initialisation), forward, backward, optimizer step
(``engine.step`` without the mask update inside it), mask update (the controller's update, from its
``update_listeners`` event "start" to "end" inside ``engine.step``; with DeepSpeed's refresh of the
low-precision weights where the update follows the optimizer step), checkpoint save and checkpoint
load. Forward, backward, optimizer step and mask update report the highest peak over the steps they
ran in.

Default setting: GPT-2 from config, vocab 256 (token ids are the bytes of the bundled corpus), width
1024, 8 layers (about 101M parameters), ZeRO-3 bf16 (``stage3_param_persistence_threshold`` 0), a
client AdamW, 2 gloo ranks, micro-batch 1 of 128 tokens, 4 steps with mask updates at steps 1 and 3.
Modes (each in its own fresh set of rank processes, so no peak carries over from another mode):

  dense   DeepSpeed's own ZeRO, no "rigl" block
  masked  RigL 90% ERK with compact_optimizer_state and compact_master_weights (the "rigl" block
          without "storage": today's behaviour)
  packed  RigL 90% ERK with "storage": "packed" (active values only; no compact_* keys, which it makes
          redundant); a setting rigl_ds refuses for it is reported as not available, not measured

On CPU a phase's peak is the kernel's RSS high-water mark (``VmHWM``), reset before the phase by
writing 5 to ``/proc/self/clear_refs`` (where that is not writable, a thread samples RSS every 2 ms
instead, which can miss short spikes; the output says which was used). It is reported above the
rank's RSS just before the model is built (all imports done), in MiB and in bytes per parameter the
rank owns (total parameters / world size), as the maximum over ranks. With ``--backend nccl`` and
CUDA, it is ``torch.cuda.max_memory_allocated`` instead (above the allocation before the build).

    python bench/memory_profile.py                                  # the default setting above
    python bench/memory_profile.py --layers 2 --embd 64 --out mem.json
    python bench/memory_profile.py --modes dense masked --stage 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import ranks  # noqa: E402

PHASES = (
    "model build",
    "engine init",
    "forward",
    "backward",
    "optimizer step",
    "mask update",
    "checkpoint save",
    "checkpoint load",
)
MODES = ("dense", "masked", "packed")
MIB = 2**20


# -- peak meters ------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class HighWaterMark:
    """The kernel's own peak RSS of this process: exact, and free while the phase runs."""

    name = "VmHWM after clear_refs"

    def __init__(self):
        self.reset()  # raises OSError where clear_refs is not writable

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the high-water mark to the current RSS (Linux >= 4.0)

    def peak(self) -> int:
        return _status_kib("VmHWM") * 1024

    def current(self) -> int:
        return _status_kib("VmRSS") * 1024

    def close(self) -> None:
        pass


class RssSampler:
    """Fallback: the highest RSS a thread sees, reading ``/proc/self/statm`` every ``interval`` seconds."""

    name = "RSS sampled every 2 ms"

    def __init__(self, interval: float = 0.002):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.interval, self.high = interval, self.current()
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            rss = self.current()
            with self.lock:
                self.high = max(self.high, rss)

    def reset(self) -> None:
        with self.lock:
            self.high = self.current()

    def peak(self) -> int:
        rss = self.current()  # the phase's end counts too, however short the phase
        with self.lock:
            self.high = max(self.high, rss)
            return self.high

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class CudaPeak:
    """Peak bytes allocated by torch's caching allocator on this rank's GPU."""

    name = "torch.cuda.max_memory_allocated"

    def __init__(self):
        import torch

        self.cuda = torch.cuda

    def reset(self) -> None:
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        self.cuda.synchronize()
        return self.cuda.max_memory_allocated()

    def current(self) -> int:
        return self.cuda.memory_allocated()

    def close(self) -> None:
        pass


def make_meter(backend: str, sampler: bool):
    import torch

    if backend == "nccl" and torch.cuda.is_available():
        return CudaPeak()
    if not sampler:
        try:
            return HighWaterMark()
        except OSError:
            pass
    return RssSampler()


class Phases:
    """Peak of each phase above the baseline, several readings per phase kept (one per step)."""

    def __init__(self, meter):
        self.meter = meter
        self.baseline = meter.current()
        self.peaks: Dict[str, List[int]] = {p: [] for p in PHASES}
        self.held: Dict[str, List[int]] = {p: [] for p in PHASES}  # still resident when the phase ends

    def start(self) -> None:
        self.meter.reset()

    def end(self, phase: str) -> int:
        """Records the peak since the last ``start`` and starts the next span."""
        peak = self.meter.peak() - self.baseline
        self.peaks[phase].append(peak)
        self.held[phase].append(self.meter.current() - self.baseline)
        self.meter.reset()
        return peak

    def write_report(self, path: Path, rank: int, params: int, losses, updates: int, deepspeed_version) -> None:
        """This rank's readings, for the driver to assemble."""
        report = {
            "rank": rank,
            "meter": self.meter.name,
            "baseline": self.baseline,
            "peaks": self.peaks,
            "held": self.held,
            "params": params,
            "losses": losses,
            "updates": updates,
            "deepspeed": deepspeed_version,
        }
        path.write_text(json.dumps(report))

    def watch_updates(self, controller) -> None:
        """The mask update runs inside the optimizer step (the controller, before or after the
        optimizer's own step): its "start" closes the step's span so far, its "end" (after anything
        the adapter does as part of the update) measures the update alone and starts the rest."""
        self._step_parts: List[int] = []

        def measure_update(event: str, step: int) -> None:
            if event == "start":
                self._step_parts.append(self.meter.peak() - self.baseline)
                self.meter.reset()
            else:
                self.end("mask update")

        controller.update_listeners.append(measure_update)

    def step(self, take_step) -> None:
        """``take_step()`` measured as "optimizer step", without a mask update run inside it."""
        parts = getattr(self, "_step_parts", [])
        parts.clear()
        take_step()
        if parts:  # the step's peak without the update: before it or after it
            after = self.meter.peak() - self.baseline
            self.peaks["optimizer step"].append(max(parts + [after]))
            self.held["optimizer step"].append(self.meter.current() - self.baseline)
            self.meter.reset()
        else:
            self.end("optimizer step")


# -- one mode on one rank -----------------------------------------------------------------------
def ds_config(mode: str, stage: int, steps: int, delta_t: int, zero: Optional[dict] = None) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, **(zero or {})},
        "steps_per_print": 10**9,
    }
    if mode != "dense":
        config["rigl"] = {
            "method": "rigl",
            "sparsity": 0.9,
            "distribution": "erk",
            # Updates at steps 1, 1 + delta_t, ... (step 0 creates the optimizer state first); the
            # end step is the run's length, so every update inside it drops and regrows entries.
            "delta_t": delta_t,
            "begin_step": 1,
            "end_step": steps,
            "compact_optimizer_state": True,
            "compact_master_weights": True,
        }
        if mode == "packed":  # keeps state for active entries only by itself: no compact_* with it
            config["rigl"] = {k: v for k, v in config["rigl"].items() if not k.startswith("compact_")}
            config["rigl"]["storage"] = "packed"
    return config


def plain_block(mode: str, steps: int, delta_t: int) -> dict:
    """The ``"rigl"`` block of the plain-PyTorch path: RigL 90% ERK as above, masked or packed."""
    block = dict(ds_config("masked", 3, steps, delta_t)["rigl"])
    block.update(compact_optimizer_state=False, compact_master_weights=False)
    if mode == "packed":
        block = {k: v for k, v in block.items() if not k.startswith("compact_")} | {"storage": "packed"}
    return block


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, mode: str) -> None:
    import logging

    import torch
    import torch.distributed as dist

    device = ranks.join(rank, world, store, args.backend)
    # Everything imported (what build_model imports lazily too) and the batches made before the
    # baseline, so no module's import counts as the model's memory.
    import deepspeed
    import torch._dynamo  # noqa: F401
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: F401
    from transformers.integrations import HfDeepSpeedConfig  # noqa: F401

    import rigl_ds
    from rigl_ds.lm.models import build_model

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # the table is the output
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed collectives, once per rank
    config = ds_config(mode, args.stage, args.steps, args.delta_t, args.zero)
    batches = [torch.tensor(ids, dtype=torch.long).view(1, -1).to(device) for ids in args.batches]
    ckpt = Path(args.ckpt_dir or os.path.dirname(store)) / f"ckpt-{mode}"

    meter = make_meter(args.backend, args.sampler)
    dist.barrier()
    phases = Phases(meter)
    phases.start()
    torch.manual_seed(0)
    sizes = dict(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, n_positions=args.seq)
    model = build_model("gpt2", args.vocab, config if args.stage == 3 else None, **sizes)
    phases.end("model build")
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
    del optimizer  # rigl_ds may have replaced it with a compact one; the engine holds what it uses
    phases.end("engine init")

    sparse = getattr(engine, "rigl", None)
    if sparse is not None:
        phases.watch_updates(sparse.controller)

    losses = []
    for x in batches:
        phases.start()
        loss = engine(x, labels=x).loss
        phases.end("forward")
        engine.backward(loss)
        losses.append(float(loss.detach()))
        del loss
        phases.end("backward")
        phases.step(engine.step)
    updates = 0 if sparse is None else sparse.controller.updates

    dist.barrier()
    phases.start()
    engine.save_checkpoint(str(ckpt))
    phases.end("checkpoint save")
    dist.barrier()
    phases.start()
    load_path, _ = engine.load_checkpoint(str(ckpt))
    phases.end("checkpoint load")
    if load_path is None:
        raise RuntimeError(f"load_checkpoint found no checkpoint in {ckpt}")

    report = Path(args.report_dir, f"{mode}.rank{rank}.json")
    phases.write_report(report, rank, n_params, losses, updates, deepspeed.__version__)
    meter.close()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips a rare gloo abort at interpreter exit (docs: deepspeed-notes, "Known flake")


def _plain_worker(rank: int, world: int, store: str, args: argparse.Namespace, mode: str) -> None:
    """One process, no DeepSpeed: ``rigl_ds.sparsify`` on a fp32 GPT-2 with a torch AdamW."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: F401  (imported before the baseline)

    import rigl_ds
    from rigl_ds.lm.models import build_model

    warnings.filterwarnings("ignore", category=FutureWarning)
    batches = [torch.tensor(ids, dtype=torch.long).view(1, -1) for ids in args.batches]
    ckpt = Path(args.ckpt_dir or os.path.dirname(store)) / f"plain-{mode}.pt"
    meter = make_meter("gloo", args.sampler)
    phases = Phases(meter)
    phases.start()
    torch.manual_seed(0)
    sizes = dict(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, n_positions=args.seq)
    model = build_model("gpt2", args.vocab, None, **sizes)
    phases.end("model build")
    n_params = sum(p.numel() for p in model.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sparse = None
    if mode != "dense":
        sparse = rigl_ds.sparsify(model, optimizer, plain_block(mode, args.steps, args.delta_t))
        phases.watch_updates(sparse.controller)
    phases.end("engine init")

    losses = []
    for x in batches:
        phases.start()
        loss = model(x, labels=x).loss
        phases.end("forward")
        loss.backward()
        losses.append(float(loss.detach()))
        del loss
        phases.end("backward")
        phases.step((sparse or optimizer).step)
        optimizer.zero_grad(set_to_none=True)
    updates = 0 if sparse is None else sparse.controller.updates

    phases.start()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if sparse is not None:
        state["rigl"] = sparse.state_dict()
    torch.save(state, ckpt)
    del state
    phases.end("checkpoint save")
    phases.start()
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if sparse is not None:
        sparse.load_state_dict(state["rigl"])
    del state
    phases.end("checkpoint load")

    phases.write_report(Path(args.report_dir, f"{mode}.rank{rank}.json"), rank, n_params, losses, updates, None)
    meter.close()


# -- the driver --------------------------------------------------------------------------------
def packed_refused(args: argparse.Namespace) -> Optional[str]:
    """Why rigl_ds's config refuses ``"storage": "packed"``, or None when it takes the key."""
    from rigl_ds.config import load_config

    try:
        if args.path == "plain":
            load_config(plain_block("packed", args.steps, args.delta_t))
        else:
            import torch

            from rigl_ds.zero.packed import refuse_packed

            config = ds_config("packed", args.stage, args.steps, args.delta_t, getattr(args, "zero", None))
            refuse_packed(config, torch.nn.Module(), load_config(config["rigl"]))
    except ValueError as exc:  # RigLConfigError is one: the config's reason, to print
        return " ".join(str(exc).split())
    return None


def token_batches(args: argparse.Namespace) -> List[List[int]]:
    """One micro-batch per step: consecutive bytes of the bundled corpus (vocab >= 256), else random ids."""
    n = args.seq * args.steps
    if args.vocab >= 256:
        from rigl_ds.corpus import kjv_text

        ids = list(kjv_text().encode("utf-8")[:n])
    else:
        import torch

        ids = torch.randint(0, args.vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    return [ids[i * args.seq : (i + 1) * args.seq] for i in range(args.steps)]


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    """Spawns the ranks for ``mode``; per phase the maximum over ranks and over the phase's readings."""
    with tempfile.TemporaryDirectory() as d:
        args.report_dir = d
        if args.path == "plain":
            ranks.spawn(_plain_worker, 1, args, mode)
        else:
            ranks.spawn(_worker, args.world, args, mode)
        world = 1 if args.path == "plain" else args.world
        reports = [json.loads(Path(d, f"{mode}.rank{r}.json").read_text()) for r in range(world)]
    per_rank = [{p: max(r["peaks"][p]) if r["peaks"][p] else None for p in PHASES} for r in reports]
    peaks = {}
    for p in PHASES:
        values = [pr[p] for pr in per_rank if pr[p] is not None]
        peaks[p] = max(values) if values else None
    # Resident at the end of the phase's last run (the fullest rank): how much of the peak stays.
    held = {p: max((r["held"][p][-1] for r in reports if r["held"][p]), default=None) for p in PHASES}
    first = reports[0]
    return {
        "available": True,
        "meter": first["meter"],
        "params": first["params"],
        "params_per_rank": first["params"] / world,
        "updates": first["updates"],
        "losses": first["losses"],
        "deepspeed": first["deepspeed"],
        "peak_bytes": peaks,
        "overall_peak_bytes": max(v for v in peaks.values() if v is not None),
        "held_after_bytes": held,
        "per_rank_peak_bytes": per_rank,
        "baseline_bytes": [r["baseline"] for r in reports],
    }


def table(results: dict) -> str:
    ran = [m for m, r in results.items() if r["available"]]
    sparse = [m for m in ran if m != "dense"]
    ratio = "dense" in ran
    head = ["phase"]
    for m in ran:
        head += [f"{m} MiB", f"{m} B/param"]
    head += [f"{m}/dense" for m in sparse] if ratio else []
    rows = [head, ["---"] * len(head)]

    def cells(get):
        row = []
        for m in ran:
            v = get(results[m])
            row += ["-", "-"] if v is None else [f"{v / MIB:.1f}", f"{v / results[m]['params_per_rank']:.2f}"]
        if ratio:
            d = get(results["dense"])
            for m in sparse:
                v = get(results[m])
                row.append("-" if v is None or not d else f"{v / d:.2f}")
        return row

    for p in PHASES:
        rows.append([p] + cells(lambda r, p=p: r["peak_bytes"][p]))
    rows.append(["**overall peak**"] + cells(lambda r: r["overall_peak_bytes"]))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument(
        "--path",
        default="deepspeed",
        choices=["deepspeed", "plain"],
        help="deepspeed: rigl_ds.initialize on --world ranks; plain: rigl_ds.sparsify in one fp32 process",
    )
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--embd", type=int, default=1024)
    p.add_argument("--heads", type=int, default=None, help="default: embd / 64")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (at least 2: updates start at step 1)")
    p.add_argument("--delta-t", type=int, default=2, help="steps between mask updates")
    p.add_argument("--stage", type=int, default=3, choices=[1, 2, 3], help="ZeRO stage (zero.Init only at 3)")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--sampler", action="store_true", help="sample RSS in a thread even where clear_refs works")
    p.add_argument("--ckpt-dir", default=None, help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    p.add_argument(
        "--zero",
        type=json.loads,
        default={},
        help='JSON merged into zero_optimization for every mode, e.g. \'{"stage3_max_reuse_distance": 0}\'',
    )
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first mask update is at step 1)")
    args.heads = args.heads or max(1, args.embd // 64)
    args.batches = token_batches(args)

    results = {}
    for mode in args.modes:
        refused = packed_refused(args) if mode == "packed" else None
        if refused is not None:
            print(f"packed: not available ({refused})", flush=True)
            results[mode] = {"available": False, "reason": refused}
            continue
        print(f"{mode}: running {1 if args.path == 'plain' else args.world} rank(s) ...", flush=True)
        results[mode] = run_mode(args, mode)
    ran = [r for r in results.values() if r["available"]]
    if not ran:
        return
    first = ran[0]
    storage = (
        "masked: compact optimizer state and master weights; packed: active values only"
        if args.path == "deepspeed"
        else "masked: dense storage; packed: active values only"
    )
    sparse = (
        f"RigL 90% ERK ({storage}), updates every {args.delta_t} steps from step 1. "
        if any(m != "dense" and r["available"] for m, r in results.items())
        else ""
    )
    engine = (
        f"ZeRO-{args.stage} bf16, AdamW, {args.world} ranks ({args.backend})"
        if args.path == "deepspeed"
        else "plain PyTorch (rigl_ds.sparsify), fp32, AdamW, 1 process"
    )
    print(
        f"\nGPT-2 {args.layers}x{args.embd}, vocab {args.vocab}, {first['params']:,} parameters; "
        f"{engine}, micro-batch 1 x {args.seq} tokens, "
        f"{args.steps} steps; {sparse}"
        f"Peak per phase above the pre-build baseline, the fullest rank ({first['meter']}); B/param: bytes per "
        f"parameter a rank owns ({first['params_per_rank']:,.0f})\n"
    )
    print(table(results))
    for mode, r in results.items():
        if r["available"] and mode != "dense" and r["updates"] == 0:
            print(f"warning: {mode} ran no mask update")  # the schedule and --steps did not meet
    if args.out:
        setting = {k: v for k, v in vars(args).items() if k not in ("batches", "report_dir", "out")}
        args.out.write_text(json.dumps({"setting": setting, "phases": list(PHASES), "modes": results}, indent=1))


if __name__ == "__main__":
    main()
