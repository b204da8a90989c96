"""Sparse-train a language model with DeepSpeed: the main job of rigl_ds.

One DeepSpeed JSON holds DeepSpeed's keys, the "rigl" block (leave it out for dense) and the "job"
block (model family and sizes, data, steps, learning rate, logging; see rigl_ds/lm/job.py):

    deepspeed --num_gpus 2 launch/train_lm.py                          # defaults: configs/cpu_char_gru_rigl.json
    deepspeed launch/train_lm.py --deepspeed_config configs/gpt2_small_rigl_erk90_zero3_bf16.json
    deepspeed launch/train_lm.py --deepspeed_config ds.json --job steps=2000 --job out_dir='"runs/x"'
    deepspeed launch/train_lm.py --deepspeed_config ds.json --resume  # from <out_dir>/checkpoints
    python launch/train_lm.py                                          # one process, no launcher

Writes <job.out_dir>/metrics.csv, summary.json, layers.json and checkpoints/; render them with
``python -m rigl_ds.lm.plot <job.out_dir>``. With ZeRO stage 3 the model is built partitioned under
``deepspeed.zero.Init``: no rank ever holds the whole model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "cpu_char_gru_rigl.json"


def main(argv=None) -> None:
    import deepspeed

    from rigl_ds.lm.train import read_config, train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument(
        "--job", action="append", default=[], metavar="KEY=VALUE", help="override a key of the job block (JSON value)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in job.out_dir")
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    config = read_config(args.deepspeed_config or str(DEFAULT_CONFIG))
    train(config, args.job, resume=args.resume)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
    from rigl_ds.rank_exit import end_rank

    end_rank()  # a finished gloo rank must not meet interpreter finalization: see rigl_ds/rank_exit.py
