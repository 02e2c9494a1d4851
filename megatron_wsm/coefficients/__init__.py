"""Merge coefficients from decay shapes: the WSM math (Theorem 3.1), one public surface.

Merging checkpoints θ_n … θ_{n+k} with coefficients c_j emulates the learning-rate decay
w_i = Σ_{j≥i} c_j; this package turns a decay (a named shape and its parameters, or custom
weights) into those coefficients and back. Pure Python on floats, no torch. The math and
its conventions: docs/schedule.md. Import every name from here; the modules depend one way:

- :mod:`.shapes`    method names and constants, the shapes f(t), the two maps between decay
  weights and coefficients, input checks (imports none of the others)
- :mod:`.positions` checkpoints at uneven positions, what a convention means (uses shapes)
- :mod:`.method`    :class:`MergeMethod` (method + parameters -> coefficients, JSON, CLI
  flags), the keyword functions ``merge_coefficients`` & co., ``load_custom`` (uses both)

(The learning-rate schedule of the trainer is :mod:`megatron_wsm.lr`.)
"""

from megatron_wsm.coefficients.method import (
    DEFAULT_METHOD,
    MergeMethod,
    decay_weights,
    decay_weights_at,
    load_custom,
    merge_coefficients,
    merge_coefficients_at,
)
from megatron_wsm.coefficients.positions import (
    EVEN_SPACING_RTOL,
    describe_convention,
    discretisation,
    is_evenly_spaced,
    window_fractions,
)
from megatron_wsm.coefficients.shapes import (
    CONVENTIONS,
    DEFAULT_CONVENTION,
    DEFAULT_EMA_ALPHA,
    DEFAULT_FINAL_RATIO,
    DEFAULT_TOL,
    DIRECT_METHODS,
    FINAL_RATIO_METHODS,
    FORMULAS,
    MAIN_METHODS,
    METHODS,
    SAMPLINGS,
    SHAPE_METHODS,
    coefficients_from_decay,
    decay_from_coefficients,
    decay_shape,
    shape_antiderivative,
    shape_function,
    validate_coefficients,
)

__all__ = [
    "CONVENTIONS",
    "DEFAULT_CONVENTION",
    "DEFAULT_EMA_ALPHA",
    "DEFAULT_FINAL_RATIO",
    "DEFAULT_METHOD",
    "DEFAULT_TOL",
    "DIRECT_METHODS",
    "EVEN_SPACING_RTOL",
    "FINAL_RATIO_METHODS",
    "FORMULAS",
    "MAIN_METHODS",
    "METHODS",
    "SAMPLINGS",
    "SHAPE_METHODS",
    "MergeMethod",
    "coefficients_from_decay",
    "decay_from_coefficients",
    "decay_shape",
    "decay_weights",
    "decay_weights_at",
    "describe_convention",
    "discretisation",
    "is_evenly_spaced",
    "load_custom",
    "merge_coefficients",
    "merge_coefficients_at",
    "shape_antiderivative",
    "shape_function",
    "validate_coefficients",
    "window_fractions",
]
