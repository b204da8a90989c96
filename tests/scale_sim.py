"""Rank-side pieces of tests/test_trainer_scale.py: models built under ``zero.Init`` on gloo ranks,
and the bundled trainer run on gloo ranks with a recorder on its model build."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import torch

ZERO3 = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10**9,
}


class GatherSpy:
    """Wraps ``deepspeed.zero.GatheredParameters`` (transformers' ZeRO-3 weight initialisation goes
    through it) and records the most entries one gather made whole at once."""

    def __init__(self):
        import deepspeed

        self.peak = 0
        self.calls = 0
        self._original = deepspeed.zero.GatheredParameters
        spy, original = self, self._original

        class Recording(original):
            def __init__(self, params, *args, **kwargs):
                many = params if isinstance(params, (list, tuple)) else [params]
                spy.peak = max(spy.peak, sum(int(getattr(p, "ds_numel", 0)) for p in many if p is not None))
                spy.calls += 1
                super().__init__(params, *args, **kwargs)

        deepspeed.zero.GatheredParameters = Recording

    def close(self) -> None:
        import deepspeed

        deepspeed.zero.GatheredParameters = self._original


def partition_facts(model: torch.nn.Module) -> List[Dict[str, Any]]:
    """What this rank holds of each parameter right now."""
    facts = []
    for name, p in model.named_parameters():
        ds_tensor = getattr(p, "ds_tensor", None)
        facts.append(
            {
                "name": name,
                "has_ds_id": hasattr(p, "ds_id"),
                "full_shape": tuple(getattr(p, "ds_shape", p.shape)),
                "full_numel": int(getattr(p, "ds_numel", p.numel())),
                "local_numel": p.numel(),  # what the parameter tensor itself holds
                "shard_numel": None if ds_tensor is None else ds_tensor.numel(),
            }
        )
    return facts


def gathered_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter whole (test-only, tiny models), gathered from the ranks' partitions."""
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def tied_names(model: torch.nn.Module) -> List[Tuple[str, str]]:
    """(module weight name, the name it is registered under) for weights shared by two modules."""
    first: Dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return out


def build_under_zero_init(specs: List[Tuple[str, int, Dict[str, Any], int]]) -> List[Dict[str, Any]]:
    """Each (family, vocab, sizes, seed) built through ``build_model(..., zero3_config=ZERO3)``."""
    import deepspeed

    from rigl_ds.lm.models import build_model

    deepspeed.init_distributed("gloo")
    out = []
    for family, vocab, sizes, seed in specs:
        torch.manual_seed(seed)
        spy = GatherSpy()
        try:
            model = build_model(family, vocab, zero3_config=ZERO3, **sizes)
        finally:
            spy.close()
        facts = partition_facts(model)  # right after the build, before anything gathers
        out.append(
            {
                "facts": facts,
                "peak_gathered": spy.peak,
                "gathers": spy.calls,
                "state": gathered_state(model),
                "tied": tied_names(model),
            }
        )
    return out


def train_recording_the_build(config: Dict[str, Any], hf_cache: str) -> Dict[str, Any]:
    """``rigl_ds.lm.train.train(config)`` on this rank, recording what the rank holds of each
    parameter right after the trainer's model build and the largest gather during it."""
    os.environ["HF_DATASETS_CACHE"] = hf_cache
    import rigl_ds.lm.train as trainer

    record: Dict[str, Any] = {}
    build = trainer.build_model

    def recording_build(*args, **kwargs):
        spy = GatherSpy()
        try:
            model = build(*args, **kwargs)
        finally:
            spy.close()
        zero3 = kwargs.get("zero3_config") is not None
        record.update(facts=partition_facts(model), peak_gathered=spy.peak, zero3=zero3)
        return model

    trainer.build_model = recording_build
    try:
        summary = trainer.train(config)
    finally:
        trainer.build_model = build
    return {"summary": summary, "build": record}


def _rss_mib() -> Dict[str, float]:
    """This process's resident memory now (VmRSS) and at its peak so far (VmHWM), in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out


def host_memory_of_zero3_build(family: str, vocab: int, sizes: Dict[str, Any]) -> Dict[str, float]:
    """Growth of this rank's peak resident memory while ``build_model(..., zero3_config=ZERO3)``
    runs (everything imported before), and the whole model's fp32 size, in MiB."""
    import gc

    import deepspeed
    import torch._dynamo  # noqa: F401
    import transformers  # noqa: F401
    from transformers.integrations import HfDeepSpeedConfig  # noqa: F401

    from rigl_ds.lm.models import build_model

    deepspeed.init_distributed("gloo")
    gc.collect()
    before = _rss_mib()
    torch.manual_seed(0)
    model = build_model(family, vocab, zero3_config=ZERO3, **sizes)
    after = _rss_mib()
    whole = sum(int(p.ds_numel) for p in model.parameters()) * 4 / 2**20
    return {"peak_growth": after["VmHWM"] - before["VmRSS"], "whole_model": whole}
