"""`retrolm demo`: the product's main job, end to end, honestly.

Build the retrieval database, train a GPT and a RETRO with the same decoder on the same
token sequences (for `seeds` seeds), evaluate them on held-out documents (never in the
database) as GPT, RAG_GPT, RETRO, RETRO-off and RETRO-shuffled, and write
`<out>/report.md`: a verdict computed from the numbers, one headline table, the overlap
plot, loss curves, one sampled continuation per model (RETRO's with the neighbours it
read), the checked leakage controls, the settings and the wall time of every stage.

Budget: by default a fixed number of training tokens per run (`DemoSettings.tokens`), so
a busy machine takes longer but prints the same numbers. `minutes` (the old behaviour)
plans the seed-0 GPT's training time from what is left of the budget after the database;
every other run then trains on that GPT's token count. The decided budget goes to
`<out>/plan.json` before training, so a re-run (or a run resumed after a kill) keeps it:
a complete database, finished checkpoints and a cached evaluation are reused.

Every setting of the demo lives in `FULL` / `TINY` (`retrolm.demo.settings`). The stages run
in `pipeline`, `numbers` reads the results and `report` writes report.md and the plots.
"""

from __future__ import annotations

from retrolm.demo.numbers import comparison, corpus_case, judge, overlap_shares, spread, verdict
from retrolm.demo.pipeline import (
    leakage_controls,
    log,
    run_demo,
    run_dirs,
    sample_generations,
    training_signal,
    write_slice,
)
from retrolm.demo.report import (
    GLOSSARY,
    RATIO_MEANING,
    STYLE,
    code_block,
    comparison_markdown,
    plot_buckets,
    plot_curves,
    quote_block,
    render_report,
)
from retrolm.demo.settings import (
    FULL,
    HIGH_OVERLAP,
    MIN_EFFECT,
    MODELS,
    OTHER_CORPUS_SPLIT,
    RATIOS,
    RETRO_TIME_RATIO,
    TINY,
    DemoSettings,
    SampleSettings,
    resolve_settings,
)

__all__ = [
    "FULL", "GLOSSARY", "HIGH_OVERLAP", "MIN_EFFECT", "MODELS", "OTHER_CORPUS_SPLIT", "RATIOS",
    "RATIO_MEANING", "RETRO_TIME_RATIO", "STYLE", "TINY", "DemoSettings", "SampleSettings",
    "code_block", "comparison", "comparison_markdown", "corpus_case", "judge", "leakage_controls",
    "log", "overlap_shares", "plot_buckets", "plot_curves", "quote_block", "render_report",
    "resolve_settings", "run_demo", "run_dirs", "sample_generations", "spread", "training_signal",
    "verdict", "write_slice",
]  # fmt: skip
