"""Sparse-train a language model on the bundled KJV text in plain PyTorch (no DeepSpeed).

The single-process path of rigl_ds: ``rigl_ds.sparsify`` around a torch optimizer. Defaults train
the RigL paper's character-level GRU, narrowed to finish in about a minute on a 2-core CPU;
``--paper-size`` uses the paper's widths (embedding 128, GRU 512, readout 256 then 128).

    python launch/train_plain.py                                   # RigL, ERK 90%, 600 steps
    python launch/train_plain.py --rigl configs/set_erk90.json     # any "rigl" block (or DeepSpeed config)
    python launch/train_plain.py --family gpt2 --dense             # the dense baseline
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import rigl_ds  # noqa: E402
from rigl_ds.lm import FAMILIES, build_model, evaluate, lm_blocks, lm_loss, load_text, train_tokenizer  # noqa: E402

DEFAULT_RIGL = '{"method": "rigl", "sparsity": 0.9, "distribution": "erk", "delta_t": 50}'
SMALL = {
    "char_gru": dict(embed=64, hidden=192, readout=(128, 64)),
    "word_lstm": dict(hidden=192),
    "gpt2": dict(n_layer=2, n_embd=128, n_head=4),
    "llama": dict(
        num_hidden_layers=2, hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="char_gru", help=f"one of {', '.join(FAMILIES)}, or a local HF model directory")
    p.add_argument(
        "--rigl", default=DEFAULT_RIGL, help='the "rigl" block as JSON, or a JSON file (a DeepSpeed config works)'
    )
    p.add_argument("--dense", action="store_true", help="train dense (ignore --rigl)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary (non-char families)")
    p.add_argument("--paper-size", action="store_true", help="char_gru at the paper's widths")
    p.add_argument("--eval-blocks", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("runs/cache"), help="tokenizer cache")
    p.add_argument("--out", type=Path, default=None, help="write the final metrics here as JSON")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    text = load_text()
    kind = "char" if args.family == "char_gru" else "bpe"
    tokenizer = train_tokenizer(text["train"], kind, args.vocab, save_dir=args.cache)
    train = lm_blocks(text["train"], tokenizer, args.seq + 1)
    val = lm_blocks(text["validation"], tokenizer, args.seq + 1)

    sizes = {} if args.paper_size else SMALL.get(args.family, {})
    model = build_model(args.family, len(tokenizer), **sizes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    sparse = None
    if not args.dense:
        block = json.loads(args.rigl) if args.rigl.lstrip().startswith("{") else args.rigl
        sparse = rigl_ds.sparsify(model, optimizer, block, total_steps=args.steps)
        probe = train[: args.batch]["input_ids"]
        report = sparse.measure_flops(probe, examples=probe.numel())
        ratio = report.inference_sparse / report.inference_dense
        print(f"{len(sparse.masks)} masked weights; inference FLOPs {ratio:.3f}x dense")
    step_fn = sparse.step if sparse else optimizer.step

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    bar = tqdm(range(args.steps), desc=sparse.config.method if sparse else "dense", mininterval=1.0)
    start, losses = time.time(), []
    for step in bar:
        idx = order[(step * args.batch + torch.arange(args.batch)) % len(order)]
        loss = lm_loss(model, train[idx]["input_ids"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step_fn()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", drop=f"{sparse.drop_fraction():.3f}" if sparse else "-")
    bar.close()
    window = min(50, len(losses))
    result = {
        "family": args.family,
        "method": sparse.config.method if sparse else "dense",
        "steps": args.steps,
        "train_loss_first_50": sum(losses[:window]) / window,
        "train_loss_last_50": sum(losses[-window:]) / window,
        "validation": evaluate(model, val, max_blocks=args.eval_blocks),
        "seconds": round(time.time() - start, 1),
    }
    if sparse:
        layers = sparse.layer_report()
        for r in layers:
            print(f"  {r['name']:40s} {r['active']:>9d} / {r['numel']:<9d} sparsity {r['sparsity']:.3f}")
        active, total = sum(r["active"] for r in layers), sum(r["numel"] for r in layers)
        result.update(
            sparsity_of_masked_layers=1 - active / total,
            mask_updates=len(sparse.controller.history),
            training_flops_vs_dense=sparse.training_flops.multiplier,
        )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
