"""Weighted merge of legacy per-rank ``torch`` checkpoints (``mp_rank_*/model_optim_rng.pt``).

Each input holds one ``torch.save`` file per model-parallel rank; the merge is done file by file
(the merge ranks split the files). Inputs are opened with ``torch.load(mmap=True,
weights_only=True)``: their tensors stay in the page cache and are read in chunks into an fp32
accumulator, so K inputs cost no more memory than one. The output file is written with one
``torch.save`` of the newest input's dict (optimizer removed, model tensors averaged), which
needs the *output* model tensors of one file in memory: the bound for this format is the model
size of one ``mp_rank`` file in the output dtype, plus one chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from megatron_wsm.checkpoint.common_state import allowed_globals
from megatron_wsm.merge.common import Comm, MergeError
from megatron_wsm.merge.inputs import LEGACY_FILE, CheckpointInput, legacy_rank_dirs
from megatron_wsm.merge.torch_dist import (
    ACTION_AVERAGE,
    ACTION_COPY,
    ACTION_DROP,
    DELAY_ENV,
)

#: Top-level entries of a legacy file that hold optimizer state; dropped by the merge.
DROPPED_ENTRIES = ("optimizer",)
_MODEL_ENTRY = "model"


def _safe_globals() -> list[Any]:
    """Globals a Megatron-LM legacy file needs beyond tensors: ``args`` and numpy RNG state."""
    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype]
    try:
        from numpy.core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 2 moved it
        from numpy._core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed.append(_reconstruct)
    allowed.extend(
        getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")
    )
    return allowed


def load_legacy(path: Path) -> dict[str, Any]:
    """Memory-map one legacy file with ``weights_only=True`` (plus Namespace/numpy RNG state)."""
    try:
        with allowed_globals(_safe_globals()):  # leaves others' registrations alone
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError as e:
        raise MergeError(f"{path}: missing") from e
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise MergeError(
            f"{path}: cannot load with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(state, dict) or not any(k.startswith(_MODEL_ENTRY) for k in state):
        raise MergeError(f"{path}: not a Megatron checkpoint file (no 'model' entry)")
    return state


def model_entries(state: dict[str, Any]) -> list[str]:
    """``model`` or ``model0``, ``model1``… (virtual pipeline stages)."""
    return sorted(
        k for k in state if k == _MODEL_ENTRY or (k.startswith("model") and k[5:].isdigit())
    )


def _action(value: Any) -> str:
    if torch.is_tensor(value) and value.is_floating_point():
        return ACTION_AVERAGE
    return ACTION_COPY


@dataclasses.dataclass
class LegacyPlan:
    """The files to merge and what happens to each model key."""

    inputs: list[CheckpointInput]
    coefficients: list[float]
    rank_dirs: list[str]
    actions: dict[str, str]  # "<rank_dir>/<model entry>/<key>" -> action
    tensor_bytes: int  # bytes of averaged tensors per input (all files)
    copy_bytes: int
    output_dtype: str
    notes: list[str]

    def bytes_to_read(self) -> int:
        """Bytes of averaged tensors read (zero-coefficient inputs skipped)."""
        n = sum(c != 0.0 for c in self.coefficients)
        return self.tensor_bytes * n + self.copy_bytes

    def bytes_to_write(self) -> int:
        """Approximate output size (tensor bytes at the output dtype)."""
        return self.tensor_bytes + self.copy_bytes

    def keys(self, action: str) -> list[str]:
        """The keys handled with ``action``."""
        return sorted(k for k, a in self.actions.items() if a == action)


def _check_file(
    rank_dir: str, inputs: list[CheckpointInput], actions: dict[str, str]
) -> tuple[int, int]:
    states = [load_legacy(inp.path / rank_dir / LEGACY_FILE) for inp in inputs]
    ref, ref_path = states[-1], inputs[-1].path
    tensor_bytes = copy_bytes = 0
    for entry in DROPPED_ENTRIES:
        if entry in ref:
            actions[f"{rank_dir}/{entry}"] = ACTION_DROP
    for entry in model_entries(ref):
        for key, value in ref[entry].items():
            name = f"{rank_dir}/{entry}/{key}"
            actions[name] = _action(value)
            if actions[name] != ACTION_AVERAGE:
                copy_bytes += value.nbytes if torch.is_tensor(value) else 0
                continue
            tensor_bytes += value.nbytes
            for inp, state in zip(inputs[:-1], states[:-1]):
                other = state.get(entry, {}).get(key)
                if not torch.is_tensor(other):
                    raise MergeError(f"{name}: present in {ref_path} but not in {inp.path}")
                if other.dtype != value.dtype or other.shape != value.shape:
                    raise MergeError(
                        f"{name}: {tuple(other.shape)} {other.dtype} in {inp.path} but "
                        f"{tuple(value.shape)} {value.dtype} in {ref_path}"
                    )
        for inp, state in zip(inputs[:-1], states[:-1]):
            extra = set(state.get(entry, {})) - set(ref[entry])
            if extra:
                raise MergeError(
                    f"{inp.path}/{rank_dir}: keys not in the newest input: {sorted(extra)[:4]}"
                )
    return tensor_bytes, copy_bytes


def build_plan(
    inputs: list[CheckpointInput], coefficients: list[float], output_dtype: str, comm: Comm
) -> LegacyPlan:
    """Check every input has the same files, keys, shapes and dtypes (collective)."""

    def rank_dirs() -> list[str]:
        dirs = legacy_rank_dirs(inputs[-1].path)
        for inp in inputs[:-1]:
            if legacy_rank_dirs(inp.path) != dirs:
                raise MergeError(
                    f"{inp.path} and {inputs[-1].path} have different mp_rank_* files "
                    "(different parallel layout)"
                )
        return dirs

    dirs = comm.run_on_rank0(rank_dirs)

    def check_share() -> tuple[dict[str, str], int, int]:
        actions: dict[str, str] = {}
        tensor_bytes = copy_bytes = 0
        for i, rank_dir in enumerate(dirs):
            if i % comm.size == comm.rank:
                t, c = _check_file(rank_dir, inputs, actions)
                tensor_bytes, copy_bytes = tensor_bytes + t, copy_bytes + c
        return actions, tensor_bytes, copy_bytes

    actions: dict[str, str] = {}
    tensor_bytes = copy_bytes = 0
    for part, t, c in comm.run_everywhere(check_share):
        actions.update(part)
        tensor_bytes, copy_bytes = tensor_bytes + t, copy_bytes + c
    notes = [f"legacy torch format: {len(dirs)} file(s) per checkpoint, merged file by file"]
    return LegacyPlan(
        inputs, coefficients, dirs, actions, tensor_bytes, copy_bytes, output_dtype, notes
    )


def _average_tensor(
    name: str, tensors: list[torch.Tensor | None], plan: LegacyPlan, acc: torch.Tensor
) -> torch.Tensor:
    ref = next(t for t in reversed(tensors) if t is not None)
    dtype = {"same": ref.dtype, "fp32": torch.float32, "bf16": torch.bfloat16}[plan.output_dtype]
    out = torch.empty(ref.shape, dtype=dtype)
    flat_out = out.view(-1)
    flats = [t.reshape(-1) if t is not None else None for t in tensors]
    step = acc.numel()
    for start in range(0, flat_out.numel(), step):
        stop = min(start + step, flat_out.numel())
        a = acc[: stop - start]
        first = True
        for coef, flat in zip(plan.coefficients, flats):
            if flat is None or coef == 0.0:
                continue
            if first:
                a.copy_(flat[start:stop]).mul_(coef)
                first = False
            else:
                a.add_(flat[start:stop].float(), alpha=coef)
        if not torch.isfinite(a.sum()):
            for inp, flat in zip(plan.inputs, flats):
                if flat is not None and not bool(torch.isfinite(flat[start:stop]).all()):
                    raise MergeError(f"{inp.path}: NaN/Inf in {name}; refusing to merge")
            raise MergeError(f"{name}: the merged values overflow (NaN/Inf)")
        flat_out[start:stop].copy_(a)
    return out


def _merge_file(
    rank_dir: str, plan: LegacyPlan, out_dir: Path, acc: torch.Tensor
) -> tuple[int, int]:
    paths = [inp.path / rank_dir / LEGACY_FILE for inp in plan.inputs]
    states = [
        load_legacy(p) if (c != 0.0 or j == len(paths) - 1) else None
        for j, (p, c) in enumerate(zip(paths, plan.coefficients))
    ]
    newest = states[-1]
    assert newest is not None
    output = {k: v for k, v in newest.items() if k not in DROPPED_ENTRIES}
    read = 0
    for entry in model_entries(newest):
        merged = {}
        for key, value in newest[entry].items():
            name = f"{rank_dir}/{entry}/{key}"
            if plan.actions.get(name) != ACTION_AVERAGE:
                merged[key] = value
                continue
            tensors = [
                None if s is None or c == 0.0 else s[entry][key]
                for s, c in zip(states, plan.coefficients)
            ]
            read += sum(t.nbytes for t in tensors if t is not None)
            merged[key] = _average_tensor(name, tensors, plan, acc)
        output[entry] = merged
    target = out_dir / rank_dir / LEGACY_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(output, target)
    with open(target, "rb+") as f:
        os.fsync(f.fileno())
    return read, target.stat().st_size


def stream(
    plan: LegacyPlan, out_dir: Path, comm: Comm, chunk_bytes: int, progress: bool
) -> tuple[int, int, int, list[str]]:
    """Merge this rank's share of the files (collective); same return as the torch_dist one."""
    elems = max(4096, chunk_bytes // 8)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)

    def work() -> tuple[int, int]:
        acc = torch.empty(elems, dtype=torch.float32)
        read = written = 0
        mine = [d for i, d in enumerate(plan.rank_dirs) if i % comm.size == comm.rank]
        bar = None
        if progress and comm.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(mine), unit="file", desc="merge (rank 0)")
        for rank_dir in mine:
            r, w = _merge_file(rank_dir, plan, out_dir, acc)
            read, written = read + r, written + w
            if bar is not None:
                bar.update(1)
            if delay:
                time.sleep(delay)
        if bar is not None:
            bar.close()
        return read, written

    results = comm.run_everywhere(work)
    return sum(r for r, _ in results), sum(w for _, w in results), elems * 4, []
