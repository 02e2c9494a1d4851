"""Planning: predicted final losses of schedules, searches over decay ratio and merge window,
and :func:`plan`, the whole fit-predict-search pipeline behind ``plan_anneal``.

Schedules are written in a small language (``KIND[:key=value,...]``, :func:`parse_schedule`):
``constant``, ``wsd:ratio=0.2,shape=1-sqrt``, ``cosine``, ``linear`` and
``merge:window=0.2,method=1-sqrt,interval=N`` (a WSM merge of the end of a stable run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_wsm import metric_names as names
from megatron_wsm.annealing.fit import DEFAULT_HUBER_DELTA, evaluate, fit_law
from megatron_wsm.annealing.law import LawParams, final_loss, peak_index, predict_loss
from megatron_wsm.annealing.logs import load_run, unique_names
from megatron_wsm.annealing.lr_curve import WSD_SHAPES, merge_lrs, trainer_lr_curve
from megatron_wsm.annealing.report import curve, curve_steps
from megatron_wsm.annealing.runs import Run
from megatron_wsm.coefficients import MergeMethod

#: Merge methods of :mod:`megatron_wsm.coefficients` that make sense to plan with.
MERGE_METHODS = ("1-sqrt", "linear", "mean", "cosine", "ema", "inverse-sqrt", "exponential")


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """Everything :func:`plan` needs; field names are the ``plan_anneal`` flags' ``dest``.

    ``fit``/``predict`` are run paths (:func:`megatron_wsm.annealing.logs.load_run`),
    ``schedule`` schedule specs (:func:`parse_schedule`). ``None`` for the schedule template
    (``train_iters``, ``lr``, ``min_lr``, ``warmup_iters``) means: from the first fit run.
    """

    fit: Sequence[str]
    predict: Sequence[str] = ()
    schedule: Sequence[str] = ()
    loss: str = "train"
    lam: float | None = None
    huber_delta: float = DEFAULT_HUBER_DELTA
    smooth: int | None = None
    fit_start: int | None = None
    predict_start: int | None = None
    starts: int = 4
    max_points: int = 2000
    train_iters: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    warmup_iters: int | None = None
    budget_tokens: float | None = None
    tokens_per_step: float | None = None
    search_shapes: Sequence[str] = ("1-sqrt", "linear", "cosine")
    search_methods: Sequence[str] = ("1-sqrt", "mean", "ema")
    merge_interval: int | None = None

    @classmethod
    def from_namespace(cls, ns: Any) -> PlanRequest:
        """The request of a parsed ``plan_anneal`` command line (attributes by field name)."""
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


#: Default decay ratios / merge-window fractions searched: 0.025, 0.05, …, 0.6.
_SEARCH_GRID = np.round(np.arange(0.025, 0.6001, 0.025), 4)


def _searched_iters(fraction: float, train_iters: int, warmup_iters: int) -> int:
    """``round(fraction · train_iters)`` iterations, clipped to 1 … the post-warmup part."""
    n = int(round(float(fraction) * train_iters))
    return min(max(n, 1), train_iters - warmup_iters)


def _wsd_curve(
    train_iters: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int, shape: str
) -> np.ndarray:
    """The trainer's WSD LR curve, decaying with ``shape`` over the last ``decay_iters``."""
    return trainer_lr_curve(
        train_iters=train_iters,
        lr=lr,
        min_lr=min_lr,
        warmup_iters=warmup_iters,
        style="WSD",
        wsd_decay_iters=decay_iters,
        wsd_shape=shape,
    )


