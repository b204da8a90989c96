"""Every way DeepSpeed takes an optimizer step updates the masks (unmanaged gradient accumulation,
pipeline parallelism's ``train_batch``), a pipeline's sparsity budget is the whole model's, and
parallelisms rigl_ds does not support are refused at start-up by the setting's name."""

import types

import ds_sim
import pipe_sim
import pytest
import torch
from gloo import run_gloo

import rigl_ds
from rigl_ds.config import RigLConfigError, load_config
from rigl_ds.plan import build_plan

# -- unmanaged gradient accumulation --------------------------------------------------------------

UNMANAGED_STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def accumulation_runs():
    runs = [
        dict(stage=stage, dtype="fp32", steps=12, gradient_accumulation_steps=2, managed_gradient_accumulation=managed)
        for stage in UNMANAGED_STAGES
        for managed in (True, False)
    ]
    per_rank = run_gloo(2, "ds_sim:train_many", runs)
    keys = [(r["stage"], r["managed_gradient_accumulation"]) for r in runs]
    return {key: [rank[i] for rank in per_rank] for i, key in enumerate(keys)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", UNMANAGED_STAGES)
def test_unmanaged_accumulation_updates_masks_on_the_optimizer_steps_as_managed_does(accumulation_runs, stage):
    managed, unmanaged = accumulation_runs[(stage, True)], accumulation_runs[(stage, False)]
    for m, u in zip(managed, unmanaged):
        # 12 micro-batches, 2 per optimizer step: updates at optimizer steps 0, 2 and 4.
        assert [h[0] for h in u["history"]] == [0, 2, 4], u["history"]
        assert all(h[1] > 0 and h[2] == h[1] for h in u["history"])
        assert u["pool_counts"] == u["targets"]
        assert not {k: v for viol in u["violations"] for k, v in viol.items() if v}
        # Same batches, same reduced gradients: the same masks after every micro-batch.
        assert u["history"] == m["history"]
        for step, masks in enumerate(m["masks"]):
            for name, mask in masks.items():
                assert torch.equal(u["masks"][step][name], mask), (stage, step, name)


# -- pipeline parallelism -----------------------------------------------------------------------

PIPE_RUNS = [dict(stage=0, dtype="fp32"), dict(stage=1, dtype="fp32"), dict(stage=0, dtype="bf16")]


@pytest.fixture(scope="module")
def pipeline_runs():
    return run_gloo(2, "pipe_sim:train_many", PIPE_RUNS)


def _whole_model_targets(block) -> dict:
    """Active entries per layer as planned for the same model without pipelining."""
    model = torch.nn.Sequential(*pipe_sim.layers())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")}
    plan = build_plan(load_config(block), shapes)
    return dict(zip(shapes, plan.targets(block["sparsity"]).tolist()))


@pytest.mark.slow
@pytest.mark.parametrize("run", range(len(PIPE_RUNS)))
def test_pipeline_stages_update_their_masks_on_every_update_step(pipeline_runs, run):
    stages = [rank[run] for rank in pipeline_runs]
    assert sorted(r["stage_id"] for r in stages) == [0, 1]
    for r in stages:
        assert r["global_steps"] == 6
        assert [h[0] for h in r["history"]] == [0, 2, 4], r["history"]
        assert all(h[1] > 0 and h[2] == h[1] for h in r["history"])
        moved = sum(int((r["masks"][0][n] != m).sum()) for n, m in r["initial"].items())
        assert moved > 0  # the first update changed masks on this stage
        assert r["pool_counts"] == r["targets"]
        assert not {k: v for viol in r["violations"] for k, v in viol.items() if v}


def test_a_stages_part_of_the_plan_keeps_each_layers_whole_model_target():
    shapes = {"a": (16, 96), "b": (96, 24), "c": (24, 64), "d": (64, 8), "e": (8, 8)}
    block = {"sparsity": 0.8, "distribution": "erk", "dense_layers": ["e"], "custom_sparsity": {"c": 0.5}}
    whole = build_plan(load_config(block), shapes)
    want = dict(zip([layer.name for layer in whole.layers], whole.targets(0.8).tolist()))
    part = whole.subset(["b", "c"])
    assert [layer.name for layer in part.layers] == ["b", "c"] and part.n_pools == 2
    assert [layer.index for layer in part.layers] == [1, 2]  # the whole plan's random-stream keys
    assert part.targets(0.8).tolist() == [want["b"], want["c"]]
    assert part.targets(0.6).tolist() == whole.targets(0.6)[1:3].tolist()  # any sparsity (GMP's schedule)


def test_a_global_top_k_cut_across_pipeline_stages_is_refused_by_name():
    whole = build_plan(load_config({"sparsity": 0.8, "distribution": "global"}), {"a": (8, 8), "b": (8, 8)})
    with pytest.raises(ValueError, match=r"rigl\.distribution"):
        whole.subset(["a"])
    assert whole.subset(["a", "b"]).targets(0.8).tolist() == whole.targets(0.8).tolist()


@pytest.mark.slow
def test_a_pipeline_splits_the_whole_models_budget_as_the_unpipelined_model_does(pipeline_runs):
    want = _whole_model_targets(pipe_sim.RIGL)
    for run in range(len(PIPE_RUNS)):
        got = {layer["name"]: layer["active"] for rank in pipeline_runs for layer in rank[run]["report"]}
        assert got == want, (PIPE_RUNS[run], got, want)
    # The check has teeth: ERK over one stage's layers alone would split the budget differently.
    first_stage = {n for n in want if n in {layer["name"] for layer in pipeline_runs[0][0]["report"]}}
    block = load_config(pipe_sim.RIGL)
    model = torch.nn.Sequential(*pipe_sim.layers())
    alone = build_plan(block, {n: tuple(p.shape) for n, p in model.named_parameters() if n in first_stage})
    assert dict(zip(sorted(first_stage), alone.targets(0.8).tolist())) != {n: want[n] for n in sorted(first_stage)}


# -- refused at start-up --------------------------------------------------------------------------


class FakeMpu:
    def __init__(self, size: int):
        self.size = size

    def get_model_parallel_world_size(self) -> int:
        return self.size

    def get_model_parallel_rank(self) -> int:
        return 0


def _nvme(key: str) -> dict:
    return {"zero_optimization": {"stage": 3, key: {"device": "nvme", "nvme_path": "/tmp/nvme"}}}


def _moe_model() -> torch.nn.Module:
    from deepspeed.moe.layer import MoE

    return torch.nn.Sequential(
        torch.nn.Linear(8, 8), MoE(hidden_size=8, expert=torch.nn.Linear(8, 8), num_experts=2, ep_size=1)
    )


def _expert_params_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    for p in model[1].parameters():
        p.allreduce, p.group_name = False, "ep_size_2"  # what deepspeed.moe marks expert params with
    return model


REFUSED = {
    "mpu": (dict(mpu=FakeMpu(2)), {}, None, "mpu.*model-parallel world size 2"),
    "autotp": (dict(), {"tensor_parallel": {"autotp_size": 2}}, None, r"tensor_parallel\.autotp_size"),
    "autoep": (dict(), {"expert_parallel": {"enabled": True, "autoep_size": 2}}, None, r"expert_parallel"),
    "moe": (dict(), {}, _moe_model, r"deepspeed\.moe.*MoE"),
    "expert_params": (dict(), {}, _expert_params_model, r"allreduce=False"),
    "nvme_optimizer": (dict(), _nvme("offload_optimizer"), None, r"zero_optimization\.offload_optimizer\.device"),
    "nvme_param": (dict(), _nvme("offload_param"), None, r"zero_optimization\.offload_param\.device"),
    "partial_offload": (
        dict(),
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
        None,
        r"zero_optimization\.offload_optimizer\.ratio",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_parallelism_is_refused_by_name_before_deepspeed_builds_anything(name):
    kwargs, extra, make_model, message = REFUSED[name]
    model = make_model() if make_model else ds_sim.tiny_model("gpt2")
    config = {**ds_sim.ds_config(2, "fp32", ds_sim.RIGL), **extra}
    with pytest.raises(RigLConfigError, match=message):
        # Without a process group: the refusal must come before DeepSpeed would need one.
        rigl_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config, **kwargs)


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_parallelism_is_refused_when_attaching_to_a_built_engine(name):
    from rigl_ds.integrations.deepspeed import SparseEngine

    kwargs, extra, make_model, message = REFUSED[name]
    model = make_model() if make_model else ds_sim.tiny_model("gpt2")
    config = {**ds_sim.ds_config(2, "fp32", ds_sim.RIGL), **extra}
    # What the HF / accelerate adapters attach to: an engine DeepSpeed already built.
    engine = types.SimpleNamespace(config=config, module=model, mpu=kwargs.get("mpu"), optimizer=object())
    with pytest.raises(RigLConfigError, match=message):
        SparseEngine(engine, load_config(config["rigl"]), total_steps=10)


def test_packed_storage_on_an_engine_built_elsewhere_is_refused_by_name():
    """The HF Trainer and accelerate build DeepSpeed's engine from the dense model themselves."""
    from rigl_ds.integrations.deepspeed import SparseEngine

    model = ds_sim.tiny_model("gpt2")
    config = ds_sim.ds_config(2, "fp32", {**ds_sim.RIGL, "storage": "packed"})
    engine = types.SimpleNamespace(config=config, module=model, mpu=None, optimizer=object())
    with pytest.raises(RigLConfigError, match=r"rigl\.storage.*before DeepSpeed builds its engine"):
        SparseEngine(engine, load_config(config["rigl"]), total_steps=10)


def test_a_pipeline_grid_with_no_tensor_slicing_is_not_taken_for_tensor_parallelism():
    from rigl_ds.integrations.deepspeed import _refuse_unsupported

    class PipeGrid(FakeMpu):  # DeepSpeed's PipelineParallelGrid: "model parallel" counts pipeline stages
        def get_slice_parallel_world_size(self) -> int:
            return 1

    _refuse_unsupported(ds_sim.ds_config(1, "fp32", ds_sim.RIGL), ds_sim.tiny_model("gpt2"), PipeGrid(4))


def test_fp16_stage0_with_deepspeeds_fused_optimizer_is_refused_by_name():
    """On CUDA an "optimizer" block gives FusedAdam under FP16_Optimizer, whose flat fp32 masters have
    no per-parameter view (cluster-review C8); fp16 is GPU-only, so the engine is stood in for."""
    from rigl_ds.zero import zero_layout

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    config = load_config({"method": "rigl", "sparsity": 0.5, "end_step": 10})
    weights = {"0.weight": model[0].weight, "1.weight": model[1].weight}
    plan = build_plan(config, {n: tuple(p.shape) for n, p in weights.items()})
    fused = types.SimpleNamespace(fp16_groups=[list(weights.values())], fp32_groups_flat=[torch.zeros(96)])
    engine = types.SimpleNamespace(
        zero_optimization_stage=lambda: 0,
        fp16_enabled=lambda: True,
        optimizer=fused,
        basic_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    with pytest.raises(RigLConfigError, match=r"fp16 with zero_optimization.stage 0 .*FusedAdam"):
        zero_layout(engine, plan, weights)
