"""Deterministic, world-size-independent order of training blocks.

The training stream is the concatenation of epoch permutations: epoch ``e`` is a permutation of the
``N`` training blocks seeded by ``(seed, e)``. Step ``s`` consumes stream positions
``[s*G, (s+1)*G)`` for a global batch of ``G`` blocks, so a batch may straddle an epoch boundary and
every block is seen once per epoch. Rank ``r`` of ``W`` takes the contiguous slice
``[r*G/W, (r+1)*G/W)`` of the global batch, and splits it into micro batches for gradient
accumulation. The global batch of a step therefore depends only on ``(N, G, seed, step)``, never on
``W`` or the micro batch size: resuming on a different number of GPUs continues the same data order.

Cost per step: O(G) plus one O(N) permutation per epoch, cached (a small LRU of recent epochs).
"""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock

import numpy as np

from linreg.errors import ConfigError, DataError

__all__ = ["epoch_permutation", "global_batch_indices", "rank_slice", "micro_batches", "read_batch", "BlockSampler"]

_PERM_CACHE: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
_PERM_CACHE_SIZE = 3
_LOCK = Lock()


def epoch_permutation(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of ``range(n_blocks)`` for ``epoch`` (cached, read-only)."""
    key = (int(n_blocks), int(seed), int(epoch))
    with _LOCK:
        perm = _PERM_CACHE.get(key)
        if perm is not None:
            _PERM_CACHE.move_to_end(key)
            return perm
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) % 2**64, 0x5A4D504C, int(epoch)])))
    dtype = np.int32 if n_blocks < 2**31 else np.int64
    perm = rng.permutation(n_blocks).astype(dtype, copy=False)
    perm.setflags(write=False)
    with _LOCK:
        _PERM_CACHE[key] = perm
        while len(_PERM_CACHE) > _PERM_CACHE_SIZE:
            _PERM_CACHE.popitem(last=False)
    return perm


def global_batch_indices(n_blocks: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Block indices (int64, length ``global_batch``) of optimizer step ``step`` (0-based)."""
    if n_blocks <= 0:
        raise DataError(f"no training blocks (n_blocks={n_blocks})")
    if global_batch <= 0:
        raise ConfigError(f"global batch size must be positive, got {global_batch}")
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}")
    start = int(step) * int(global_batch)
    end = start + int(global_batch)
    out = np.empty(global_batch, dtype=np.int64)
    pos = start
    filled = 0
    while pos < end:
        epoch, off = divmod(pos, n_blocks)
        take = min(end - pos, n_blocks - off)
        out[filled : filled + take] = epoch_permutation(n_blocks, seed, epoch)[off : off + take]
        filled += take
        pos += take
    return out


def rank_slice(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of a global batch (``len(indices)`` must divide by ``world_size``)."""
    n = len(indices)
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid rank {rank} of world size {world_size}")
    if n % world_size:
        raise ConfigError(f"global batch of {n} blocks does not divide over {world_size} ranks")
    k = n // world_size
    return indices[rank * k : (rank + 1) * k]


def micro_batches(indices: np.ndarray, micro_batch: int) -> list[np.ndarray]:
    """Split a rank's share into consecutive micro batches of ``micro_batch`` blocks (must divide)."""
    if micro_batch <= 0 or len(indices) % micro_batch:
        raise ConfigError(f"{len(indices)} blocks per rank do not split into micro batches of {micro_batch}")
    return [indices[i : i + micro_batch] for i in range(0, len(indices), micro_batch)]


def read_batch(blocks: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Copy rows ``indices`` of a (memory-mapped) block array into an int64 array, in the given order.

    Rows are read in ascending file order (better locality on memmaps), then put back in order.
    """
    idx = np.asarray(indices, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    rows = np.asarray(blocks[idx[order]])
    out = np.empty((len(idx), blocks.shape[1]), dtype=np.int64)
    out[order] = rows
    return out


class BlockSampler:
    """Per-rank view of the global order: ``sampler.micro(step)`` -> list of index arrays.

    ``global_batch`` must equal ``world_size * micro_batch * grad_accum`` for some integer grad_accum.
    """

    def __init__(self, n_blocks: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 micro_batch: int | None = None):
        if n_blocks <= 0:
            raise DataError(f"no training blocks (n_blocks={n_blocks})")
        if global_batch % world_size:
            raise ConfigError(f"global batch {global_batch} does not divide over {world_size} ranks")
        per_rank = global_batch // world_size
        micro_batch = micro_batch or per_rank
        if per_rank % micro_batch:
            raise ConfigError(
                f"per-rank batch {per_rank} (global {global_batch} / {world_size} ranks) does not split into micro "
                f"batches of {micro_batch}"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"invalid rank {rank} of world size {world_size}")
        self.n_blocks, self.global_batch, self.seed = int(n_blocks), int(global_batch), int(seed)
        self.rank, self.world_size, self.micro_batch = int(rank), int(world_size), int(micro_batch)
        self.grad_accum = per_rank // micro_batch

    @property
    def steps_per_epoch(self) -> float:
        return self.n_blocks / self.global_batch

    def epoch(self, step: int) -> float:
        """Fractional epoch reached after ``step`` steps."""
        return step * self.global_batch / self.n_blocks

    def global_indices(self, step: int) -> np.ndarray:
        return global_batch_indices(self.n_blocks, self.global_batch, step, self.seed)

    def rank_indices(self, step: int) -> np.ndarray:
        return rank_slice(self.global_indices(step), self.rank, self.world_size)

    def micro(self, step: int) -> list[np.ndarray]:
        return micro_batches(self.rank_indices(step), self.micro_batch)
