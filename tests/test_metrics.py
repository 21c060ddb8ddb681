import math

import numpy as np
import pytest

from retrolm.errors import RetrolmError
from retrolm.evaluation.metrics import (
    batch_longest_common_substring,
    bits_per_byte,
    chunk_overlap_ratio,
    distinct_n,
    exact_match,
    f1_score,
    has_repetition,
    longest_common_substring,
    mean_length,
    normalize_answer,
    overlap_buckets,
    perplexity,
    repetition_rate,
)


def test_normalize_answer_squad_convention():
    assert normalize_answer("  The Quick, brown-fox!  ") == "quick brownfox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # article only as a whole word


def test_exact_match_and_f1_hand_computed():
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "x"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # pred "eiffel" vs gold "eiffel tower": P=1, R=1/2 -> F1=2/3
    assert f1_score("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    # pred "big red dog" vs gold "red dog runs": common 2, P=2/3, R=2/3
    assert f1_score("a big red dog", ["red dog runs"]) == pytest.approx(2 / 3)
    # max over answers
    assert f1_score("red dog", ["cat", "red dog"]) == 1.0
    assert f1_score("cat", ["dog"]) == 0.0
    # repeated tokens count by multiplicity: pred "a a"->"" no; use "dog dog" vs "dog"
    assert f1_score("dog dog", ["dog"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    with pytest.raises(RetrolmError):
        exact_match("x", [])


def test_repetition_at_end():
    assert has_repetition([1, 2, 1, 2, 1, 2])
    assert has_repetition([9, 8, 7, 5, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    # loop cut mid-phrase still counts (rotation of the phrase)
    assert has_repetition([9, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1])
    # only twice at the end
    assert not has_repetition([5, 6, 1, 2, 1, 2])
    # repeated three times but not at the end
    assert not has_repetition([1, 2, 1, 2, 1, 2, 7, 8, 9])
    # no repetition at all
    assert not has_repetition(list(range(50)))
    # a single token repeated 3 times is a 1-token phrase, not a >= 2-token phrase
    assert not has_repetition([4, 5, 7, 7, 7])
    assert has_repetition([7] * 6)  # "7 7" three times
    assert not has_repetition([])


def test_repetition_rate_distinct_mean_length():
    gens = [[1, 2, 1, 2, 1, 2], [1, 2, 3, 4], [5, 5], [3, 4, 5, 3, 4, 5, 3, 4, 5]]
    assert repetition_rate(gens) == pytest.approx(50.0)
    assert mean_length(gens) == pytest.approx((6 + 4 + 2 + 9) / 4)
    # unigrams: 21 total, unique {1,2,3,4,5} = 5
    assert distinct_n(gens, 1) == pytest.approx(5 / 21)
    # bigrams: (1,2)x3,(2,1)x2 | (1,2),(2,3),(3,4) | (5,5) | (3,4),(4,5),(5,3),(3,4),(4,5),(5,3),(3,4),(4,5)
    uniq = {(1, 2), (2, 1), (2, 3), (3, 4), (5, 5), (4, 5), (5, 3)}
    assert distinct_n(gens, 2) == pytest.approx(len(uniq) / (5 + 3 + 1 + 8))
    assert distinct_n([[1]], 2) == 0.0


def _lcs_brute(a, b):
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            k = 0
            while i + k < len(a) and j + k < len(b) and a[i + k] == b[j + k]:
                k += 1
            best = max(best, k)
    return best


def test_lcs_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = rng.integers(0, 4, size=rng.integers(1, 30))
        b = rng.integers(0, 4, size=rng.integers(1, 40))
        assert longest_common_substring(a, b) == _lcs_brute(list(a), list(b))
    assert longest_common_substring([], [1]) == 0


def test_batch_lcs_with_masks_and_planted_runs():
    rng = np.random.default_rng(1)
    n, m, k, r = 50, 16, 2, 32
    chunks = rng.integers(0, 1000, size=(n, m))
    nbs = rng.integers(1000, 2000, size=(n, k, r))  # disjoint vocab -> LCS 0
    lens = rng.integers(0, m + 1, size=n)
    for i in range(n):
        s = rng.integers(0, m - lens[i] + 1)
        nbs[i, 1, 3 : 3 + lens[i]] = chunks[i, s : s + lens[i]]
    out = batch_longest_common_substring(chunks, nbs, block=7)
    assert out.shape == (n, k)
    assert (out[:, 0] == 0).all()
    assert (out[:, 1] == lens).all()
    # padding: identical pad ids must not match when masked out
    c = np.array([[0, 0, 0, 5]])
    nb = np.array([[[0, 0, 0, 0]]])
    assert batch_longest_common_substring(c, nb)[0, 0] == 3
    mask = np.array([[[False] * 4]])
    assert batch_longest_common_substring(c, nb, neighbour_mask=mask)[0, 0] == 0
    assert chunk_overlap_ratio([1, 2, 3, 4], [[9, 9], [2, 3, 9]], m=4) == 0.5


def test_overlap_buckets_shares_and_bpb():
    ratios = [0.0, 0.1, 0.125, 0.3, 1.0]
    nll = [10.0, 20.0, 30.0, 40.0, 50.0]
    nbytes = [10, 10, 10, 10, 10]
    rows = overlap_buckets(ratios, nll, nbytes)
    assert [r["alpha"] for r in rows] == [0.0, 0.125, 0.25, 0.5, 1.0]
    assert [r["n_chunks"] for r in rows] == [1, 3, 3, 4, 5]
    assert [r["share"] for r in rows] == pytest.approx([0.2, 0.6, 0.6, 0.8, 1.0])
    assert rows[1]["bpb"] == pytest.approx(60.0 / (math.log(2) * 30))
    assert rows[-1]["bpb"] == pytest.approx(bits_per_byte(150.0, 50))
    empty = overlap_buckets([0.5], [1.0], [4], alphas=(0.25,))
    assert empty[0]["n_chunks"] == 0 and math.isnan(empty[0]["bpb"])
    with pytest.raises(RetrolmError):
        overlap_buckets([0.1, 0.2], [1.0], [3, 4])


def test_bpb_and_perplexity():
    assert bits_per_byte(math.log(2) * 8, 8) == pytest.approx(1.0)
    assert perplexity(math.log(5) * 10, 10) == pytest.approx(5.0)
    with pytest.raises(RetrolmError):
        bits_per_byte(1.0, 0)
