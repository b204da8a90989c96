"""bench/quality_study.py's report: it rewrites only its own sections of docs/results.md, keeps a
family's earlier table when the results file has none of it, and reuses no result trained under
other settings."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import quality_study as q  # noqa: E402

ABOVE = "# Results\n\n## Memory\n\nhand-written text above the study, with <!-- quality-study:begin --> in it\n\n"
OLD_GPT = "### GPT-style transformer (BPE)\n\n| method | old |\n|---|---|\n| dense | 1 |\n\n"
VERDICT = "- GPT-style transformer (BPE), 90% erk: set 1 < rigl 2 -> the paper's ordering does NOT hold."


def _result(method, seed, bits, sparsity=0.9, distribution="erk"):
    return {
        "family": "char_gru", "method": method, "sparsity": sparsity, "distribution": distribution, "seed": seed,
        "params": 1000, "bits_per_char": bits, "perplexity": 2.0**bits, "training_flops_vs_dense": 0.1,
        "seconds": 1.0, "spec": q.spec_id("cpu", "char_gru"),
    }


def test_the_report_keeps_text_above_its_heading_and_a_missing_familys_table(tmp_path):
    doc = tmp_path / "results.md"
    below = "\n### Reading (by hand)\n\nkept\n"
    doc.write_text(
        ABOVE + "## Quality study\n\nold intro\n\n" + OLD_GPT + "### Does the paper's ordering hold here?\n\n"
        + VERDICT + "\n\n<!-- quality-study:end -->\n" + below
    )
    results = [_result("dense", s, 2.0 + s / 100, 0.0, "-") for s in range(2)]
    results += [_result(m, s, 2.5 + s / 100) for m in ("set", "rigl") for s in range(2)]
    q.write_report(results, "cpu", tmp_path, doc)
    text = doc.read_text()
    assert text.startswith(ABOVE + "## Quality study\n")
    assert text.endswith("<!-- quality-study:end -->\n" + below)
    assert "### Character-level GRU" in text and "| set | 0.9 | erk | 2 |" in text
    gpt = text[text.index("### GPT-style transformer (BPE)\n") :]
    assert gpt.split("\n")[2].startswith("*Kept from an earlier run") and "| dense | 1 |" in gpt
    assert VERDICT in text
    q.write_report(results, "cpu", tmp_path, doc)  # a second rewrite keeps it once, noted once
    again = doc.read_text()
    assert again.count("*Kept from an earlier run") == 1 and again.count(VERDICT) == 1
    assert again.startswith(ABOVE)


def test_results_under_other_settings_are_not_reused():
    assert q.current(_result("set", 0, 2.5), "cpu")
    assert not q.current({**_result("set", 0, 2.5), "spec": "0" * 12}, "cpu")
    assert q.current({k: v for k, v in _result("set", 0, 2.5).items() if k != "spec"}, "cpu")  # older results
    assert q.spec_id("cpu", "gpt") != q.spec_id("cpu", "char_gru")


def test_a_candidate_better_than_rigl_at_more_training_flops_is_not_called_a_win(tmp_path):
    doc = tmp_path / "results.md"
    main = [_result(m, s, bits + s / 100) for m, bits in (("rigl", 2.6), ("set", 2.5)) for s in range(3)]
    main += [_result("dense", s, 2.2, 0.0, "-") for s in range(3)]
    cheap = [{**_result("rigl+pool0.1", s, 2.5 + s / 100), "study": "plus"} for s in range(3)]
    dear = [
        {**_result("rigl+n_m2:16", s, 2.5 + s / 100), "study": "plus", "training_flops_vs_dense": 0.12}
        for s in range(3)
    ]
    q.write_plus_report(cheap + dear, main, "cpu", doc)
    rows = {line.split(" |")[0]: line for line in doc.read_text().splitlines() if line.startswith("| rigl")}
    assert "| rigl+pool0.1 **wins**" in rows
    assert "| rigl+n_m2:16 *better at more FLOPs*" in rows
    assert "| rigl" in rows and "wins" not in rows["| rigl"]
