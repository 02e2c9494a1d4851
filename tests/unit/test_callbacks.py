"""The training loop's one callback protocol: the points, their order, and exit on errors."""

from __future__ import annotations

import ast
import inspect
from types import SimpleNamespace
from typing import Any

import pytest

from megatron_wsm import training
from megatron_wsm.callbacks import Callback, CallbackList
from megatron_wsm.checkpoint_callback import CheckpointCallback


class Recorder(Callback):
    """Writes each point it sees into a shared log; optionally adds an extra evaluation."""

    def __init__(self, name: str, log: list[Any], extra: dict[str, Any] | None = None) -> None:
        self.name, self.log, self.extra = name, log, extra

    def after_step(self, comp: Any, result: Any) -> None:
        self.log.append((self.name, "after_step", comp.state.iteration))

    def at_evaluation(self, comp: Any, evaluation: Any) -> list[dict[str, Any]]:
        self.log.append((self.name, "at_evaluation", evaluation["loss"]))
        return [self.extra] if self.extra else []

    def after_evaluation(self, comp: Any, evaluation: Any, extra: list[Any]) -> None:
        self.log.append((self.name, "after_evaluation", [e["method"] for e in extra]))

    def at_exit(self, comp: Any, error: BaseException | None) -> None:
        self.log.append((self.name, "at_exit", type(error).__name__ if error else None))


def _comp(train_iters: int, eval_interval: int = 0, exit_interval: int = 0) -> Any:
    cfg = SimpleNamespace(
        training=SimpleNamespace(
            train_iters=train_iters, eval_interval=eval_interval, exit_interval=exit_interval
        )
    )
    return SimpleNamespace(cfg=cfg, state=training.TrainState())


def _fake_step(comp: Any) -> training.StepResult:
    comp.state.iteration += 1
    return training.StepResult(
        loss=1.0, grad_norm=0.5, learning_rate=1e-3, skipped=False, seconds=0.0
    )


def test_base_callback_does_nothing() -> None:
    cb = Callback()
    comp = _comp(1)
    assert cb.after_step(comp, None) is None
    assert cb.at_evaluation(comp, {"loss": 1.0}) == []
    assert cb.after_evaluation(comp, {"loss": 1.0}, []) is None
    assert cb.at_exit(comp, None) is None


def test_extra_evaluations_reach_every_callback_after_all_were_asked() -> None:
    log: list[Any] = []
    a = Recorder("a", log)
    b = Recorder("b", log, extra={"method": "mean", "loss": 2.0})
    extra = CallbackList([a, b]).at_evaluation(_comp(1), {"loss": 1.0})
    assert extra == [{"method": "mean", "loss": 2.0}]
    assert log == [
        ("a", "at_evaluation", 1.0),
        ("b", "at_evaluation", 1.0),
        ("a", "after_evaluation", ["mean"]),
        ("b", "after_evaluation", ["mean"]),
    ]


def test_at_exit_runs_every_callback_and_raises_the_first_failure() -> None:
    log: list[Any] = []

    class Failing(Callback):
        def __init__(self, message: str) -> None:
            self.message = message

        def at_exit(self, comp: Any, error: BaseException | None) -> None:
            log.append(self.message)
            raise RuntimeError(self.message)

    callbacks = CallbackList([Failing("first"), Recorder("r", log), Failing("second")])
    with pytest.raises(RuntimeError, match="first"):
        callbacks.at_exit(_comp(1), None)
    assert log == ["first", ("r", "at_exit", None), "second"]


