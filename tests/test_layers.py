"""Which weights are sparsified by default, on the model families rigl_ds trains."""

import pytest
import torch
from torch import nn

import rigl_ds
from rigl_ds.layers import default_sparse_weights, find_sparse_weights


def test_gpt2_default_is_the_block_projections_not_embeddings_or_the_tied_head():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    names = default_sparse_weights(model)
    assert names == [
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]


def test_llama_default_is_the_linear_projections_and_not_the_untied_head():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    names = default_sparse_weights(transformers.LlamaForCausalLM(cfg))
    assert names == [
        f"model.layers.0.{m}.weight"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]


def test_rnn_default_is_the_gate_matrices_and_readout_but_not_the_vocabulary_head():
    class CharGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(30, 8)
            self.gru = nn.GRU(8, 16, num_layers=2)
            self.readout = nn.Linear(16, 12)
            self.out = nn.Linear(12, 30)

    names = default_sparse_weights(CharGRU())
    assert names == ["gru.weight_ih_l0", "gru.weight_hh_l0", "gru.weight_ih_l1", "gru.weight_hh_l1", "readout.weight"]


def test_a_hidden_layer_as_wide_as_the_vocabulary_is_not_mistaken_for_the_head():
    model = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 64))
    assert default_sparse_weights(model) == ["1.weight", "3.weight"]  # 4 is the head


def test_tied_head_is_excluded_even_under_another_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(30, 8)
            self.proj = nn.Linear(8, 8)
            self.decoder = nn.Linear(8, 30, bias=False)
            self.decoder.weight = self.wte.weight

    assert default_sparse_weights(Tied()) == ["proj.weight"]


def test_module_patterns_override_the_default():
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 30))
    assert list(find_sparse_weights(model, ["2"])) == ["2.weight"]
    assert list(find_sparse_weights(model, ["*.weight"])) == ["0.weight", "1.weight", "2.weight"]


def test_lstm_gates_as_mask_groups_on_a_real_run():
    model = nn.LSTM(8, 16)
    opt = torch.optim.Adam(model.parameters())
    sparse = rigl_ds.sparsify(
        model,
        opt,
        {
            "sparsity": 0.75,
            "distribution": "uniform",
            "end_step": 10,
            "mask_groups": {"weight_*": {"axis": 0, "blocks": 4}},
        },
    )
    for name in ("weight_ih_l0", "weight_hh_l0"):
        gates = sparse.masks[name].view(4, 16, -1)
        assert len({int(g.sum()) for g in gates}) == 1
