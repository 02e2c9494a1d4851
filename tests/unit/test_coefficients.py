"""Tests of megatron_wsm.coefficients: decay shapes <-> merge coefficients (Theorem 3.1)."""

from __future__ import annotations

import itertools
import json
import math
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_wsm import coefficients
from megatron_wsm.coefficients import (
    DEFAULT_EMA_ALPHA,
    DEFAULT_FINAL_RATIO,
    DIRECT_METHODS,
    METHODS,
    SHAPE_METHODS,
    coefficients_from_decay,
    decay_from_coefficients,
    decay_shape,
    decay_weights,
    load_custom,
    merge_coefficients,
    validate_coefficients,
)

NAMED = tuple(m for m in METHODS if m != "custom")
KS = (1, 2, 3, 8, 16)
PROPS = settings(max_examples=150, deadline=None)


# --------------------------------------------------------------------------- exactness


def _sgd_runs(
    w: list[float], *, interval: int, dim: int, seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Plain SGD (no momentum) on a fixed gradient sequence, in float64.

    Run A: constant LR, θ saved at the start and after every interval (k+1 checkpoints).
    Run B: same gradients, the LR of interval i scaled by w_i; returns its final θ.
    """
    rng = np.random.default_rng(seed)
    k = len(w)
    lr = 0.05
    theta0 = rng.standard_normal(dim)
    grads = rng.standard_normal((k * interval, dim))

    theta = theta0.copy()
    checkpoints = [theta.copy()]
    for i in range(k):
        for s in range(interval):
            theta = theta - lr * grads[i * interval + s]
        checkpoints.append(theta.copy())

    theta_b = theta0.copy()
    for i in range(k):
        for s in range(interval):
            theta_b = theta_b - (lr * w[i]) * grads[i * interval + s]
    return checkpoints, theta_b


def _merge(checkpoints: list[np.ndarray], c: list[float]) -> np.ndarray:
    assert len(checkpoints) == len(c)
    out = np.zeros_like(checkpoints[0])
    for cj, theta in zip(c, checkpoints, strict=True):
        out += cj * theta
    return out


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("method", NAMED)
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.3])
def test_merge_equals_decayed_sgd_run(method: str, k: int, min_lr_ratio: float) -> None:
    w = decay_weights(method, k, min_lr_ratio=min_lr_ratio)
    c = merge_coefficients(method, k, min_lr_ratio=min_lr_ratio)
    assert len(w) == k and len(c) == k + 1
    checkpoints, theta_b = _sgd_runs(w, interval=3, dim=64, seed=k)
    merged = _merge(checkpoints, c)
    np.testing.assert_allclose(merged, theta_b, rtol=0, atol=1e-12)
    # The decay reported next to the coefficients is the one the merge emulates.
    np.testing.assert_allclose(decay_from_coefficients(c), w, rtol=0, atol=1e-14)


@pytest.mark.parametrize("k", KS)
def test_merge_equals_decayed_sgd_run_custom_decay(k: int) -> None:
    rng = np.random.default_rng(100 + k)
    w = sorted(rng.uniform(0, 1, size=k).tolist(), reverse=True)
    c = merge_coefficients("custom", k, decay=w)
    checkpoints, theta_b = _sgd_runs(w, interval=2, dim=32, seed=7)
    np.testing.assert_allclose(_merge(checkpoints, c), theta_b, rtol=0, atol=1e-12)


def test_rising_decay_is_still_exact_when_allowed() -> None:
    # Extrapolating merges (negative c) emulate a rising LR just as exactly.
    w = [0.2, 0.9, 0.4, 1.0]
    c = coefficients_from_decay(w, allow_negative=True)
    assert min(c) < 0
    checkpoints, theta_b = _sgd_runs(w, interval=4, dim=16, seed=3)
    np.testing.assert_allclose(_merge(checkpoints, c), theta_b, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- known values


@pytest.mark.parametrize("k", range(1, 33))
def test_linear_decay_is_plain_mean_of_newest_k(k: int) -> None:
    expected = [0.0] + [1.0 / k] * k
    np.testing.assert_allclose(merge_coefficients("linear", k), expected, rtol=0, atol=1e-15)
    assert merge_coefficients("mean", k) == expected
    np.testing.assert_allclose(
        decay_weights("mean", k), decay_weights("linear", k), rtol=0, atol=1e-15
    )


def test_theorem_3_1_by_hand() -> None:
    assert coefficients_from_decay([1.0, 0.5, 0.25]) == [0.0, 0.5, 0.25, 0.25]
    assert coefficients_from_decay([0.75, 0.5]) == [0.25, 0.25, 0.5]
    assert decay_from_coefficients([0.25, 0.25, 0.5]) == [0.75, 0.5]
    assert decay_from_coefficients([0.0, 0.5, 0.25, 0.25]) == [1.0, 0.5, 0.25]


def test_shape_values_k4() -> None:
    assert decay_weights("1-sqrt", 4) == pytest.approx(
        [1.0, 0.5, 1 - math.sqrt(0.5), 1 - math.sqrt(0.75)], abs=1e-15
    )
    assert decay_weights("cosine", 2) == pytest.approx([1.0, 0.5], abs=1e-15)
    assert decay_weights("linear", 4) == [1.0, 0.75, 0.5, 0.25]
    assert decay_weights("wsd-exponential", 2) == pytest.approx([1.0, 2 * 0.5**0.5 - 1])
    assert decay_weights("exponential", 4, final_ratio=0.01) == pytest.approx(
        [0.01 ** (i / 4) for i in range(4)]
    )
    # Default inverse-sqrt (final ratio 1/3) at k = 8 is exactly w_i = 1/sqrt(i).
    assert decay_weights("inverse-sqrt", 8) == pytest.approx(
        [1 / math.sqrt(i) for i in range(1, 9)], abs=1e-15
    )
    assert merge_coefficients("constant", 5) == [0.0] * 5 + [1.0]
    assert decay_weights("constant", 3) == [1.0, 1.0, 1.0]


def test_ema_coefficients() -> None:
    assert merge_coefficients("ema", 3, alpha=0.5) == [0.125, 0.125, 0.25, 0.5]
    a = DEFAULT_EMA_ALPHA
    c = merge_coefficients("ema", 8)
    assert c == pytest.approx([(1 - a) ** 8] + [a * (1 - a) ** (8 - j) for j in range(1, 9)])
    # The EMA recursion started at θ_n gives the same weights.
    ema = np.eye(9)[0]
    for j in range(1, 9):
        ema = (1 - a) * ema + a * np.eye(9)[j]
    np.testing.assert_allclose(c, ema, rtol=0, atol=1e-15)
    # Implied decay: w_i = 1 - (1 - a)^(k - i + 1).
    assert decay_weights("ema", 8) == pytest.approx([1 - (1 - a) ** (9 - i) for i in range(1, 9)])
    assert merge_coefficients("ema", 4, alpha=1.0) == merge_coefficients("constant", 4)


@pytest.mark.parametrize("method", SHAPE_METHODS)
def test_shapes_start_at_one_and_do_not_rise(method: str) -> None:
    assert decay_shape(method, 0.0) == 1.0
    ts = [i / 200 for i in range(201)]
    values = [decay_shape(method, t) for t in ts]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_final_ratio_is_f_of_one() -> None:
    for method in ("exponential", "inverse-sqrt"):
        assert decay_shape(method, 1.0) == pytest.approx(DEFAULT_FINAL_RATIO[method])
        assert decay_shape(method, 1.0, final_ratio=0.25) == pytest.approx(0.25)
    assert decay_shape("wsd-exponential", 1.0) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("method", NAMED)
@pytest.mark.parametrize("r", [0.0, 0.1, 0.5, 1.0])
def test_min_lr_ratio_floor(method: str, r: float) -> None:
    base = decay_weights(method, 8)
    floored = decay_weights(method, 8, min_lr_ratio=r)
    np.testing.assert_allclose(floored, [r + (1 - r) * w for w in base], rtol=0, atol=1e-15)
    if r == 1.0:
        np.testing.assert_allclose(
            merge_coefficients(method, 8, min_lr_ratio=r), [0.0] * 8 + [1.0], atol=1e-15
        )


# Megatron-LM's WSD decay styles, under the names this module uses for them.
_MEGATRON_WSD_STYLES = {
    "linear": "linear",
    "cosine": "cosine",
    "1-sqrt": "minus_sqrt",
    "wsd-exponential": "exponential",
}


@pytest.mark.parametrize("method", sorted(_MEGATRON_WSD_STYLES))
def test_matches_megatron_wsd_scheduler(method: str) -> None:
    """w_i is the LR Megatron's WSD scheduler applies during interval i (one step each)."""
    opsched = pytest.importorskip("megatron.core.optimizer_param_scheduler")

    class _Groups:
        param_groups: ClassVar[list[dict]] = [{}]

    k, stable, max_lr, min_lr = 8, 5, 2.0, 0.5
    sched = opsched.OptimizerParamScheduler(
        _Groups(),
        init_lr=0.0,
        max_lr=max_lr,
        min_lr=min_lr,
        lr_warmup_steps=0,
        lr_decay_steps=stable + k,
        lr_decay_style="WSD",
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=1,
        wd_incr_style="linear",
        wsd_decay_steps=k,
        lr_wsd_decay_style=_MEGATRON_WSD_STYLES[method],
    )
    # The update of interval i (after stable + i - 1 steps) uses the LR computed there.
    sched.step(stable)
    megatron = []
    for _ in range(k):
        megatron.append(_Groups.param_groups[0]["lr"] / max_lr)
        sched.step(1)
    ours = decay_weights(method, k, min_lr_ratio=min_lr / max_lr)
    np.testing.assert_allclose(ours, megatron, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- properties

_unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@PROPS
@given(st.lists(_unit, min_size=1, max_size=40))
def test_nonincreasing_decay_gives_valid_coefficients(ws: list[float]) -> None:
    w = sorted(ws, reverse=True)
    c = coefficients_from_decay(w)
    assert len(c) == len(w) + 1
    assert abs(math.fsum(c) - 1.0) <= 1e-12
    assert all(cj >= 0.0 for cj in c)
    assert validate_coefficients(c) == c
    # w -> c -> w
    np.testing.assert_allclose(decay_from_coefficients(c), w, rtol=0, atol=1e-12)


@PROPS
@given(st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=2, max_size=40))
def test_coefficients_round_trip(raw: list[float]) -> None:
    total = math.fsum(raw)
    if total <= 1e-6:
        raw = [0.0] * (len(raw) - 1) + [1.0]
        total = 1.0
    c = [x / total for x in raw]
    w = decay_from_coefficients(c)
    assert all(-1e-12 <= wi <= 1.0 + 1e-12 for wi in w)
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(w))
    # c -> w -> c
    np.testing.assert_allclose(coefficients_from_decay(w), c, rtol=0, atol=1e-12)


