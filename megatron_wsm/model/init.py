"""``--layout-independent-init``: initial weights that do not depend on the TP/PP/EP layout."""

from __future__ import annotations

import zlib

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
from megatron.core.transformer import TransformerConfig

from megatron_wsm.checkpoint.keys import is_norm_param_key

#: Output projections: megatron-core draws them with σ/√(2·num_layers) (``scaled_init_method``).
_OUTPUT_PROJECTIONS = ("linear_proj", "linear_fc2")


def _key_seed(seed: int, key: str, row: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode()) * 7919 + row) % (2**63 - 1)


def layout_independent_init(model: torch.nn.Module, config: TransformerConfig, seed: int) -> None:
    """Re-initialise weights so their values do not depend on the TP/PP/EP layout.

    megatron-core draws initial weights per rank, so a PP=2 or EP=2 model starts from other
    numbers than a 1-process model with the same seed. Here every *global* tensor (as
    dist_checkpointing sees it: key, global shape) is drawn row by row along its first global
    dimension from a generator seeded by (seed, key, row), and each rank copies its own slice.
    Distributions follow megatron-core's defaults: N(0, σ) with σ = ``init_method_std``, and
    σ/√(2·num_layers) for the output projections (``linear_proj``, ``linear_fc2``, shared
    experts' included); norm weights stay 1, biases and buffers (the router's expert bias) as
    megatron-core made them (zeros). Costs one global row per local row; meant for tests and
    small models (``--layout-independent-init``).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    std = config.init_method_std
    out_std = std / (2.0 * config.num_layers) ** 0.5
    with torch.no_grad():
        for sh in nested_values(sharded):
            if not isinstance(sh, ShardedTensor) or sh.data is None:
                continue
            if not sh.data.is_floating_point() or not sh.key.endswith("weight"):
                continue
            if is_norm_param_key(sh.key):  # TE's fused `layer_norm_weight` included
                continue
            if sh.flattened_range is not None:
                raise ValueError(f"{sh.key}: flattened shards are not supported here")
            sigma = out_std if any(p in sh.key for p in _OUTPUT_PROJECTIONS) else std
            local_full_shape = (1,) * sh.prepend_axis_num + tuple(sh.data.shape)
            slices = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, local_full_shape))
            rows = []
            for row in range(slices[0].start, slices[0].stop):
                gen = torch.Generator().manual_seed(_key_seed(seed, sh.key, row))
                full_row = torch.randn(tuple(sh.global_shape[1:]), generator=gen)
                rows.append(full_row[slices[1:]])
            local = torch.stack(rows).reshape(sh.data.shape) * sigma
            sh.data.copy_(local.to(sh.data.dtype))
