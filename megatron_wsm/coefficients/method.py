"""The merge method as one value: :class:`MergeMethod` (all parameters, JSON, CLI flags).

A method name and its parameters become merge coefficients here, for k evenly spaced intervals
or for checkpoint positions; the keyword functions :func:`merge_coefficients`,
:func:`decay_weights` and their ``_at`` forms build a :class:`MergeMethod` and ask it, so every
parameter is named once, as a field of the class. Every tool that picks merge coefficients (the
trainer's merge, merge_wsm, wsm_weights) builds one from its flags with
:meth:`MergeMethod.add_cli_flags` / :meth:`MergeMethod.from_cli`, and saves it in the merge
provenance with :meth:`MergeMethod.to_json`. Custom weights are read by :func:`load_custom`.

The top of :mod:`megatron_wsm.coefficients`: it uses :mod:`.shapes` (the math) and
:mod:`.positions` (uneven windows), neither of which imports it. Import the public names from
:mod:`megatron_wsm.coefficients`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping
from numbers import Integral
from pathlib import Path
from typing import Any

from megatron_wsm.coefficients.positions import (
    check_positions,
    is_evenly_spaced,
    uneven_shape_weights,
    window_fractions,
)
from megatron_wsm.coefficients.shapes import (
    CONVENTIONS,
    DEFAULT_CONVENTION,
    DEFAULT_EMA_ALPHA,
    DEFAULT_FINAL_RATIO,
    DIRECT_METHODS,
    FINAL_RATIO_METHODS,
    METHODS,
    SAMPLINGS,
    SHAPE_METHODS,
    apply_floor,
    as_floats,
    check_convention,
    check_k,
    check_method,
    check_min_lr_ratio,
    check_sampling,
    coefficients_from_decay,
    decay_from_coefficients,
    resolve_alpha,
    resolve_final_ratio,
    shape_function,
    validate_coefficients,
)

#: The method a tool uses when none is given.
DEFAULT_METHOD = "1-sqrt"


# --------------------------------------------------------------------------- custom input


def _parse_numbers(text: str, source: str) -> list[float]:
    """Numbers separated by commas, whitespace or newlines; '#' starts a comment."""
    tokens: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        tokens.extend(tok for tok in line.replace(",", " ").split() if tok)
    if not tokens:
        raise ValueError(f"no numbers found in {source}")
    out = []
    for idx, tok in enumerate(tokens):
        try:
            out.append(float(tok))
        except ValueError:
            raise ValueError(f"{source}: item {idx} is not a number: {tok!r}") from None
    return out


def load_custom(path_or_list: Iterable[float] | str | os.PathLike[str]) -> list[float]:
    """Read custom coefficients or decay weights.

    Accepts a sequence of numbers, a string of numbers separated by commas (e.g.
    ``"0,0.25,0.25,0.5"``), or a path to a file holding either a JSON list of numbers or
    plain numbers separated by commas/whitespace, one per line allowed, ``#`` comments
    allowed. Returns floats; raises ``ValueError`` for a missing file, an empty list,
    anything that is not a number, NaN or infinity. Sums and ranges are checked later by
    :func:`validate_coefficients` / :func:`coefficients_from_decay`.
    """
    if isinstance(path_or_list, os.PathLike):
        return _load_file(Path(path_or_list))
    if isinstance(path_or_list, str):
        text = path_or_list.strip()
        if not text:
            raise ValueError("empty custom weights: give a comma list of numbers or a file")
        path = Path(text)
        # A bare number list never names a file, so try the file first only if one exists.
        if path.is_file():
            return _load_file(path)
        try:
            values = _parse_numbers(text, "custom weights")
        except ValueError:
            raise ValueError(
                f"custom weights {text!r} are neither an existing file nor a comma-separated "
                "list of numbers"
            ) from None
        return as_floats(values, "custom weights")
    return as_floats(path_or_list, "custom weights")


def _load_file(path: Path) -> list[float]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read custom weights from {str(path)!r}: {exc}") from None
    source = repr(str(path))
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not valid JSON: {exc}") from None
        # Text starting with "[" that parses is a JSON list; nesting fails in as_floats.
        return as_floats(data, f"custom weights in {source}")
    return as_floats(_parse_numbers(text, source), f"custom weights in {source}")


# --------------------------------------------------------------------------- by index


def _direct_coefficients(method: str, k: int, alpha: float, convention: str) -> list[float]:
    if method == "mean":
        if convention == "megatron-lm":
            # Every input equally: the linear decay of this convention (c_j = 1/(k+1)).
            return [1.0 / (k + 1)] * (k + 1)
        return [0.0] + [1.0 / k] * k
    # ema: the EMA θ̄ ← (1-alpha) θ̄ + alpha θ over θ_{n+1} … θ_{n+k}, started at θ̄ = θ_n.
    keep = 1.0 - alpha
    return [keep**k] + [alpha * keep ** (k - j) for j in range(1, k + 1)]


def _resolve_custom(
    k: object, r: float, coefficients: object, decay: object, allow_negative: bool
) -> tuple[list[float], list[float]]:
    if (coefficients is None) == (decay is None):
        raise ValueError("method 'custom' needs exactly one of coefficients= or decay=")
    if r:
        raise ValueError(
            "min_lr_ratio does not apply to method 'custom'; fold the floor into the weights"
        )
    if coefficients is not None:
        c = validate_coefficients(load_custom(coefficients), allow_negative=allow_negative)
        w = decay_from_coefficients(c, allow_negative=allow_negative)
    else:
        w = load_custom(decay)
        c = coefficients_from_decay(w, allow_negative=allow_negative)
        validate_coefficients(c, allow_negative=allow_negative)
    if k is not None and check_k(k) != len(w):
        what = f"{len(c)} coefficients" if coefficients is not None else f"{len(w)} decay weights"
        raise ValueError(f"k = {k} does not match the custom weights: {what} mean k = {len(w)}")
    return w, c


def _floats_or_none(values: object) -> tuple[float, ...] | None:
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

    method: str = DEFAULT_METHOD
    alpha: float | None = None
    min_lr_ratio: float = 0.0
    final_ratio: float | None = None
    weights: tuple[float, ...] | None = None
    decay: tuple[float, ...] | None = None
    allow_negative: bool = False
    convention: str = DEFAULT_CONVENTION
    sampling: str = "start"

    def __post_init__(self) -> None:
        method = check_method(self.method)
        check_convention(self.convention)
        check_sampling(self.sampling)
        check_min_lr_ratio(self.min_lr_ratio)
        if self.alpha is not None:
            resolve_alpha(method, self.alpha)
        if self.final_ratio is not None:
            resolve_final_ratio(method, self.final_ratio)
        object.__setattr__(self, "weights", _floats_or_none(self.weights))
        object.__setattr__(self, "decay", _floats_or_none(self.decay))
        if method == "custom":
            # Validates the custom list (sum, signs, k) exactly as the functions do.
            _resolve_custom(None, self.min_lr_ratio, self.weights, self.decay, self.allow_negative)
        elif self.weights is not None or self.decay is not None:
            raise ValueError(
                f"coefficients/decay are only accepted with method 'custom', not {method!r}"
            )

    @classmethod
    def of(cls, method: str, *, coefficients: object = None, **params: Any) -> MergeMethod:
        """The method of the keyword functions' arguments: ``coefficients=`` is the field
        ``weights``, every other keyword a field of the same name."""
        return cls(method, weights=coefficients, **params)  # type: ignore[arg-type]

    # -- values ---------------------------------------------------------------------------

    def _by_index(self, k: int | None) -> tuple[list[float], list[float]]:
        """(w, c) for k evenly spaced intervals, each shape sampled at its interval's start."""
        r = check_min_lr_ratio(self.min_lr_ratio)
        if self.method == "custom":
            return _resolve_custom(k, r, self.weights, self.decay, self.allow_negative)
        kk = check_k(k)
        if self.method in DIRECT_METHODS:
            alpha = resolve_alpha(self.method, self.alpha)
            c = _direct_coefficients(self.method, kk, alpha, self.convention)
            if r:
                # Floor in coefficient space: mix in r of the newest checkpoint (w -> r + (1-r) w).
                c = [(1.0 - r) * cj for cj in c]
                c[-1] += r
            c = validate_coefficients(c)
            return decay_from_coefficients(c), c
        f = shape_function(self.method, self.final_ratio)
        # wsm: interval i sampled at its start, (i-1)/k. megatron-lm: i/(k+1), the same float
        # expression as Megatron-LM's ``index / n_checkpoints`` so its weights come out equal.
        if self.convention == "megatron-lm":
            ts = [i / (kk + 1) for i in range(1, kk + 1)]
        else:
            ts = [(i - 1) / kk for i in range(1, kk + 1)]
        # Clamp: cos/pow may land a rounding error outside [0, 1] near the ends.
        w = [apply_floor(min(1.0, max(0.0, f(t))), r) for t in ts]
        return w, coefficients_from_decay(w)

    def _by_position(self, positions: object) -> tuple[list[float], list[float]]:
        """(w, c) for checkpoints at ``positions``: shapes follow them, the rest go by index."""
        pos = check_positions(positions)
        # The index path is the answer for all but shapes on uneven windows (or mean
        # sampling): direct and custom methods weight by index. It also checks k.
        w, c = self._by_index(len(pos) - 1)
        if self.method not in SHAPE_METHODS or (self.sampling == "start" and is_evenly_spaced(pos)):
            return w, c
        if self.convention != "wsm":
            what = "sampling 'mean'" if self.sampling == "mean" else "unevenly spaced checkpoints"
            raise ValueError(
                f"convention {self.convention!r} weights checkpoints by index; {what} need "
                "convention 'wsm'"
            )
        w = uneven_shape_weights(
            self.method,
            window_fractions(pos),
            min_lr_ratio=self.min_lr_ratio,
            final_ratio=self.final_ratio,
            sampling=self.sampling,
        )
        return w, coefficients_from_decay(w)

    def _resolve_where(
        self, where: int | Iterable[float] | None
    ) -> tuple[list[float], list[float]]:
        if where is None or isinstance(where, Integral):
            k = None if where is None else check_k(where)
            if self.sampling == "start" or k is None:
                return self._by_index(k)
            where = list(range(k + 1))  # mean sampling of an even window
        return self._by_position(where)

    def coefficients(self, where: int | Iterable[float] | None = None) -> list[float]:
        """Merge coefficients c_0 … c_k: ``where`` is k (checkpoints evenly spaced) or the
        checkpoint positions p_0 < … < p_k; None only for ``custom`` (k from its list)."""
        return self._resolve_where(where)[1]

    def decay_weights(self, where: int | Iterable[float] | None = None) -> list[float]:
        """Decay weights w_1 … w_k the merge emulates; ``where`` as in :meth:`coefficients`."""
        return self._resolve_where(where)[0]

    def resolved(self) -> MergeMethod:
        """The same method with its defaults spelled out (ema alpha, final_ratio)."""
        alpha = resolve_alpha(self.method, self.alpha) if self.method == "ema" else None
        rho = self.final_ratio
        if self.method in FINAL_RATIO_METHODS:
            rho = resolve_final_ratio(self.method, rho)
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
            rho = rho if name in FINAL_RATIO_METHODS else None
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


