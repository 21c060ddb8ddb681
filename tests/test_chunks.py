"""Chunk table, token stream lookups and vectorised neighbour gathering."""

from __future__ import annotations

import numpy as np

from retrolm.db.chunks import ChunkStore, TokenStream, make_chunks, token_dtype

PAD = 1


def _store(tmp_path, lengths, m):
    """A train stream of documents with the given lengths (EOS=0 included); token = 10+pos."""
    lengths = np.array(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    tokens = (np.arange(lengths.sum()) + 10).astype(np.uint16)
    tokens[starts + lengths - 1] = 0
    tokens.tofile(tmp_path / "tokens.bin")
    np.save(tmp_path / "docs.npy", np.stack([starts, lengths], 1))
    np.save(tmp_path / "doc_index.npy", np.arange(len(lengths)))
    stream = TokenStream(tmp_path, np.dtype(np.uint16), m)
    return stream, ChunkStore(stream, make_chunks(stream.docs, m), PAD)


def test_token_dtype():
    assert token_dtype(65535) == np.uint16 and token_dtype(70000) == np.uint32


def test_chunks_never_cross_documents_and_round_trip(tmp_path):
    m = 4
    stream, store = _store(tmp_path, [9, 4, 1, 6], m)
    table = store.table
    assert table[:, 2].tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert table[:, 1].tolist() == [4, 4, 1, 4, 1, 4, 2]
    for d, (start, length) in enumerate(stream.docs):
        rows = np.flatnonzero(table[:, 2] == d)
        joined = np.concatenate([store.chunk_tokens(int(c)) for c in rows])
        assert joined.tolist() == stream.tokens[start : start + length].tolist()


def test_gather_chunk_then_continuation_with_padding(tmp_path):
    m = 4
    stream, store = _store(tmp_path, [9, 4, 1, 6], m)
    ids = np.array([[0, 2], [3, -1], [5, 6]])  # (3, 2)
    tokens, mask = store.gather(ids)
    assert tokens.shape == mask.shape == (3, 2, 2 * m) and tokens.dtype == np.int64
    t = stream.tokens.astype(np.int64)
    # chunk 0 of doc 0 continues with chunk 1 of doc 0
    assert tokens[0, 0].tolist() == t[0:8].tolist() and mask[0, 0].all()
    # chunk 2 is the 1-token tail of doc 0: padded, no continuation (next chunk is another doc)
    assert tokens[0, 1].tolist() == [t[8]] + [PAD] * 7 and mask[0, 1].tolist() == [True] + [False] * 7
    # chunk 3 is doc 1 whole; next chunk belongs to doc 2 → no continuation
    assert tokens[1, 0, :4].tolist() == t[9:13].tolist() and not mask[1, 0, 4:].any()
    # id -1 → all padding
    assert (tokens[1, 1] == PAD).all() and not mask[1, 1].any()
    # chunk 5 continues with the short chunk 6
    assert tokens[2, 0].tolist() == t[14:20].tolist() + [PAD, PAD]
    assert mask[2, 0].sum() == 6
    # last chunk of the whole store has no continuation
    assert not mask[2, 1, 4:].any()


def test_doc_of_and_window_docs(tmp_path):
    stream, _ = _store(tmp_path, [9, 4, 1, 6], 4)
    assert stream.doc_of(np.array([0, 8, 9, 12, 13, 14, 19])).tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert stream.num_windows == 5
    assert stream.window_docs(2) == {0, 1}  # tokens 8..11
    assert stream.window_docs(3) == {1, 2, 3}  # tokens 12..15
    assert stream.window_docs(4) == {3}  # tokens 16..19