@PROPS
@given(st.lists(_unit, min_size=2, max_size=30))
def test_rising_decay_rejected_unless_allowed(w: list[float]) -> None:
    rises = any(b - a > 1e-9 for a, b in itertools.pairwise(w))
    if rises:
        with pytest.raises(ValueError, match="rises"):
            coefficients_from_decay(w)
    c = coefficients_from_decay(w, allow_negative=True)
    assert abs(math.fsum(c) - 1.0) <= 1e-12
    np.testing.assert_allclose(
        decay_from_coefficients(c, allow_negative=True), w, rtol=0, atol=1e-12
    )


@PROPS
@given(
    method=st.sampled_from(NAMED),
    k=st.integers(min_value=1, max_value=200),
    r=_unit,
    alpha=st.floats(min_value=1e-6, max_value=1.0),
    rho=st.floats(min_value=1e-6, max_value=1.0),
)
def test_named_methods_always_valid(
    method: str, k: int, r: float, alpha: float, rho: float
) -> None:
    kw: dict[str, float] = {"min_lr_ratio": r}
    if method == "ema":
        kw["alpha"] = alpha
    if method in ("exponential", "inverse-sqrt"):
        kw["final_ratio"] = rho
    c = merge_coefficients(method, k, **kw)
    assert len(c) == k + 1
    assert validate_coefficients(c, tol=1e-12) == c
    w = decay_weights(method, k, **kw)
    assert all(0.0 <= wi <= 1.0 for wi in w)
    assert all(a >= b for a, b in itertools.pairwise(w))
    if method not in DIRECT_METHODS:
        assert w[0] == 1.0 and c[0] == 0.0  # default discretisation: w_1 = f(0) = 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: merge_coefficients("bogus", 4), "unknown method 'bogus'"),
        (lambda: decay_weights("Linear", 4), "unknown method"),
        (lambda: merge_coefficients("linear", 0), "k .* must be >= 1"),
        (lambda: merge_coefficients("linear", -3), "k .* must be >= 1"),
        (lambda: merge_coefficients("linear", 2.5), "must be an integer"),
        (lambda: merge_coefficients("linear", True), "must be an integer"),
        (lambda: merge_coefficients("linear", None), "must be an integer"),
        (lambda: merge_coefficients("ema", 4, alpha=0.0), r"alpha must be in \(0, 1\]"),
        (lambda: merge_coefficients("ema", 4, alpha=-0.1), r"alpha must be in \(0, 1\]"),
        (lambda: merge_coefficients("ema", 4, alpha=1.5), r"alpha must be in \(0, 1\]"),
        (lambda: merge_coefficients("ema", 4, alpha=math.nan), "alpha must be finite"),
        (lambda: merge_coefficients("mean", 4, alpha=0.5), "alpha only applies to ema"),
        (lambda: merge_coefficients("exponential", 4, final_ratio=0.0), "final_ratio must be"),
        (lambda: merge_coefficients("inverse-sqrt", 4, final_ratio=2.0), "final_ratio must be"),
        (lambda: merge_coefficients("cosine", 4, final_ratio=0.5), "final_ratio only applies"),
        (lambda: merge_coefficients("linear", 4, min_lr_ratio=-0.1), "min_lr_ratio must be in"),
        (lambda: merge_coefficients("linear", 4, min_lr_ratio=1.5), "min_lr_ratio must be in"),
        (lambda: merge_coefficients("linear", 4, min_lr_ratio=math.nan), "must be finite"),
        (lambda: coefficients_from_decay([1.2, 0.5]), r"w_1 = 1.2 is outside \[0, 1\]"),
        (lambda: coefficients_from_decay([1.0, -0.1]), r"w_2 = -0.1 is outside \[0, 1\]"),
        (lambda: coefficients_from_decay([0.5, 0.8]), "rises from w_1 = 0.5 to w_2 = 0.8"),
        (lambda: coefficients_from_decay([1.0, math.nan]), "NaN"),
        (lambda: coefficients_from_decay([1.0, math.inf]), "infinite"),
        (lambda: coefficients_from_decay([]), "empty"),
        (lambda: coefficients_from_decay("1,0.5"), "got a string"),
        (lambda: coefficients_from_decay([1.0, "x"]), "not a real number"),
        (lambda: validate_coefficients([0.5, 0.4]), "must sum to 1 .* got 0.9"),
        (lambda: validate_coefficients([1.0, 1.0]), "must sum to 1"),
        (lambda: validate_coefficients([-0.1, 0.6, 0.5]), "c_0 = -0.1 is negative"),
        (lambda: validate_coefficients([0.5, math.nan, 0.5]), "NaN"),
        (lambda: validate_coefficients([1.0]), "at least 2 coefficients"),
        (lambda: decay_from_coefficients([0.3, 0.3]), "must sum to 1"),
        (lambda: decay_from_coefficients([0.5, -0.5, 1.0]), "c_1 = -0.5 is negative"),
        (lambda: merge_coefficients("custom", None), "exactly one of"),
        (
            lambda: merge_coefficients("custom", None, coefficients=[0, 1], decay=[1]),
            "exactly one of",
        ),
        (lambda: merge_coefficients("custom", 3, decay=[1.0, 0.5]), "k = 3 does not match"),
        (lambda: merge_coefficients("linear", 2, decay=[1.0, 0.5]), "only accepted with"),
        (
            lambda: merge_coefficients("custom", None, decay=[1.0], min_lr_ratio=0.1),
            "min_lr_ratio does not apply",
        ),
        (lambda: merge_coefficients("custom", None, coefficients=[0.6, 0.6]), "sum to 1"),
        (lambda: merge_coefficients("custom", None, decay=[0.2, 0.5]), "rises"),
        (lambda: decay_shape("mean", 0.5), "defined by its coefficients"),
        (lambda: decay_shape("linear", 1.5), r"t must be in \[0, 1\]"),
    ],
)
def test_validation_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_negative_coefficients_allowed_explicitly() -> None:
    c = [-0.5, 0.5, 1.0]
    assert validate_coefficients(c, allow_negative=True) == c
    assert decay_from_coefficients(c, allow_negative=True) == [1.5, 1.0]
    assert merge_coefficients("custom", 2, coefficients=c, allow_negative=True) == c


