"""The training read-ahead returns exactly the synchronous reader's batches, whatever the order
of requests, and a failed read-ahead surfaces only when its batch is asked for."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from megatron_wsm.batches import GlobalBatchPrefetcher, global_batch_iterator

SEQ = 6


class Samples:
    """A GPTDataset stand-in: sample i is deterministic in i; records which thread read what."""

    def __init__(self, n: int = 50, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.readers: set[str] = set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        self.readers.add(threading.current_thread().name)
        if i == self.fail_at:
            raise OSError(f"sample {i} is unreadable")
        tokens = (np.arange(SEQ) + 7 * i) % 97
        return {
            "tokens": tokens,
            "labels": (tokens + 1) % 97,
            "loss_mask": np.ones(SEQ, dtype=np.float32),
            "position_ids": np.arange(SEQ),
        }


def synchronous(ds, consumed, mbs, dp, rank, nmb):
    return list(global_batch_iterator(ds, consumed, mbs, dp, rank, nmb, torch.device("cpu")))


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("dp,rank", [(1, 0), (2, 1)])
def test_read_ahead_equals_the_synchronous_reader_in_any_order(dp, rank):
    ds = Samples()
    mbs, nmb = 2, 3
    gbs = mbs * dp * nmb
    prefetcher = GlobalBatchPrefetcher(ds, mbs, dp, rank, nmb, stride=gbs)
    try:
        # In order (served from the read-ahead), a rewind, a jump (a resume elsewhere), wrap
        # around the end of the dataset, and a request after a step that asked for no read-ahead.
        positions = [0, gbs, 2 * gbs, gbs, 7 * gbs, 8 * gbs, 44, 44 + gbs, 3]
        for j, consumed in enumerate(positions):
            got = prefetcher.batches(consumed, torch.device("cpu"), read_next=j != 6)
            assert same(got, synchronous(ds, consumed, mbs, dp, rank, nmb)), consumed
            assert got[0]["tokens"].dtype == torch.int64
            assert got[0]["loss_mask"].dtype == torch.float32
    finally:
        prefetcher.close()
    assert any(name.startswith("wsm-batches") for name in ds.readers)  # it did read ahead


def test_a_failed_read_ahead_is_reported_only_when_its_batch_is_asked_for():
    ds = Samples(fail_at=5)
    prefetcher = GlobalBatchPrefetcher(ds, 2, 1, 0, 2, stride=4)
    try:
        prefetcher.batches(0, torch.device("cpu"))  # reads ahead [4, 8): sample 5 fails
        # Asked for another position, the failed read-ahead is dropped, not raised.
        prefetcher.batches(8, torch.device("cpu"), read_next=False)
        prefetcher.batches(0, torch.device("cpu"))  # reads ahead [4, 8) again
        with pytest.raises(OSError, match="sample 5 is unreadable"):
            prefetcher.batches(4, torch.device("cpu"))
    finally:
        prefetcher.close()
