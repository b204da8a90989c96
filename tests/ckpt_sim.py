"""A DeepSpeed save and load on gloo ranks, watching the order in which the checkpoint's parts land."""

from __future__ import annotations

import functools
import os
from typing import Any, Dict

import ds_sim


def save_then_load(folder: str) -> Dict[str, Any]:
    """ZeRO-2 run of 5 steps saving at step 3 (recording, as DeepSpeed's save returns and as
    ``latest`` is written, what is on disk), then a run loaded from it to step 5."""
    import deepspeed

    from rigl_ds import checkpoint

    events = []
    tag_dir = os.path.join(folder, "global_step3")
    original_save = deepspeed.DeepSpeedEngine.save_checkpoint

    @functools.wraps(original_save)
    def deepspeed_save(self, *args, **kwargs):
        out = original_save(self, *args, **kwargs)
        on_disk = {
            "latest": os.path.exists(os.path.join(folder, "latest")),
            "record": os.path.exists(os.path.join(tag_dir, "rigl_ds", "complete.json")),
        }
        events.append(("deepspeed_saved", on_disk))
        return out

    original_latest = checkpoint.write_latest

    def write_latest(save_dir, tag):
        events.append(("write_latest", checkpoint.is_complete(os.path.join(save_dir, tag))))
        return original_latest(save_dir, tag)

    deepspeed.DeepSpeedEngine.save_checkpoint = deepspeed_save
    checkpoint.write_latest = write_latest
    try:
        straight = ds_sim.train(stage=2, dtype="fp32", steps=5, save_at=3, save_dir=folder)
    finally:
        deepspeed.DeepSpeedEngine.save_checkpoint = original_save
        checkpoint.write_latest = original_latest
    resumed = ds_sim.train(stage=2, dtype="fp32", steps=5, load_dir=folder)
    return {"events": events, "straight": straight, "resumed": resumed}
