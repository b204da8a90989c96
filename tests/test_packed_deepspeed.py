"""``"storage": "packed"`` under DeepSpeed (ZeRO 0-3, 2 gloo ranks): the values are ordinary
parameters ZeRO partitions and steps, and training equals the masked run's: the same masks at every
step, the same losses, and the same fp32 masters and Adam moments at every entry. What packed storage
does not run under yet is refused by name."""

import ds_sim
import pytest
import torch
from gloo import run_gloo

import rigl_ds
from rigl_ds.config import RigLConfigError

pytestmark = pytest.mark.slow

SNFS = {**ds_sim.RIGL, "method": "snfs"}
SET = {**ds_sim.RIGL, "method": "set"}
# RigL whose optimizer also steps on update steps (RigL-plus): grown entries step with their own gradient.
STEPPING = {**ds_sim.RIGL, "skip_optimizer_step_on_update": False}
STATIC = {"method": "static", "sparsity": 0.8, "seed": 3}
RUNS = [
    dict(stage=2, dtype="fp32", rigl=STATIC),
    dict(stage=3, dtype="fp32", rigl=STATIC),
    dict(stage=0, dtype="fp32", rigl=ds_sim.RIGL),
    dict(stage=0, dtype="fp32", rigl=STEPPING),
    dict(stage=2, dtype="fp32", rigl=STEPPING),
    dict(stage=3, dtype="fp32", rigl=STEPPING),
    dict(stage=1, dtype="fp32", rigl=ds_sim.RIGL),
    dict(stage=2, dtype="fp32", rigl=ds_sim.RIGL),
    dict(stage=2, dtype="fp32", rigl=SET),
    dict(stage=2, dtype="fp32", rigl=SNFS),
    dict(stage=2, dtype="fp32", rigl=ds_sim.RIGL, gradient_accumulation_steps=2),
    dict(stage=3, dtype="fp32", rigl=ds_sim.RIGL),
    dict(stage=3, dtype="fp32", rigl=SET),
    dict(stage=3, dtype="fp32", rigl=SNFS),
    dict(stage=3, dtype="fp32", rigl=ds_sim.RIGL, zero_init=True),
    dict(stage=2, dtype="fp32", rigl=ds_sim.RIGL, family="lstm"),
    dict(stage=3, dtype="fp32", rigl=ds_sim.RIGL, family="lstm"),
    dict(stage=0, dtype="bf16", rigl=ds_sim.RIGL),
    dict(stage=2, dtype="bf16", rigl=ds_sim.RIGL),
    dict(stage=3, dtype="bf16", rigl=ds_sim.RIGL),
]


def _id(run):
    extra = "-gas2" if run.get("gradient_accumulation_steps") else ""
    extra += "-zero_init" if run.get("zero_init") else ""
    extra += "-lstm" if run.get("family") == "lstm" else ""
    extra += "-stepping" if run["rigl"].get("skip_optimizer_step_on_update") is False else ""
    return f"zero{run['stage']}-{run['dtype']}-{run['rigl']['method']}{extra}"


@pytest.fixture(scope="module")
def pairs():
    per_rank = run_gloo(2, "packed_ds_sim:pairs", RUNS, timeout=900)
    return {_id(run): [rank[i] for rank in per_rank] for i, run in enumerate(RUNS)}


@pytest.mark.parametrize("run", [r for r in RUNS if r["dtype"] == "fp32"], ids=_id)
def test_packed_training_under_deepspeed_is_the_masked_run_bit_for_bit(pairs, run):
    for rank in pairs[_id(run)]:
        masked, packed = rank["masked"], rank["packed"]
        assert packed["layout"] == "packed"
        assert packed["history"] == masked["history"]
        assert len(packed["history"]) >= 2 or run["rigl"]["method"] == "static"
        assert packed["losses"] == masked["losses"]
        for step, (m, p) in enumerate(zip(masked["masks"], packed["masks"])):
            assert m.keys() == p.keys()
            for name in m:
                assert torch.equal(m[name].view(-1), p[name].view(-1)), (step, name)
                for key, want in masked["states"][step][name].items():
                    assert torch.equal(packed["states"][step][name][key], want), (step, name, key)


@pytest.mark.parametrize("run", [r for r in RUNS if r["dtype"] == "bf16"], ids=_id)
def test_packed_bf16_takes_the_masked_runs_first_update_and_keeps_its_counts(pairs, run):
    """bf16: the first update (before any optimizer step) is the masked run's; later ones may part
    in the last bits, as the dense gradients are bf16 here and DeepSpeed's own reduction differs."""
    for rank in pairs[_id(run)]:
        masked, packed = rank["masked"], rank["packed"]
        assert packed["history"][0] == masked["history"][0]
        assert [h[4] for h in packed["history"]] == [h[4] for h in masked["history"]]  # n_active per update
        first = masked["masks"][0]
        assert all(torch.equal(first[n].view(-1), packed["masks"][0][n].view(-1)) for n in first)
        assert all(torch.isfinite(torch.tensor(packed["losses"])))
        assert abs(packed["losses"][-1] - masked["losses"][-1]) < 0.05