def test_tolerance_is_respected() -> None:
    validate_coefficients([0.5, 0.5 + 5e-10])
    with pytest.raises(ValueError):
        validate_coefficients([0.5, 0.5 + 5e-10], tol=1e-12)


# --------------------------------------------------------------------------- custom input


def test_load_custom_forms(tmp_path) -> None:
    assert load_custom("0, 0.25,0.25 ,0.5") == [0.0, 0.25, 0.25, 0.5]
    assert load_custom([1, 0.5]) == [1.0, 0.5]
    assert load_custom(np.array([1.0, 0.5])) == [1.0, 0.5]

    js = tmp_path / "c.json"
    js.write_text(json.dumps([0.0, 0.5, 0.5]))
    assert load_custom(str(js)) == [0.0, 0.5, 0.5]
    assert load_custom(js) == [0.0, 0.5, 0.5]

    txt = tmp_path / "w.txt"
    txt.write_text("# decay, one per line\n1.0\n0.5  # middle\n\n0.25\n")
    assert load_custom(txt) == [1.0, 0.5, 0.25]

    csv = tmp_path / "w.csv"
    csv.write_text("1.0, 0.75,\n0.5\n")
    assert load_custom(str(csv)) == [1.0, 0.75, 0.5]

    assert merge_coefficients("custom", None, decay=str(txt)) == [0.0, 0.5, 0.25, 0.25]
    assert decay_weights("custom", 2, coefficients=str(js)) == [1.0, 0.5]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no numbers"),
        ("# nothing\n", "no numbers"),
        ("1.0\nabc\n", "not a number: 'abc'"),
        ("[1.0, 0.5", "not valid JSON"),
        ('["a"]', "not a real number"),
        ("[[1.0]]", "not a real number"),
        ("[]", "empty"),
        ("[1.0, NaN]", "NaN"),
        ("1.0\nnan\n", "NaN"),
    ],
)
def test_load_custom_bad_files(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_custom(path)


def test_load_custom_bad_strings(tmp_path) -> None:
    with pytest.raises(ValueError, match="neither an existing file"):
        load_custom(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="neither an existing file"):
        load_custom("0.5,abc")
    with pytest.raises(ValueError, match="empty"):
        load_custom("  ")
    with pytest.raises(ValueError, match="cannot read"):
        load_custom(tmp_path / "missing.txt")


def test_methods_tuple() -> None:
    required = {
        "linear",
        "cosine",
        "1-sqrt",
        "inverse-sqrt",
        "exponential",
        "wsd-exponential",
        "mean",
        "ema",
        "constant",
        "custom",
    }
    assert set(METHODS) == required
    assert len(METHODS) == len(set(METHODS))
    assert set(coefficients.FORMULAS) == required
    assert set(SHAPE_METHODS) | set(DIRECT_METHODS) | {"custom"} == required
