"""The merge method as one value: :class:`MergeMethod` (all parameters, JSON, CLI flags).

Every tool that picks merge coefficients (the trainer's merge, merge_wsm, wsm_weights) builds
one from its flags with :meth:`MergeMethod.add_cli_flags` / :meth:`MergeMethod.from_cli`, and
saves it in the merge provenance with :meth:`MergeMethod.to_json`. Also importable from
:mod:`megatron_wsm.schedule`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable, Mapping
from numbers import Integral

from megatron_wsm.schedule import (
    _FINAL_RATIO_METHODS,
    CONVENTIONS,
    DEFAULT_CONVENTION,
    DEFAULT_EMA_ALPHA,
    DEFAULT_FINAL_RATIO,
    METHODS,
    SAMPLINGS,
    _check_convention,
    _check_k,
    _check_method,
    _check_min_lr_ratio,
    _check_sampling,
    _resolve,
    _resolve_alpha,
    _resolve_custom,
    _resolve_final_ratio,
    load_custom,
)
from megatron_wsm.schedule_positions import _resolve_at


def _floats_or_none(values: object, what: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    return tuple(load_custom(values))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A merge method with all its parameters: one value for every tool and the provenance.

    ``method`` is one of :data:`METHODS`; ``custom`` needs exactly one of ``weights`` (the
    coefficients c_0 … c_k) or ``decay`` (w_1 … w_k), given as numbers, a comma list or a
    file (:func:`load_custom`; stored as floats). ``alpha`` (ema), ``final_ratio``
    (exponential, inverse-sqrt), ``min_lr_ratio``, ``allow_negative``, ``convention`` and
    ``sampling`` as in :func:`merge_coefficients_at`. Invalid combinations raise
    ``ValueError`` at construction, as the functions would.
    """

    method: str = "1-sqrt"
    alpha: float | None = None
    min_lr_ratio: float = 0.0
    final_ratio: float | None = None
    weights: tuple[float, ...] | None = None
    decay: tuple[float, ...] | None = None
    allow_negative: bool = False
    convention: str = DEFAULT_CONVENTION
    sampling: str = "start"

    def __post_init__(self) -> None:
        method = _check_method(self.method)
        _check_convention(self.convention)
        _check_sampling(self.sampling)
        _check_min_lr_ratio(self.min_lr_ratio)
        if self.alpha is not None:
            _resolve_alpha(method, self.alpha)
        if self.final_ratio is not None:
            _resolve_final_ratio(method, self.final_ratio)
        object.__setattr__(self, "weights", _floats_or_none(self.weights, "weights"))
        object.__setattr__(self, "decay", _floats_or_none(self.decay, "decay"))
        if method == "custom":
            # Validates the custom list (sum, signs, k) exactly as the functions do.
            _resolve_custom(None, self.min_lr_ratio, self.weights, self.decay, self.allow_negative)
        elif self.weights is not None or self.decay is not None:
            raise ValueError(
                f"coefficients/decay are only accepted with method 'custom', not {method!r}"
            )

    # -- values ---------------------------------------------------------------------------

    def _kwargs(self) -> dict[str, object]:
        return {
            "min_lr_ratio": self.min_lr_ratio,
            "alpha": self.alpha,
            "final_ratio": self.final_ratio,
            "coefficients": self.weights,
            "decay": self.decay,
            "allow_negative": self.allow_negative,
            "convention": self.convention,
        }

    def _resolve_where(
        self, where: int | Iterable[float] | None
    ) -> tuple[list[float], list[float]]:
        if where is None or isinstance(where, Integral):
            k = None if where is None else _check_k(where)
            if self.sampling == "start" or k is None:
                return _resolve(self.method, k, **self._kwargs())  # type: ignore[arg-type]
            where = list(range(k + 1))  # mean sampling of an even window
        return _resolve_at(self.method, where, sampling=self.sampling, **self._kwargs())

    def coefficients(self, where: int | Iterable[float] | None = None) -> list[float]:
        """Merge coefficients c_0 … c_k: ``where`` is k (checkpoints evenly spaced) or the
        checkpoint positions p_0 < … < p_k; None only for ``custom`` (k from its list)."""
        return self._resolve_where(where)[1]

    def decay_weights(self, where: int | Iterable[float] | None = None) -> list[float]:
        """Decay weights w_1 … w_k the merge emulates; ``where`` as in :meth:`coefficients`."""
        return self._resolve_where(where)[0]

    def resolved(self) -> MergeMethod:
        """The same method with its defaults spelled out (ema alpha, final_ratio)."""
        alpha = _resolve_alpha(self.method, self.alpha) if self.method == "ema" else None
        rho = self.final_ratio
        if self.method in _FINAL_RATIO_METHODS:
            rho = _resolve_final_ratio(self.method, rho)
        return dataclasses.replace(self, alpha=alpha, final_ratio=rho)

    # -- JSON -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict of every field (custom lists as lists of floats)."""
        out: dict[str, object] = dataclasses.asdict(self)
        for key in ("weights", "decay"):
            if out[key] is not None:
                out[key] = list(out[key])  # type: ignore[call-overload]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> MergeMethod:
        """Inverse of :meth:`to_json`; missing keys take their defaults, unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown merge-method keys {unknown}; known: {sorted(names)}")
        return cls(**data)  # type: ignore[arg-type]

    # -- command line ---------------------------------------------------------------------

    @staticmethod
    def add_cli_flags(
        parser: argparse.ArgumentParser | argparse._ArgumentGroup,
        *,
        several: bool = False,
        coefficients_alias: bool = False,
    ) -> None:
        """Add the flags of a merge method: ``--method`` (``several``: one or more, custom
        allowed), ``--alpha``, ``--min-lr-ratio``, ``--final-ratio``, ``--weights`` |
        ``--decay``, ``--allow-negative``, ``--convention``, ``--sampling``.

        ``coefficients_alias`` also accepts the deprecated ``--coefficients`` for
        ``--weights`` (with a warning on stderr). Read them back with :meth:`from_cli`.
        """
        if several:
            parser.add_argument(
                "--method",
                nargs="+",
                choices=METHODS,
                metavar="METHOD",
                help=f"one or more of: {', '.join(METHODS)}. 'custom' needs --weights or --decay.",
            )
        else:
            parser.add_argument(
                "--method",
                choices=[m for m in METHODS if m != "custom"],
                default=None,
                help="decay shape the merge emulates (or use --weights / --decay)",
            )
        parser.add_argument(
            "--convention",
            choices=CONVENTIONS,
            default=DEFAULT_CONVENTION,
            help="wsm (default): w_i = f((i-1)/k), the oldest checkpoint only anchors the "
            "window; megatron-lm: w_i = f(i/(k+1)) as Megatron-LM's weighted_merge.py, every "
            "input weighted (mean = 1/(k+1) each)",
        )
        parser.add_argument(
            "--sampling",
            choices=SAMPLINGS,
            default="start",
            help="weight of interval i for shape methods: f at its start (default; the even "
            "discretisation) or the mean of f over it (conserves each interval's LR area)",
        )
        parser.add_argument(
            "--min-lr-ratio",
            type=float,
            default=0.0,
            metavar="R",
            help="LR floor r for named methods: w = r + (1 - r) * w (default 0)",
        )
        parser.add_argument(
            "--alpha",
            type=float,
            metavar="A",
            help=f"ema weight of the newest checkpoint, in (0, 1] (default {DEFAULT_EMA_ALPHA})",
        )
        parser.add_argument(
            "--final-ratio",
            type=float,
            metavar="RHO",
            help="f(1) of exponential and inverse-sqrt, in (0, 1] (defaults: "
            + ", ".join(f"{m} {v:.4g}" for m, v in DEFAULT_FINAL_RATIO.items())
            + ")",
        )
        custom = parser.add_mutually_exclusive_group()
        names = ["--weights", "--coefficients"] if coefficients_alias else ["--weights"]
        custom.add_argument(
            *names,
            dest="weights",
            metavar="LIST|FILE",
            action=_WeightsAction,
            help="custom merge coefficients c_0..c_k (oldest first): comma list or file (JSON "
            "list or numbers)"
            + ("; --coefficients is a deprecated alias" if coefficients_alias else ""),
        )
        custom.add_argument(
            "--decay",
            metavar="LIST|FILE",
            help="custom decay w_1..w_k: comma list or file (JSON list or numbers)",
        )
        parser.add_argument(
            "--allow-negative",
            action="store_true",
            help="accept custom weights with negative coefficients (a rising decay; extrapolation)",
        )

    @classmethod
    def from_cli(cls, args: argparse.Namespace, method: str | None = None) -> MergeMethod:
        """The method of parsed :meth:`add_cli_flags` flags.

        ``method`` overrides ``args.method`` (a tool showing several methods side by side);
        then ``--alpha`` / ``--final-ratio`` are passed only to the methods they apply to.
        Without ``--method``, ``--weights`` / ``--decay`` mean ``custom``.
        """
        name = method if method is not None else args.method
        custom = args.weights is not None or args.decay is not None
        if name is None or isinstance(name, list):
            name = "custom" if custom else DEFAULT_METHOD
        alpha, rho = args.alpha, args.final_ratio
        if method is not None:
            alpha = alpha if name == "ema" else None
            rho = rho if name in _FINAL_RATIO_METHODS else None
        is_custom = name == "custom"
        return cls(
            method=name,
            alpha=alpha,
            min_lr_ratio=args.min_lr_ratio,
            final_ratio=rho,
            weights=args.weights if is_custom else None,
            decay=args.decay if is_custom else None,
            allow_negative=args.allow_negative,
            convention=args.convention,
            sampling=args.sampling,
        )


#: The method a tool uses when none is given.
DEFAULT_METHOD = "1-sqrt"


class _WeightsAction(argparse.Action):
    """Store ``--weights``; warn once when it was spelled ``--coefficients`` (deprecated)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        if option_string == "--coefficients":
            print(
                f"{parser.prog}: warning: --coefficients is deprecated; use --weights",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)