# --------------------------------------------------------------------------- keyword functions
# The function forms of MergeMethod; ``params`` are its fields (``coefficients=`` for
# ``weights``), so the parameter list is written once, in the class.


def _index(k: object) -> int | None:
    # A k that is not an integer must not be taken for a list of positions.
    return None if k is None else check_k(k)


def decay_weights(method: str, k: int | None, **params: Any) -> list[float]:
    """Decay weights w_1 … w_k (LR scale of each interval) of a method.

    Shape methods (see :func:`~megatron_wsm.coefficients.decay_shape` for every f):
    w_i = f((i - 1)/k), so w_1 = 1.

    - ``mean``:  the decay implied by c_0 = 0, c_j = 1/k, i.e. w_i = (k - i + 1)/k — the
      same as ``linear``.
    - ``ema``:   the decay implied by the EMA coefficients (see :func:`merge_coefficients`),
      w_i = 1 - (1 - alpha)^{k-i+1}; ``alpha`` in (0, 1], default :data:`DEFAULT_EMA_ALPHA`.
    - ``custom``: ``decay`` as given (validated), or the decay implied by ``coefficients``;
      each may be a sequence, a comma list string or a file (:func:`load_custom`). ``k``
      may be None (taken from the list) or must match it.

    Keyword parameters are the fields of :class:`MergeMethod` (``coefficients=`` for its
    ``weights``): ``min_lr_ratio`` r ∈ [0, 1] floors every named method, w ↦ r + (1 - r)·w;
    ``final_ratio`` rho ∈ (0, 1] (defaults :data:`DEFAULT_FINAL_RATIO`) is f(1) of
    ``exponential`` and ``inverse-sqrt``; ``allow_negative`` accepts a rising custom decay.
    A parameter that does not apply to the method, or any invalid value, raises
    ``ValueError``; an unknown keyword raises ``TypeError``.

    ``convention`` (:data:`CONVENTIONS`): ``"wsm"`` as above; ``"megatron-lm"`` samples
    shapes at w_i = f(i/(k+1)) (w_1 < 1, every checkpoint weighted) and makes ``mean`` the
    plain mean of all k+1 checkpoints (w_i = (k + 1 - i)/(k + 1)). ``ema`` and ``custom``
    are the same under both. ``sampling="mean"`` is :func:`decay_weights_at` of an even
    window.
    """
    return MergeMethod.of(method, **params).decay_weights(_index(k))


