"""Consolidate a sharded rigl_ds + DeepSpeed checkpoint into one sparse model, as ``zero_to_fp32``
does for dense: fp32 weights with exact zeros, the whole masks, and a per-layer sparsity report.

    python -m rigl_ds.export CHECKPOINT_DIR OUTPUT_DIR [--tag global_step100] [--config-from MODEL_DIR]

Writes OUTPUT_DIR/model.safetensors (every parameter in fp32: the fp32 master of ZeRO 1-3, the
module's own weights of ZeRO-0), masks.safetensors (uint8, one per masked
weight), sparsity_report.json, and config.json copied from --config-from (a Hugging Face model
directory) so that ``from_pretrained(OUTPUT_DIR)`` works.

A pipeline-parallel checkpoint (``PipelineModule``) is assembled from every stage: the masks from
each stage's rank files, the weights from DeepSpeed's per-layer files, each replaced by its fp32
master where the stage's optimizer keeps one (ZeRO-1, bf16), which ``zero_to_fp32`` does not read
for pipelines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional

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


def _weights(checkpoint_dir: str, tag: str, pipelined: bool = False) -> Dict[str, torch.Tensor]:
    folder = os.path.join(checkpoint_dir, tag)
    if pipelined:
        return _pipeline_weights(folder)
    if any(f.endswith("optim_states.pt") and "zero_pp" in f for f in os.listdir(folder)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    # ZeRO-0: the module's weights are whole in the model-states file.
    state = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


# DeepSpeed's pipeline checkpoint files: one per layer of the whole model (PipelineModule.ckpt_layer_path,
# no tensor slicing), and per stage ("mp_rank" counts pipeline stages) its model states and, where its
# optimizer partitions fp32 masters over the data-parallel ranks, one optimizer file per rank.
_LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt")
_STAGE_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")


def _pipeline_weights(folder: str) -> Dict[str, torch.Tensor]:
    """Every stage's parameters, named as in the ``PipelineModule`` ("<layer index>.<key>"): the
    module's own weights from the per-layer files, then the fp32 masters where a stage has them."""
    names = sorted(os.listdir(folder))
    weights: Dict[str, torch.Tensor] = {}
    for name in names:
        match = _LAYER_FILE.fullmatch(name)
        if match:
            state = _load(os.path.join(folder, name))
            weights.update({f"{int(match.group(1))}.{k}": v.float() for k, v in state.items()})
    if not weights:
        raise FileNotFoundError(f"{folder} holds no pipeline layer files (layer_NN-model_states.pt)")
    for name in names:
        match = _STAGE_FILE.fullmatch(name)
        if match:
            dp_world = int(_load(os.path.join(folder, name))["dp_world_size"])
            for param, master in _stage_masters(folder, match.group(1), dp_world).items():
                if param not in weights or weights[param].numel() != master.numel():
                    raise ValueError(f"{folder}: the fp32 master of {param!r} matches no layer file's parameter")
                weights[param] = master.view(weights[param].shape)
    return weights


def _stage_masters(folder: str, mp_rank: str, dp_world: int) -> Dict[str, torch.Tensor]:
    """One stage's fp32 masters, flattened: each parameter's fragments in data-parallel rank order (a
    ZeRO partition cuts the flat group in rank order). Empty where the stage keeps none (ZeRO-0 fp32)."""
    partitions: List[Dict[str, Any]] = []
    for rank in range(dp_world):
        found = [
            os.path.join(folder, f"{prefix}zero_pp_rank_{rank}_mp_rank_{mp_rank}_optim_states.pt")
            for prefix in ("", "bf16_")
        ]
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            if rank == 0:
                return {}
            raise FileNotFoundError(f"{folder}: no optimizer file of data-parallel rank {rank} (mp_rank_{mp_rank})")
        partitions.append(_load(found[0])["optimizer_state_dict"])
    fragments: Dict[str, List[torch.Tensor]] = {}
    for state in partitions:
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for param, address in mapping.items():
                fragments.setdefault(param, []).append(flat.narrow(0, address.start, address.numel))
    return {param: torch.cat(parts).float() for param, parts in fragments.items()}


_PACKED = re.compile(r"^(?P<module>.*)\.parametrizations\.(?P<name>[^.]+)\.original$")


def _unpacked(weights: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A ``"storage": "packed"`` checkpoint holds each masked weight as its active values and their
    positions (``<module>.parametrizations.<name>.original`` and ``...<name>.0.positions``): each
    becomes the dense weight under its own name, as a dense run's checkpoint holds it."""
    out = dict(weights)
    for key, values in weights.items():
        m = _PACKED.match(key)
        if m is None:
            continue
        dense_name = f"{m['module']}.{m['name']}" if m["module"] else m["name"]
        positions_key = f"{m['module']}.parametrizations.{m['name']}.0.positions"
        if positions_key not in weights:
            raise KeyError(f"packed weight {dense_name!r}: the checkpoint has its values but no {positions_key!r}")
        if dense_name not in masks:
            raise KeyError(f"packed weight {dense_name!r} has no mask in the rigl_ds checkpoint")
        shape = masks[dense_name].shape
        positions = weights[positions_key].reshape(-1).long()
        dense = torch.zeros(shape.numel(), dtype=torch.float32).index_put_((positions,), values.reshape(-1).float())
        out[dense_name] = dense.view(shape)
        del out[key], out[positions_key]
    return out


def _load(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def export(checkpoint_dir: str, output_dir: str, tag: Optional[str] = None, config_from: Optional[str] = None):
    """Writes the consolidated sparse model; returns the sparsity report."""
    from safetensors.torch import save_file

    tag = _tag(checkpoint_dir, tag)
    tag_dir = os.path.join(checkpoint_dir, tag)
    complete, reason = checkpoint.is_complete(tag_dir, checksums=False)  # whole_masks checks each file it reads
    if not complete:
        raise checkpoint.IncompleteCheckpointError(f"not exporting {tag_dir}: {reason}")
    folder = checkpoint.rigl_folder(tag_dir)
    masks = whole_masks(folder)
    weights = _weights(checkpoint_dir, tag, pipelined=checkpoint.verify(folder).num_stages is not None)
    weights = _unpacked(weights, masks)
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
