"""FLOPs accounting: per-layer counts, density scaling, and the paper's per-method training formulas."""

import pytest
import torch
from helpers import make, task, train_step
from torch import nn

from rigl_ds.flops import TrainingFlops, expected_training_flops, training_flops_per_step, weight_uses


def test_paper_training_formulas():
    fs, fd = 1.0, 10.0
    assert expected_training_flops("dense", fs, fd) == 30.0
    assert expected_training_flops("static", fs, fd) == 3.0
    assert expected_training_flops("set", fs, fd) == 3.0
    assert expected_training_flops("snfs", fs, fd) == 12.0
    assert expected_training_flops("rigl", fs, fd, delta_t=100) == pytest.approx((300 + 2 + 10) / 101)


def test_weight_uses_count_rows_positions_and_timesteps():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.rnn = nn.LSTM(6, 8, batch_first=True)
            self.conv = nn.Conv1d(8, 4, kernel_size=3)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            h, _ = self.rnn(self.emb(x))  # (B, T, 8)
            c = self.conv(h.transpose(1, 2))  # (B, 4, T - 2)
            return self.fc(c.transpose(1, 2))

    uses = weight_uses(M(), torch.zeros(3, 7, dtype=torch.long))
    assert uses == {"rnn.weight_ih_l0": 21, "rnn.weight_hh_l0": 21, "conv.weight": 3 * 5, "fc.weight": 3 * 5}


def test_gpt2_conv1d_uses():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    uses = weight_uses(model, torch.zeros(2, 8, dtype=torch.long))
    assert uses["transformer.h.0.attn.c_attn.weight"] == 16 and uses["transformer.h.0.mlp.c_fc.weight"] == 16


def test_sparse_forward_scales_each_layer_by_density_and_training_is_accounted_per_step():
    model, opt, sparse = make(
        {"method": "rigl", "sparsity": 0.9, "delta_t": 10, "end_step": 50, "distribution": "uniform"}
    )
    x, y = task()
    report = sparse.measure_flops(x, examples=x.numel())
    dense = {"fc1.weight": 2 * 48 * 96, "fc2.weight": 2 * 96 * 48, "head.weight": 2 * 48 * 40}
    assert report.per_layer_dense == pytest.approx(dense)
    active = {r["name"]: r["active"] for r in sparse.layer_report()}
    assert report.per_layer_sparse["fc1.weight"] == pytest.approx(2 * active["fc1.weight"])
    assert report.per_layer_sparse["head.weight"] == pytest.approx(dense["head.weight"])  # dense head
    fs, fd = report.inference_sparse, report.inference_dense
    assert report.training_multiplier == pytest.approx(expected_training_flops("rigl", fs, fd, 10) / (3 * fd))
    for _ in range(21):
        train_step(model, opt, sparse, x, y)
    # 21 steps: updates at 0, 10, 20 cost 2 f_S + f_D, the other 18 cost 3 f_S.
    want = x.numel() * (3 * (2 * fs + fd) + 18 * 3 * fs)
    assert sparse.training_flops.total == pytest.approx(want)
    assert sparse.training_flops.multiplier == pytest.approx(want / (21 * 3 * fd * x.numel()))


def test_training_flops_of_gmp_follow_its_schedule():
    acc = TrainingFlops()
    for f_s in (10.0, 5.0, 1.0):
        acc.add("gmp", f_s, 10.0, update_step=False)
    assert acc.multiplier == pytest.approx((10 + 5 + 1) / 30)
    assert training_flops_per_step("snfs", 1.0, 10.0, False) == 12.0