@pytest.mark.parametrize("run", [_id(r) for r in RUNS if r["rigl"]["method"] == "rigl"])
def test_rigl_selects_each_packed_layer_inside_backward_and_keeps_no_dense_gradient(pairs, run):
    """On update steps each layer is selected in the backward that ends the step and its dense
    gradient let go there: after backward no layer holds one (with gradient accumulation, the
    earlier micro-batches' sum is held until the last), and every layer has its selection."""
    for rank in pairs[run]:
        packed = rank["packed"]
        assert len(packed["held"]) == len(packed["history"]) >= 2
        for holding, selected in packed["held"]:
            assert holding == []
            assert selected == packed["layers"]


@pytest.mark.parametrize("run", ["zero2-fp32-rigl", "zero3-fp32-rigl", "zero3-fp32-rigl-zero_init"])
def test_the_packed_model_hands_deepspeed_only_active_values(pairs, run):
    packed = pairs[run][0]["packed"]
    assert not any(n.endswith("attn.c_attn.weight") for n in packed["params"])
    assert any(n.endswith("attn.c_attn.parametrizations.weight.original") for n in packed["params"])
    # ZeRO-3 partitions the positions too: a (never trained) parameter there, a buffer below.
    positions_are_params = any(n.endswith("attn.c_attn.parametrizations.weight.0.positions") for n in packed["params"])
    assert positions_are_params == run.startswith("zero3")


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, r"offload_optimizer"),
        ({"fp16": {"enabled": True}}, r"fp16"),
        (
            {"gradient_accumulation_steps": 2, "rigl": {**STEPPING, "storage": "packed"}},
            r"skip_optimizer_step_on_update false and 2 micro-batches",
        ),
    ],
)
def test_what_packed_storage_does_not_run_under_yet_is_refused_by_name(extra, message):
    model = ds_sim.tiny_model("gpt2")
    config = {**ds_sim.ds_config(2, "fp32", {**ds_sim.RIGL, "storage": "packed"}), **extra}
    with pytest.raises(RigLConfigError, match=message):
        rigl_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_packed_deepspeed_checkpoint_resumes_bit_identically(stage, tmp_path):
    per_rank = run_gloo(2, "packed_ds_sim:resume", stage, "fp32", ds_sim.RIGL, str(tmp_path), timeout=600)
    for got in per_rank:
        straight, resumed = got["straight"], got["resumed"]
        assert resumed["start"] == 4
        assert resumed["losses"] == straight["losses"][4:]
        for a, b in zip(straight["masks"][4:], resumed["masks"]):
            assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_export_of_a_packed_checkpoint_is_the_masked_runs_dense_model(stage, tmp_path):
    from safetensors.torch import load_file

    from rigl_ds.export import main as export_main

    folders = {s: str(tmp_path / s) for s in ("masked", "packed")}
    run_gloo(2, "packed_ds_sim:save_both", stage, "fp32", ds_sim.RIGL, folders, timeout=600)
    got = {}
    for storage, folder in folders.items():
        export_main([folder, f"{folder}-export"])
        exported = f"{folder}-export"
        got[storage] = (load_file(f"{exported}/model.safetensors"), load_file(f"{exported}/masks.safetensors"))
    (w_masked, m_masked), (w_packed, m_packed) = got["masked"], got["packed"]
    assert set(w_packed) == set(w_masked) and set(m_packed) == set(m_masked)
    assert not any("parametrizations" in k for k in w_packed)
    for name in w_masked:
        assert torch.equal(w_packed[name], w_masked[name]), name
    for name in m_masked:
        assert torch.equal(m_packed[name], m_masked[name]), name


@pytest.mark.parametrize("world", [1, 4])
def test_packed_equals_masked_at_other_world_sizes(world):
    runs = [dict(stage=s, dtype="fp32", rigl=ds_sim.RIGL, steps=6) for s in (3, 2)]
    per_rank = run_gloo(world, "packed_ds_sim:pairs", runs, timeout=900)
    for rank in per_rank:
        for pair in rank:
            masked, packed = pair["masked"], pair["packed"]
            assert packed["history"] == masked["history"] and packed["losses"] == masked["losses"]
            for m, p in zip(masked["masks"], packed["masks"]):
                assert all(torch.equal(m[n].view(-1), p[n].view(-1)) for n in m)
