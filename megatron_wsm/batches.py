"""Micro-batches for one data-parallel rank, addressed by consumed samples.

Follows Megatron-LM's pretraining sampler: a global batch of ``G`` samples starting at
``consumed_samples`` is cut into micro-batches of ``mbs × dp`` consecutive samples, and DP rank
``r`` takes slice ``[r·mbs, (r+1)·mbs)`` of each. So the samples a global batch sees do not depend
on the DP size (DP=2 and DP=1 train on the same data), and resuming from ``consumed_samples``
continues exactly where the run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

#: Keys of a megatron-core GPTDataset sample that the model consumes.
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def micro_batch_indices(
    consumed_samples: int, micro_batch_size: int, dp_size: int, dp_rank: int, num_micro: int
) -> list[list[int]]:
    """Sample indices of each micro-batch of the global batch starting at ``consumed_samples``."""
    out = []
    for m in range(num_micro):
        start = consumed_samples + m * micro_batch_size * dp_size + dp_rank * micro_batch_size
        out.append(list(range(start, start + micro_batch_size)))
    return out


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack dataset samples into a batch of CPU tensors (int64 tokens, float loss mask)."""
    batch: dict[str, torch.Tensor] = {}
    for key in BATCH_KEYS:
        values = [s[key] for s in samples]
        arr = torch.stack(
            [v if torch.is_tensor(v) else torch.from_numpy(np.asarray(v)) for v in values]
        )
        batch[key] = arr.float() if key == "loss_mask" else arr.long()
    return batch


def global_batch_iterator(
    dataset: Sequence[dict[str, Any]],
    consumed_samples: int,
    micro_batch_size: int,
    dp_size: int,
    dp_rank: int,
    num_micro: int,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterator over this rank's micro-batches of one global batch (wraps around the dataset)."""
    n = len(dataset)
    for indices in micro_batch_indices(
        consumed_samples, micro_batch_size, dp_size, dp_rank, num_micro
    ):
        batch = collate([dataset[i % n] for i in indices])
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