def merge_coefficients(method: str, k: int | None, **params: Any) -> list[float]:
    """Merge coefficients c_0 … c_k (oldest checkpoint first) of a method; they sum to 1.

    Shape methods: :func:`~megatron_wsm.coefficients.coefficients_from_decay` of
    :func:`decay_weights`, so c_0 = 0. Direct methods:

    - ``mean``: c_0 = 0, c_j = 1/k (the plain mean of the newest k checkpoints).
    - ``ema`` with alpha: c_j = alpha (1 - alpha)^{k-j} for j ≥ 1, c_0 = (1 - alpha)^k —
      an exponential moving average over θ_{n+1} … θ_{n+k} started from θ_n; alpha = 1 is
      ``constant``.
    - ``constant``: c = (0, …, 0, 1), the newest checkpoint only.
    - ``custom``: ``coefficients`` as given (validated), or Theorem 3.1 of ``decay``.

    Parameters as in :func:`decay_weights`; the floor r maps c ↦ (1 - r)·c + r·e_k.
    With ``convention="megatron-lm"`` shapes use w_i = f(i/(k+1)) and ``mean`` is
    c_j = 1/(k+1): every input weighted, as Megatron-LM's ``weighted_merge.py``.
    """
    return MergeMethod.of(method, **params).coefficients(_index(k))


