"""Annealing loss law: fit it to training logs, predict schedules and WSM merges, plan.

Pure numpy (and scipy's solvers): a learning-rate curve goes in, a loss prediction comes out.
Nothing here imports torch or megatron-core (TensorBoard logs are read with ``tensorboard``
only when asked); :func:`trainer_lr_curve` is a numpy twin of megatron-core's scheduler for
fast searches, checked against it in the tests. The CLI is :mod:`megatron_wsm.cli.plan_anneal`.

The law (Tissue et al., "Scaling Law with Learning Rate Annealing", arXiv 2408.11029)::

    L(s) = L0 + A · S1(s)^(-alpha) - C · S2(s)

over optimizer steps s, with η_i the LR of update i (i = 1, 2, …):

- ``S1(s) = Σ_{i≤s} η_i`` — the *forward area* under the LR curve;
- ``S2(s) = Σ_{i≤s} m_i``, ``m_i = λ·m_{i-1} + Δ_i``, ``Δ_i = η_{i-1} - η_i`` — the
  *annealing area*, a momentum of the LR drops that keeps paying off after the drop. Drops are
  counted from the step the LR first reaches its peak on: warmup is not annealing (counting its
  rises as negative drops would make the law predict a loss *increase* during warmup). A later
  rise (re-warming) does count, negatively.

Wang et al. (arXiv 2512.13705) keeps this split into a forward term and an
annealing-momentum term, argues that *steps* rather than tokens are the right clock, and lets
peak LR and step count enter the fit. Here both enter through the areas themselves: S1 and S2
are sums over steps of the raw LR, so runs with a different peak LR or length share one set of
parameters. (Its model-size term λ_N·N^(-α_N) is a constant for one model and is absorbed into
L0; its Adam-normalised momentum variant is not implemented.)

Conventions:

- ``lrs[i]`` is the LR of update ``i + 1`` (the trainer's ``learning-rate`` at iteration
  ``i + 1``). A dense per-step curve is needed; :meth:`Run.from_points` interpolates gaps.
- The trainer's *training* loss at iteration ``s`` is computed before update ``s``, so it sees
  the areas after ``s - 1`` updates (``loss_lag = 1``); a validation loss logged at iteration
  ``s`` comes after update ``s`` (``loss_lag = 0``). A *final* loss (after the last update,
  e.g. of a merged model) uses the full sums.
- WSM merge (Theorem 3.1 of the WSM paper, docs/schedule.md): merging the checkpoints of a
  window of D steps with the coefficients of decay shape f gives the weights that training
  with LR scaled by w_i = f((i-1)/k) over the window's k intervals would give, for the same
  gradients. Its loss is predicted as the final loss of that emulated decay
  (:func:`merge_lrs`). With Adam and real gradients this is an approximation: the bet WSM
  makes.

Fitting (:func:`fit_law`): variable projection — (L0, A, C) by robust bounded linear least
squares for each (α, λ), (α, λ) by a grid and Nelder-Mead; see :mod:`.fit`.

Modules: :mod:`.law` (the law and its areas), :mod:`.runs` (the ``Run`` type, smoothing),
:mod:`.fit` (the fit), :mod:`.lr_curve` (the trainer's LR curve in numpy, merge emulation),
:mod:`.plan` (searches, the schedule mini-language, :func:`plan`), :mod:`.logs` (TensorBoard
and CSV readers), :mod:`.report` (table and plot). Every public name is re-exported here.
"""

from __future__ import annotations

from megatron_wsm.annealing.fit import (
    DEFAULT_ALPHA_BOUNDS,
    DEFAULT_HUBER_DELTA,
    DEFAULT_LAM_BOUNDS,
    FitResult,
    RunFit,
    evaluate,
    fit_law,
)
from megatron_wsm.annealing.law import (
    LAW,
    IdentificationError,
    LawParams,
    annealing_area,
    final_loss,
    forward_area,
    peak_index,
    predict_loss,
    warmup_end_step,
)
from megatron_wsm.annealing.logs import (
    load_run,
)
from megatron_wsm.annealing.lr_curve import (
    WSD_SHAPES,
    merge_lrs,
    trainer_lr_curve,
)
from megatron_wsm.annealing.plan import (
    MERGE_METHODS,
    PlanRequest,
    parse_schedule,
    plan,
    schedule_lrs,
    search_decay_ratio,
    search_merge_window,
)
from megatron_wsm.annealing.report import (
    format_report,
    plot,
)
from megatron_wsm.annealing.runs import (
    Run,
    default_fit_start,
    default_smooth_window,
    mape,
    smooth,
)

__all__ = [
    "DEFAULT_ALPHA_BOUNDS",
    "DEFAULT_HUBER_DELTA",
    "DEFAULT_LAM_BOUNDS",
    "FitResult",
    "IdentificationError",
    "LAW",
    "LawParams",
    "MERGE_METHODS",
    "PlanRequest",
    "Run",
    "RunFit",
    "WSD_SHAPES",
    "annealing_area",
    "default_fit_start",
    "default_smooth_window",
    "evaluate",
    "final_loss",
    "fit_law",
    "format_report",
    "forward_area",
    "load_run",
    "mape",
    "merge_lrs",
    "parse_schedule",
    "peak_index",
    "plan",
    "plot",
    "predict_loss",
    "schedule_lrs",
    "search_decay_ratio",
    "search_merge_window",
    "smooth",
    "trainer_lr_curve",
    "warmup_end_step",
]
