"""The speed work keeps the numbers: outputs, loss and gradients as before, in every path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retrolm.model.config import RetroConfig
from retrolm.model.copy_head import mix, successor_mass
from retrolm.model.layers import RMSNorm, Rotary
from retrolm.model.retro import Retro

M, R, V = 16, 32, 512

# Computed by the model before the speed changes (softmax-space mixture, loss as the
# cross-entropy of the mixture's output, rotary tables rebuilt per call, nn.RMSNorm), float64.
REFERENCE = {
    True: {
        "loss": 8.236124323544617,
        "logit_sum": -628218.5123476214,
        "logits_1_71": [-9.480930406125388, -3.8111149914097107, -9.44490860172746,
                        -9.610933428671572, -9.535138604320561, -9.666535544330154],
        "grads": {"tok_emb.weight": 2.1607099068871247,
                  "blocks.0.attn.qkv.weight": 0.48618387753076586,
                  "blocks.4.cca.kv.weight": 0.4300243979559117,
                  "encoder.blocks.0.cross.q.weight": 0.002586430925733542,
                  "copy_head.sentinel_bias": 6.5211946777112555,
                  "copy_head.match_weight": 0.15856023199019914,
                  "copy_head.q.weight": 0.0770481534583767},
    },
    False: {
        "loss": 6.244588055839992,
        "logit_sum": 323.08463774377475,
        "logits_1_71": [0.03868707324184591, 0.013912174255816047, 0.07470887763977427,
                        -0.09131594930433905, -0.015521124953328441, -0.1469180649629212],
        "grads": {"tok_emb.weight": 0.9665902422463248,
                  "blocks.0.attn.qkv.weight": 0.12459516523634327,
                  "blocks.4.cca.kv.weight": 0.11091756737540046,
                  "encoder.blocks.0.cross.q.weight": 0.0005063204958952172},
    },
}  # fmt: skip


def reference_model(copy_head: bool) -> Retro:
    torch.manual_seed(0)
    config = RetroConfig.from_name("tiny", copy_head=copy_head, copy_match=3)
    model = Retro(config).double().train()
    if copy_head:
        with torch.no_grad():
            model.copy_head.match_weight.copy_(torch.tensor([0.2, 0.3, 0.4]))
            model.copy_head.sentinel_bias.fill_(0.05)
    return model


def reference_inputs(B: int = 2, T: int = 72):
    """A partial last chunk, masked neighbour tokens, exact matches, ignored targets."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (B, T), generator=g)
    nb = torch.randint(0, V, (B, math.ceil(T / M), 2, R), generator=g)
    nb[:, :, 0, :8] = tokens[:, None, :8]
    mask = torch.rand(nb.shape, generator=g) > 0.2
    targets = tokens.roll(-1, 1)
    targets[:, -3:] = -100
    return tokens, nb, mask, targets


@pytest.mark.parametrize("copy_head", [True, False])
def test_outputs_loss_and_gradients_match_the_reference(copy_head: bool) -> None:
    model = reference_model(copy_head)
    tokens, nb, mask, targets = reference_inputs()
    logits, loss = model(tokens, nb, mask, targets=targets)
    loss.backward()
    ref = REFERENCE[copy_head]
    close = dict(rtol=1e-9, atol=1e-12)
    assert loss.item() == pytest.approx(ref["loss"], rel=1e-12)
    assert logits.sum().item() == pytest.approx(ref["logit_sum"], rel=1e-12)
    torch.testing.assert_close(
        logits[1, 71, :6], torch.tensor(ref["logits_1_71"], dtype=torch.float64), **close
    )
    grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if n in ref["grads"]}
    assert grads == pytest.approx(ref["grads"], rel=1e-9)


