"""KV-cached decoding (`Retro.step`) equals the full forward pass across chunk boundaries."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_retro
from retrolm.errors import RetrolmError
from retrolm.model.retro import Retro

M, R, V = 16, 32, 512
T = 4 * M + 7  # four chunk boundaries and a partial chunk
ATOL = 1e-10


def make_model(**overrides) -> Retro:
    return make_tiny_retro(**overrides)


def make_inputs(B: int = 2, length: int = T, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, length), generator=g)
    chunks = math.ceil(length / M)
    neighbours = torch.randint(0, V, (B, chunks, 2, R), generator=g)
    mask = torch.rand(B, chunks, 2, R, generator=g) > 0.1
    mask[-1, 2] = False  # one chunk of one sequence without neighbours
    return tokens, neighbours, mask


class Lookup:
    """A retrieve() callback over precomputed neighbours that records its calls."""

    def __init__(self, tokens, neighbours, mask):
        self.tokens, self.neighbours, self.mask = tokens, neighbours, mask
        self.calls: list[int] = []

    def __call__(self, u: int, chunk_tokens: torch.Tensor):
        assert torch.equal(chunk_tokens, self.tokens[:, u * M : (u + 1) * M]), "wrong chunk tokens"
        self.calls.append(u)
        return self.neighbours[:, u], self.mask[:, u]


def decode(model: Retro, tokens: torch.Tensor, sizes: list[int], retrieve) -> torch.Tensor:
    cache, outs, pos = None, [], 0
    for size in sizes:
        logits, cache = model.step(tokens[:, pos : pos + size], cache, retrieve)
        outs.append(logits)
        pos += size
    assert pos == tokens.shape[1] and len(cache) == pos
    return torch.cat(outs, 1)


@pytest.mark.parametrize("copy_head", [False, True])
@pytest.mark.parametrize(
    "sizes", [[1] * T, [5, 11, 1, 20, 17, 3, 14], [T], [M - 1, 1, M, 2 * M + 7]]
)
def test_step_equals_forward_with_neighbours(sizes: list[int], copy_head: bool) -> None:
    model = make_model(copy_head=copy_head)
    tokens, neighbours, mask = make_inputs()
    full, _ = model(tokens, neighbours, mask)
    lookup = Lookup(tokens, neighbours, mask)
    torch.testing.assert_close(decode(model, tokens, sizes, lookup), full, rtol=0, atol=ATOL)
    assert lookup.calls == [0, 1, 2, 3]  # each complete chunk retrieved once, in order


@pytest.mark.parametrize("sizes", [[1] * T, [7, 30, 34]])
def test_step_equals_forward_without_neighbours(sizes: list[int]) -> None:
    model = make_model()
    tokens, _, _ = make_inputs()
    full, _ = model(tokens)
    torch.testing.assert_close(decode(model, tokens, sizes, None), full, rtol=0, atol=ATOL)
    gpt = make_model(cca_layers=[])
    torch.testing.assert_close(decode(gpt, tokens, sizes, None), gpt(tokens)[0], rtol=0, atol=ATOL)


def test_retrieve_returning_none_is_no_neighbours_for_that_chunk() -> None:
    model = make_model()
    tokens, neighbours, mask = make_inputs()
    mask[:, 1] = False
    full, _ = model(tokens, neighbours, mask)
    lookup = Lookup(tokens, neighbours, mask)

    def skip_chunk_1(u, chunk_tokens):
        return None if u == 1 else lookup(u, chunk_tokens)

    torch.testing.assert_close(
        decode(model, tokens, [3] * 23 + [2], skip_chunk_1), full, rtol=0, atol=ATOL
    )


def test_fewer_neighbours_from_retrieve() -> None:
    model = make_model()
    tokens, neighbours, mask = make_inputs()
    full, _ = model(tokens, neighbours[:, :, :1], mask[:, :, :1])
    lookup = Lookup(tokens, neighbours[:, :, :1], mask[:, :, :1])
    torch.testing.assert_close(
        decode(model, tokens, [9] * 7 + [8], lookup), full, rtol=0, atol=ATOL
    )


def test_rollback_after_rejected_draft() -> None:
    """A draft crossing two chunk boundaries is rejected; decoding resumes as if never fed."""
    model = make_model()
    tokens, neighbours, mask = make_inputs()
    full, _ = model(tokens, neighbours, mask)
    lookup = Lookup(tokens, neighbours, mask)
    prefix = M + 5
    out, cache = model.step(tokens[:, :prefix], None, lookup)
    g = torch.Generator().manual_seed(9)
    draft = torch.randint(0, V, (2, 2 * M + 3), generator=g)
    wrong = torch.randint(0, V, neighbours.shape, generator=g)

    def wrong_retrieve(u, chunk_tokens):
        return wrong[:, u], None

    model.step(draft, cache, wrong_retrieve)
    assert len(cache) == prefix + draft.shape[1] and set(cache.encoded) == {0, 1, 2}
    cache.rollback(prefix + 4)  # accept 4 draft tokens... that were wrong: roll back further
    cache.rollback(prefix)
    assert len(cache) == prefix and set(cache.encoded) == {0}
    rest, cache = model.step(tokens[:, prefix:], cache, lookup)
    torch.testing.assert_close(torch.cat([out, rest], 1), full, rtol=0, atol=ATOL)
    assert lookup.calls == [0, 1, 2, 3]
    with pytest.raises(RetrolmError, match="roll the cache back"):
        cache.rollback(T + 1)


def test_rollback_to_a_chunk_boundary_keeps_completed_chunks() -> None:
    model = make_model()
    tokens, neighbours, mask = make_inputs()
    full, _ = model(tokens, neighbours, mask)
    lookup = Lookup(tokens, neighbours, mask)
    out, cache = model.step(tokens[:, : 2 * M], None, lookup)
    model.step(tokens[:, 2 * M : 3 * M], cache, lookup)
    cache.rollback(2 * M)  # chunk 1 is complete at length 2m: its neighbours stay cached
    assert set(cache.encoded) == {0, 1}
    rest, cache = model.step(tokens[:, 2 * M :], cache, lookup)
    torch.testing.assert_close(torch.cat([out, rest], 1), full, rtol=0, atol=ATOL)


def test_positions_beyond_max_seq_len_keep_counting() -> None:
    """Policy: rotary positions extrapolate; the cache and the full pass agree past max_seq_len."""
    model = make_model(max_seq_len=32)
    tokens, neighbours, mask = make_inputs(1, 5 * M + 3)
    full, _ = model(tokens, neighbours, mask)
    lookup = Lookup(tokens, neighbours, mask)
    torch.testing.assert_close(
        decode(model, tokens, [40] + [1] * 43, lookup), full, rtol=0, atol=ATOL
    )


def test_step_input_errors() -> None:
    model = make_model()
    tokens, _, _ = make_inputs()
    _, cache = model.step(tokens[:, :3])
    with pytest.raises(RetrolmError, match="batch size"):
        model.step(tokens[:1, 3:4], cache)
    with pytest.raises(RetrolmError, match="retrieve"):
        model.step(
            tokens[:, 3:M], cache, lambda u, c: (torch.zeros(2, 2, 7, dtype=torch.long), None)
        )
    assert len(cache) == 3  # the failed step left the cache as it was
    rest, cache = model.step(tokens[:, 3:], cache)
    torch.testing.assert_close(rest, model(tokens)[0][:, 3:], rtol=0, atol=ATOL)