def search_decay_ratio(
    params: LawParams,
    *,
    train_iters: int,
    lr: float,
    min_lr: float = 0.0,
    warmup_iters: int = 0,
    shapes: Sequence[str] = ("1-sqrt",),
    ratios: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Predicted final loss of WSD runs of ``train_iters`` steps over decay ratios × shapes.

    A ratio r decays over round(r · train_iters) iterations (clipped to the post-warmup part).
    Returns one dict per candidate (``shape``, ``ratio``, ``decay_iters``, ``final_loss``),
    best first.
    """
    out = []
    seen = set()
    for shape in shapes:
        for r in _SEARCH_GRID if ratios is None else ratios:
            n = _searched_iters(r, train_iters, warmup_iters)
            if (shape, n) in seen:
                continue
            seen.add((shape, n))
            lrs = _wsd_curve(train_iters, lr, min_lr, warmup_iters, n, shape)
            out.append(
                {
                    "kind": "wsd",
                    "shape": shape,
                    "ratio": n / train_iters,
                    "decay_iters": n,
                    "final_loss": final_loss(params, lrs),
                }
            )
    out.sort(key=lambda d: d["final_loss"])
    return out


def search_merge_window(
    params: LawParams,
    *,
    train_iters: int,
    lr: float,
    warmup_iters: int = 0,
    methods: Sequence[str] = ("1-sqrt",),
    fractions: Sequence[float] | None = None,
    interval: int | None = None,
    n_intervals: int = 8,
) -> list[dict[str, Any]]:
    """Predicted loss of WSM merges at the end of a stable run of ``train_iters`` steps.

    Window = fraction × train_iters (outside warmup), split into intervals of ``interval``
    steps (a fixed checkpoint spacing, e.g. ``--wsm-interval``) or, when None, into
    ``n_intervals`` equal ones. One dict per candidate (``method``, ``fraction``,
    ``window_iters``, ``interval``, ``final_loss``), best first.
    """
    base = trainer_lr_curve(
        train_iters=train_iters, lr=lr, warmup_iters=warmup_iters, style="stable"
    )
    out = []
    seen = set()
    for method in methods:
        for f in _SEARCH_GRID if fractions is None else fractions:
            win = _searched_iters(f, train_iters, warmup_iters)
            step = interval if interval is not None else max(1, win // n_intervals)
            win = max(step, win - win % step)  # a whole number of intervals
            if (method, win, step) in seen:
                continue
            seen.add((method, win, step))
            lrs = merge_lrs(base, win, method, interval=step)
            out.append(
                {
                    "kind": "merge",
                    "method": method,
                    "fraction": win / train_iters,
                    "window_iters": win,
                    "interval": step,
                    "n_checkpoints": win // step + 1,
                    "final_loss": final_loss(params, lrs),
                }
            )
    out.sort(key=lambda d: d["final_loss"])
    return out


def parse_schedule(spec: str) -> tuple[str, dict[str, str]]:
    """``KIND[:k=v,...]`` -> (kind, options); raises ValueError on bad syntax."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "stable":
        kind = "constant"
    if kind not in ("constant", "wsd", "cosine", "linear", "merge"):
        raise ValueError(
            f"schedule {spec!r}: unknown kind {kind!r} (constant, wsd, cosine, linear, merge)"
        )
    opts = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"schedule {spec!r}: expected key=value, got {item!r}")
        opts[key.strip()] = val.strip()
    allowed = {
        "constant": set(),
        "cosine": set(),
        "linear": set(),
        "wsd": {"ratio", "iters", "shape"},
        "merge": {"window", "window_iters", "method", "interval", "alpha", "final_ratio"},
    }[kind]
    extra = set(opts) - allowed
    if extra:
        raise ValueError(
            f"schedule {spec!r}: unknown option(s) {sorted(extra)} for {kind} "
            f"(allowed: {sorted(allowed) or 'none'})"
        )
    return kind, opts


