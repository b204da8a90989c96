"""Sparse-train the paper's character-level GRU LM on the bundled KJV text, in plain PyTorch.

The single-process path of rigl_ds (no DeepSpeed): ``rigl_ds.sparsify`` around a torch optimizer.
Defaults finish in a few minutes on a 2-core CPU; ``--paper-size`` uses the paper's widths
(embedding 128, GRU 512, readout 256 then 128).

    python launch/train_plain.py                                  # RigL, ERK 90%, 600 steps
    python launch/train_plain.py --rigl '{"method": "set", "sparsity": 0.8}'
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rigl_ds  # noqa: E402
from rigl_ds.corpus import kjv_split  # noqa: E402


class CharGRU(nn.Module):
    """Embedding -> GRU -> readout (two Linear + ReLU) -> vocabulary logits, as in the RigL paper."""

    def __init__(self, vocab: int, embed: int, hidden: int, readout: tuple):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        layers, width = [], hidden
        for r in readout:
            layers += [nn.Linear(width, r), nn.ReLU()]
            width = r
        self.readout = nn.Sequential(*layers)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.embed(x))
        return self.head(self.readout(h))


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        idx = starts[:, None] + torch.arange(seq + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def bits_per_char(model: nn.Module, data: torch.Tensor, seq: int, limit: int) -> float:
    model.eval()
    data = data[: limit + 1]
    n = (data.numel() - 1) // seq * seq
    x = data[:n].view(-1, seq)
    y = data[1 : n + 1].view(-1, seq)
    total = 0.0
    for i in range(0, x.shape[0], 64):
        logits = model(x[i : i + 64])
        total += nn.functional.cross_entropy(logits.flatten(0, 1), y[i : i + 64].flatten(), reduction="sum").item()
    model.train()
    return total / y.numel() / math.log(2)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rigl",
        default='{"method": "rigl", "sparsity": 0.9, "distribution": "erk", "delta_t": 50}',
        help='the "rigl" block as JSON, or a path to a JSON file (a DeepSpeed config with a rigl block works too)',
    )
    p.add_argument("--dense", action="store_true", help="train the dense model (no rigl block)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--paper-size", action="store_true")
    p.add_argument("--eval-chars", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the final metrics here as JSON")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_lines, val_lines = kjv_split()
    train_text, val_text = "\n".join(train_lines), "\n".join(val_lines)
    chars = sorted(set(train_text) | set(val_text))
    stoi = {c: i for i, c in enumerate(chars)}
    train = torch.tensor([stoi[c] for c in train_text], dtype=torch.long)
    val = torch.tensor([stoi[c] for c in val_text], dtype=torch.long)

    embed, hidden, readout = (128, 512, (256, 128)) if args.paper_size else (64, 192, (128, 64))
    model = CharGRU(len(chars), embed, hidden, readout)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    sparse = None
    if not args.dense:
        block = args.rigl if not args.rigl.lstrip().startswith("{") else json.loads(args.rigl)
        sparse = rigl_ds.sparsify(model, optimizer, block, total_steps=args.steps)
        x0, _ = next(batches(train, args.batch, args.seq, torch.Generator().manual_seed(0)))
        report = sparse.measure_flops(x0, examples=args.batch * args.seq)
        ratio = report.inference_sparse / report.inference_dense
        print(f"masked layers: {len(sparse.masks)}; inference FLOPs {ratio:.3f}x dense")
    stepper = sparse.step if sparse else optimizer.step

    data = batches(train, args.batch, args.seq, torch.Generator().manual_seed(args.seed + 1))
    bar = tqdm(range(args.steps), desc=sparse.config.method if sparse else "dense", mininterval=1.0)
    start, losses = time.time(), []
    for step in bar:
        x, y = next(data)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        stepper()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", drop=f"{sparse.drop_fraction():.3f}" if sparse else "-")
    bar.close()
    result = {
        "method": sparse.config.method if sparse else "dense",
        "steps": args.steps,
        "train_loss_first_50": sum(losses[:50]) / 50,
        "train_loss_last_50": sum(losses[-50:]) / 50,
        "val_bits_per_char": bits_per_char(model, val, args.seq, args.eval_chars),
        "seconds": round(time.time() - start, 1),
    }
    if sparse:
        active = sum(r["active"] for r in sparse.layer_report())
        total = sum(r["numel"] for r in sparse.layer_report())
        result.update(
            sparsity_of_masked_layers=1 - active / total,
            mask_updates=len(sparse.controller.history),
            training_flops_vs_dense=sparse.training_flops.multiplier,
        )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