@pytest.mark.parametrize("decoder_weight", [0.0, 1.0])
def test_loss_and_gradients_equal_those_of_the_output(decoder_weight: float) -> None:
    """The loss read at the targets (no vocabulary-sized output in its graph) equals the
    cross-entropy of the returned mixture, gradients included."""
    tokens, nb, mask, targets = reference_inputs()
    results = []
    for through_output in (False, True):
        model = reference_model(copy_head=True)
        model.config.copy_decoder_loss = decoder_weight
        logits, loss = model(tokens, nb, mask, targets=targets)
        if through_output:
            loss = F.nll_loss(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
            if decoder_weight:  # the decoder-alone term, as the model adds it
                decoder = model.lm_head(model.norm(decoder_hidden(model, tokens, nb, mask)))
                own = F.cross_entropy(decoder.reshape(-1, V), targets.reshape(-1))
                loss = loss + decoder_weight * (own - own.detach())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def decoder_hidden(model: Retro, tokens, nb, mask) -> torch.Tensor:
    """The decoder's last hidden states (B, T, C), captured through a hook on the final norm."""
    captured = []
    handle = model.norm.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    try:
        model(tokens, nb, mask)
    finally:
        handle.remove()
    return captured[0]


def test_mix_matches_the_probability_space_formula_with_repeated_successors() -> None:
    g = torch.Generator().manual_seed(0)
    N, m, S, vocab = 3, 4, 6, 11
    logits = torch.randn(N, m, vocab, generator=g, dtype=torch.float64)
    scores = torch.randn(N, m, S + 1, generator=g, dtype=torch.float64)
    scores[0, :, 2] = float("-inf")  # a slot without a successor
    log_w = scores.log_softmax(-1)
    log_copy, log_sentinel = log_w[..., :S], log_w[..., S]
    successors = torch.tensor([[1, 1, 1, 4, 0, 1], [2, 3, 2, 3, 2, 9], [5, 6, 7, 8, 9, 10]])
    mass = successor_mass(log_copy, successors)
    out = mix(logits.log_softmax(-1), log_sentinel, successors[:, None].expand(N, m, S), mass)
    want = logits.softmax(-1) * log_sentinel.exp()[..., None]
    want = want.scatter_add(-1, successors[:, None].expand(N, m, S), log_copy.exp()).log()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(N, m, dtype=torch.float64))


def test_rotary_tables_are_cached_and_equal_fresh_ones() -> None:
    rotary = Rotary(16, 10000.0)
    with torch.inference_mode():  # first built while decoding ...
        cos, sin = rotary.span(3, 40, torch.float32)
    fresh = rotary(torch.arange(3, 40), torch.float32)
    torch.testing.assert_close((cos, sin), fresh, rtol=0, atol=1e-7)
    again, _ = rotary.span(0, 10, torch.float32)
    assert again.data_ptr() == rotary.span(0, 10, torch.float32)[0].data_ptr()  # no rebuild
    x = torch.randn(5, 37, 16, requires_grad=True)  # ... then used in training
    (x[..., :8] * cos).sum().backward()
    long_cos, _ = rotary.span(100, 300, torch.float32)  # grows past the first size
    torch.testing.assert_close(long_cos, rotary(torch.arange(100, 300), torch.float32)[0])
    cyc_cos, _ = rotary.cyclic(2 * 7 + 3, 7, torch.float32)
    torch.testing.assert_close(cyc_cos, rotary(torch.arange(17) % 7, torch.float32)[0])


def spy_rms_norm(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    """Record the (input, weight) dtypes of every F.rms_norm call. torch warns only once per
    process about a mismatch (then silently takes its slow unfused path), so the dtypes are
    what a test can check."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real = F.rms_norm

    def spy(x, shape, weight=None, eps=None):
        seen.append((x.dtype, weight.dtype if weight is not None else x.dtype))
        return real(x, shape, weight, eps)

    monkeypatch.setattr(F, "rms_norm", spy)
    return seen


def test_rmsnorm_is_torch_rmsnorm_in_float32_and_float32_under_bf16_autocast(monkeypatch) -> None:
    torch.manual_seed(0)
    norm, plain = RMSNorm(32, eps=1e-5), torch.nn.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        plain.weight.copy_(norm.weight)
    x = torch.randn(4, 32) * 3
    assert torch.equal(norm(x), plain(x))
    seen = spy_rms_norm(monkeypatch)
    assert norm(x.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x.bfloat16())
    assert seen == [(torch.float64, torch.float64), (torch.float32, torch.float32)]
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), plain(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_bf16_autocast_step_normalises_in_float32(monkeypatch) -> None:
    """Every RMSNorm of a RETRO training step under bf16 autocast sees matching dtypes."""
    model = reference_model(copy_head=True).float()
    tokens, nb, mask, targets = reference_inputs(B=1, T=32)
    seen = spy_rms_norm(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(tokens, nb, mask, targets=targets)
    loss.backward()
    assert len(seen) >= 15 and all(x == w == torch.float32 for x, w in seen)
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
