"""`retrolm retrofit`: add retrieval (encoder + CCA) to a trained GPT and train it.

The options are generated from `RetrofitConfig` (what is added, what trains, the LR) and
`TrainConfig` (how it trains), minus the training settings retro-fitting sets itself.
"""

from __future__ import annotations

from pathlib import Path

import typer

from retrolm.cli.options import with_dataclass_options
from retrolm.retrofitting.config import RetrofitConfig
from retrolm.training.config import TrainConfig

# Set by retro-fitting: k and lr come from RetrofitConfig, the model always retrieves, and
# the run starts from the retro-fitted GPT (not --init-from, not --resume); the CLI shows progress.
_TRAIN_FIELDS_SET_BY_RETROFIT = ("k", "lr", "retrieval", "init_from", "resume", "progress")


def register(app: typer.Typer) -> None:
    app.command("retrofit")(retrofit_command)


@with_dataclass_options(TrainConfig, into="train_cfg", exclude=_TRAIN_FIELDS_SET_BY_RETROFIT)
@with_dataclass_options(RetrofitConfig, into="config")
def retrofit_command(
    source: Path = typer.Option(
        ..., "--source", help="retrolm GPT checkpoint dir (or run dir) or a local HF GPT-2 dir."
    ),
    db: Path = typer.Option(..., "--db", help="Retrieval database (same tokenizer as the source)."),
    out: Path = typer.Option(..., "--out", help="Run directory: init/, checkpoints, final/, retrofit.json."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    config: RetrofitConfig = None,  # type: ignore[assignment]  # built from the generated options
    train_cfg: TrainConfig = None,  # type: ignore[assignment]
) -> None:
    """Retro-fit a GPT: copy its decoder, add a random encoder + CCA, train, report perplexity."""
    import dataclasses
    import json

    from retrolm.cli.device import resolve_device
    from retrolm.retrofitting.pipeline import retrofit

    train_cfg = dataclasses.replace(train_cfg, device=resolve_device(train_cfg.device))
    config = dataclasses.replace(config, lr=config.peak_lr())
    report = retrofit(source, db, out, train_cfg, config)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    p, ppl = report["parameters"], report["valid_perplexity"]
    typer.echo(
        f"retro-fitted ({report['mode']}): {p['decoder']:,} decoder + {p['retrieval']:,} new params "
        f"(+{100 * p['retrieval_share_of_decoder']:.1f}%), {p['trainable']:,} trained"
    )
    b, a = ppl["before"], ppl["after"]
    typer.echo(f"valid ppl before: source {b['source']:.3f}, retrieval on {b['retrieval_on']:.3f}")
    typer.echo(f"valid ppl after:  retrieval on {a['retrieval_on']:.3f}, off {a['retrieval_off']:.3f}")
    typer.echo(report["final"])
