"""Bytes of training state per parameter on each rank, read from the actual tensors.

Trains a GPT-2 from config for two steps on gloo ranks (or NCCL GPUs) under ZeRO-3 bf16 with AdamW:
dense, rigl_ds with masks only (dense optimizer state), rigl_ds with ``compact_optimizer_state``,
with ``compact_master_weights`` on top (fp32 masters of active entries only in the optimizer;
DeepSpeed's master weights and gradients in bf16, which ZeRO-3 shares with the bf16 partition), and
with ``"storage": "packed"`` (active values and their positions are the parameters ZeRO partitions),
at 80%, 90% and 95% ERK. Then it walks the engine and sums, per category, the bytes of every distinct
tensor storage it holds on this rank: low-precision weights (each parameter's ``ds_tensor``), fp32
master partitions, their gradients, the low-precision gradient buffers, the torch optimizer's state,
the masks and index sets rigl_ds adds, and DeepSpeed's other buffers. Each figure is divided by the
parameters this rank is responsible for (total / world size).

    python bench/memory.py                         # GPT-2 6x512, 2 ranks
    python bench/memory.py --layers 12 --embd 768  # GPT-2 small
"""

from __future__ import annotations

import argparse

import ranks
import torch
import torch.distributed as dist

CATEGORIES = ("lp weights", "fp32 master", "fp32 grads", "lp grads", "optimizer state", "masks", "other ZeRO")


def _storages(obj, seen, out, category, depth=0):
    """Adds (data_ptr -> bytes) of every tensor reachable through lists/tuples/dicts of ``obj``."""
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 0:
            return
        storage = obj.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            out[category] = out.get(category, 0) + storage.nbytes()
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _storages(v, seen, out, category, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, seen, out, category, depth + 1)


def state_bytes(engine) -> dict:
    """Bytes per category on this rank; each storage counted once, in the first category that holds it."""
    seen, out = set(), {}
    opt = engine.optimizer
    params = list(engine.module.parameters())
    _storages([p.ds_tensor for p in params if hasattr(p, "ds_tensor")], seen, out, "lp weights")
    _storages([p.data for p in params], seen, out, "lp weights")  # persistent (unpartitioned) params, if any
    _storages(getattr(opt, "fp32_partitioned_groups_flat", []), seen, out, "fp32 master")
    _storages(
        [t.grad for t in getattr(opt, "fp32_partitioned_groups_flat", []) if t.grad is not None],
        seen,
        out,
        "fp32 grads",
    )
    masters = [s["master"] for s in engine.basic_optimizer.state.values() if "master" in s]
    _storages(masters, seen, out, "fp32 master")  # compact master weights: the optimizer's own
    _storages(dict(engine.basic_optimizer.state), seen, out, "optimizer state")
    sparse = getattr(engine, "rigl", None)
    if sparse is not None:
        _storages([s.mask_bits for s in sparse.shards], seen, out, "masks")
    for name, value in vars(opt).items():
        category = "lp grads" if "grad" in name.lower() else "other ZeRO"
        _storages(value, seen, out, category)
    return out


def _worker(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    import transformers

    import rigl_ds

    device = ranks.join(rank, world, store, args.backend)
    cases = [("dense", None, "")]
    for sparsity in args.sparsities:
        cases += [
            (f"rigl {sparsity:.0%}", sparsity, ""),
            (f"rigl {sparsity:.0%} compact", sparsity, "state"),
            (f"rigl {sparsity:.0%} +master", sparsity, "master"),
            (f"rigl {sparsity:.0%} packed", sparsity, "packed"),
        ]
    rows = []
    for label, sparsity, compact in cases:
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(
            n_layer=args.layers, n_embd=args.embd, n_head=args.heads, n_positions=args.seq, vocab_size=args.vocab
        )
        model = transformers.GPT2LMHeadModel(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "steps_per_print": 10**9,
        }
        if sparsity is not None:
            config["rigl"] = {
                "method": "rigl",
                "sparsity": sparsity,
                "delta_t": 100,
                "end_step": 1,
                "compact_optimizer_state": compact in ("state", "master"),
                "compact_master_weights": compact == "master",
            }
            if compact == "packed":  # active values only; compact_* are for masked storage
                config["rigl"] = {k: v for k, v in config["rigl"].items() if not k.startswith("compact_")}
                config["rigl"]["storage"] = "packed"
        engine, *_ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
        for step in range(2):  # step 0: the one update (optimizer step skipped); step 1 creates optimizer state
            x = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(step)).to(device)
            engine.backward(engine(x, labels=x).loss)
            engine.step()
        local = state_bytes(engine)
        t = torch.tensor([local.get(c, 0) for c in CATEGORIES], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the fullest rank
        rows.append((label, t.cpu().tolist(), n_params / world))
        del engine, model, optimizer
    if rank == 0:
        print(
            f"GPT-2 {args.layers}x{args.embd}, vocab {args.vocab}, ZeRO-3 bf16, AdamW, {world} ranks "
            f"({args.backend}); bytes per parameter on the fullest rank"
        )
        head = " | ".join(f"{c:>10}" for c in CATEGORIES)
        print(f"{'case':>18} | {head} | {'total':>6} | vs dense")
        dense_total = sum(rows[0][1]) / rows[0][2]
        for label, values, per_rank in rows:
            per = [v / per_rank for v in values]
            print(
                f"{label:>18} | " + " | ".join(f"{v:>10.2f}" for v in per) + f" | {sum(per):>6.2f} | "
                f"{sum(per) / dense_total:.2f}x"
            )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--embd", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = p.parse_args()
    ranks.spawn(_worker, args.world, args)


if __name__ == "__main__":
    main()
