"""A training script as users write it, started by the ``deepspeed`` launcher in tests:

deepspeed --num_gpus 2 tests/ds_launch_job.py --deepspeed_config ds.json --out report.json
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
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


if __name__ == "__main__":
    main()
