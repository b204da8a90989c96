"""The default job runs end to end on the bundled corpus and its loss falls."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rigl_ds.corpus import kjv_text

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_corpus_is_intact():
    lines = kjv_text().splitlines()
    assert len(lines) == 31102 and lines[0].startswith("In the beginning God created")


def run_job(tmp_path, *args):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "train_plain.py"),
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_default_job_trains_the_char_gru_sparse_and_the_loss_falls(tmp_path):
    result, stdout = run_job(
        tmp_path,
        "--steps",
        "120",
        "--eval-blocks",
        "40",
        "--rigl",
        '{"method": "rigl", "sparsity": 0.9, "delta_t": 20}',
    )
    assert result["mask_updates"] == 5  # steps 0, 20, 40, 60, 80 (end at 75% of 120 = 90)
    assert abs(result["sparsity_of_masked_layers"] - 0.9) < 0.001
    assert result["train_loss_last_50"] < result["train_loss_first_50"] - 0.3
    assert 0 < result["training_flops_vs_dense"] < 0.3
    assert 1.0 < result["validation"]["bits_per_char"] < 6.0
    assert stdout.count(" sparsity 0.") == 4  # every masked weight reported, the readout included


@pytest.mark.slow
def test_gpt2_dense_baseline_runs(tmp_path):
    result, _ = run_job(
        tmp_path, "--family", "gpt2", "--dense", "--steps", "30", "--eval-blocks", "10", "--vocab", "512"
    )
    assert result["method"] == "dense" and result["validation"]["perplexity"] < 512
