"""The default job runs end to end on the bundled corpus and its loss falls."""

import json
import subprocess
import sys
from pathlib import Path

from rigl_ds.corpus import kjv_split, kjv_text

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_corpus_is_intact_and_split_without_overlap():
    lines = kjv_text().splitlines()
    assert len(lines) == 31102 and lines[0].startswith("In the beginning God created")
    train, val = kjv_split(0.05)
    assert train + val == lines and len(val) == len(lines) - int(len(lines) * 0.95)


def test_default_job_trains_sparse_and_the_loss_falls(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "train_plain.py"),
            "--steps",
            "120",
            "--eval-chars",
            "5000",
            "--out",
            str(out),
            "--rigl",
            '{"method": "rigl", "sparsity": 0.9, "delta_t": 20}',
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.read_text())
    assert result["mask_updates"] == 5  # steps 0, 20, 40, 60, 80 (end at 75% of 120 = 90)
    assert abs(result["sparsity_of_masked_layers"] - 0.9) < 0.001
    assert result["train_loss_last_50"] < result["train_loss_first_50"] - 0.3
    assert 0 < result["training_flops_vs_dense"] < 0.3
