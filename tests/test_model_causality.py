"""Causality by gradients, partial last chunks, missing neighbours, and retrieval off == GPT."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_retro
from retrolm.errors import RetrolmError
from retrolm.model.retro import Retro

M, R, V = 16, 32, 512


def make_model(**overrides) -> Retro:
    return make_tiny_retro(**overrides)


def make_inputs(B: int, T: int, k: int = 2, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    neighbours = torch.randint(0, V, (B, math.ceil(T / M), k, R), generator=g)
    mask = torch.rand(B, math.ceil(T / M), k, R, generator=g) > 0.1
    return tokens, neighbours, mask


def embedding_grads(model: Retro, tokens, neighbours, mask, t: int):
    """Grads of a projection of logits[:, t] w.r.t. the token and neighbour embeddings."""
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = model.tok_emb.register_forward_hook(keep)
    try:
        logits, _ = model(tokens, neighbours, mask)
    finally:
        handle.remove()
    weights = torch.randn(
        logits.shape[-1], generator=torch.Generator().manual_seed(t), dtype=logits.dtype
    )
    (logits[0, t] @ weights).backward()
    token_emb, nb_emb = captured  # decoder call first, then the neighbour encoder's call
    return token_emb.grad[0].abs().sum(-1), nb_emb.grad  # (T,), (B, chunks, k, r, C)


@pytest.mark.parametrize("copy_head", [False, True])
def test_causality_by_gradients(copy_head: bool) -> None:
    model = make_model(copy_head=copy_head)
    T = 4 * M  # four full chunks: the last token sees chunk 3's neighbours
    tokens, neighbours, mask = make_inputs(2, T)
    seen_nonzero = set()
    for t in range(T):
        tok_grad, nb_grad = embedding_grads(model, tokens, neighbours, mask, t)
        assert torch.all(tok_grad[t + 1 :] == 0), f"logits at {t} depend on later tokens"
        assert tok_grad[t] > 0
        assert torch.all(nb_grad[1] == 0), "batch elements leak into each other"
        per_chunk = nb_grad[0].abs().flatten(1).sum(-1)  # (chunks,)
        for u in range(per_chunk.shape[0]):
            if t < (u + 1) * M - 1:
                assert per_chunk[u] == 0, f"position {t} sees the neighbours of chunk {u}"
            elif per_chunk[u] > 0:
                seen_nonzero.add(u)
        if t < M - 1:
            assert torch.all(per_chunk == 0)
    assert seen_nonzero == {0, 1, 2, 3}, "some chunk's neighbours never reach the decoder"


def test_last_token_of_chunk_sees_its_neighbours() -> None:
    model = make_model()
    tokens, neighbours, mask = make_inputs(1, 3 * M)
    for u in range(3):
        _, nb_grad = embedding_grads(model, tokens, neighbours, mask, (u + 1) * M - 1)
        assert nb_grad[0, u].abs().sum() > 0
        assert torch.all(nb_grad[0, u + 1 :] == 0)


def test_partial_last_chunk_trains_and_is_causal() -> None:
    model = make_model()
    T = 3 * M + 7
    tokens, neighbours, mask = make_inputs(2, T + 9)  # 9 more tokens: a full 4th chunk + 1
    short_tokens, short_nb, short_mask = (
        tokens[:, :T],
        neighbours[:, : math.ceil(T / M)],
        mask[:, : math.ceil(T / M)],
    )
    assert short_nb.shape[1] == 4
    targets = short_tokens.roll(-1, 1)
    targets[:, -1] = -100
    logits, loss = model(short_tokens, short_nb, short_mask, targets=targets)
    assert logits.shape == (2, T, V) and torch.isfinite(loss)
    loss.backward()
    assert all(
        p.grad is not None for n, p in model.named_parameters() if "encoder" in n or "cca" in n
    )
    long_logits, _ = model(tokens, neighbours, mask)
    torch.testing.assert_close(long_logits[:, :T], logits, rtol=0, atol=1e-10)
    # the loss ignores -100 and equals the mean over the rest
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), targets[:, :-1].reshape(-1)
    )
    torch.testing.assert_close(loss, manual)


def test_retrieval_off_equals_gpt_with_same_weights() -> None:
    model = make_model()
    gpt = Retro(model.config.as_gpt()).double().eval()
    missing, unexpected = gpt.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("encoder" in k or "cca" in k for k in unexpected)
    tokens, neighbours, mask = make_inputs(2, 3 * M + 5)
    reference, _ = gpt(tokens)
    off, _ = model(tokens, neighbours, mask, retrieval=False)
    none, _ = model(tokens)
    on, _ = model(tokens, neighbours, mask)
    assert torch.equal(off, reference) and torch.equal(none, reference)
    assert not torch.allclose(on[:, M - 1 :], reference[:, M - 1 :])
    assert torch.equal(on[:, : M - 1], reference[:, : M - 1])  # first m-1 tokens see nothing
    # all neighbours missing: every CCA update is zero -> the GPT again
    all_missing, _ = model(tokens, neighbours, torch.zeros_like(mask))
    torch.testing.assert_close(all_missing, reference, rtol=0, atol=1e-12)


def test_fewer_neighbours_equals_masked_extra_neighbour() -> None:
    model = make_model()
    tokens, neighbours, mask = make_inputs(1, 3 * M)
    one, _ = model(tokens, neighbours[:, :, :1], mask[:, :, :1])
    padded_mask = mask.clone()
    padded_mask[:, :, 1] = False
    two, _ = model(tokens, neighbours, padded_mask)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-10)
    three, _ = model(tokens, torch.cat([neighbours, neighbours[:, :, :1]], 2))  # k' > k works too
    assert three.shape == one.shape


def test_bad_neighbour_shapes_are_refused() -> None:
    model = make_model()
    tokens, neighbours, mask = make_inputs(1, 3 * M)
    with pytest.raises(RetrolmError, match="neighbours must be"):
        model(tokens, neighbours[..., :16])
    with pytest.raises(RetrolmError, match="chunks"):
        model(tokens, neighbours[:, :2])
    with pytest.raises(RetrolmError, match="neighbour_mask shape"):
        model(tokens, neighbours, mask[:, :, :1])
