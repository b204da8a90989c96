"""Per-step cost of the rigl_ds DeepSpeed plugin against the same run without the "rigl" block.

Spawns ranks (gloo on CPU, or NCCL with --backend nccl, one per GPU), builds a Hugging Face GPT-2
from config (no download) and trains it with ZeRO under each stage asked for, dense and with a RigL
ERK 90% block, feeding identical batches. Prints per stage: the median whole iteration (forward,
backward, engine.step) between mask updates, the mask-update iteration, mask initialisation, and
the ratios against dense, all measured in the same run; and "plugin ms", the time spent inside
rigl_ds's own parts of a step between updates (timed in the step, so free of the run-to-run noise
of two whole-step medians), with ``1 + plugin / dense``, the overhead that time alone adds.

    python bench/deepspeed_overhead.py                          # GPT-2 small, 2 ranks, ZeRO 2 and 3
    python bench/deepspeed_overhead.py --layers 4 --embd 256 --stages 1 2 3
    python bench/deepspeed_overhead.py --stages 3 --storages masked packed   # packed storage's step time too
"""

from __future__ import annotations

import argparse
import statistics
import time

import ranks
import torch
import torch.distributed as dist


def _worker(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    import transformers

    import rigl_ds

    device = ranks.join(rank, world, store, args.backend)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(
        f"{world} ranks ({args.backend}), GPT-2 {args.layers}x{args.embd}, seq {args.seq}, micro-batch {args.batch}, "
        f"{args.dtype}, {torch.get_num_threads()} threads per rank"
    )
    say(
        f"{'stage':>5} | {'dense ms':>9} | {'rigl ms':>9} | {'ratio':>6} | {'plugin ms':>9} | {'1+plugin/d':>11} | "
        f"{'update ms':>9} | {'update/dense':>12} | {'amortised':>9} | {'init s':>6}"
    )

    def sync():
        if args.backend == "nccl":
            torch.cuda.synchronize()

    for stage in args.stages:
        times = {}
        for mode in ["dense"] + list(args.storages):
            sparse = mode != "dense"
            torch.manual_seed(0)
            cfg = transformers.GPT2Config(
                n_layer=args.layers, n_embd=args.embd, n_head=args.heads, n_positions=max(args.seq, 64)
            )
            model = transformers.GPT2LMHeadModel(cfg)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            config = {
                "train_micro_batch_size_per_gpu": args.batch,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                "steps_per_print": 10**9,
            }
            if args.dtype == "bf16":
                config["bf16"] = {"enabled": True}
            if sparse:
                # One update, at step `update_at`, inside the timed window; none otherwise.
                config["rigl"] = {
                    "method": "rigl",
                    "sparsity": 0.9,
                    "distribution": "erk",
                    "delta_t": 10**6,
                    "begin_step": args.update_at,
                    "end_step": args.update_at + 1,
                    "storage": mode,
                }
            dist.barrier()
            start = time.perf_counter()
            engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
            sync()
            init = time.perf_counter() - start
            plugin = _time_plugin(engine, sync) if sparse else None
            steps, plugin_steps = [], []
            g = torch.Generator().manual_seed(0)
            for _ in range(args.steps):
                x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
                dist.barrier()
                sync()
                if plugin is not None:
                    plugin["seconds"] = 0.0
                t0 = time.perf_counter()
                loss = engine(x, labels=x).loss
                engine.backward(loss)
                engine.step()
                sync()
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                steps.append(float(t))
                if plugin is not None:
                    own = torch.tensor([plugin["seconds"]], dtype=torch.float64, device=device)
                    dist.all_reduce(own, op=dist.ReduceOp.MAX)
                    plugin_steps.append(float(own))
            regular = [i for i in range(len(steps)) if i >= args.warmup and i != args.update_at]
            own = statistics.median(plugin_steps[i] for i in regular) if sparse else None
            median = statistics.median(steps[i] for i in regular)
            times[mode] = (median, steps[args.update_at] if sparse else None, init, own)
            del engine
        dense = times["dense"][0]
        for mode in args.storages:
            rigl, update, init, own = times[mode]
            amortised = (rigl * (args.delta_t - 1) + update) / (dense * args.delta_t)
            label = f"{stage} {mode}" if args.storages != ["masked"] else f"{stage}"
            say(
                f"{label:>5} | {dense * 1e3:>9.1f} | {rigl * 1e3:>9.1f} | {rigl / dense:>5.2f}x | {own * 1e3:>9.1f} | "
                f"{1 + own / dense:>10.3f}x | {update * 1e3:>9.1f} | {update / dense:>11.2f}x | {amortised:>8.2f}x | "
                f"{init:>6.1f}"
            )
        if len(args.storages) > 1 and "masked" in args.storages:
            for mode in args.storages:
                if mode != "masked":
                    say(f"      {mode} / masked between updates: {times[mode][0] / times['masked'][0]:.2f}x")
    dist.destroy_process_group()


def _time_plugin(engine, sync) -> dict:
    """Adds the wall time of every rigl_ds piece of a step (the controller before and after the
    optimizer step, the offload norm fix-up, the re-mask after the torch optimizer's step) to
    ``timer["seconds"]``: the plugin's own cost, measured inside the step rather than as the
    difference of two noisy whole-step medians."""
    sparse, timer = engine.rigl, {"seconds": 0.0}

    def clocked(fn, sign=1.0):
        """``fn``, adding (``sign`` 1) or taking off (-1: the optimizer's own step, run inside a
        clocked wrapper) its wall time."""

        def run(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                timer["seconds"] += sign * (time.perf_counter() - t0)

        return run

    controller = sparse.controller
    controller.before_step = clocked(controller.before_step)
    controller.after_step = clocked(controller.after_step)
    sparse.zero.gradients_masked = clocked(sparse.zero.gradients_masked)
    engine.basic_optimizer.step = clocked(engine.basic_optimizer.step)
    sparse._basic_step = clocked(sparse._basic_step, sign=-1.0)
    return timer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--update-at", type=int, default=5)
    p.add_argument("--delta-t", type=int, default=100, help="update interval for the amortised figure")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument(
        "--storages", nargs="+", default=["masked"], choices=["masked", "packed"], help='the "rigl" block\'s storage'
    )
    args = p.parse_args()
    ranks.spawn(_worker, args.world, args)


if __name__ == "__main__":
    main()
