"""RetroConfig: presets, CCA placement, validation at construction, JSON round trip, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from retrolm.errors import RetrolmError
from retrolm.model.config import PRESETS, RetroConfig, default_cca_layers
from retrolm.model.flops import flops_per_token, mfu
from retrolm.model.retro import Retro


@pytest.mark.parametrize(
    "n_layers, expected",
    [(12, [6, 9, 12]), (15, [6, 9, 12, 15]), (16, [9, 12, 15]), (24, [9, 12, 15, 18, 21, 24]),
     (6, [6]), (5, [2, 5]), (4, [4]), (3, [3]), (2, [2]), (1, [1])],
)  # fmt: skip
def test_default_cca_layers(n_layers: int, expected: list[int]) -> None:
    assert default_cca_layers(n_layers) == expected


def test_presets_sizes() -> None:
    tiny = Retro(RetroConfig.from_name("tiny"))
    assert tiny.num_params() < 2_000_000
    assert tiny.config.chunk_size == 16 and tiny.config.neighbor_len == 32
    assert tiny.config.vocab_size == 512
    small = Retro(RetroConfig.from_name("cpu-small"))
    assert 10_000_000 <= small.num_params() <= 20_000_000
    assert small.config.chunk_size == 64
    expected = {"small": (12, 768, 12), "medium": (24, 1024, 16), "xl": (24, 2048, 32)}
    for name, (layers, width, heads) in expected.items():
        config = RetroConfig.from_name(name)
        assert (config.n_layers, config.d_model, config.n_heads) == (layers, width, heads)
        with torch.device("meta"):
            n = Retro(config).num_params()
            n_gpt = Retro(config.as_gpt()).num_params()
        # paper: encoder + CCA add roughly 10-20% (126M -> 148M, 1.3B -> 1.5B)
        assert 1.03 < n / n_gpt < 1.30, (name, n, n_gpt)
    assert set(PRESETS) >= {"tiny", "cpu-small", "small", "medium", "xl"}


def test_json_round_trip(tmp_path) -> None:
    config = RetroConfig.from_name("tiny", mlp="gelu", cca_layers=[3], dropout=0.1)
    config.save_json(tmp_path / "config.json")
    again = RetroConfig.load_json(tmp_path / "config.json")
    assert again == config
    assert RetroConfig.from_dict(config.to_dict()) == config
    gpt = config.as_gpt()
    assert gpt.cca_layers == [] and not gpt.is_retro and config.cca_layers == [3]
    assert Retro(gpt).encoder is None


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(d_model=66, n_heads=4), "not divisible by n_heads"),
        (dict(enc_d_model=50, enc_heads=4), "not divisible by enc_heads"),
        (dict(cca_layers=[0]), "out of range"),
        (dict(cca_layers=[6]), "out of range"),
        (dict(neighbor_len=16), "must be 2m"),
        (dict(continuation=False, neighbor_len=32), "must be m"),
        (dict(mlp="relu"), "mlp must be"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(pad_id=600), "pad_id"),
    ],
)
def test_invalid_configs_fail_at_construction(overrides: dict, words: str) -> None:
    with pytest.raises(RetrolmError, match=words):
        RetroConfig.from_name("tiny", **overrides)


def test_valid_variants_and_unknown_names() -> None:
    assert RetroConfig.from_name("tiny", continuation=False).neighbor_len == 16
    with pytest.raises(RetrolmError, match="unknown model preset"):
        RetroConfig.from_name("huge")
    with pytest.raises(RetrolmError, match="unknown model config field"):
        RetroConfig.from_dict({**RetroConfig().to_dict(), "n_layer": 3})


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(mlp="gelu", enc_d_model=64), dict(cca_layers=[]), dict(copy_head=True, copy_match=3)],
)
def test_flops_formula_matches_counted_matmuls(overrides: dict) -> None:
    """The formula's weight matmuls equal torch's FLOP counter; attention scores are documented apart."""
    config = RetroConfig.from_name("tiny", **overrides)
    model = Retro(config)
    T = 128
    tokens = torch.randint(0, 512, (1, T))
    neighbours = torch.randint(0, 512, (1, T // 16, 2, 32))
    with FlopCounterMode(display=False) as counter:
        model(tokens, neighbours)
    counted = counter.get_total_flops() / T
    f = flops_per_token(config, T)
    assert f["train"] == 3 * f["forward"]
    # depending on the SDPA kernel, the counter sees the score products or not
    assert (
        min(abs(counted - f["forward"]), abs(counted - (f["forward"] - f["attention_scores"])))
        < 1e-6 * counted
    )
    assert model.flops_per_token(T) == f["train"]
    assert mfu(1e6, 100.0, 1e9) == pytest.approx(0.1)


def test_gpt_and_retro_from_the_same_seed_share_the_decoder_start():
    """Paired comparisons: adding CCA layers must not change the decoder's initial weights."""


    config = RetroConfig.from_name("tiny")
    torch.manual_seed(7)
    retro = dict(Retro(config).named_parameters())
    torch.manual_seed(7)
    gpt = dict(Retro(config.as_gpt()).named_parameters())
    assert set(gpt) < set(retro)
    for name, param in gpt.items():
        assert torch.equal(param, retro[name]), name
    torch.manual_seed(8)
    other = dict(Retro(config.as_gpt()).named_parameters())
    assert not torch.equal(other["blocks.0.attn.qkv.weight"], gpt["blocks.0.attn.qkv.weight"])
    # the GPT-2 scales survive the split into two generators
    assert abs(gpt["blocks.0.mlp.up.weight"].std().item() - 0.02) < 0.002
    assert gpt["blocks.0.attn.out.weight"].std().item() < 0.01
    assert float(retro["encoder.blocks.0.cross.q.weight"].std()) > 0.015
