"""`retrolm demo --tiny` end to end: the report, a re-run that reuses everything, one more seed,
and a second run into another directory that must print the same numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest


def _argv(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["demo", "--tiny", "--corpus", str(corpus), "--out", str(out), *extra]


def _numbers(printed: str) -> str:
    """What the CLI prints minus the line naming the run directory."""
    return "\n".join(line for line in printed.splitlines() if not line.startswith("report: "))


@pytest.fixture(scope="module")
def first_run(tiny_corpus, tmp_path_factory) -> dict[str, Any]:
    """One fresh `retrolm demo --tiny` (through the CLI), with its output and wall time."""
    import contextlib
    import io

    from retrolm.cli import main

    out = tmp_path_factory.mktemp("demo") / "a"
    printed = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(printed):
        main(_argv(tiny_corpus, out))
    return {"out": out, "seconds": time.time() - t0, "printed": printed.getvalue()}


def test_demo_tiny_report(first_run):
    out, printed = first_run["out"], first_run["printed"]
    assert "**Verdict: retrieval " in printed
    assert (
        "| model | test (headline) ppl | test (headline) bpb | valid ppl | valid bpb |" in printed
    )
    assert "| RETRO / RETRO-off |" in printed and "| RETRO-shuffled / RETRO |" in printed

    report = (out / "report.md").read_text()
    for needle in ("**Verdict: retrieval ", "**How much related text the database holds:**", "## Headline",
                   "| GPT |", "| RAG_GPT |", "| RETRO |", "| RETRO-off |", "| RETRO-shuffled |",
                   "| RETRO / GPT |", "## What the terms mean", "- **RETRO-off**:", "- **RETRO-shuffled**:",
                   "- **RAG_GPT**:", "- **overlap bucket**:", "![bits per byte by overlap bucket](overlap_bpb.png)",
                   "![training loss](loss_curves.png)", "### GPT", "### RETRO", "Neighbour 1 of 2 it read",
                   "> ```text", "found in the database: **0**", "**0** found", "## Settings",
                   "## Wall time and speed", "| database |", "tokens/s"):  # fmt: skip
        assert needle in report, needle
    # self-contained: no Python reprs, no references to files outside the run and the docs
    for banned in ("{'", "':", "SPEC", "None", "True", "False"):
        assert banned not in report, banned
    assert (out / "loss_curves.png").stat().st_size > 1000 and (
        out / "overlap_bpb.png"
    ).stat().st_size > 1000

    results = json.loads((out / "results.json").read_text())
    test = results["comparison"]["test"]
    gpt, retro = test["rows"]["GPT"]["ppl"]["mean"], test["rows"]["RETRO"]["ppl"]["mean"]
    assert test["ratios"]["RETRO/GPT"]["mean"] == pytest.approx(retro / gpt)
    assert {"GPT", "RAG_GPT", "RETRO", "RETRO-off"} <= set(test["rows"]) and "valid" in results[
        "comparison"
    ]
    runs = results["runs"]
    assert (
        runs["GPT seed 0"]["tokens"] == runs["RETRO seed 0"]["tokens"] == 128 * 4 * 12
    )  # fixed token budget
    assert results["plan"]["gpt_budget"] == {"tokens": 128 * 4 * 12}
    assert not results["db_reused"]
    signal = results["training_signal"]  # how often training could reward reading neighbours
    assert (
        signal["chunks"] > 0
        and 0 <= signal["share_over_half"] <= 1 - signal["share_at_most_eighth"]
    )
    retro_sample = results["samples"]["samples"]["RETRO"]
    assert retro_sample["chunks"] and all(ch["read"] for ch in retro_sample["chunks"])


def test_demo_rerun_reuses_then_adds_a_seed(first_run, tiny_corpus, capsys):
    from retrolm.cli import main

    out = first_run["out"]
    watched = [out / "db" / "manifest.json", out / "db" / "embeddings.f16", out / "gpt" / "final" / "model.safetensors",
               out / "retro" / "final" / "model.safetensors", out / "plan.json"]  # fmt: skip
    before = {p: p.stat().st_mtime_ns for p in watched}
    t0 = time.time()
    main(_argv(tiny_corpus, out))
    second_seconds = time.time() - t0
    captured = capsys.readouterr()
    assert "reusing the complete database" in captured.err
    assert "reusing the finished GPT checkpoint" in captured.err
    assert "reusing the finished RETRO checkpoint" in captured.err
    assert "reusing the evaluation of the seed-0 checkpoints" in captured.err
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # nothing rebuilt or retrained
    assert _numbers(captured.out) == _numbers(first_run["printed"])
    assert json.loads((out / "results.json").read_text())["db_reused"]
    assert second_seconds < first_run["seconds"]

    # --seeds 2 keeps seed 0 (database, checkpoints, evaluation) and adds seed 1
    main(_argv(tiny_corpus, out, "--seeds", "2"))
    captured = capsys.readouterr()
    assert "reusing the finished RETRO checkpoint (seed 0)" in captured.err
    assert "training the GPT checkpoint (seed 1)" in captured.err
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == 2
    assert results["runs"]["GPT seed 1"]["tokens"] == results["runs"]["RETRO seed 0"]["tokens"]
    ppl = results["comparison"]["test"]["rows"]["RETRO"]["ppl"]
    assert len(ppl["values"]) == 2 and ppl["min"] <= ppl["mean"] <= ppl["max"]
    report = (out / "report.md").read_text()
    assert "mean over 2 seeds (min-max)" in report and "| RETRO seed 1 training" in report
    assert "(seeds: " in report  # the verdict quotes the range of the ratios


def test_demo_same_settings_same_numbers(tiny_corpus, tmp_path, capsys):
    """Results do not depend on timing: two runs into different directories print the same tables.

    BM25 keeps the two database builds fast; training, evaluation and sampling are the same
    code as with the dense retriever.
    """
    from retrolm.cli import main

    printed = []
    for name in ("b1", "b2"):
        main(_argv(tiny_corpus, tmp_path / name, "--retriever", "bm25"))
        printed.append(_numbers(capsys.readouterr().out))
    assert "| RETRO |" in printed[0] and printed[0] == printed[1]
    reports = [(tmp_path / name / "report.md").read_text() for name in ("b1", "b2")]
    assert [r.split("## What the terms mean")[0] for r in reports] == [
        reports[0].split("## What the terms mean")[0]
    ] * 2


def test_verdict_reads_the_numbers():
    from retrolm.demo import spread, verdict

    def summary(
        retro_gpt: list[float], retro_off: list[float], shuf: list[float] | None
    ) -> dict[str, Any]:
        ratios = {"RETRO/GPT": spread(retro_gpt), "RETRO/RETRO-off": spread(retro_off)}
        if shuf is not None:
            ratios["RETRO-shuffled/RETRO"] = spread(shuf)
        return {
            "headline_split": "test",
            "seeds": len(retro_gpt),
            "comparison": {"test": {"ratios": ratios}},
        }

    paid = verdict(summary([0.80], [0.85], [1.10]))
    assert "retrieval paid off" in paid and "20.0% better" in paid and "15.0%" in paid
    assert "9.1%" in paid and "the gain comes from the neighbours' content" in paid
    unused = verdict(summary([0.985], [0.9995], [1.0]))
    assert "did not pay off" in unused and "within 3% of the GPT" in unused
    assert "did not learn to use its neighbours" in unused
    # one seed of two inside the noise band: not a result
    mixed = verdict(summary([0.90, 0.99], [0.90, 0.98], None))
    assert "did not pay off" in mixed and "the seeds disagree (seeds: 0.900-0.980)" in mixed
    assert "not checked" in mixed
