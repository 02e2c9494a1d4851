"""MergeMethod: the same numbers as the keyword functions, JSON and CLI round trips, and one
definition of each decay shape (schedule's shapes == the trainer's Megatron WSD decay)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest

from megatron_wsm import coefficients
from megatron_wsm.coefficients import METHODS, MergeMethod

# Every method with non-default parameters where it has any, on both conventions.
CASES = [
    MergeMethod("linear", min_lr_ratio=0.1),
    MergeMethod("cosine"),
    MergeMethod("1-sqrt", convention="megatron-lm"),
    MergeMethod("inverse-sqrt", final_ratio=0.5),
    MergeMethod("exponential", final_ratio=0.2, min_lr_ratio=0.05),
    MergeMethod("wsd-exponential"),
    MergeMethod("mean", convention="megatron-lm"),
    MergeMethod("ema", alpha=0.3),
    MergeMethod("constant"),
    MergeMethod("1-sqrt", sampling="mean"),
    MergeMethod("custom", weights=[0.1, 0.2, 0.3, 0.4]),
    MergeMethod("custom", decay=[1.0, 0.5, 0.25]),
    MergeMethod("custom", weights=[0.2, -0.1, 0.4, 0.5], allow_negative=True),
]


def test_cases_cover_every_method() -> None:
    assert {m.method for m in CASES} == set(METHODS)


def old_kwargs(m: MergeMethod) -> dict:
    return dict(
        min_lr_ratio=m.min_lr_ratio,
        alpha=m.alpha,
        final_ratio=m.final_ratio,
        coefficients=m.weights,
        decay=m.decay,
        allow_negative=m.allow_negative,
        convention=m.convention,
    )


@pytest.mark.parametrize("m", CASES, ids=lambda m: f"{m.method}-{m.convention}-{m.sampling}")
def test_coefficients_identical_to_the_keyword_functions(m: MergeMethod) -> None:
    k = 3
    kw = old_kwargs(m)
    if m.sampling == "start":
        assert m.coefficients(k) == coefficients.merge_coefficients(m.method, k, **kw)
        assert m.decay_weights(k) == coefficients.decay_weights(m.method, k, **kw)
    even = list(range(k + 1))
    assert m.coefficients(even) == coefficients.merge_coefficients_at(
        m.method, even, sampling=m.sampling, **kw
    )
    assert m.decay_weights(even) == coefficients.decay_weights_at(
        m.method, even, sampling=m.sampling, **kw
    )
    if m.convention == "wsm":  # megatron-lm is index-only: uneven positions are refused
        uneven = [0, 10, 30, 70]
        assert m.coefficients(uneven) == coefficients.merge_coefficients_at(
            m.method, uneven, sampling=m.sampling, **kw
        )


@pytest.mark.parametrize("m", CASES, ids=lambda m: m.method)
def test_json_round_trip(m: MergeMethod) -> None:
    text = json.dumps(m.to_json())
    back = MergeMethod.from_json(json.loads(text))
    assert back == m
    assert back.coefficients(3) == m.coefficients(3)


def test_from_json_refuses_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown merge-method keys"):
        MergeMethod.from_json({"method": "mean", "coefficients": [1.0]})
    with pytest.raises(ValueError, match="alpha only applies to ema"):
        MergeMethod.from_json({"method": "mean", "alpha": 0.3})
    with pytest.raises(ValueError, match="only accepted with method 'custom'"):
        MergeMethod("linear", weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="must sum to 1"):
        MergeMethod("custom", weights=[0.5, 0.6])


def test_keyword_functions_take_exactly_the_fields() -> None:
    """The functions' keywords are MergeMethod's fields (``coefficients`` for ``weights``):
    a keyword that is not a field is a TypeError, as a misspelt keyword always was."""
    fields = {f.name for f in dataclasses.fields(MergeMethod)} - {"method", "weights"}
    for name in fields | {"coefficients"}:
        value = MergeMethod().__dict__.get(name)  # the default: accepted by every method
        coefficients.merge_coefficients("1-sqrt", 2, **{name: value})
    for fn in (coefficients.merge_coefficients, coefficients.decay_weights):
        with pytest.raises(TypeError, match="min_lr"):
            fn("linear", 3, min_lr=0.1)
    for fn in (coefficients.merge_coefficients_at, coefficients.decay_weights_at):
        with pytest.raises(TypeError, match="weights"):
            fn("custom", [0, 1, 2], coefficients=[0, 0.5, 0.5], weights=[0, 0.5, 0.5])


def test_k_is_never_taken_for_positions() -> None:
    """A k that is not an integer is refused as k, not read as a list of positions."""
    for bad in (3.0, True, 0):
        with pytest.raises(ValueError, match="k \\(number of merged intervals\\)"):
            coefficients.merge_coefficients("linear", bad)
    # ``sampling="mean"`` of k is the mean over an even window, as MergeMethod computes it.
    assert coefficients.decay_weights(
        "linear", 4, sampling="mean"
    ) == coefficients.decay_weights_at("linear", [0, 1, 2, 3, 4], sampling="mean")


def flags_of(m: MergeMethod) -> list[str]:
    argv = ["--method", m.method] if m.method != "custom" else []
    if m.alpha is not None:
        argv += ["--alpha", repr(m.alpha)]
    if m.final_ratio is not None:
        argv += ["--final-ratio", repr(m.final_ratio)]
    if m.weights is not None:
        argv.append("--weights=" + ",".join(map(repr, m.weights)))
    if m.decay is not None:
        argv.append("--decay=" + ",".join(map(repr, m.decay)))
    if m.allow_negative:
        argv.append("--allow-negative")
    argv += ["--min-lr-ratio", repr(m.min_lr_ratio), "--convention", m.convention]
    return argv + ["--sampling", m.sampling]


@pytest.mark.parametrize("m", CASES, ids=lambda m: m.method)
def test_cli_flags_round_trip(m: MergeMethod) -> None:
    parser = argparse.ArgumentParser()
    MergeMethod.add_cli_flags(parser)
    assert MergeMethod.from_cli(parser.parse_args(flags_of(m))) == m


def test_several_methods_and_deprecated_alias(capsys) -> None:
    parser = argparse.ArgumentParser(prog="tool")
    MergeMethod.add_cli_flags(parser, several=True, coefficients_alias=True)
    args = parser.parse_args(["--method", "ema", "linear", "--alpha", "0.4"])
    # --alpha goes to the method it applies to only.
    assert MergeMethod.from_cli(args, method="ema").alpha == 0.4
    assert MergeMethod.from_cli(args, method="linear").alpha is None
    args = parser.parse_args(["--coefficients", "0,0.5,0.5"])
    assert "--coefficients is deprecated" in capsys.readouterr().err
    assert MergeMethod.from_cli(args, method="custom").weights == (0.0, 0.5, 0.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--weights", "0,1", "--decay", "1"])


def test_resolved_spells_out_defaults() -> None:
    assert MergeMethod("ema").resolved().alpha == coefficients.DEFAULT_EMA_ALPHA
    rho = coefficients.DEFAULT_FINAL_RATIO["exponential"]
    r = MergeMethod("exponential").resolved()
    assert r.final_ratio == rho and r.coefficients(5) == MergeMethod("exponential").coefficients(5)
    assert dataclasses.replace(r, final_ratio=None) == MergeMethod("exponential")


@pytest.mark.parametrize(
    ("trainer", "shape"),
    [
        ("linear", "linear"),
        ("cosine", "cosine"),
        ("exponential", "wsd-exponential"),
        ("minus_sqrt", "1-sqrt"),
    ],
)
def test_megatron_wsd_decay_is_schedules_shape(trainer: str, shape: str) -> None:
    """lr.py drives megatron-core's scheduler; its WSD decay must be schedule's f, exactly."""
    from megatron_wsm.config import OptimizerSettings
    from megatron_wsm.lr import lr_curve

    decay, peak = 40, 1e-3
    opt = OptimizerSettings(
        lr=peak,
        min_lr=0.0,
        lr_warmup_iters=0,
        lr_decay_style="WSD",
        lr_wsd_decay_style=trainer,
        lr_wsd_decay_iters=decay,
    )
    lrs = np.array(lr_curve(opt, 100, 1))
    # Iteration i uses the LR after i - 1 samples; decay starts after 100 - decay of them.
    t = np.clip((np.arange(100) - (100 - decay)) / decay, 0.0, 1.0)
    f = coefficients.shape_function(shape)
    np.testing.assert_allclose(lrs, peak * np.array([f(x) for x in t]), rtol=1e-12, atol=1e-18)
