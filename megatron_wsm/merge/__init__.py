"""WSM merge: the weighted average of a window of checkpoints, shard by shard, streamed.

``merge_checkpoints(inputs, coefficients, output)`` averages checkpoints that share one parallel
layout into ``output`` in that same layout: output shard s = Σ_j c_j · (shard s of input j), with
c_0 belonging to the oldest input. Formats:

- torch_dist (megatron-core ``dist_checkpointing``, what the trainer writes): item-level
  streaming over the DCP storage index, chunk-bounded memory, work split over merge ranks
  (:mod:`megatron_wsm.merge.torch_dist`);
- legacy per-rank ``torch`` files (``mp_rank_XX[_YYY]/model_optim_rng.pt``), file by file
  (:mod:`megatron_wsm.merge.legacy`).

Floating-point model tensors (buffers such as the MoE router's ``expert_bias`` included) are
averaged in fp32; everything else (integer tensors, ``_extra_state``, RNG, scheduler, iteration)
is copied from the newest input; optimizer state is dropped. The output appears atomically (a
temporary sibling directory renamed into place) with ``wsm_manifest.json`` (kind ``merged``) and
``wsm_merge_provenance.json``. Any refusal raises :class:`MergeError` before anything is written.

This file is the public surface only; imports run one way, down this list:

- ``driver.py``: :func:`merge_checkpoints` (checks, plan, stream, publish; the dry run);
- ``output.py``: where the output may go (:func:`check_output_location`, via
  :mod:`megatron_wsm.checkpoint.publish`), the temporary directory, the merged manifest, the
  provenance and publishing;
- ``weights.py``: the inputs' positions and their coefficients (:func:`input_positions`,
  :func:`method_coefficients`, checks against the inputs); the math is
  :mod:`megatron_wsm.coefficients`;
- ``legacy.py``, ``torch_dist/``: the two formats' engines (plan and stream);
- ``inputs.py``: finding, checking and ordering the inputs, the ``--load-dir`` window;
- ``common.py``: :class:`MergeError`, :class:`MergeReport`, the merge ranks' collectives.
"""

from megatron_wsm.merge.common import MergeError, MergeReport
from megatron_wsm.merge.driver import DEFAULT_CHUNK_MB, OUTPUT_DTYPES, merge_checkpoints
from megatron_wsm.merge.inputs import (
    POSITION_UNITS,
    WindowSelection,
    choose_window,
    inspect_input,
    select_window,
)
from megatron_wsm.merge.output import MERGED_OUTPUT, PROVENANCE_NAME, check_output_location
from megatron_wsm.merge.weights import (
    InputPositions,
    describe_coefficients,
    input_positions,
    method_coefficients,
    resolve_coefficients,
)

__all__ = [
    "DEFAULT_CHUNK_MB",
    "MERGED_OUTPUT",
    "OUTPUT_DTYPES",
    "POSITION_UNITS",
    "PROVENANCE_NAME",
    "InputPositions",
    "MergeError",
    "MergeReport",
    "WindowSelection",
    "check_output_location",
    "choose_window",
    "describe_coefficients",
    "input_positions",
    "inspect_input",
    "merge_checkpoints",
    "method_coefficients",
    "resolve_coefficients",
    "select_window",
]
