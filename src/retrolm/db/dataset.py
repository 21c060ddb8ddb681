"""Training data over a retrieval database split: token sequences plus their neighbours.

Sequence i of a split covers query windows s = i*l .. s+l-1 (l = n/m) of that split's
packed token stream, so chunk u of the sequence carries the neighbours that the
database retrieved with chunk u itself (`neighbors/{split}.npy` row s+u). The train split
is cut only from the prefix `lm_train_tokens` that the database set aside for LM
training.

Order of samples comes from `ResumableBatchSampler`: one seeded permutation per epoch,
consumed in global batches; its whole state is one integer (samples consumed), so a
resumed or a multi-process run sees exactly the batches a single uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from retrolm.errors import RetrolmError

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB


def _open_db(path: Path) -> RetrievalDB:
    # Sizes are still checked; the sha256 pass already ran where the trainer opened the
    # database, and repeating it in every worker would reread every file each time.
    from retrolm.db.database import RetrievalDB

    return RetrievalDB.open(path, verify=False)


def first_k_valid(ids: np.ndarray, k: int) -> np.ndarray:
    """Per row, the first k ids that are not -1, in their original order, padded with -1."""
    order = np.argsort(ids < 0, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, axis=-1)[..., :k]


class RetroDataset(Dataset):
    """Sequences of `seq_len` tokens from `split`, with next-token targets and neighbours.

    Item i is a dict of tensors:
      tokens          int64 [n]        stream[s*m : s*m+n]
      targets         int64 [n]        stream[s*m+1 : s*m+n+1]
      neighbours      int64 [l, k, r]  (only with retrieval) chunk + continuation tokens
      neighbour_mask  bool  [l, k, r]  True = real token

    `exclude_sample_docs` (default: on for the train split) drops any neighbour whose
    document appears anywhere in the sample (Megatron's rule), on top of the per-window
    exclusion the database already applied; the remaining neighbours move up, so the
    k kept are the best k of the stored K that survive.

    The database's memmaps are opened lazily in the process that reads them, so each
    DataLoader worker opens its own (see `worker_init`).
    """

    def __init__(
        self,
        db: str | Path | RetrievalDB,
        split: str,
        seq_len: int,
        k: int = 2,
        retrieval: bool = True,
        exclude_sample_docs: bool | None = None,
    ):
        if isinstance(db, (str, Path)):
            self.db_path = Path(db)
            self._db: RetrievalDB | None = None
        else:
            self.db_path = Path(db.path)
            self._db = db
        self.split = split
        self.retrieval = retrieval
        self.exclude_sample_docs = (split == "train") if exclude_sample_docs is None else exclude_sample_docs
        database = self.db
        if split not in database.splits:
            raise RetrolmError(
                f"database {self.db_path} has no split {split!r}; it has {sorted(database.splits)}"
            )
        self.m = int(database.chunk_size)
        if seq_len <= 0 or seq_len % self.m:
            raise RetrolmError(
                f"--seq-len {seq_len} must be a positive multiple of the database chunk size {self.m}"
            )
        self.seq_len = seq_len
        self.l = seq_len // self.m
        stored_k = int(database.neighbors[split].shape[1]) if retrieval else k
        if retrieval and not 1 <= k <= stored_k:
            raise RetrolmError(
                f"--k {k} is out of range: the database stores {stored_k} neighbours per chunk"
            )
        self.k = k
        self.usable_tokens = self._usable_tokens(database)
        self.num_sequences = (self.usable_tokens - 1) // seq_len  # +1 token for the last target
        if self.num_sequences < 1:
            raise RetrolmError(
                f"split {split!r} has {self.usable_tokens} usable tokens, too few for one sequence "
                f"of {seq_len}+1; use a smaller --seq-len or a larger corpus"
            )

    # -- database access (lazy, per process) ---------------------------------------------

    @property
    def db(self) -> RetrievalDB:
        if self._db is None:
            self._db = _open_db(self.db_path)
        return self._db

    def reopen(self) -> None:
        """Forget the handles inherited from the parent process; reopen on next access."""
        self._db = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_db"] = None  # memmaps are not shipped to workers, they reopen them
        return state

    def _usable_tokens(self, database: RetrievalDB) -> int:
        total = len(database.streams[self.split])
        if self.split == "train":
            return min(total, int(database.lm_train_tokens))
        return total

    # -- items -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_sequences:
            raise IndexError(index)
        database = self.db
        s = index * self.l  # first query window of the sequence
        start = s * self.m
        window = database.streams[self.split].read(start, start + self.seq_len + 1)  # (n+1,)
        window = torch.as_tensor(np.asarray(window, dtype=np.int64))
        item = {"tokens": window[:-1].clone(), "targets": window[1:].clone()}
        if self.retrieval:
            neighbours, mask = database.chunks.gather(self.neighbour_ids(index))  # (l, k, r) x2
            item["neighbours"] = torch.as_tensor(np.asarray(neighbours), dtype=torch.int64)
            item["neighbour_mask"] = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        return item

    def neighbour_ids(self, index: int) -> np.ndarray:
        """Database chunk ids used as neighbours of sequence `index`: int64 [l, k], -1 = none."""
        s = index * self.l
        ids = np.array(self.db.neighbors[self.split][s : s + self.l], dtype=np.int64)  # (l, K)
        if self.exclude_sample_docs:
            start = s * self.m
            ids = self._drop_sample_docs(ids, start, start + self.seq_len + 1)
        return first_k_valid(ids, self.k)  # (l, k)

    def sample_documents(self, start: int, stop: int) -> np.ndarray:
        """Rows of `{split}/docs.npy` whose tokens overlap stream positions [start, stop)."""
        starts = self.db.streams[self.split].docs[:, 0]
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, stop - 1, side="right")) - 1
        return np.arange(max(first, 0), last + 1, dtype=np.int64)

    def _drop_sample_docs(self, ids: np.ndarray, start: int, stop: int) -> np.ndarray:
        # Database chunks come from train documents only, so only train samples can share one.
        if self.split != "train":
            return ids
        docs = self.sample_documents(start, stop)
        chunk_docs = self.db.chunks.chunk_docs(np.maximum(ids, 0))  # (l, K)
        ids = ids.copy()
        ids[np.isin(chunk_docs, docs) & (ids >= 0)] = -1
        return ids


class ResumableBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of a seeded, endless, resumable sample order.

    The global order is the concatenation of one permutation of [0, num_samples) per
    epoch (permutation e seeded by (seed, e)). Optimizer step t consumes the global batch
    order[start + t*G : start + (t+1)*G], G = `global_batch`. That batch is cut into
    world_size * accum micro-batches of `micro_batch` samples; rank r takes micro-batch
    j*world_size + r for accumulation step j. So the set of samples per optimizer step
    is the same for any world size and any accumulation, and the state is one integer.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
    ):
        if micro_batch < 1 or global_batch % (micro_batch * world_size):
            raise RetrolmError(
                f"batch size {global_batch} must be a multiple of micro-batch {micro_batch} x "
                f"{world_size} processes; change --batch-size or --grad-accum"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.accum = global_batch // (micro_batch * world_size)
        self.seed = seed
        self.shuffle = shuffle
        self.start = start
        self._cached: tuple[int, np.ndarray] | None = None

    def position(self, samples_seen: int) -> dict[str, int]:
        """JSON-safe sampler position after `samples_seen` samples."""
        epoch, index = divmod(samples_seen, self.num_samples)
        return {"samples_seen": samples_seen, "epoch": epoch, "index": index}

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._cached = (epoch, order)
        return self._cached[1]

    def global_batch_at(self, samples_seen: int) -> np.ndarray:
        """The `global_batch` sample indices that follow `samples_seen` consumed samples."""
        out = np.empty(self.global_batch, dtype=np.int64)
        filled = 0
        while filled < self.global_batch:
            epoch, index = divmod(samples_seen + filled, self.num_samples)
            take = min(self.global_batch - filled, self.num_samples - index)
            out[filled : filled + take] = self._order(epoch)[index : index + take]
            filled += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        seen = self.start
        while True:
            batch = self.global_batch_at(seen)
            for j in range(self.accum):
                offset = (j * self.world_size + self.rank) * self.micro_batch
                yield batch[offset : offset + self.micro_batch].tolist()
            seen += self.global_batch


def worker_init(_worker_id: int) -> None:
    """DataLoader hook: each worker reopens the database memmaps itself."""
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reopen"):
        info.dataset.reopen()


def make_loader(
    dataset: RetroDataset, sampler: ResumableBatchSampler, num_workers: int = 0
) -> DataLoader:
    """An endless DataLoader yielding this rank's micro-batches in sampler order.

    It gets its own torch.Generator: a DataLoader otherwise draws its worker base seed
    from the global RNG when iteration starts, which would make a resumed run's dropout
    differ from an uninterrupted one.
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        generator=torch.Generator().manual_seed(sampler.seed),
        num_workers=num_workers,
        worker_init_fn=worker_init if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
