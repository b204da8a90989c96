"""An accelerate training loop (Accelerator, prepare, accelerator.backward), started with
`accelerate launch --config_file <a DeepSpeed accelerate config>`. It knows nothing of rigl_ds: tests
run it unchanged.
"""

import argparse
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, DummyScheduler
from transformers import GPT2Config, GPT2LMHeadModel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train_file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save_at", type=int, nargs="*", default=[])
    args = p.parse_args()
    accelerator = Accelerator()
    torch.manual_seed(0)
    with open(args.train_file, "rb") as f:
        ids = torch.tensor(list(f.read()), dtype=torch.long)
    blocks = ids[: len(ids) // 32 * 32].view(-1, 32)
    loader = torch.utils.data.DataLoader(blocks, batch_size=2, shuffle=False)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_layer=2, n_embd=32, n_head=2))
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    # The DeepSpeed config names the optimizer and scheduler: accelerate's placeholders stand for them.
    optimizer = (DummyOptim if "optimizer" in ds_config else torch.optim.AdamW)(model.parameters(), lr=3e-3)
    if "scheduler" in ds_config:
        scheduler = DummyScheduler(optimizer, total_num_steps=args.steps, warmup_num_steps=1)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    os.makedirs(args.out, exist_ok=True)
    step = 0
    while step < args.steps:
        for x in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=x, labels=x).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                if step in args.save_at or step == args.steps:
                    state = accelerator.get_state_dict(model)
                    if accelerator.is_main_process:
                        name = "weights_final.pt" if step == args.steps else f"weights_step{step}.pt"
                        torch.save(state, os.path.join(args.out, name))
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
