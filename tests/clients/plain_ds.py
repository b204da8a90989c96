"""A plain DeepSpeed training script (deepspeed.initialize, engine.backward, engine.step). It knows
nothing of rigl_ds: tests run it unchanged.

    deepspeed --num_gpus 2 plain_ds.py --deepspeed_config ds.json --train_file text.txt --out out --steps 8
"""

import argparse
import os

import deepspeed
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--train_file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save_at", type=int, nargs="*", default=[], help="also save the weights after these steps")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args()
    torch.manual_seed(0)
    with open(args.train_file, "rb") as f:
        ids = torch.tensor(list(f.read()), dtype=torch.long)
    blocks = ids[: len(ids) // 32 * 32].view(-1, 32)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_layer=2, n_embd=32, n_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer)
    micro = engine.train_micro_batch_size_per_gpu()
    os.makedirs(args.out, exist_ok=True)
    for step in range(args.steps * engine.gradient_accumulation_steps()):
        start = (step * engine.world_size + engine.global_rank) * micro % (len(blocks) - micro)
        x = blocks[start : start + micro]
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if engine.is_gradient_accumulation_boundary() and engine.global_steps in args.save_at:
            if engine.global_rank == 0:
                torch.save(engine.module.state_dict(), os.path.join(args.out, f"weights_step{engine.global_steps}.pt"))
    engine.save_checkpoint(os.path.join(args.out, "checkpoints"))
    if engine.global_rank == 0:
        torch.save(engine.module.state_dict(), os.path.join(args.out, "weights_final.pt"))


if __name__ == "__main__":
    main()
