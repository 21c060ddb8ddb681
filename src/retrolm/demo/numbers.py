"""The demo's numbers: per-seed spreads, the comparison table, and the verdict read from them."""

from __future__ import annotations

from typing import Any

import numpy as np

from retrolm.demo.settings import HIGH_OVERLAP, MIN_EFFECT, MODELS, RATIOS

# -- numbers -------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, min, max and (population) standard deviation of per-seed values."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
            "std": float(arr.std()), "values": [float(v) for v in arr]}  # fmt: skip


def comparison(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per split: each model's ppl and bpb and each ratio, as spreads over the seeds.

    `per_seed[s][split]` is `evaluate`'s result for seed s. A model (RETRO-shuffled with
    an evaluation that does not produce it) missing in any seed is left out.
    """
    from retrolm.evaluation.perplexity import find_row

    table: dict[str, dict[str, Any]] = {}
    for split in per_seed[0]:
        results = [seed[split] for seed in per_seed]
        rows: dict[str, Any] = {}
        for name in MODELS:
            found = [find_row(res, name) for res in results]
            if all(found):
                rows[name] = {
                    "ppl": spread([r["ppl"] for r in found]),
                    "bpb": spread([r["bpb"] for r in found]),
                    "buckets": [
                        {"alpha": b["alpha"], "share": b["share"], "n_chunks": b["n_chunks"],
                         "bpb": float(np.mean([r["buckets"][i]["bpb"] for r in found]))}
                        for i, b in enumerate(found[0]["buckets"])
                    ],
                }  # fmt: skip
        ratios = {f"{a}/{b}": spread([rows[a]["ppl"]["values"][s] / rows[b]["ppl"]["values"][s]
                                      for s in range(len(results))])
                  for a, b in RATIOS if a in rows and b in rows}  # fmt: skip
        table[split] = {"tokens": results[0]["tokens"], "chunks": results[0]["chunks"],
                        "bytes": results[0]["bytes"], "rows": rows, "ratios": ratios}  # fmt: skip
    return table


def overlap_shares(split_table: dict[str, Any]) -> dict[str, float]:
    """Share of held-out chunks whose overlap with their neighbours is > 1/2 and > 1/8."""
    buckets = next(iter(split_table["rows"].values()))["buckets"]
    by_alpha = {round(b["alpha"], 4): b["share"] for b in buckets}
    return {"over_half": 1.0 - by_alpha[HIGH_OVERLAP], "over_eighth": 1.0 - by_alpha[0.125]}


def judge(stat: dict[str, Any] | None) -> str | None:
    """Read a per-seed ratio: "below" / "above" 1 in every seed by more than MIN_EFFECT,
    "same" (every seed within MIN_EFFECT of 1), or "unclear" (the seeds disagree)."""
    if stat is None:
        return None
    if stat["max"] <= 1 - MIN_EFFECT:
        return "below"
    if stat["min"] >= 1 + MIN_EFFECT:
        return "above"
    if stat["min"] > 1 - MIN_EFFECT and stat["max"] < 1 + MIN_EFFECT:
        return "same"
    return "unclear"


def verdict(s: dict[str, Any]) -> str:
    """The plain-language verdict, computed from the headline split's ratios."""
    split, n = s["headline_split"], s["seeds"]
    ratios = s["comparison"][split]["ratios"]
    gpt, off, shuf = (
        ratios["RETRO/GPT"],
        ratios.get("RETRO/RETRO-off"),
        ratios.get("RETRO-shuffled/RETRO"),
    )
    j_gpt, j_off, j_shuf = judge(gpt), judge(off), judge(shuf)
    noise = f"{100 * MIN_EFFECT:.0f}%"

    def rng(stat: dict[str, Any]) -> str:
        return f" (seeds: {stat['min']:.3f}-{stat['max']:.3f})" if n > 1 else ""

    def pct(stat: dict[str, Any], inverse: bool = False) -> str:
        ratio = 1 / stat["mean"] if inverse else stat["mean"]
        return f"{100 * abs(1 - ratio):.1f}%"

    head = f"On `{split}` the RETRO/GPT perplexity ratio is {gpt['mean']:.3f}{rng(gpt)}: "
    head += {
        "below": f"RETRO is {pct(gpt)} better than a GPT trained on the same tokens",
        "above": f"RETRO is {pct(gpt)} worse than a GPT trained on the same tokens",
        "same": f"within {noise} of the GPT, which is no difference (two training runs differ by that much)",
        "unclear": f"{pct(gpt)} {'better' if gpt['mean'] < 1 else 'worse'} on average, but the seeds disagree, "
        "so it is no clear difference",
    }[j_gpt]
    paid = j_gpt == "below" and j_off == "below"
    lines = [
        "**Verdict: retrieval paid off on this corpus.**" if paid else
        "**Verdict: retrieval did not pay off on this corpus.**",
        head + ".",
    ]  # fmt: skip
    if off is not None:
        lines.append({
            "below": f"RETRO beats RETRO-off by {pct(off)}{rng(off)}: the trained model uses its neighbours.",
            "above": f"RETRO is {pct(off)} worse than RETRO-off{rng(off)}: its neighbours hurt it.",
            "same": f"RETRO is within {pct(off)} of RETRO-off{rng(off)}: the model did not learn to use its "
                    "neighbours, so any difference to the GPT comes from training, not retrieval.",
            "unclear": f"RETRO is {pct(off)} {'below' if off['mean'] < 1 else 'above'} RETRO-off on average but "
                       f"the seeds disagree{rng(off)}: no clear use of the neighbours.",
        }[j_off])  # fmt: skip
    if shuf is None:
        lines.append("RETRO-shuffled was not evaluated, so whether a gain comes from the neighbours' content "
                     "is not checked.")  # fmt: skip
    elif j_shuf == "above" and j_off == "below":
        lines.append(f"RETRO beats RETRO-shuffled by {pct(shuf, inverse=True)}{rng(shuf)}: the gain comes from "
                     "the neighbours' content, not from seeing some text.")  # fmt: skip
    elif j_shuf == "above":
        lines.append(f"RETRO-shuffled is {pct(shuf)} worse than RETRO{rng(shuf)}: wrong neighbours hurt it, so "
                     "it does read them, but the right ones do not make it better than without any.")  # fmt: skip
    elif j_off == "below":
        lines.append(
            f"But RETRO-shuffled is not clearly worse than RETRO ({pct(shuf)} apart{rng(shuf)}): the "
            "gain does not come from what the neighbours say (unrelated database text helps as much)."
        )
    else:
        lines.append(f"RETRO-shuffled (wrong neighbours) is {pct(shuf)} from RETRO{rng(shuf)}: what the "
                     "neighbours say makes no clear difference to it.")  # fmt: skip
    return " ".join(lines)


def corpus_case(s: dict[str, Any]) -> str:
    """Which case the corpus is: how much text related to the held-out chunks the database holds."""
    split = s["headline_split"]
    shares = overlap_shares(s["comparison"][split])
    high, some = shares["over_half"], shares["over_eighth"]
    numbers = (f"{100 * high:.0f}% of the `{split}` chunks share more than half a chunk verbatim with the "
               f"neighbours RETRO reads for them (high overlap) and {100 * some:.0f}% share more than 1/8 of "
               "a chunk")  # fmt: skip
    if high >= 0.1:
        case = ("the database holds closely related, partly verbatim text for many held-out chunks (other "
                "documents saying the same thing in other words or with other names, never the held-out "
                "document itself), so large RETRO gains are possible and most of any gain is copying; the "
                "bucket table shows how RETRO does where there is nothing to copy")  # fmt: skip
    elif some >= 0.2:
        case = (
            "the database holds related text (shared phrases) for a fair share of held-out chunks, "
            "but few long verbatim matches, so only moderate RETRO gains are expected"
        )
    else:
        case = ("the database holds little text related to the held-out chunks (the nearly leak-free case), "
                "so only small RETRO gains are expected")  # fmt: skip
    return f"**How much related text the database holds:** {numbers}: {case}."