def test_loop_order_step_log_save_eval_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per iteration: the step, every after_step in list order, then (at an evaluation
    iteration) the evaluation points; at_exit once at the end."""
    monkeypatch.setattr(training, "train_step", _fake_step)
    monkeypatch.setattr(training, "evaluate", lambda comp: {"loss": 3.0})
    log: list[Any] = []
    comp = _comp(train_iters=4, eval_interval=2, exit_interval=3)
    history = training.train(
        comp, [Recorder("a", log), Recorder("b", log, extra={"method": "m", "loss": 4.0})]
    )
    assert [row["iteration"] for row in history] == [1, 2, 3]  # --exit-interval 3
    assert history[1]["valid_loss"] == 3.0 and "valid_loss" not in history[0]
    assert log == [
        ("a", "after_step", 1),
        ("b", "after_step", 1),
        ("a", "after_step", 2),
        ("b", "after_step", 2),
        ("a", "at_evaluation", 3.0),
        ("b", "at_evaluation", 3.0),
        ("a", "after_evaluation", ["m"]),
        ("b", "after_evaluation", ["m"]),
        ("a", "after_step", 3),
        ("b", "after_step", 3),
        ("a", "at_exit", None),
        ("b", "at_exit", None),
    ]


def test_at_exit_sees_the_error_that_ends_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_step(comp: Any) -> training.StepResult:
        if comp.state.iteration == 1:
            raise training.NonFiniteStepError("iteration 2: the loss is nan")
        return _fake_step(comp)

    monkeypatch.setattr(training, "train_step", failing_step)
    log: list[Any] = []
    with pytest.raises(training.NonFiniteStepError):
        training.train(_comp(train_iters=5), [Recorder("a", log)])
    assert log == [("a", "after_step", 1), ("a", "at_exit", "NonFiniteStepError")]


class FakeManager:
    def __init__(self, wait_error: Exception | None = None) -> None:
        self.wait_error = wait_error
        self.waited = 0
        self.locks = [SimpleNamespace(released=0), SimpleNamespace(released=0)]
        for lock in self.locks:
            lock.release = lambda lock=lock: setattr(lock, "released", lock.released + 1)

    def wait(self) -> None:
        self.waited += 1
        if self.wait_error is not None:
            raise self.wait_error


def _checkpoint_callback(manager: FakeManager) -> CheckpointCallback:
    callback = CheckpointCallback.__new__(CheckpointCallback)  # at_exit needs the manager only
    callback.manager = manager
    return callback


@pytest.mark.parametrize("error", [None, training.NonFiniteStepError("nan")])
def test_checkpoint_exit_finishes_saves_then_releases_the_locks(error: Any) -> None:
    manager = FakeManager()
    _checkpoint_callback(manager).at_exit(_comp(1), error)
    assert manager.waited == 1
    assert [lock.released for lock in manager.locks] == [1, 1]


def test_checkpoint_exit_releases_the_locks_when_a_pending_save_fails() -> None:
    manager = FakeManager(wait_error=RuntimeError("async save failed"))
    with pytest.raises(RuntimeError, match="async save failed"):
        _checkpoint_callback(manager).at_exit(_comp(1), None)
    assert [lock.released for lock in manager.locks] == [1, 1]


def test_the_loop_knows_no_callback_by_name() -> None:
    tree = ast.parse(inspect.getsource(training))
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert imported.isdisjoint(
        {
            "megatron_wsm.checkpoint_callback",
            "megatron_wsm.readout_callback",
            "megatron_wsm.log_callback",
            "megatron_wsm.moe_metrics",
        }
    )
    assert list(inspect.signature(training.train).parameters) == ["comp", "callbacks"]


def test_completed_saves_reach_every_callback_and_the_logger_prints_them(capsys) -> None:
    """The checkpoint callback announces a finished save to the whole list (after_save), before
    retention; the logger prints it (a window save relative to the last full one)."""
    from pathlib import Path

    from megatron_wsm.checkpoint.manager import SaveResult
    from megatron_wsm.log_callback import LogCallback

    seen: list[tuple[str, int]] = []

    class Saves(Callback):
        def after_save(self, saved: SaveResult) -> None:
            seen.append((saved.kind, saved.iteration))

    logger = LogCallback.__new__(LogCallback)  # after_save needs no TensorBoard
    logger._last_full_bytes = None
    checkpoint = CheckpointCallback.__new__(CheckpointCallback)
    checkpoint.cfg = SimpleNamespace(training=SimpleNamespace(save_keep_last=None),
                                     wsm=SimpleNamespace(wsm_window=None, wsm_window_tokens=None))
    checkpoint.manager = SimpleNamespace(prune_full=lambda *a: [], prune_window=lambda *a: [])
    CallbackList([checkpoint, Saves(), logger])  # attach
    checkpoint._full_done(SaveResult(Path("ck/iter_0000004"), "full", 4, 4 << 20, 0.5))
    checkpoint._window_done(SaveResult(Path("ck/wsm_window/iter_0000004"), "window", 4,
                                       1 << 20, 0.1))
    assert seen == [("full", 4), ("window", 4)]
    out = capsys.readouterr().out
    assert "saved full checkpoint at iteration 4: ck/iter_0000004 (4.0 MiB" in out
    assert "saved window checkpoint at iteration 4" in out and "25.0% of a full checkpoint" in out
