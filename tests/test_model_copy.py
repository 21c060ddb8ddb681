"""The neighbour copy head: a normalised mixture, causal by perturbation, off == decoder alone."""

from __future__ import annotations

import math

import torch

from retrolm.model.config import RetroConfig
from retrolm.model.retro import Retro

M, R, V = 16, 32, 512


def make_model(**overrides) -> Retro:
    torch.manual_seed(0)
    model = Retro(RetroConfig.from_name("tiny", copy_head=True, **overrides)).double().eval()
    with torch.no_grad():  # make copying matter: exact matches count, the sentinel is weak
        model.copy_head.match_weight.copy_(torch.tensor([0.2, 0.3]))
        model.copy_head.sentinel_bias.fill_(0.0)
    return model


def copy_inputs(B: int = 2, T: int = 4 * M, seed: int = 5):
    """Sequences whose neighbours are the sequence's own next chunk plus one (a copyable twin)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T + 2 * M), generator=g)
    n_chunks = T // M
    neighbours = torch.stack(  # neighbour of chunk u = tokens of chunks u+1, u+2 (r = 2m)
        [tokens[:, (u + 1) * M : (u + 3) * M] for u in range(n_chunks)], dim=1
    )[:, :, None]  # (B, l, 1, r)
    return tokens[:, :T], neighbours, torch.ones_like(neighbours, dtype=torch.bool)


def test_output_is_a_normalised_distribution() -> None:
    model = make_model()
    tokens, neighbours, mask = copy_inputs()
    logits, _ = model(tokens, neighbours, mask)
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(logits.shape[:2], dtype=logits.dtype))


def test_retrieval_off_is_the_decoder_alone() -> None:
    model = make_model()
    gpt = Retro(model.config.as_gpt()).double().eval()
    gpt.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k in gpt.state_dict()}, strict=True
    )
    tokens, neighbours, mask = copy_inputs()
    off, _ = model(tokens, neighbours, mask, retrieval=False)
    plain, _ = gpt(tokens)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)


def test_copying_a_matched_successor_lowers_the_loss() -> None:
    """With exact-match weights on, a sequence whose neighbour holds its continuation is
    predicted far better than with another sequence's neighbours (no training needed)."""
    model = make_model()
    with torch.no_grad():
        model.copy_head.match_weight.copy_(torch.tensor([0.4, 0.6]))
    tokens, neighbours, mask = copy_inputs()
    targets = tokens.roll(-1, 1)
    targets[:, : M - 1] = -100  # positions before the first neighbour cannot copy
    targets[:, -1] = -100
    _, true_loss = model(tokens, neighbours, mask, targets=targets)
    _, shuffled_loss = model(tokens, neighbours.flip(0), mask, targets=targets)
    assert true_loss < shuffled_loss - 1.0


def test_no_position_reads_the_future_by_perturbation() -> None:
    """Gradients miss the exact-match features; change a token or a neighbour and compare."""
    model = make_model()
    tokens, neighbours, mask = copy_inputs(B=1)
    base, _ = model(tokens, neighbours, mask)
    T = tokens.shape[1]
    for t in (3, M - 1, M, 2 * M + 5, T - 1):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1) % V
        out, _ = model(changed, neighbours, mask)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.equal(out[:, t:], base[:, t:])
    for u in range(T // M):
        changed = neighbours.clone()
        changed[0, u] = (changed[0, u] + 7) % V
        out, _ = model(tokens, changed, mask)
        first = (u + 1) * M - 1  # the first position that may read chunk u's neighbours
        torch.testing.assert_close(out[:, :first], base[:, :first], rtol=0, atol=0)
        assert not torch.equal(out[:, first], base[:, first])


def test_copy_head_is_a_retrieval_part() -> None:
    from retrolm.model.retro import is_retrieval_parameter

    model = make_model()
    names = [n for n, _ in model.named_parameters() if n.startswith("copy_head.")]
    assert names and all(is_retrieval_parameter(n) for n in names)
    assert not math.isnan(model.copy_head.sentinel_bias.item())


def test_decoder_loss_adds_gradient_but_not_value() -> None:
    """copy_decoder_loss trains the decoder alone too, while the reported loss stays the mixture's."""
    tokens, neighbours, mask = copy_inputs()
    targets = tokens.roll(-1, 1)
    results = []
    for weight in (0.0, 1.0):
        model = make_model(copy_decoder_loss=weight).train()
        _, loss = model(tokens, neighbours, mask, targets=targets)
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    assert not torch.allclose(results[0][1], results[1][1])
