"""Consolidate a sharded rigl_ds + DeepSpeed checkpoint into one sparse model, as ``zero_to_fp32``
does for dense: fp32 weights with exact zeros, the whole masks, and a per-layer sparsity report.

    python -m rigl_ds.export CHECKPOINT_DIR OUTPUT_DIR [--tag global_step100] [--config-from MODEL_DIR]

Writes OUTPUT_DIR/model.safetensors (every parameter in fp32: the fp32 master of ZeRO 1-3, the
module's own weights of ZeRO-0), masks.safetensors (uint8, one per masked
weight), sparsity_report.json, and config.json copied from --config-from (a Hugging Face model
directory) so that ``from_pretrained(OUTPUT_DIR)`` works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any, Dict, Optional

import torch

from . import checkpoint


def _tag(checkpoint_dir: str, tag: Optional[str]) -> str:
    if tag is not None:
        return tag
    latest = checkpoint.read_latest(checkpoint_dir)
    if latest is None:
        raise FileNotFoundError(f"{checkpoint_dir} has no 'latest' file; pass --tag")
    return latest


def whole_masks(folder: str) -> Dict[str, torch.Tensor]:
    """Every masked layer's whole mask, assembled from the saved ranks' ranges (one file at a time)."""
    return checkpoint.whole_masks(folder)


def _weights(checkpoint_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    folder = os.path.join(checkpoint_dir, tag)
    if any(f.endswith("optim_states.pt") and "zero_pp" in f for f in os.listdir(folder)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    # ZeRO-0: the module's weights are whole in the model-states file.
    state = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


def export(checkpoint_dir: str, output_dir: str, tag: Optional[str] = None, config_from: Optional[str] = None):
    """Writes the consolidated sparse model; returns the sparsity report."""
    from safetensors.torch import save_file

    tag = _tag(checkpoint_dir, tag)
    tag_dir = os.path.join(checkpoint_dir, tag)
    complete, reason = checkpoint.is_complete(tag_dir, checksums=False)  # whole_masks checks each file it reads
    if not complete:
        raise checkpoint.IncompleteCheckpointError(f"not exporting {tag_dir}: {reason}")
    masks = whole_masks(checkpoint.rigl_folder(tag_dir))
    weights = _weights(checkpoint_dir, tag)
    layers, total, active = [], 0, 0
    for name, mask in masks.items():
        if name not in weights:
            raise KeyError(f"masked weight {name!r} is not in the checkpoint's model state")
        w = weights[name]
        if tuple(w.shape) != tuple(mask.shape):
            raise ValueError(f"{name}: weight shape {tuple(w.shape)} differs from its mask's {tuple(mask.shape)}")
        stray = int((w[~mask] != 0).sum())
        if stray:
            raise ValueError(f"{name}: {stray} masked entries are non-zero in the checkpoint; refusing to hide that")
        n, a = mask.numel(), int(mask.sum())
        layers.append({"name": name, "shape": list(mask.shape), "numel": n, "active": a, "sparsity": 1 - a / n})
        total, active = total + n, active + a
    report: Dict[str, Any] = {
        "checkpoint": os.path.abspath(os.path.join(checkpoint_dir, tag)),
        "masked_entries": total,
        "active_entries": active,
        "sparsity": 1 - active / total if total else 0.0,
        "parameters": int(sum(w.numel() for w in weights.values())),
        "layers": layers,
    }
    # Tied weights (GPT-2's embedding and head) come back as one tensor under two names: keep the
    # first name, as Hugging Face does; from_pretrained ties them again.
    unique: Dict[str, torch.Tensor] = {}
    seen: Dict[Any, str] = {}
    for k, v in weights.items():
        where = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else id(v)
        if where in seen:
            report.setdefault("tied", {})[k] = seen[where]
            continue
        seen[where] = k
        unique[k] = v.clone()  # zero_to_fp32 hands out views of one flat buffer
    os.makedirs(output_dir, exist_ok=True)
    save_file(unique, os.path.join(output_dir, "model.safetensors"))
    mask_file = os.path.join(output_dir, "masks.safetensors")
    save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, mask_file)
    with open(os.path.join(output_dir, "sparsity_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    if config_from is not None:
        shutil.copy(os.path.join(config_from, "config.json"), os.path.join(output_dir, "config.json"))
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_dir")
    p.add_argument("output_dir")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    p.add_argument("--config-from", default=None, help="a Hugging Face model directory whose config.json to copy")
    args = p.parse_args(argv)
    report = export(args.checkpoint_dir, args.output_dir, args.tag, args.config_from)
    print(
        f"{report['active_entries']:,} of {report['masked_entries']:,} masked-layer entries active "
        f"(sparsity {report['sparsity']:.4f}) over {len(report['layers'])} layers -> {args.output_dir}"
    )


if __name__ == "__main__":
    main()
