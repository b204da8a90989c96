"""The bundled trainer at scale: under ZeRO-3 it builds the model partitioned (``zero.Init``), so no
rank holds the whole model, and it counts FLOPs from the layers' shapes instead of a forward pass,
with exactly the figures the forward count gave."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from gloo import run_gloo
from scale_sim import tied_names
from torch import nn

from rigl_ds.flops import FlopsMeter, weight_uses, weight_uses_per_token
from rigl_ds.lm.models import build_model
from rigl_ds.lm.train import lm_flops_meter

ROOT = Path(__file__).resolve().parent.parent

# Small models of every family the trainer builds (tied and untied heads, several RNN layers).
LLAMA = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
FAMILIES = {
    "gpt2": ("gpt2", 64, {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32}),
    "llama": ("llama", 64, LLAMA),
    "llama_untied": ("llama", 64, {**LLAMA, "num_hidden_layers": 1, "tie_word_embeddings": False}),
    "char_gru": ("char_gru", 40, {"embed": 16, "hidden": 24, "readout": (20, 12)}),
    "word_lstm": ("word_lstm", 64, {"hidden": 16, "layers": 2}),
}


def _whole(key: str, seed: int = 0) -> nn.Module:
    family, vocab, sizes = FAMILIES[key]
    torch.manual_seed(seed)
    return build_model(family, vocab, **sizes)


def _layers_at(model: nn.Module, sparsity: float):
    """A layer report with every default sparse weight at ``sparsity`` (what FlopsMeter reads)."""
    from rigl_ds.layers import default_sparse_weights

    return [{"name": n, "sparsity": sparsity} for n in default_sparse_weights(model)]


@pytest.mark.parametrize("key", list(FAMILIES))
@pytest.mark.parametrize("shape", [(1, 17), (2, 9)], ids=["trainer_probe", "batch2"])
def test_flops_counted_from_shapes_equal_the_forward_count(key, shape):
    """The trainer's old count (``weight_uses`` over a probe forward, divided by the probe's tokens)
    and the shape count give the same uses per weight and exactly the same FLOPs figures."""
    model = _whole(key).eval()
    probe = torch.randint(1, FAMILIES[key][1], shape, generator=torch.Generator().manual_seed(0))
    forward = weight_uses(model, probe)
    per_token = weight_uses_per_token(model)
    assert forward and {n: u * probe.numel() for n, u in per_token.items()} == forward

    old = FlopsMeter(model, forward, probe.numel(), "rigl", 7)
    new = lm_flops_meter(model, "rigl", 7)
    assert new.uses == old.uses and new.numels == old.numels
    for layers in (None, _layers_at(model, 0.9), _layers_at(model, 0.5)):
        a, b = old.report_at(layers), new.report_at(layers)
        assert b.per_layer_dense == a.per_layer_dense and b.per_layer_sparse == a.per_layer_sparse
        assert (b.inference_dense, b.inference_sparse, b.training_per_example, b.training_multiplier) == (
            a.inference_dense,
            a.inference_sparse,
            a.training_per_example,
            a.training_multiplier,
        )


def test_the_shape_count_includes_the_head_tied_to_the_embedding_and_every_rnn_layer():
    gpt2, lstm = _whole("gpt2"), _whole("word_lstm")
    assert weight_uses_per_token(gpt2)["transformer.wte.weight"] == 1  # through lm_head; the lookup is not a matmul
    assert "transformer.wpe.weight" not in weight_uses_per_token(gpt2)
    assert weight_uses_per_token(lstm) == {
        "embed.weight": 1,
        "rnn.weight_ih_l0": 1,
        "rnn.weight_hh_l0": 1,
        "rnn.weight_ih_l1": 1,
        "rnn.weight_hh_l1": 1,
    }


def test_the_shape_count_refuses_a_convolution_it_cannot_count():
    model = nn.Sequential(nn.Linear(4, 8), nn.Conv1d(8, 8, kernel_size=3))
    with pytest.raises(ValueError, match=r"1 is a Conv1d"):
        weight_uses_per_token(model)


def _check_partitioned(facts, world: int) -> None:
    for f in facts:
        assert f["has_ds_id"], f["name"]
        assert f["local_numel"] == 0, f"{f['name']}: whole on this rank ({f['local_numel']} entries)"
        assert f["shard_numel"] == math.ceil(f["full_numel"] / world), f["name"]


@pytest.mark.slow
def test_zero3_builds_every_family_partitioned_on_two_ranks(tmp_path):
    """Right after ``build_model(..., zero3_config=...)`` every parameter is a ZeRO-3 partition (the
    tensor itself empty, the rank's shard ceil(numel / 2) long); gathered, the weights are the whole
    build's (bit for bit for the plain-torch families, whose modules initialise themselves before
    zero.Init partitions them; initialised by transformers' ZeRO-3 path for the HF families, never
    gathering the whole model at once). A local Hugging Face directory loads into the partitions."""
    keys = ["gpt2", "llama", "char_gru", "word_lstm"]
    saved = _whole("llama", seed=5)
    saved.save_pretrained(tmp_path / "local")
    specs = [(*FAMILIES[k], 0) for k in keys] + [(str(tmp_path / "local"), 0, {}, 0)]
    ranks = run_gloo(2, "scale_sim:build_under_zero_init", specs, timeout=300)
    local = [rank[len(keys)] for rank in ranks]
    for got in local:
        _check_partitioned(got["facts"], world=2)
        assert got["tied"] == tied_names(saved) != []
        assert got["peak_gathered"] < sum(p.numel() for p in saved.parameters())
        for name, p in saved.named_parameters():
            assert torch.equal(got["state"][name], p.detach()), name
    for i, key in enumerate(keys):
        whole = _whole(key)
        shapes = {n: tuple(p.shape) for n, p in whole.named_parameters()}
        total = sum(p.numel() for p in whole.parameters())
        tied = tied_names(whole)
        assert tied or key == "char_gru", key  # the others tie their head to the embedding
        for rank in ranks:
            got = rank[i]
            _check_partitioned(got["facts"], world=2)
            assert {f["name"]: f["full_shape"] for f in got["facts"]} == shapes, key
            assert got["tied"] == tied, key
            for name in shapes:
                assert torch.equal(got["state"][name], ranks[0][i]["state"][name]), (key, name)
            assert got["peak_gathered"] < total, key
        state = ranks[0][i]["state"]
        if key in ("char_gru", "word_lstm"):
            assert ranks[0][i]["gathers"] == 0
            for name, p in whole.named_parameters():
                assert torch.equal(state[name], p.detach()), (key, name)
            continue
        # transformers initialised the partitioned weights (one module's gather at a time) with other
        # draws than the whole build, from the same distributions: constants equal, spreads alike.
        assert ranks[0][i]["gathers"] > 0
        for name, p in whole.named_parameters():
            w, ref = state[name], p.detach()
            if torch.equal(ref, torch.full_like(ref, float(ref.flatten()[0]))):
                assert torch.equal(w, ref), (key, name)
            else:
                assert float(w.std()) == pytest.approx(float(ref.std()), rel=0.15), (key, name)


@pytest.mark.slow
def test_a_zero3_build_never_grows_a_rank_by_the_whole_model_in_host_memory():
    """Resident memory, not just parameter bookkeeping: while a 100M-parameter GPT-2 (400 MiB fp32)
    is built under ZeRO-3 on 2 CPU ranks, each rank's peak grows by its half plus one module's gather
    and a fixed overhead (measured: 272 MiB), well under the whole model. Without returning the
    freed gather buffers to the OS during the build, glibc kept them and one rank grew past the
    whole model (measured: 451 MiB)."""
    sizes = {"n_layer": 32, "n_embd": 512, "n_head": 8, "n_positions": 128}
    for got in run_gloo(2, "scale_sim:host_memory_of_zero3_build", "gpt2", 8192, sizes, timeout=300):
        assert got["whole_model"] > 400
        assert got["peak_growth"] < 0.8 * got["whole_model"], got


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,sizes",
    [
        ("cpu_gpt2_rigl.json", {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32}),
        ("cpu_word_lstm_rigl.json", {"hidden": 32, "layers": 2}),  # plain torch, tied head, mask groups
    ],
    ids=["gpt2", "word_lstm"],
)
def test_the_trainer_on_two_zero3_ranks_builds_partitioned_and_keeps_exact_counts(tmp_path, name, sizes):
    """``rigl_ds.lm.train.train`` on 2 gloo ranks at ZeRO-3: the model it builds is partitioned
    before DeepSpeed sees it, and the run's counts are those of the whole model: total
    parameters, exact active counts per layer (the plan's targets), mask updates, and the
    inference FLOPs ratio of the forward count at the final masks."""
    from rigl_ds.config import load_config
    from rigl_ds.layers import find_sparse_weights, global_shape
    from rigl_ds.lm.data import load_text, train_tokenizer
    from rigl_ds.lm.job import load_job
    from rigl_ds.plan import build_plan

    config = json.loads((ROOT / "configs" / name).read_text())
    config["job"].update(
        steps=6,
        log_every=1,
        eval_every=6,
        eval_blocks=8,
        vocab_size=300,
        seq_len=16,
        save_every=0,
        out_dir=str(tmp_path / "run"),
        model=sizes,
    )
    config["train_micro_batch_size_per_gpu"] = 2
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    config["rigl"].update(delta_t=2)
    ranks = run_gloo(2, "scale_sim:train_recording_the_build", config, str(tmp_path / "hf"), timeout=600)

    job = load_job(config["job"])
    tok = train_tokenizer(load_text()["train"], job.tokenizer_kind, job.vocab_size, tmp_path / "cache")
    torch.manual_seed(job.seed)
    whole = build_model(job.family, len(tok), **job.model)
    total = sum(p.numel() for p in whole.parameters())
    rigl = load_config(config["rigl"])
    plan = build_plan(rigl, {n: global_shape(p) for n, p in find_sparse_weights(whole, rigl.modules).items()})
    targets = plan.targets(rigl.sparsity).tolist()
    per_layer = [sum(targets[p] for p in layer.pools) for layer in plan.layers]  # mask groups: pools per layer
    for got in ranks:
        build, summary = got["build"], got["summary"]
        assert build["zero3"]
        _check_partitioned(build["facts"], world=2)
        assert build["peak_gathered"] < total
        assert summary["total_params"] == total
        assert [r["active"] for r in summary["layers"]] == per_layer
        assert summary["mask_updates"] == 3  # steps 0, 2, 4 (end: 0.75 of 6)
        assert math.isfinite(summary["final"]["loss"]) and math.isfinite(summary["validation"]["loss"])
    a, b = (r["summary"] for r in ranks)
    assert (a["layers"], a["final"]["loss"], a["validation"]) == (b["layers"], b["final"]["loss"], b["validation"])
    # FLOPs on partitioned weights: the whole model's forward count at the run's final masks.
    probe = torch.zeros(1, job.seq_len + 1, dtype=torch.long)
    report = FlopsMeter(whole, weight_uses(whole, probe), probe.numel(), "rigl", rigl.delta_t).report_at(
        ranks[0]["summary"]["layers"]
    )
    assert ranks[0]["summary"]["inference_flops_vs_dense"] == report.inference_sparse / report.inference_dense
