"""bench/gpu_check.py, the one-shot GPU check, runs anywhere: without CUDA its radix section compares
the sharded selection with the reference on CPU (and passes), every section that needs CUDA reports
SKIP, each as one JSON line, and the script exits 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SECTIONS = ("nccl", "offload", "pipeline", "fp16_overflow", "snfs_resume", "perf")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}  # no GPU, even on a machine with one
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--out",
            str(out),
            "--sections",
            "radix",
            "--sections",
            ",".join(CUDA_SECTIONS),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    return proc, {line["section"]: line for line in lines}


def test_radix_section_selects_bit_identically_to_the_reference_on_cpu(cpu_run):
    proc, sections = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    radix = sections["radix"]
    assert radix["status"] == "PASS", radix
    figures = radix["figures"]
    assert figures["cases"] == figures["identical"] > 100 and not figures["mismatches"]
    assert {"whole", "group", "w1", "w2", "w3"} <= set(figures["per_variant"])


def test_sections_that_need_cuda_report_skip_without_it(cpu_run):
    proc, sections = cpu_run
    assert proc.returncode == 0
    for name in CUDA_SECTIONS:
        assert sections[name]["status"] == "SKIP" and sections[name]["reason"] == "no CUDA", sections[name]
    assert "[perf] SKIP no CUDA" in proc.stdout
    assert list(sections) == ["env", "radix", *CUDA_SECTIONS]  # one line per section, in the order run
