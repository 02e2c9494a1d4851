"""Full and window checkpoints with megatron-core ``dist_checkpointing`` (torch_dist).

(Over ~600 lines on purpose: :class:`CheckpointManager` is one unit of save/load I/O; the pure
optimizer-state rules are in :mod:`megatron_wsm.checkpoint.optimizer_state`, names and retention in
:mod:`megatron_wsm.checkpoint.layout`.)

Layout under a checkpoint root (``--save`` for full ones, ``--wsm-save`` for window ones)::

    iter_0000100/                  a finished checkpoint: torch_dist shards + wsm_manifest.json
    .tmp-iter_0000120/             a save in progress (or killed): never listed, never loaded
    latest_checkpointed_iteration.txt   Megatron-LM's tracker file: the newest checkpoint

Every rank writes only its own shards into ``.tmp-iter_*``; after all ranks finished, rank 0
writes the manifest (``complete: true``) and renames the directory into place — one atomic
step, so a crash can never leave a directory that looks complete. Before that, rank 0 checks
that the ``.metadata`` describes exactly the shards in the directory (:mod:`.integrity`); a
save that fails the check fails on every rank and stays a ``.tmp-`` directory. At most one
save is in flight at a time (async ones included: see :meth:`CheckpointManager.save`), and
the helper processes saving starts die with the trainer. Retention runs after that and only
deletes complete checkpoints of ours, never the newest one.

Names, listing, completeness and the window rule (which checkpoints to keep) are in
:mod:`megatron_wsm.checkpoint.layout`; the save policy is a pure function at the top; I/O is in
:class:`CheckpointManager`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch

from megatron_wsm import cpu_compat
from megatron_wsm import distributed as wdist
from megatron_wsm.checkpoint import common_state as ckpt_common
from megatron_wsm.checkpoint import integrity as ckpt_integrity
from megatron_wsm.checkpoint import keys as spec_keys
from megatron_wsm.checkpoint.layout import (
    TMP_PREFIX,
    TRACKER_FILE,
    checkpoint_name,
    checkpoint_problems,
    dir_bytes,
    has_dist_metadata,
    list_checkpoints,
    prune_full_dir,
    prune_window_dir,
    read_tracker,
)
from megatron_wsm.checkpoint.manifest import (
    EXTRA_OPTIMIZER,
    KIND_FULL,
    CheckpointManifest,
    ParallelLayout,
    config_hash,
    read_manifest,
    write_manifest,
)
from megatron_wsm.checkpoint.megatron_args import (
    megatron_lm_args,
    parallel_layout_from_args,
    shape_differences,
)
from megatron_wsm.checkpoint.optimizer_state import (
    _CONTENT_OPTIMIZER,
    _optimizer_parts,
    load_metadata,
    optimizer_load_problem,
    optimizer_record,
    optimizer_sharding_metadata,
    saved_optimizer_from_content,
)
from megatron_wsm.process_guard import die_with_parent

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, incomplete, corrupt or for another model)."""


# ----------------------------------------------------------------------------- pure policy


def should_save(iteration: int, interval: int | None) -> bool:
    """Save after ``iteration`` when it is a multiple of ``interval`` (iteration-aligned, so a
    resumed run saves at the same iterations as an uninterrupted one)."""
    return bool(interval) and iteration > 0 and iteration % interval == 0


def model_identity(model_json: dict[str, Any], padded_vocab: int) -> dict[str, Any]:
    """The model fields that decide parameter shapes and routing (``ModelConfig`` fields marked
    ``shape``; those added later only when not at their default); hashed into manifests."""
    from megatron_wsm.config.model import model_identity_fields

    ident = model_identity_fields(model_json)
    ident["padded_vocab_size"] = padded_vocab
    return ident


# ----------------------------------------------------------------------------- loading


