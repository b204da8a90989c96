"""A training script as users write it, started by the ``deepspeed`` launcher in tests:

deepspeed --num_gpus 2 tests/ds_launch_job.py --deepspeed_config ds.json --out report.json

With ``--masks masks.pt`` rank 0 also saves every layer's whole mask (a dict of bool tensors, assembled
from the ranks' shards with an all_reduce), so runs on different node layouts can be compared.
"""

import argparse
import json
import os
import sys

import deepspeed
import torch

sys.path.insert(0, os.path.dirname(__file__))

import ds_sim  # noqa: E402

import rigl_ds  # noqa: E402
from rigl_ds.lm.models import lm_loss  # noqa: E402
from rigl_ds.rank_exit import end_rank  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--masks", default=None, help="also save the whole masks here (from rank 0)")
    deepspeed.add_config_arguments(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = ds_sim.tiny_model("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = rigl_ds.initialize(args=args, model=model, optimizer=optimizer)
    for step in range(args.steps):
        x = ds_sim.batch("gpt2", step)
        engine.backward(lm_loss(engine, x))
        engine.step()
    report = engine.rigl.layer_report()
    masks = ds_sim.full_masks(engine.rigl) if args.masks else None  # a collective: every rank calls it
    if engine.global_rank == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "world": engine.world_size,
                    "layout": engine.rigl.layout,
                    "report": report,
                    "updates": len(engine.rigl.history),
                },
                f,
            )
        if masks is not None:
            torch.save(masks, args.masks)


if __name__ == "__main__":
    main()
    end_rank()  # not interpreter finalization: see rigl_ds.rank_exit
