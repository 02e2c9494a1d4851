"""The two discretisation conventions: ``wsm`` (default) and ``megatron-lm``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_wsm.coefficients import (
    CONVENTIONS,
    SHAPE_METHODS,
    decay_from_coefficients,
    decay_shape,
    decay_weights,
    describe_convention,
    discretisation,
    merge_coefficients,
    merge_coefficients_at,
)


def _megatron_lm_reference(shape, n_checkpoints: int) -> list[float]:
    """Megatron-LM ``weighted_merge.py`` (``schedule_to_merge_coefficients``), written out
    from its published description: decay d_i = f(i/n) for i = 0 … n-1, the newest gets
    d_{n-1}, checkpoint i (0 < i < n-1) gets d_i - d_{i+1}, the oldest the remainder."""
    d = [shape(i / n_checkpoints) for i in range(n_checkpoints)]
    c = [0.0] * n_checkpoints
    c[-1] = d[-1]
    for i in range(1, n_checkpoints - 1):
        c[i] = d[i] - d[i + 1]
    c[0] = 1 - sum(c)
    return c


_MEGATRON_STYLES = {
    "linear": ("linear", lambda x: 1 - x),
    "minus-sqrt": ("1-sqrt", lambda x: 1 - math.sqrt(x)),
}


@pytest.mark.parametrize("style", sorted(_MEGATRON_STYLES))
@pytest.mark.parametrize("k", range(2, 17))
def test_reproduces_megatron_lm_weights(style: str, k: int) -> None:
    method, shape = _MEGATRON_STYLES[style]
    ours = merge_coefficients(method, k, convention="megatron-lm")
    ref = _megatron_lm_reference(shape, k + 1)
    assert len(ours) == k + 1
    # The oldest weight is a remainder (1 - sum) there and 1 - w_1 here: equal up to rounding.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)
    assert ours[1:] == ref[1:]  # the others are the same float expressions


def test_four_inputs_worked_example() -> None:
    megatron = merge_coefficients("1-sqrt", 3, convention="megatron-lm")
    assert [round(x, 3) for x in megatron] == [0.5, 0.207, 0.159, 0.134]
    wsm = merge_coefficients("1-sqrt", 3)
    assert [round(x, 3) for x in wsm] == [0.0, 0.577, 0.239, 0.184]
    assert merge_coefficients("mean", 3) == [0.0, 1 / 3, 1 / 3, 1 / 3]
    assert merge_coefficients("mean", 3, convention="megatron-lm") == [0.25] * 4
    assert merge_coefficients("linear", 3, convention="megatron-lm") == [0.25] * 4


@pytest.mark.parametrize("k", range(1, 17))
def test_mean_is_equal_weights_under_megatron_lm(k: int) -> None:
    c = merge_coefficients("mean", k, convention="megatron-lm")
    assert c == [1.0 / (k + 1)] * (k + 1)
    np.testing.assert_allclose(
        merge_coefficients("linear", k, convention="megatron-lm"), c, rtol=0, atol=1e-15
    )
    np.testing.assert_allclose(
        decay_weights("mean", k, convention="megatron-lm"),
        decay_weights("linear", k, convention="megatron-lm"),
        rtol=0,
        atol=1e-15,
    )


@pytest.mark.parametrize("method", SHAPE_METHODS)
@pytest.mark.parametrize("r", [0.0, 0.25])
def test_megatron_lm_is_wsm_with_one_more_interval(method: str, r: float) -> None:
    """megatron-lm over k+1 inputs = wsm over k+2 inputs with its (zero) anchor dropped."""
    for k in range(1, 17):
        wsm = merge_coefficients(method, k + 1, min_lr_ratio=r)
        assert wsm[0] == 0.0
        ours = merge_coefficients(method, k, min_lr_ratio=r, convention="megatron-lm")
        np.testing.assert_allclose(ours, wsm[1:], rtol=0, atol=1e-15)
        w = decay_weights(method, k, min_lr_ratio=r, convention="megatron-lm")
        expected = [r + (1 - r) * decay_shape(method, i / (k + 1)) for i in range(1, k + 1)]
        np.testing.assert_allclose(w, expected, rtol=0, atol=1e-15)
        np.testing.assert_allclose(decay_from_coefficients(ours), w, rtol=0, atol=1e-14)


def test_ema_and_custom_do_not_depend_on_the_convention() -> None:
    for k in (1, 4, 9):
        assert merge_coefficients("ema", k, alpha=0.3) == merge_coefficients(
            "ema", k, alpha=0.3, convention="megatron-lm"
        )
    assert merge_coefficients("custom", None, decay=[1.0, 0.5], convention="megatron-lm") == [
        0.0,
        0.5,
        0.5,
    ]


def test_even_positions_follow_the_convention() -> None:
    assert merge_coefficients_at(
        "1-sqrt", [100, 200, 300, 400], convention="megatron-lm"
    ) == merge_coefficients("1-sqrt", 3, convention="megatron-lm")


def test_describe_convention_names_zero_weight_inputs() -> None:
    info = describe_convention(merge_coefficients("1-sqrt", 3), method="1-sqrt")
    assert info["convention"] == "wsm"
    assert info["zero_weight_inputs"] == [0]
    assert "anchors" in info["discretisation"]
    assert any("input 0 (the oldest) has weight 0" in n for n in info["notes"])

    info = describe_convention(
        merge_coefficients("1-sqrt", 3, convention="megatron-lm"),
        method="1-sqrt",
        convention="megatron-lm",
    )
    assert info["zero_weight_inputs"] == [] and info["notes"] == []
    assert info["discretisation"] == discretisation("megatron-lm")

    info = describe_convention(merge_coefficients("constant", 3), method="constant")
    assert info["zero_weight_inputs"] == [0, 1, 2]
    assert any("inputs [1, 2] have weight 0" in n for n in info["notes"])

    info = describe_convention(
        merge_coefficients_at("linear", [0, 1, 3, 4]), method="linear", positions=[0, 1, 3, 4]
    )
    assert info["evenly_spaced"] is False and info["positions"] == [0, 1, 3, 4]
    assert "t_(i-1)" in info["discretisation"]

    info = describe_convention([0.2, 0.8], method="custom", convention="megatron-lm")
    assert info["zero_weight_inputs"] == []
    assert any("explicit weights" in n for n in info["notes"])


def test_conventions_tuple_and_errors() -> None:
    assert CONVENTIONS == ("wsm", "megatron-lm")
    with pytest.raises(ValueError, match="unknown convention 'megatron'"):
        merge_coefficients("linear", 3, convention="megatron")
    with pytest.raises(ValueError, match="evenly spaced"):
        discretisation("megatron-lm", uneven=True)