def decay_weights_at(method: str, positions: Iterable[float], **params: Any) -> list[float]:
    """Decay weights w_1 … w_k for checkpoints at ``positions`` p_0 < … < p_k.

    Positions are iterations or consumed tokens — whatever the LR schedule counts in —
    oldest first; k = len(positions) - 1. For shape methods with t_j = (p_j - p_0)/(p_k -
    p_0) (:func:`~megatron_wsm.coefficients.window_fractions`):

    - ``sampling="start"`` (default): w_i = f(t_{i-1}), the shape at the start of interval
      i. Evenly spaced positions take the index path of :func:`decay_weights`, so the
      result is identical to it bit for bit.
    - ``sampling="mean"``: w_i = mean of f over [t_{i-1}, t_i] (the LR area of interval i
      divided by its length), also for evenly spaced positions.

    ``mean``, ``ema`` and ``custom`` weight checkpoints by index; positions only fix k.
    ``convention="megatron-lm"`` is defined by index too: with uneven positions or
    ``sampling="mean"`` a shape method raises ``ValueError``. Other parameters as in
    :func:`decay_weights`.
    """
    return MergeMethod.of(method, **params)._by_position(positions)[0]


def merge_coefficients_at(method: str, positions: Iterable[float], **params: Any) -> list[float]:
    """Merge coefficients c_0 … c_k for checkpoints at ``positions`` (oldest first).

    Theorem 3.1 of :func:`decay_weights_at` — see there for positions, ``sampling`` and
    which methods follow the positions. Evenly spaced positions with the default
    ``sampling="start"`` give exactly :func:`merge_coefficients` of k = len(positions) - 1.
    """
    return MergeMethod.of(method, **params)._by_position(positions)[1]


class _WeightsAction(argparse.Action):
    """Store ``--weights``; warn once when it was spelled ``--coefficients`` (deprecated)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        if option_string == "--coefficients":
            print(
                f"{parser.prog}: warning: --coefficients is deprecated; use --weights",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)
