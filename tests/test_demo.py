"""`retrolm demo --tiny` end to end in a temp dir, then a re-run that reuses everything."""

from __future__ import annotations

import json
import time


def test_demo_tiny_end_to_end_and_rerun_reuses(tiny_corpus, tmp_path, capsys):
    from retrolm.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--tiny", "--corpus", str(tiny_corpus), "--out", str(out)]
    t0 = time.time()
    main(argv)
    first_seconds = time.time() - t0
    printed = capsys.readouterr()
    assert "| split | tokens | GPT ppl | RETRO ppl | RETRO/GPT |" in printed.out

    report = (out / "report.md").read_text()
    for needle in ("## Comparison", "| test (headline) |", "RETRO-off ppl", "RAG_GPT ppl",
                   "## Leakage controls in force", "documents found in both a held-out split and the database: 0",
                   "that come from a document the window overlaps: 0", "## Does the database contain related text?",
                   "| alpha | share of chunks |", "![training loss](loss_curves.png)", "GPT:", "RETRO:",
                   "tokens/s"):  # fmt: skip
        assert needle in report, needle
    assert (out / "loss_curves.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    cmp = results["comparison"]["test"]
    assert cmp["ratio"] == cmp["RETRO"] / cmp["GPT"] and all(v > 1 for k, v in cmp.items() if k != "ratio")
    assert results["runs"]["GPT"]["tokens"] == results["runs"]["RETRO"]["tokens"] > 0  # same tokens
    assert not results["db_reused"]
    signal = results["training_signal"]  # how often training could reward reading neighbours
    assert signal["chunks"] > 0 and 0 <= signal["share_over_half"] <= 1 - signal["share_at_most_eighth"]
    assert "In training, " in report and "of train chunks share more than half a chunk" in report

    watched = [out / "db" / "manifest.json", out / "db" / "embeddings.f16", out / "gpt" / "final" / "model.safetensors",
               out / "retro" / "final" / "model.safetensors", out / "plan.json"]  # fmt: skip
    before = {p: p.stat().st_mtime_ns for p in watched}
    t0 = time.time()
    main(argv)
    second_seconds = time.time() - t0
    log = capsys.readouterr().err
    assert "reusing the complete database" in log
    assert "reusing the finished GPT checkpoint" in log and "reusing the finished RETRO checkpoint" in log
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # nothing rebuilt or retrained
    assert json.loads((out / "results.json").read_text())["db_reused"]
    assert second_seconds < first_seconds
