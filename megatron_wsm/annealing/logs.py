"""Reading runs from logs: TensorBoard event files of the trainer, or ``step,lr,loss`` CSV."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_wsm import metric_names as names
from megatron_wsm.annealing.runs import Run


def load_run(path: str, *, loss: str = "train") -> Run:
    """Read one run: a TensorBoard event directory (or file) or a ``step,lr,loss`` CSV."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such file or directory")
    if p.is_dir() or ".tfevents." in p.name:
        return _load_tensorboard(p, loss)
    return _load_csv(p)


def tensorboard_scalars(
    path: str | os.PathLike, tags: Sequence[str] | None = None
) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the TensorBoard events under ``path``: the ``tags`` present
    (absent ones are left out), or every scalar tag. All events are kept, and a resumed run's
    re-logged steps replace the older ones (TensorBoard's purge of orphaned steps), so the
    result spans every invocation of a run. The one reader of the trainer's scalars (planner,
    examples)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0 = keep every event (the default samples 10,000 per tag).
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    present = acc.Tags().get("scalars", [])
    wanted = present if tags is None else [t for t in tags if t in present]
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in wanted}


def _load_tensorboard(p: Path, loss: str) -> Run:
    got = tensorboard_scalars(p)
    loss_tag = names.LM_LOSS if loss == "train" else names.VALID_LOSS
    missing = [t for t in (names.LEARNING_RATE, loss_tag) if t not in got]
    if missing:
        raise ValueError(
            f"{p}: TensorBoard scalars {missing} not found (has: {sorted(got) or 'none'})"
        )
    lr = sorted(got[names.LEARNING_RATE].items())
    obs = sorted(got[loss_tag].items())
    tps = None
    if names.CONSUMED_TOKENS in got:
        ev = sorted(got[names.CONSUMED_TOKENS].items())
        tps = _tokens_per_step([s for s, _ in ev], [v for _, v in ev])
    elif names.LEARNING_RATE_VS_TOKENS in got:
        # Written right after "learning-rate" at every logged iteration, with the consumed
        # tokens as its step: the n-th token count belongs to the n-th logged iteration.
        tokens = sorted(got[names.LEARNING_RATE_VS_TOKENS])
        n = min(len(tokens), len(lr))
        tps = _tokens_per_step([s for s, _ in lr[:n]], tokens[:n])
    return Run.from_points(
        _run_name(p),
        [s for s, _ in lr],
        [v for _, v in lr],
        [s for s, _ in obs],
        [v for _, v in obs],
        loss_lag=1 if loss == "train" else 0,
        tokens_per_step=tps,
    )


def _tokens_per_step(steps: Sequence[int], tokens: Sequence[float]) -> float | None:
    st = np.asarray(steps, dtype=np.float64)
    tk = np.asarray(tokens, dtype=np.float64)
    ok = st > 0
    if not np.any(ok):
        return None
    return float(np.median(tk[ok] / st[ok]))


def _load_csv(p: Path) -> Run:
    with open(p, newline="") as fh:
        rows = list(csv.reader(line for line in fh if line.strip() and not line.startswith("#")))
    if not rows:
        raise ValueError(f"{p}: empty CSV")
    header = [h.strip().lower() for h in rows[0]]
    if not {"step", "lr"} <= set(header):
        raise ValueError(f"{p}: the CSV needs a header with columns step,lr[,loss][,tokens]")
    col = {h: i for i, h in enumerate(header)}
    lr_s, lr_v, lo_s, lo_v, tk_s, tk_v = [], [], [], [], [], []
    for n, row in enumerate(rows[1:], start=2):

        def cell(name: str, row: list[str] = row) -> str:
            i = col.get(name)
            return row[i].strip() if i is not None and i < len(row) else ""

        try:
            step = int(float(cell("step")))
            if cell("lr"):
                lr_s.append(step)
                lr_v.append(float(cell("lr")))
            if cell("loss"):
                lo_s.append(step)
                lo_v.append(float(cell("loss")))
            if cell("tokens"):
                tk_s.append(step)
                tk_v.append(float(cell("tokens")))
        except ValueError:
            raise ValueError(f"{p}:{n}: not a number in {row}") from None
    first = min(lr_s + lo_s + tk_s, default=1)
    if first < 0:
        raise ValueError(f"{p}: negative step {first}; steps are iterations (from 1, or from 0)")
    # Runs are 1-based iterations (the trainer's, and what the law's loss_lag assumes). A log
    # whose steps start at 0 counts from 0: its step k is iteration k + 1 (LR of update k + 1,
    # loss before it), so shift every column alike rather than dropping or misplacing step 0.
    shift = 1 if first == 0 else 0
    lr_s, lo_s, tk_s = ([s + shift for s in col] for col in (lr_s, lo_s, tk_s))
    run = Run.from_points(
        _run_name(p),
        lr_s,
        lr_v,
        lo_s,
        lo_v,
        tokens_per_step=_tokens_per_step_slope(tk_s, tk_v) if tk_s else None,
    )
    if shift:
        run.notes.insert(0, "steps counted from 0: step k read as iteration k + 1")
    return run


def _tokens_per_step_slope(steps: Sequence[int], tokens: Sequence[float]) -> float | None:
    """Tokens per step from a ``tokens`` column: the median slope between logged rows, which
    does not depend on whether a row's tokens are counted before or after its step; a single
    row falls back to tokens / step."""
    st = np.asarray(steps, dtype=np.float64)
    tk = np.asarray(tokens, dtype=np.float64)
    d_st, d_tk = np.diff(st), np.diff(tk)
    ok = d_st > 0
    if not np.any(ok):
        return _tokens_per_step(steps, tokens)
    return float(np.median(d_tk[ok] / d_st[ok]))


#: Directory names that say "TensorBoard events" rather than which run: the run is the parent.
_TB_DIR_NAMES = ("tb", "tensorboard", "tensorboard_logs", "logs")


def _run_name(p: Path) -> str:
    # absolute, not resolved: a symlink's own name ("const" -> runs/x/tb) names the run
    p = Path(os.path.abspath(p))
    if ".tfevents." in p.name:
        p = p.parent
    elif p.is_file():
        return p.stem
    # runs/const/tb -> "const" (the trainer's --tensorboard-dir is often <run>/tb)
    return p.parent.name if p.name.lower() in _TB_DIR_NAMES and p.parent.name else p.name


def unique_names(runs: list[Run]) -> None:
    """Rename runs in place so that names are unique (``name#2``, ``name#3``, ...)."""
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name}#{seen[r.name]}"
        else:
            seen[r.name] = 1
