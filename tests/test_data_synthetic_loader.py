"""Embedded synthetic corpus and the deterministic block sampler (no tokenizers, no datasets)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from linreg.data.loader import BlockSampler, global_batch_indices, micro_batches, rank_slice, read_batch
from linreg.data.synthetic import synthetic_stories
from linreg.errors import ConfigError, DataError


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_in_seed_and_prefix_stable():
    a = synthetic_stories(200, seed=7)
    assert a == synthetic_stories(200, seed=7)
    assert a[:50] == synthetic_stories(50, seed=7)
    b = synthetic_stories(200, seed=8)
    assert a != b
    assert sum(x == y for x, y in zip(a, b)) < 5


def test_synthetic_looks_like_stories_and_is_varied():
    docs = synthetic_stories(2000, seed=0)
    assert len(set(docs)) == len(docs)
    for d in docs[:50]:
        assert d == d.strip() and "\n\n" in d  # several paragraphs
        assert d.count(".") >= 4  # several sentences
    words = {w for d in docs for w in d.split()}
    assert len(words) > 400
    openings = {d.split(".")[0] for d in docs}
    assert len(openings) > 300


def test_synthetic_is_fast():
    t = time.perf_counter()
    docs = synthetic_stories(10_000, seed=1)
    assert len(docs) == 10_000
    assert time.perf_counter() - t < 3.0


# ------------------------------------------------------------------------------------------ sampler


def _reference_stream(n: int, g: int, steps: int, seed: int) -> list[np.ndarray]:
    """Independent reference: materialize the concatenated epoch permutations, cut every G."""
    from linreg.data.loader import epoch_permutation

    epochs = (steps * g) // n + 2
    stream = np.concatenate([np.asarray(epoch_permutation(n, seed, e)) for e in range(epochs)])
    return [stream[s * g : (s + 1) * g] for s in range(steps)]


@pytest.mark.parametrize("n,g", [(10, 4), (37, 8), (5, 12), (64, 64)])
def test_global_batches_follow_epoch_permutations(n, g):
    steps = 25
    ref = _reference_stream(n, g, steps, seed=3)
    for s in range(steps):
        np.testing.assert_array_equal(global_batch_indices(n, g, s, seed=3), ref[s])
    # every epoch is a permutation: each block exactly once per epoch of the stream
    allidx = np.concatenate([global_batch_indices(n, g, s, 3) for s in range(steps)])
    full = (len(allidx) // n) * n
    counts = np.bincount(allidx[:full], minlength=n)
    assert (counts == full // n).all()


def test_epochs_reshuffle_and_seed_matters():
    n = 100
    e0 = global_batch_indices(n, n, 0, seed=1)
    e1 = global_batch_indices(n, n, 1, seed=1)
    assert sorted(e0) == sorted(e1) == list(range(n))
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, global_batch_indices(n, n, 0, seed=2))


def test_world_size_one_and_two_see_the_same_global_batches():
    n, g, seed = 1000, 16, 11
    for step in [0, 1, 2, 62, 63, 64, 500]:
        single = BlockSampler(n, g, seed, rank=0, world_size=1, micro_batch=4)
        r0 = BlockSampler(n, g, seed, rank=0, world_size=2, micro_batch=2)
        r1 = BlockSampler(n, g, seed, rank=1, world_size=2, micro_batch=8)
        one = np.concatenate(single.micro(step))
        two = np.concatenate([np.concatenate(r0.micro(step)), np.concatenate(r1.micro(step))])
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, global_batch_indices(n, g, step, seed))
    assert single.grad_accum == 4 and r0.grad_accum == 4 and r1.grad_accum == 1


def test_rank_slice_and_micro_batches():
    idx = np.arange(12)
    assert rank_slice(idx, 1, 3).tolist() == [4, 5, 6, 7]
    assert [m.tolist() for m in micro_batches(rank_slice(idx, 2, 3), 2)] == [[8, 9], [10, 11]]
    with pytest.raises(ConfigError, match="does not divide"):
        rank_slice(idx, 0, 5)
    with pytest.raises(ConfigError):
        micro_batches(idx, 5)
    with pytest.raises(ConfigError):
        BlockSampler(100, 16, 0, rank=0, world_size=3)
    with pytest.raises(DataError):
        global_batch_indices(0, 4, 0, 0)


def test_large_step_is_cheap():
    n = 2_000_000
    t = time.perf_counter()
    for s in range(1000, 1200):
        global_batch_indices(n, 512, s, seed=0)
    assert time.perf_counter() - t < 2.0  # one cached permutation, O(G) per step


def test_read_batch_keeps_order(tmp_path):
    arr = np.arange(40, dtype=np.uint16).reshape(10, 4)
    np.save(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    idx = np.array([7, 2, 9, 2])
    out = read_batch(mm, idx)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, arr[idx].astype(np.int64))