def resolve_load_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory from ``--load``: the directory itself when it is a checkpoint,
    else the newest complete ``iter_*`` below it (Megatron's tracker file is only a hint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--load {path}: no such directory")
    if has_dist_metadata(path):
        manifest = None
        try:
            manifest = read_manifest(path)
        except ValueError as e:
            raise CheckpointError(f"--load {path}: {e}") from e
        if manifest is not None and not manifest.complete:
            raise CheckpointError(f"--load {path}: checkpoint is marked incomplete")
        return path
    complete = list_checkpoints(path, include_incomplete=False)
    if not complete:
        foreign = tracked_checkpoint(path)
        if foreign is not None:
            return foreign
        listed = list_checkpoints(path)
        hint = f" ({len(listed)} incomplete ones found)" if listed else ""
        raise CheckpointError(f"--load {path}: no complete checkpoint found{hint}")
    return complete[-1].path


def tracked_checkpoint(root: Path) -> Path | None:
    """The checkpoint Megatron-LM's ``--load root`` resumes, when it is not one of ours: the
    ``iter_N`` directory its tracker file names, holding torch_dist files and no manifest of
    ours (a checkpoint Megatron-LM wrote; its files and common state are checked before the
    load, :meth:`CheckpointManager._verify_before_load`). None otherwise (no tracker, a
    ``release`` tracker, a symlink, a directory of ours)."""
    # TODO(H5): use megatron_wsm.checkpoint.megatron_lm's recogniser once it lands.
    try:
        iteration = read_tracker(root)
    except ckpt_integrity.IntegrityError as e:
        raise CheckpointError(f"--load {root}: {e}") from e
    if iteration is None:
        return None
    candidate = root / checkpoint_name(iteration)
    if candidate.is_symlink() or not candidate.is_dir() or not has_dist_metadata(candidate):
        return None
    try:
        if read_manifest(candidate) is not None:
            return None  # ours, and not complete: refused with the listing's message
    except ValueError:
        return None
    return candidate


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, for bitwise resume, with its device kind
    (:mod:`megatron_wsm.checkpoint.rng`)."""
    from megatron_wsm.checkpoint import rng

    return rng.capture()


def set_rng_state(state: dict[str, Any], seed: int | None = None) -> bool:
    """Inverse of :func:`rng_state`: the tracker / CUDA states only on the device kind they were
    saved on, else re-seeded from ``seed`` (the run's ``--seed``) as at start-up, with a note.
    Returns whether the device states were restored."""
    from megatron_wsm.checkpoint import rng
    from megatron_wsm.config import TrainingConfig

    return rng.restore(state, TrainingConfig.seed if seed is None else seed)


def _weights_finite(model: list[Any]) -> bool:
    """True when every parameter of this rank's model chunks is finite (one device-to-host
    read for all of them: a read per parameter would stall a GPU at every save)."""
    flags = [torch.isfinite(p).all() for chunk in model for p in chunk.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


# ----------------------------------------------------------------------------- I/O


@dataclasses.dataclass
class SaveResult:
    """What a finished save reports."""

    path: Path
    kind: str
    iteration: int
    bytes: int
    seconds: float


class CheckpointManager:
    """Saves, loads and prunes the checkpoints of one run (every rank holds one)."""

    def __init__(
        self,
        model: list[Any],
        optimizer: Any,
        scheduler: Any,
        layout: ParallelLayout,
        model_json: dict[str, Any],
        padded_vocab: int,
        run_info: dict[str, Any] | None = None,
        optim_sharding: str | None = None,
    ) -> None:
        """``optim_sharding``: None for the plain optimizer, else one of
        :data:`~megatron_wsm.checkpoint.optimizer_state.OPTIM_SHARDINGS` (how the distributed
        optimizer's state is saved)."""
        self.run_info = dict(run_info or {})
        self.optim_sharding = optim_sharding
        self.optim_metadata = optimizer_sharding_metadata(optim_sharding)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.layout = layout
        self.identity = model_identity(model_json, padded_vocab)
        self.identity_hash = config_hash(self.identity)
        self._async_queue = None
        self._pending: list[Callable[[], None]] = []
        #: The save directories' trainer locks (rank 0; :func:`pretrain.hold_save_dirs`).
        self.locks: list[Any] = []

    # -- state dicts

    def bare_model(self) -> Any:
        """The GPTModel under the DDP / Float16Module wrappers: checkpoint keys are its own
        names (what the merged readout swaps weights into)."""
        module = self.model[0]
        while hasattr(module, "module"):
            module = module.module
        return module

    def _model_sharded(self) -> dict[str, Any]:
        return self.bare_model().sharded_state_dict()

    def _rng_object(self, value: Any) -> Any:
        """This rank's ``rng_state`` ShardedObject in Megatron-LM's layout
        (:func:`megatron_wsm.checkpoint.rng.sharding`), so Megatron-LM resumes it and we resume
        Megatron-LM's."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        shape, offset, replica = _rng_sharding()
        return ShardedObject("rng_state", value, shape, offset, replica_id=replica)

    def _rng_request(self, ckpt: Path) -> Any:
        """The ``rng_state`` load request for ``ckpt`` in the layout it was saved with, or None
        (with a note on rank 0) when its layout has no state for this rank: another TP/PP (or,
        with EP, DP) size, or our older world-shaped layout at another world size."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        from megatron_wsm.checkpoint import rng

        stored = spec_keys.checkpoint_keys(ckpt)
        shape, offset, replica = _rng_sharding()
        if rng.shard_key(shape, offset) in stored:
            return ShardedObject("rng_state", None, shape, offset, replica_id=replica)
        world = (self.layout.world_size,)
        if rng.shard_key(world, (wdist.rank(),)) in stored:
            # megatron-wsm before Megatron-LM's layout: one state per global rank.
            return ShardedObject("rng_state", None, world, (wdist.rank(),), replica_id=0)
        if any(k.startswith("rng_state/") for k in stored):
            print_rank0_note(
                f"note: {ckpt}: its RNG state was saved with another parallel layout; the RNG "
                "streams continue from this run's seeding (--no-load-rng silences this)"
            )
        return None

    def _state_dict(self, kind: str, train_state: Any) -> dict[str, Any]:
        for chunk in self.model:
            if getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False):
                # With an overlapped param gather the updated weights arrive only in the next
                # forward; a save must hold this step's weights.
                chunk.start_param_sync(force_sync=True)
        model_sd = self._model_sharded()
        sd: dict[str, Any] = {
            "model": model_sd,
            "checkpoint_version": 3.0,
            "iteration": train_state.iteration,
            "consumed_samples": train_state.consumed_samples,
            "consumed_tokens": train_state.consumed_tokens,
            # Megatron-LM's command-line record, which its loader reads for the data position
            # and the model shape (window and merged checkpoints carry it too, for
            # --use-checkpoint-args); plain values only (checkpoint/megatron_args.py).
            "args": megatron_lm_args(
                self.run_info,
                iteration=train_state.iteration,
                consumed_samples=train_state.consumed_samples,
                padded_vocab_size=self.identity["padded_vocab_size"],
                parallel=dataclasses.asdict(self.layout),
            ),
        }
        if kind == KIND_FULL:
            sd["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, metadata=self.optim_metadata
            )
            from megatron_wsm import lr as lr_schedule

            sd["opt_param_scheduler"] = lr_schedule.scheduler_state(self.scheduler)
            sd["rng_state"] = self._rng_object([rng_state()])  # Megatron-LM's one-element list
        return sd

    def _save_strategy(self) -> Any:
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.serialization import (
            get_default_save_sharded_strategy,
        )
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        strategy = get_default_save_sharded_strategy("torch_dist")
        if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
            # Spread the writing of replicated shards over DP ranks (Megatron's default).
            strategy = FullyParallelSaveStrategyWrapper(
                strategy, parallel_state.get_data_parallel_group(with_context_parallel=True)
            )
        return strategy

    # -- saving

    def save(
        self,
        root: str | os.PathLike,
        kind: str,
        train_state: Any,
        learning_rate: float,
        *,
        async_save: bool = False,
        on_complete: Callable[[SaveResult], None] | None = None,
    ) -> None:
        """Save a ``kind`` checkpoint of the current state under ``root``.

        Synchronous saves return after the checkpoint is complete (and ``on_complete`` ran on
        rank 0). Async saves return once the shards are staged; the finalisation (manifest,
        rename, ``on_complete``) happens in :meth:`poll` / :meth:`wait` on a later call.
        """
        from megatron.core import dist_checkpointing

        # megatron-core 0.16 hands every torch_dist save's write results back through ONE
        # process-global queue (filesystem_async._results_queue), sync saves included (they run
        # as an async request executed in place), and each save's finalisation takes whatever
        # result is at the queue's head. With another save in flight, the two saves take each
        # other's results and each .metadata describes the other save's shards. So no save
        # starts while one is in flight: finish (blocking) every pending one first.
        self._finish_pending()
        bind_helper_processes_to_trainer()
        start = time.perf_counter()
        root = Path(root)
        # Async finalisation runs iterations later: capture the values now.
        iteration = train_state.iteration
        if not wdist.all_ranks_true(_weights_finite(self.model)):
            # Defence in depth behind the trainer's step check (which may be switched off):
            # a diverged model never becomes a checkpoint a resume or a merge would pick.
            raise CheckpointError(
                f"refusing to save the {kind} checkpoint of iteration {iteration}: the model "
                "holds non-finite weights (NaN or inf); the newest checkpoint on disk is the "
                "last good one"
            )
        name = checkpoint_name(iteration)
        tmp = root / (TMP_PREFIX + name)
        final = root / name
        if wdist.rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                # A leftover of an interrupted save of this iteration: ours or a dead run's,
                # never a live one's (this run holds the directory's trainer lock).
                shutil.rmtree(tmp)
            tmp.mkdir()
        wdist.barrier()
        state_dict = self._state_dict(kind, train_state)
        manifest = CheckpointManifest(
            kind=kind,
            iteration=train_state.iteration,
            consumed_samples=train_state.consumed_samples,
            consumed_tokens=train_state.consumed_tokens,
            learning_rate=learning_rate,
            parallel=self.layout,
            model_config_hash=self.identity_hash,
            model_config=self.identity,
            checkpoint_format="torch_dist",
            megatron_core_version=_mcore_version(),
            model_spec=_model_spec(
                (self.run_info.get("model") or {}).get("transformer_impl") or "transformer_engine"
            ),
            complete=True,
            extra={"run": self.run_info},
        )
        content_metadata = None
        if kind == KIND_FULL:
            manifest.extra[EXTRA_OPTIMIZER] = {
                **optimizer_record(self.optim_sharding),
                "parts": _optimizer_parts(self.optimizer),
            }
            # Megatron-LM keeps the sharding metadata with the checkpoint the same way, so a
            # loader can rebuild the matching request without our manifest.
            content_metadata = {
                **self.optim_metadata,
                _CONTENT_OPTIMIZER: manifest.extra[EXTRA_OPTIMIZER]["optimizer"],
            }

        def finalize() -> None:
            # Runs on every rank after every rank's shards and the .metadata are on disk.
            _maybe_inject_crash(kind, iteration, "before-finalize")
            error = ""
            if wdist.rank() == 0:
                try:
                    _check_saved_files(tmp)
                    manifest.created_unix = time.time()
                    write_manifest(tmp, manifest)
                    _replace_dir(tmp, final)
                except (CheckpointError, OSError) as e:
                    error = str(e)
            # Every rank learns rank 0's verdict, so a refused save fails on all of them (the
            # directory stays a .tmp- one: never listed as complete) instead of leaving the
            # other ranks in a barrier.
            if not wdist.all_ranks_true(not error):
                raise CheckpointError(
                    error or f"{kind} checkpoint of iteration {iteration} refused on rank 0"
                )
            if wdist.rank() == 0:
                # Megatron-LM's tracker, in the window root too: there it names the newest
                # window checkpoint, so Megatron-LM's --load of the window root finds weights
                # (--finetune --no-load-optim --no-load-rng) instead of starting from random.
                _write_text_atomic(root / TRACKER_FILE, str(iteration))
                result = SaveResult(
                    final,
                    kind,
                    iteration,
                    dir_bytes(final),
                    time.perf_counter() - start,
                )
                if on_complete is not None:
                    on_complete(result)
            wdist.barrier()

        if async_save:
            _maybe_inject_crash(kind, iteration, "before-write")
            request = dist_checkpointing.save(
                state_dict,
                str(tmp),
                self._save_strategy(),
                async_sharded_save=True,
                **async_save_kwargs(dist_checkpointing.save),
                content_metadata=content_metadata,
            )
            request.add_finalize_fn(finalize)
            self._async().schedule_async_request(request)
        else:
            _maybe_inject_crash(kind, iteration, "before-write")
            dist_checkpointing.save(
                state_dict, str(tmp), self._save_strategy(), content_metadata=content_metadata
            )
            _maybe_inject_crash(kind, iteration, "after-shards")
            wdist.barrier()
            finalize()

    def _async(self) -> Any:
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue(persistent=False)
        return self._async_queue

    def _finish_pending(self) -> None:
        """Finalise every async save in flight (blocking), then drop any write result left in
        megatron-core's shared results queue: it belongs to no save in flight, and the next
        save's finalisation would otherwise take it for its own."""
        if self._async_queue is not None and self._async_queue.get_num_unfinalized_calls():
            self._async_queue.maybe_finalize_async_calls(blocking=True)
        _drain_results_queue()

    def poll(self) -> None:
        """Finalise async saves that finished (non-blocking; call every iteration, all ranks)."""
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until every async save is finalised (call before exiting)."""
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=True)
            self._async_queue.close()
            self._async_queue = None

    def finish_pending(self) -> None:
        """Finalise every async save in flight (blocking; all ranks): afterwards the saved
        windows on disk are what the trainer has promised (the merged readout reads them)."""
        self._finish_pending()

    def window_reader(self) -> dict[str, Callable[..., None]]:
        """The checks and key adaptation a reader of this run's checkpoints applies
        (:func:`megatron_wsm.wsm_readout.merged_tensors`' ``verify`` and ``adapt``)."""
        return {"verify": self.verify_model_checkpoint, "adapt": _adapt_request}

    def verify_model_checkpoint(self, ckpt: Path) -> None:
        """Refuse ``ckpt`` unless it holds this model and its files are intact (collective)."""
        try:
            manifest = read_manifest(ckpt)
        except ValueError as e:
            raise CheckpointError(f"{ckpt}: {e}") from e
        self._check_identity(ckpt, manifest)
        self._verify_before_load(ckpt)

    def _check_identity(self, ckpt: Path, manifest: CheckpointManifest | None) -> None:
        if manifest is not None and manifest.model_config_hash != self.identity_hash:
            diff = {
                k: (manifest.model_config.get(k), v)
                for k, v in self.identity.items()
                if manifest.model_config.get(k) != v
            }
            raise CheckpointError(
                f"{ckpt} holds another model: (checkpoint, this run) differ in {diff}"
                + self._padding_hint(diff)
            )

    def _padding_hint(self, diff: dict[str, tuple[Any, Any]]) -> str:
        """``": <how to get the checkpoint's rows>"`` when only the vocabulary padding differs
        (another TP size pads differently: model/vocab.py), else ``""``."""
        recorded = diff.get("padded_vocab_size", (None,))[0]
        if set(diff) != {"padded_vocab_size"} or not isinstance(recorded, int):
            return ""
        from megatron_wsm.model.vocab import padding_mismatch_hint

        hint = padding_mismatch_hint(
            recorded, self.identity.get("vocab_size"), self.layout.tensor_model_parallel_size
        )
        return f": {hint}" if hint else ""

    # -- retention

    def prune_window(
        self, root: str | os.PathLike, window_iters: int | None, window_tokens: int | None
    ) -> list[Path]:
        """Rank 0 prunes window checkpoints outside the window (see :func:`prune_window_dir`)."""
        return prune_window_dir(root, window_iters, window_tokens) if wdist.rank() == 0 else []

    def prune_full(self, root: str | os.PathLike, keep_last: int | None) -> list[Path]:
        """Rank 0 keeps the newest ``keep_last`` full checkpoints (:func:`prune_full_dir`)."""
        return prune_full_dir(root, keep_last) if wdist.rank() == 0 else []

    # -- loading

    def _load_scheduler(self, saved: dict[str, Any]) -> None:
        """Take over the checkpoint's scheduler position (samples trained so far).

        With neither --override-opt-param-scheduler nor --use-checkpoint-opt-param-scheduler,
        megatron-core refuses any difference in lengths, yet a longer (or differently ending)
        run of a stable phase is the point of WSM. So we compare only what changes the LR of
        the resumed steps (:func:`lr.schedule_conflicts`) and, when nothing does, load with this
        command line's schedule.
        """
        sched = self.scheduler
        if sched.override_opt_param_scheduler or sched.use_checkpoint_opt_param_scheduler:
            if not sched.override_opt_param_scheduler:
                # megatron-core restores neither the WSD decay nor the warmup start: take them
                # from the checkpoint too (before load_state_dict steps to its position).
                for key in ("init_lr", "wsd_decay_steps", "lr_wsd_decay_style"):
                    if key in saved:
                        setattr(sched, key, saved[key])
            sched.load_state_dict(saved)  # the user chose whose values win
            return
        self._refuse_schedule_conflict(saved)
        sched.override_opt_param_scheduler = True  # keep our values, take only num_steps
        try:
            sched.load_state_dict(saved)
        finally:
            sched.override_opt_param_scheduler = False

    def _refuse_schedule_conflict(self, saved: dict[str, Any]) -> None:
        """Raise when this run's LR schedule changes the LR of the resumed steps (see
        :meth:`_load_scheduler`)."""
        from megatron_wsm import lr as lr_schedule

        state = lr_schedule.scheduler_state(self.scheduler)
        conflicts = lr_schedule.schedule_conflicts(saved, state)
        if conflicts:
            raise CheckpointError(
                "the LR schedule of this run differs from the checkpoint's where it changes "
                f"the LR from here on ({'; '.join(conflicts)}); pass "
                "--override-opt-param-scheduler to use this command line's schedule, or "
                "--use-checkpoint-opt-param-scheduler to keep the checkpoint's"
            )

    def _check_schedule_before_load(self, ckpt: Path) -> None:
        """The schedule check, before megatron-core's load: from 0.19 it keys the optimizer's
        parameter groups by their peak LR, so another ``--lr`` would otherwise fail inside the
        load with a message about parameter groups instead of ours. Nothing to check when a
        scheduler flag says whose schedule wins."""
        sched = self.scheduler
        if sched.override_opt_param_scheduler or sched.use_checkpoint_opt_param_scheduler:
            return
        try:
            common = ckpt_common.read_common_state(ckpt)
        except (ckpt_common.CommonStateError, ckpt_integrity.IntegrityError):
            return  # megatron-core's load reports an unreadable checkpoint
        saved = common.get("opt_param_scheduler") if isinstance(common, dict) else None
        if isinstance(saved, dict):
            self._refuse_schedule_conflict(saved)

    def _verify_before_load(self, ckpt: Path) -> None:
        """Refuse a checkpoint whose files are not what its ``.metadata`` says (collective).

        megatron-core unpickles ``.metadata`` with plain ``pickle``: every rank first reads it
        with the restricted unpickler and checks shard names and byte ranges, so a crafted or
        inconsistent checkpoint is refused before megatron-core touches it. Then the CRC-32 of
        every item is checked, the shard files split over the ranks (one extra read of the
        checkpoint in all, shared like the load itself), so bit rot is not loaded silently.
        """
        if not os.path.lexists(ckpt / ckpt_integrity.METADATA_FILE):
            return  # legacy format: megatron-core refuses it with its own message
        try:
            # Checkpoint files that are not regular files (megatron-core would block on a FIFO),
            # metadata, ranges, a readable common state at the iteration of the name/manifest.
            problems = checkpoint_problems(ckpt, read_manifest(ckpt))
            if not problems:
                metadata = ckpt_integrity.load_metadata(ckpt)
                files = ckpt_integrity.shard_files(metadata)
                mine = files[wdist.rank() :: wdist.world_size()]
                problems = ckpt_integrity.crc_problems(ckpt, metadata, files=mine)
        except ValueError as e:  # IntegrityError, ManifestError: changed since it was checked
            problems = [str(e)]
        if not wdist.all_ranks_true(not problems):
            found = [p for per_rank in wdist.all_gather_objects(problems) for p in per_rank]
            more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
            raise CheckpointError(f"refusing to load {ckpt}: {found[0]}{more}")

    @staticmethod
    def _checkpoint_args(ckpt: Path) -> Any:
        """The ``args`` of ``ckpt``'s common state (restricted read), None when unreadable."""
        try:
            common = ckpt_common.read_common_state(ckpt)
        except (ckpt_common.CommonStateError, ckpt_integrity.IntegrityError):
            return None  # megatron-core's load reports an unreadable checkpoint
        return common.get("args") if isinstance(common, dict) else None

    @staticmethod
    def _saved_optimizer(ckpt: Path, manifest: CheckpointManifest | None) -> dict[str, Any]:
        """:func:`optimizer_record` of the checkpoint's writer (manifest, else the content
        metadata megatron-core keeps with the checkpoint, else: the plain optimizer)."""
        from megatron.core import dist_checkpointing

        content = dist_checkpointing.load_content_metadata(str(ckpt)) or {}
        from_content = saved_optimizer_from_content(content)
        if manifest is not None and EXTRA_OPTIMIZER in manifest.extra:
            record = dict(manifest.extra[EXTRA_OPTIMIZER])
            record["metadata"] = load_metadata(content, record.get("sharding"))
            return record
        return from_content

    def load(
        self,
        path: str | os.PathLike,
        *,
        load_optim: bool = True,
        load_rng: bool = True,
        finetune: bool = False,
    ) -> dict[str, Any]:
        """Load ``path`` (a checkpoint dir or a root) into model/optimizer/scheduler.

        Returns ``{"iteration", "consumed_samples", "consumed_tokens", "kind", "path"}``.
        Model-only checkpoints (window, merged) and ``finetune`` load weights only.
        """
        from megatron.core import dist_checkpointing

        ckpt = resolve_load_dir(path)
        try:
            manifest = read_manifest(ckpt)
        except ValueError as e:
            raise CheckpointError(f"{ckpt}: {e}") from e
        kind = manifest.kind if manifest is not None else KIND_FULL
        self._check_identity(ckpt, manifest)
        self._verify_before_load(ckpt)
        # Without our manifest (Megatron-LM's checkpoints): the model and layout its args say.
        foreign_args = self._checkpoint_args(ckpt) if manifest is None else None
        diff = shape_differences(foreign_args, self.identity)
        if diff:
            raise CheckpointError(
                f"{ckpt} holds another model: (checkpoint, this run) differ in {diff}"
                + self._padding_hint(diff)
            )
        saved_layout = manifest.parallel if manifest is not None else None
        if saved_layout is None and parallel_layout_from_args(foreign_args) is not None:
            saved_layout = ParallelLayout(**parallel_layout_from_args(foreign_args))
        model_sd = self._model_sharded()
        sharded: dict[str, Any] = {"model": model_sd}
        has_optim = kind == KIND_FULL and not finetune
        if has_optim and load_optim:
            self._check_schedule_before_load(ckpt)
            saved = self._saved_optimizer(ckpt, manifest)
            problem = optimizer_load_problem(
                saved,
                self.optim_sharding,
                saved_layout,
                self.layout,
                _optimizer_parts(self.optimizer),
            )
            if problem:
                raise CheckpointError(
                    f"cannot load the optimizer state of {ckpt}: {problem}; or add "
                    "--no-load-optim --no-load-rng to load the weights alone"
                )
            # Load with the writer's sharding (this run's --dist-ckpt-optim-* choice applies
            # to its own saves).
            metadata = saved["metadata"]
            cpu_compat.init_torch_adam_state(self.optimizer)
            sharded["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=True, metadata=metadata
            )
        _adapt_request(sharded, ckpt)
        if has_optim and load_rng:
            request = self._rng_request(ckpt)
            if request is not None:
                sharded["rng_state"] = request
        try:
            loaded = dist_checkpointing.load(sharded, str(ckpt))
            self.bare_model().load_state_dict(loaded["model"], strict=True)
            if "optimizer" in sharded:
                # no_grad: with fp32 parameters the distributed optimizer's main parameters
                # are views of the model's (leaf tensors that require grad), which its
                # load copies into in place.
                with cpu_compat.loading_torch_adam_state(self.optimizer), torch.no_grad():
                    self.optimizer.load_state_dict(loaded["optimizer"])
            elif hasattr(self.optimizer, "reload_model_params"):
                # fp32 master copies must follow the loaded weights when no optimizer state
                # is read (bf16 training).
                self.optimizer.reload_model_params()
        except Exception as e:  # megatron-core raises many types; say which checkpoint failed
            hint = load_failure_hint(str(e), "optimizer" in sharded)
            raise CheckpointError(f"cannot load {ckpt}: {type(e).__name__}: {e}{hint}") from e
        if has_optim and load_optim and "opt_param_scheduler" in loaded:
            self._load_scheduler(loaded["opt_param_scheduler"])
        if "rng_state" in sharded and loaded.get("rng_state") is not None:
            set_rng_state(
                _dp_rank_state(loaded["rng_state"]),
                (self.run_info.get("training") or {}).get("seed"),
            )
        wdist.barrier()
        if finetune:
            return {
                "iteration": 0,
                "consumed_samples": 0,
                "consumed_tokens": 0,
                "kind": kind,
                "path": str(ckpt),
            }
        position = data_position(loaded, (self.run_info.get("model") or {}).get("seq_length"))
        return {
            "iteration": int(loaded.get("iteration", 0)),
            **position,
            "kind": kind,
            "path": str(ckpt),
        }


# ----------------------------------------------------------------------------- helpers

#: Test-only fault injection: ``KIND:ITERATION:POINT`` (e.g. ``window:6:after-shards``) makes
#: rank 0 SIGKILL itself at that point of that save, to prove a crash leaves nothing that looks
#: complete. Points: ``before-write``, ``after-shards`` (sync saves), ``before-finalize`` (all
#: shards and the .metadata written, nothing marked complete yet; for async saves this is the
#: trainer finalising iterations later). Unset in normal runs.
CRASH_ENV = "MEGATRON_WSM_TEST_CRASH_DURING_SAVE"


def load_failure_hint(message: str, loading_optimizer: bool) -> str:
    """What to do about a failed ``dist_checkpointing.load`` (appended to its message)."""
    if not loading_optimizer:
        return ""
    if "parameter group" in message:
        # megatron-core >= 0.19 matches the saved parameter groups by their LR / weight-decay
        # settings, so a run with another peak LR (even with --override-opt-param-scheduler)
        # cannot take over the optimizer state.
        return (
            " (megatron-core matches optimizer parameter groups by their LR and weight-decay "
            "settings: with another --lr, --min-lr or weight decay the optimizer state cannot "
            "be loaded; add --no-load-optim --no-load-rng to load the weights alone)"
        )
    return (
        " (optimizer state reloads only into the parallel layout it was saved "
        "with; add --no-load-optim --no-load-rng to load the weights alone)"
    )


def _adapt_request(sharded: dict[str, Any], ckpt: Path) -> None:
    """Rename a load request's model keys to the checkpoint's: either spec's checkpoint, and
    the local spec's older norm names, load into this model."""
    if (ckpt / ckpt_integrity.METADATA_FILE).is_file():
        spec_keys.adapt_load_request(sharded, spec_keys.checkpoint_keys(ckpt))


def data_position(common: dict[str, Any], seq_length: int | None) -> dict[str, int]:
    """Where a loaded checkpoint's data position is: ours keep ``consumed_samples`` and
    ``consumed_tokens`` at the top level of the common state; Megatron-LM's only in ``args``
    (``consumed_train_samples``; tokens = samples x its ``seq_length``, else ``seq_length``:
    the run's). Without either, 0 (a checkpoint that says nothing starts the data over)."""
    args = common.get("args")
    if "consumed_samples" in common:
        samples = int(common["consumed_samples"])
        tokens = int(common.get("consumed_tokens", 0))
    elif getattr(args, "consumed_train_samples", None) is not None:
        samples = int(args.consumed_train_samples)
        seq = getattr(args, "seq_length", None) or seq_length or 0
        tokens = samples * int(seq)
    else:
        samples = tokens = 0
    return {"consumed_samples": samples, "consumed_tokens": tokens}


def _rng_sharding() -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """:func:`megatron_wsm.checkpoint.rng.sharding` for this rank."""
    from megatron.core import parallel_state as ps

    from megatron_wsm.checkpoint import rng

    return rng.sharding(
        (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        (
            ps.get_data_parallel_rank(with_context_parallel=True),
            ps.get_data_parallel_world_size(with_context_parallel=True),
        ),
        ps.get_expert_model_parallel_world_size(),
    )


def _dp_rank_state(value: Any) -> Any:
    """This rank's entry of a loaded RNG state (Megatron-LM's list holds one per DP rank with
    ``--data-parallel-random-init``, else one)."""
    from megatron.core import parallel_state as ps

    from megatron_wsm.checkpoint import rng

    if isinstance(value, (list, tuple)):
        return rng.normalize(value, ps.get_data_parallel_rank())
    return value


def print_rank0_note(message: str) -> None:
    """One line on global rank 0."""
    if wdist.rank() == 0:
        print(message, flush=True)


def _maybe_inject_crash(kind: str, iteration: int, point: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if spec and spec == f"{kind}:{iteration}:{point}" and wdist.rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def async_save_kwargs(save: Callable[..., Any]) -> dict[str, Any]:
    """Extra arguments for an async ``dist_checkpointing.save``: megatron-core >= 0.17 defaults
    to the nvidia-resiliency-ext strategy (an optional package); ask for its own one there.
    Decided by the signature, so 0.16 (no such argument) gets nothing."""
    import inspect

    params = inspect.signature(save).parameters
    return {"async_strategy": "mcore"} if "async_strategy" in params else {}


def _model_spec(transformer_impl: str) -> dict[str, Any]:
    """The layer spec this run built (``--transformer-impl`` on this machine), for the manifest."""
    from megatron_wsm.accelerators import SPEC_TE, layer_spec_name

    spec = layer_spec_name(transformer_impl)
    te_version = None
    if spec == SPEC_TE:
        from importlib.metadata import PackageNotFoundError, version

        for dist_name in ("transformer_engine", "transformer-engine"):
            try:
                te_version = version(dist_name)
                break
            except PackageNotFoundError:
                continue
    return {
        "layer_spec": spec,
        "key_scheme": spec_keys.KEY_SCHEME,
        "transformer_engine_version": te_version,
    }


def _mcore_version() -> str:
    from megatron.core.package_info import __version__

    return __version__


def _check_saved_files(path: Path) -> None:
    """Fail the save (before it is marked complete) unless its ``.metadata`` describes exactly
    the shards in ``path`` (missing metadata or files, truncated shards, another save's index)."""
    problems = ckpt_integrity.storage_problems(path)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{path}: saved files are inconsistent, not marking it complete: "
            + "; ".join(problems[:3])
            + more
        )


def _drain_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    q = filesystem_async._results_queue
    if q is None:
        return
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
        logger.warning("dropped a stale torch_dist write result no save in flight owns")


# ----------------------------------------------------------------------------- helper processes

_helpers_bound = False
_fork_parent_pid = 0
_results_manager: Any = None


def _before_fork() -> None:
    global _fork_parent_pid
    _fork_parent_pid = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_fork_parent_pid)


def bind_helper_processes_to_trainer() -> None:
    """Make the helper processes checkpoint saving starts die with the trainer (idempotent).

    megatron-core's torch_dist saves start two kinds: forked writers (the async save process and
    its per-file workers) and, once per process, a ``multiprocessing`` Manager
    serving the shared write-results queue. Neither watches its parent, so a trainer killed
    with SIGKILL left them (a few hundred MB each) asleep under
    init forever. Forked children get a parent-death signal from an at-fork hook; the Manager
    is started here, with the same signal set by its initializer, and installed as
    megatron-core's queue before its first save would start one of its own. Linux only (a
    no-op elsewhere). Note the signal fires when the forking *thread* exits: megatron-core forks
    from the main thread of the trainer and of its writer process.
    """
    global _helpers_bound, _results_manager
    if _helpers_bound:
        return
    _helpers_bound = True
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch import multiprocessing as mp

    if filesystem_async._results_queue is None:
        from multiprocessing.managers import SyncManager

        # spawn on GPUs (CUDA state must not be forked). Without CUDA, fork: a spawned server
        # imports torch to unpickle the first write result (~3 s at each process's first
        # save), and megatron-core forks its writer workers from this process anyway.
        method = "spawn" if torch.cuda.is_available() else "fork"
        _results_manager = SyncManager(ctx=mp.get_context(method))
        _results_manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = _results_manager.Queue()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished checkpoint into place; an existing one at ``dst`` is replaced only after
    the new one is in place (the old one is renamed aside first, then deleted)."""
    if dst.exists():
        aside = dst.with_name(f"{TMP_PREFIX}old-{dst.name}-{os.getpid()}")
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)
