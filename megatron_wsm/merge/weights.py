"""The weights of one merge: where its inputs sit, their coefficients, and the checks on them.

The glue between a window of checkpoints and :mod:`megatron_wsm.coefficients` (which owns the
merge math and is not repeated here): read the inputs' positions in merge order
(:func:`input_positions`), turn a :class:`~megatron_wsm.coefficients.MergeMethod` into
c_0…c_k for them (:func:`method_coefficients`, :func:`resolve_coefficients`), say what those
coefficients mean (:func:`describe_coefficients`) and check the given ones against the inputs
(:func:`check_coefficients`). The merge tool and the trainer's merged readout both come here,
so they pick the same weights.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from megatron_wsm.merge.common import Comm, MergeError
from megatron_wsm.merge.inputs import checkpoint_positions, inspect_input, order_inputs

if TYPE_CHECKING:
    from megatron_wsm.coefficients import MergeMethod

# megatron_wsm.coefficients is imported inside the functions: the merge engine needs only
# numbers, and importing the merge package stays as light as it was.


def resolve_coefficients(
    method: MergeMethod | str | None,
    k: int,
    *,
    positions: Sequence[float] | None = None,
    **method_fields: Any,
) -> list[float]:
    """Merge coefficients c_0…c_k (oldest first) of a
    :class:`~megatron_wsm.coefficients.MergeMethod` for k+1 checkpoints; ValueError (from
    :mod:`megatron_wsm.coefficients`) when invalid.

    ``positions`` p_0 < … < p_k (iterations or tokens, oldest first) evaluate a shape method's
    decay at the checkpoints' real places; evenly spaced positions, or none, give exactly the
    index-based coefficients. Custom ``weights`` / ``decay`` are taken as given whatever the
    positions. A method name (or None with ``weights=``) plus the method's fields as keywords
    (``method_fields``: ``min_lr_ratio=``, ``sampling=``, ``weights=``…) is still accepted and
    turned into a :class:`MergeMethod`.
    """
    from megatron_wsm.coefficients import MergeMethod

    if not isinstance(method, MergeMethod):
        method = MergeMethod(method or "custom", **method_fields)
    elif method_fields:
        raise TypeError(f"resolve_coefficients: {sorted(method_fields)} given beside a MergeMethod")
    if positions is not None and len(positions) != k + 1:
        raise ValueError(f"{len(positions)} positions given for {k + 1} checkpoints")
    if method.method == "custom":
        if method.weights is not None and len(method.weights) != k + 1:
            raise ValueError(f"{len(method.weights)} weights given for {k + 1} checkpoints")
        return method.coefficients(k)
    return method.coefficients(list(positions) if positions is not None else k)


def method_coefficients(
    method: MergeMethod, positions: Sequence[float], positions_from: str = "iteration"
) -> list[float]:
    """c_0…c_k of ``method`` for checkpoints at ``positions`` (oldest first), as the merge tool
    and the trainer's merged readout use them; ValueError when they cannot be derived.

    The ``megatron-lm`` convention weights checkpoints by index, so it refuses unevenly
    spaced ones (``positions_from`` names the unit in the message).
    """
    from megatron_wsm.coefficients import is_evenly_spaced

    if (
        method.method != "custom"
        and method.convention == "megatron-lm"
        and not is_evenly_spaced(positions)
    ):
        raise ValueError(
            f"--convention megatron-lm weights checkpoints by index, but they are unevenly "
            f"spaced ({positions_from} {', '.join(map(str, positions))}); use --convention "
            "wsm, or --positions-from index to treat them as evenly spaced"
        )
    return resolve_coefficients(method, len(positions) - 1, positions=positions)


def describe_coefficients(
    coefficients: Sequence[float],
    *,
    method: str | None,
    positions: Sequence[float],
    unit: str,
    convention: str = "wsm",
    sampling: str = "start",
) -> dict[str, Any]:
    """What the coefficients mean, for the report and the provenance: positions and their
    ``unit``, convention, sampling, discretisation formula, zero-weight inputs and why
    (:func:`megatron_wsm.coefficients.describe_convention`), and the coefficients themselves."""
    from megatron_wsm.coefficients import describe_convention

    info = describe_convention(
        coefficients, method=method, convention=convention, positions=positions,
        sampling=sampling,
    )
    return {"position_unit": unit, **info, "coefficients": list(coefficients)}


def check_coefficients(
    coefficients: Sequence[float], n_inputs: int, allow_negative: bool
) -> list[float]:
    """The coefficients a merge of ``n_inputs`` checkpoints will use, as floats; MergeError when
    there are fewer than 2 inputs, the counts differ, or
    :func:`megatron_wsm.coefficients.validate_coefficients` refuses them (sum, signs)."""
    from megatron_wsm.coefficients import validate_coefficients

    if n_inputs < 2:
        raise MergeError(f"a merge needs at least 2 checkpoints, got {n_inputs}")
    if len(coefficients) != n_inputs:
        raise MergeError(f"{len(coefficients)} coefficients for {n_inputs} checkpoints")
    try:
        return validate_coefficients(list(coefficients), allow_negative=allow_negative)
    except ValueError as e:
        raise MergeError(f"invalid merge coefficients: {e}") from e


@dataclasses.dataclass
class InputPositions:
    """Merge inputs in merge order (oldest first) and where each sits (:func:`input_positions`)."""

    paths: list[str]
    positions: list[int]
    #: ``iteration``, ``tokens`` or ``index`` (also after a fallback to the index).
    unit: str
    notes: list[str]


def input_positions(
    inputs: Sequence[str | os.PathLike],
    *,
    positions_from: str = "iteration",
    allow_no_manifest: bool = False,
    group: Any = None,
) -> InputPositions:
    """Order ``inputs`` as the merge will (oldest first) and read their positions.

    Collective over ``group`` like :func:`~megatron_wsm.merge.merge_checkpoints` (rank 0 reads
    the manifests and shares the answer). ``positions_from`` is one of
    :data:`~megatron_wsm.merge.inputs.POSITION_UNITS`; when an input lacks that number (no
    manifest, iteration unknown) the index is used and a note says so. Pass ``paths`` to
    :func:`~megatron_wsm.merge.merge_checkpoints` so the coefficients match its order.
    """
    def read() -> InputPositions:
        checked = [inspect_input(p, allow_no_manifest=allow_no_manifest) for p in inputs]
        ordered, notes = order_inputs(checked)
        positions, unit, more = checkpoint_positions(ordered, positions_from)
        return InputPositions([str(inp.path) for inp in ordered], positions, unit, notes + more)

    return Comm(group).run_on_rank0(read)