def schedule_lrs(spec: str, template: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The LR curve of a schedule spec on the template (train_iters, lr, min_lr, warmup)."""
    kind, opts = parse_schedule(spec)
    T, lr, min_lr, warm = (
        template["train_iters"],
        template["lr"],
        template["min_lr"],
        template["warmup_iters"],
    )
    info: dict[str, Any] = {"spec": spec, "kind": kind, "train_iters": T}
    if kind in ("constant", "cosine", "linear"):
        style = "stable" if kind == "constant" else kind
        lrs = trainer_lr_curve(train_iters=T, lr=lr, min_lr=min_lr, warmup_iters=warm, style=style)
    elif kind == "wsd":
        shape = opts.get("shape", "1-sqrt")
        if shape not in WSD_SHAPES:
            raise ValueError(f"schedule {spec!r}: shape must be one of {WSD_SHAPES}")
        n = _length(spec, opts, "iters", "ratio", T)
        lrs = _wsd_curve(T, lr, min_lr, warm, n, shape)
        info.update(shape=shape, decay_iters=n, ratio=n / T)
    else:
        method = opts.get("method", "1-sqrt")
        win = _length(spec, opts, "window_iters", "window", T)
        interval = int(opts["interval"]) if "interval" in opts else None
        kw = {k: float(opts[k]) for k in ("alpha", "final_ratio") if k in opts}
        merge = MergeMethod(method, **kw)
        base = trainer_lr_curve(train_iters=T, lr=lr, warmup_iters=warm, style="stable")
        lrs = merge_lrs(base, win, merge, interval=interval)
        step = interval or max(1, int(round(win / 8)))
        info.update(
            method=method,
            window_iters=win,
            fraction=win / T,
            interval=step,
            n_checkpoints=win // step + 1,
        )
    return lrs, info


def _length(spec: str, opts: dict[str, str], iters_key: str, ratio_key: str, T: int) -> int:
    if iters_key in opts:
        n = int(opts[iters_key])
    elif ratio_key in opts:
        n = int(round(float(opts[ratio_key]) * T))
    else:
        raise ValueError(f"schedule {spec!r}: give {ratio_key}= (fraction) or {iters_key}=")
    if not 1 <= n <= T:
        raise ValueError(f"schedule {spec!r}: length {n} outside 1..{T} iterations")
    return n


def _template(req: PlanRequest, runs: list[Run], train_iters: int) -> dict[str, Any]:
    """Peak LR, min LR and warmup of new schedules: flags, else the first fit run's."""
    ref = runs[0]
    after_peak = np.concatenate([r.lrs[peak_index(r.lrs) :] for r in runs])
    return {
        "train_iters": int(train_iters),
        "lr": req.lr if req.lr is not None else float(ref.lrs.max()),
        # The lowest LR any run decayed to, e.g. the --min-lr of a WSD run.
        "min_lr": req.min_lr if req.min_lr is not None else float(after_peak.min()),
        "warmup_iters": (req.warmup_iters if req.warmup_iters is not None else peak_index(ref.lrs)),
    }


def _budget_iters(req: PlanRequest, fit_runs: list[Run]) -> tuple[int, float | None]:
    """Iterations of new schedules (budget, --train-iters or the longest fit run), tokens/step."""
    tps = req.tokens_per_step
    if tps is None:
        tps = next((r.tokens_per_step for r in fit_runs if r.tokens_per_step), None)
    T = req.train_iters
    if req.budget_tokens is not None:
        if not tps:
            raise ValueError(
                "--budget-tokens needs tokens per step: none found in the runs' logs "
                f"({names.CONSUMED_TOKENS!r} / {names.LEARNING_RATE_VS_TOKENS!r} tags, or a "
                "CSV 'tokens' column); pass --tokens-per-step"
            )
        T = int(req.budget_tokens // tps)
        if T < 2:
            raise ValueError(f"--budget-tokens {req.budget_tokens:g} is under 2 iterations")
    return int(T or max(r.lrs.size for r in fit_runs)), tps


def plan(req: PlanRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """Do the work; returns (report for JSON/table, curves for the plot)."""
    fit_runs = [load_run(p, loss=req.loss) for p in req.fit]
    pred_runs = [load_run(p, loss=req.loss) for p in req.predict]
    unique_names(fit_runs + pred_runs)
    paths = {r.name: p for r, p in zip(fit_runs + pred_runs, [*req.fit, *req.predict])}
    # Everything that can be wrong with the request is checked before the (slower) fit.
    T, tps = _budget_iters(req, fit_runs)
    template = _template(req, fit_runs, T)
    schedules = [(spec, *schedule_lrs(spec, template)) for spec in req.schedule]

    result = fit_law(
        fit_runs,
        lam=req.lam,
        huber_delta=req.huber_delta,
        smooth_window=req.smooth,
        fit_start=req.fit_start,
        n_starts=req.starts,
        max_points=req.max_points,
    )
    params = result.params
    report: dict[str, Any] = result.to_json()
    report["fit_runs"] = report.pop("runs")
    for r in report["fit_runs"]:
        r["path"] = paths[r["name"]]
    report["definitions"] = {
        "S1": "sum over steps of the LR (forward area)",
        "S2": "sum over steps of m_i = lam*m_(i-1) + (lr_(i-1) - lr_i), drops counted from the "
        "first step at peak LR",
        "step": "optimizer iteration; training loss at iteration s sees s-1 updates",
        "mape": "percent, vs the smoothed observed loss from the fit start on; mape_raw vs the "
        "logged loss; noise_mape: smoothed vs logged (the floor of mape_raw)",
    }
    warnings = list(report.pop("warnings"))
    for r in fit_runs + pred_runs:
        warnings += [f"{r.name}: {n}" for n in r.notes]
    curves: dict[str, Any] = {"runs": []}
    for r, f in zip(fit_runs, result.runs):
        curves["runs"].append(curve("fit", r.name, r.lrs, fit=f))

    report["predict"] = []
    for r in pred_runs:
        entry: dict[str, Any] = {"name": r.name, "path": paths[r.name]}
        if r.has_loss:
            start = req.predict_start if req.predict_start is not None else req.fit_start
            ev = evaluate(params, r, smooth_window=req.smooth, start=start)
            entry.update(ev.to_json())
            curves["runs"].append(curve("predict", r.name, r.lrs, fit=ev))
        else:
            steps = curve_steps(r.lrs, req.fit_start)
            pred = predict_loss(params, r.lrs, steps, loss_lag=1)
            entry.update(train_iters=int(r.lrs.size), final_predicted=final_loss(params, r.lrs))
            curves["runs"].append(curve("predict", r.name, r.lrs, pred=pred, steps=steps))
        report["predict"].append(entry)

    longest = max(r.lrs.size for r in fit_runs)
    report["template"] = dict(template, tokens_per_step=tps)
    if T > 2 * longest:
        warnings.append(
            f"predicting {T} iterations, {T / longest:.1f}x the longest fitted run: extrapolation"
        )

    report["schedules"] = []
    for spec, lrs, info in schedules:
        info["final_loss"] = final_loss(params, lrs)
        report["schedules"].append(info)
        steps = curve_steps(lrs, req.fit_start)
        curves["runs"].append(
            dict(
                curve("schedule", spec, lrs, pred=predict_loss(params, lrs, steps), steps=steps),
                merge=info["kind"] == "merge",
                final=info["final_loss"],
            )
        )

    if req.budget_tokens is not None:
        assert tps is not None
        common = dict(train_iters=T, lr=template["lr"], warmup_iters=template["warmup_iters"])
        wsd = search_decay_ratio(
            params, min_lr=template["min_lr"], shapes=req.search_shapes, **common
        )
        merge = search_merge_window(
            params, methods=req.search_methods, interval=req.merge_interval, **common
        )
        const = trainer_lr_curve(style="stable", **common)
        for cands, key, what in ((wsd, "ratio", "decay ratio"), (merge, "fraction", "window")):
            values = [c[key] for c in cands]
            if cands[0][key] in (min(values), max(values)):
                warnings.append(
                    f"the best {what} ({cands[0][key]:.3f}) is at the edge of the searched range "
                    f"({min(values):.3f}-{max(values):.3f}): the law favours it beyond what the "
                    "fitted runs show; check it with a run"
                )
        report["search"] = {
            "budget_tokens": float(req.budget_tokens),
            "tokens_per_step": float(tps),
            "train_iters": T,
            "constant_final_loss": final_loss(params, const),
            "best_wsd": wsd[0],
            "best_merge": merge[0],
            "wsd": wsd,
            "merge": merge,
        }
    report["warnings"] = warnings
    return report, curves
