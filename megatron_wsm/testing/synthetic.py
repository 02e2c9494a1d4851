"""Synthetic Megatron-style MoE checkpoints for the merge's tests and benchmark.

The state dicts mimic what megatron-core's ``GPTModel.sharded_state_dict()`` produces for an MoE
model (observed key names: layers stacked on dim 0 of the global shape, experts on dim 1,
``_extra_state`` as ``ShardedObject``), split over ``world`` ranks that are at once the TP and
the EP ranks: attention/embedding weights are split along a dim (TP), experts are distributed
(EP), norms/router/expert bias are replicated (``replica_id`` = TP rank, only rank 0 saves).
Values are a deterministic function of (seed, key, element) whatever the layout, so a reference
can be computed from global tensors. Saving goes through megatron-core's own
``dist_checkpointing.save`` (torch_dist) — call :func:`save_torch_dist` on every rank of an
initialised process group — or ``torch.save`` per rank for the legacy format.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import zlib
from pathlib import Path
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch

from megatron_wsm.checkpoint.manifest import CheckpointManifest, ParallelLayout, write_manifest
from megatron_wsm.ports import free_port


@dataclasses.dataclass
class SyntheticSpec:
    """Sizes of the synthetic MoE model (global, before any split)."""

    num_layers: int = 2
    hidden: int = 32
    ffn: int = 48  # expert FFN width (fc1 is 2*ffn wide: GLU)
    num_experts: int = 4
    vocab: int = 128
    dtype: torch.dtype = torch.float32
    #: Split the QKV weight along its input dim instead of its output dim: the same tensors in
    #: another parallel layout (for the merge's layout-mismatch refusal).
    alt_layout: bool = False

    def tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
        """key -> (global shape, dtype, how it is split: 'tp0', 'tp2', 'ep', 'rep')."""
        L, H, F, E, V, dt = (
            self.num_layers, self.hidden, self.ffn, self.num_experts, self.vocab, self.dtype,
        )
        return {
            "embedding.word_embeddings.weight": ((V, H), dt, "tp0"),
            "decoder.layers.input_layernorm.weight": ((L, H), dt, "rep"),
            "decoder.layers.self_attention.linear_qkv.weight": (
                (L, 3 * H, H), dt, "tp2" if self.alt_layout else "tp1"
            ),
            "decoder.layers.self_attention.linear_proj.weight": ((L, H, H), dt, "tp2"),
            "decoder.layers.pre_mlp_layernorm.weight": ((L, H), dt, "rep"),
            "decoder.layers.mlp.router.weight": ((L, E, H), dt, "rep"),
            "decoder.layers.mlp.router.expert_bias": ((L, E), torch.float32, "rep"),
            "decoder.layers.mlp.router.token_counts": ((L, E), torch.int64, "rep"),
            "decoder.layers.mlp.experts.experts.linear_fc1.weight": ((L, E, 2 * F, H), dt, "ep"),
            "decoder.layers.mlp.experts.experts.linear_fc2.weight": ((L, E, H, F), dt, "ep"),
            "decoder.final_layernorm.weight": ((H,), dt, "rep"),
            "output_layer.weight": ((V, H), dt, "tp0"),
        }

    def nbytes(self) -> int:
        """Bytes of all model tensors (one checkpoint, all ranks)."""
        total = 0
        for shape, dtype, _ in self.tensors().values():
            n = 1
            for s in shape:
                n *= s
            total += n * dtype.itemsize
        return total


def global_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The full tensor ``key`` of checkpoint ``seed`` (deterministic, layout independent)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 0.02 + 0.001 * seed).to(dtype)
    return torch.randint(0, 1000, shape, generator=gen, dtype=dtype)


def _split(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim=dim)[rank].clone()


def sharded_state_dict(
    spec: SyntheticSpec,
    seed: int,
    rank: int,
    world: int,
    *,
    iteration: int = 0,
    with_optimizer: bool = False,
) -> dict[str, Any]:
    """The state dict rank ``rank`` of ``world`` hands to ``dist_checkpointing.save``."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    layers = spec.num_layers
    for key, (shape, dtype, split) in spec.tensors().items():
        full = global_tensor(key, shape, dtype, seed)
        shards = _shards(key, full, split, rank, world, layers, spec.num_experts)
        for name, local, offsets, replica in shards:
            prepend = full.dim() - local.dim()
            st = ShardedTensor.from_rank_offsets(
                key, local, *offsets, replica_id=replica, prepend_axis_num=prepend
            )
            model[name] = st
            if with_optimizer and dtype.is_floating_point:
                opt_key = f"optimizer.state.exp_avg.{key}"
                optim[name] = ShardedTensor.from_rank_offsets(
                    opt_key, torch.full_like(local, 0.5, dtype=torch.float32), *offsets,
                    replica_id=replica, prepend_axis_num=prepend,
                )
    for layer in range(layers):
        for module in ("self_attention.linear_qkv", "self_attention.linear_proj"):
            key = f"decoder.layers.{module}._extra_state"
            model[f"{key}.{layer}"] = ShardedObject(
                key, {"layer": layer, "seed": seed}, (layers,), (layer,), replica_id=rank
            )
    state: dict[str, Any] = {
        "model": model,
        "iteration": iteration,
        "consumed_samples": iteration * 8,
        "checkpoint_version": 3.0,
    }
    if with_optimizer:
        state["optimizer"] = {"state": optim, "param_groups": [{"lr": 1e-3, "step": iteration}]}
        state["opt_param_scheduler"] = {"num_steps": iteration * 8, "max_lr": 1e-3}
        state["rng_state"] = ShardedObject(
            "rng_state", {"seed": seed, "rank": rank}, (world,), (rank,), replica_id=0
        )
    return state


def _shards(
    key: str, full: torch.Tensor, split: str, rank: int, world: int, layers: int, experts: int
) -> list[tuple[str, torch.Tensor, tuple[tuple[int, int, int], ...], Any]]:
    """(name, local tensor, rank offsets, replica id) of each shard this rank saves."""
    out = []
    if split == "tp0":  # not stacked, split on dim 0 (vocab)
        return [(key, _split(full, 0, rank, world), ((0, rank, world),), 0)]
    if full.dim() == 1:  # final norm: replicated, not stacked
        return [(key, full.clone(), (), rank)]
    if split == "ep":
        local_experts = experts // world
        for layer in range(layers):
            for e in range(local_experts):
                g = rank * local_experts + e
                name = f"{key}.{layer}.{g}"
                offsets = ((0, layer, layers), (1, g, experts))
                out.append((name, full[layer, g].clone(), offsets, 0))
        return out
    for layer in range(layers):
        per_layer = full[layer]
        if split == "rep":
            out.append((f"{key}.{layer}", per_layer.clone(), ((0, layer, layers),), rank))
        else:  # tp1 / tp2: split along dim 1 or 2 of the global (stacked) shape
            dim = int(split[-1])
            local = _split(per_layer, dim - 1, rank, world)
            offsets = ((0, layer, layers), (dim, rank, world))
            out.append((f"{key}.{layer}", local, offsets, 0))
    return out


def save_torch_dist(
    path: str | os.PathLike,
    spec: SyntheticSpec,
    seed: int,
    *,
    iteration: int,
    with_optimizer: bool = False,
    manifest: bool = True,
    kind: str = "window",
    tokens_per_iteration: int = 1024,
    config_hash: str = "synthetic0000000",
    embed_common: bool = False,
) -> Path:
    """Save one synthetic checkpoint with megatron-core (call on every rank of the group).

    ``embed_common``: lay the common state out as megatron-core >= 0.19 does (a
    ``common_state`` ShardedObject inside the shard files, no ``common.pt``) on any version.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_wsm import cpu_compat

    cpu_compat.apply()  # megatron-core's torch_dist save calls torch.cuda.* (no-op on GPUs)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    path = Path(path)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    state = sharded_state_dict(
        spec, seed, rank, world, iteration=iteration, with_optimizer=with_optimizer
    )
    if embed_common:
        from megatron.core.dist_checkpointing import ShardedObject
        from megatron.core.dist_checkpointing.utils import extract_sharded_base

        _, common = extract_sharded_base(state)
        state["common_state"] = ShardedObject(
            "common_state", common, (1,), (0,), replica_id=rank
        )
    dist_checkpointing.save(state, str(path))
    if dist.is_initialized():
        dist.barrier()
    if embed_common and rank == 0:
        (path / "common.pt").unlink(missing_ok=True)  # megatron-core < 0.19 also wrote it
    if rank == 0 and manifest:
        write_manifest(path, synthetic_manifest(spec, iteration, world, kind, tokens_per_iteration,
                                                config_hash))
    return path


def synthetic_manifest(
    spec: SyntheticSpec,
    iteration: int,
    world: int,
    kind: str = "window",
    tokens_per_iteration: int = 1024,
    config_hash: str = "synthetic0000000",
    checkpoint_format: str = "torch_dist",
) -> CheckpointManifest:
    """A complete manifest for a synthetic checkpoint."""
    return CheckpointManifest(
        kind=kind,
        iteration=iteration,
        consumed_samples=iteration * 8,
        consumed_tokens=iteration * tokens_per_iteration,
        learning_rate=1e-3,
        parallel=ParallelLayout(
            tensor_model_parallel_size=world, expert_model_parallel_size=world, world_size=world
        ),
        model_config_hash=config_hash,
        model_config={"synthetic": dataclasses.asdict(spec) | {"dtype": str(spec.dtype)}},
        checkpoint_format=checkpoint_format,
        complete=True,
    )


def save_legacy(
    path: str | os.PathLike,
    spec: SyntheticSpec,
    seed: int,
    *,
    iteration: int,
    world: int = 2,
    manifest: bool = True,
) -> Path:
    """A legacy Megatron-LM ``torch`` checkpoint: ``mp_rank_XX/model_optim_rng.pt`` per TP rank."""
    import numpy as np

    path = Path(path)
    for rank in range(world):
        model: dict[str, Any] = {}
        for key, (shape, dtype, split) in spec.tensors().items():
            full = global_tensor(key, shape, dtype, seed)
            if split.startswith("tp"):
                full = _split(full, int(split[-1]), rank, world)
            model[key] = full.clone()
        model["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
        state = {
            "model": model,
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": []},
            "opt_param_scheduler": {"num_steps": iteration},
            "iteration": iteration,
            "checkpoint_version": 3.0,
            "args": argparse.Namespace(tensor_model_parallel_size=world, seed=seed),
            "rng_state": [{"np_rng_state": np.random.RandomState(seed).get_state(),
                           "torch_rng_state": torch.get_rng_state()}],
        }
        rank_dir = path / f"mp_rank_{rank:02d}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, rank_dir / "model_optim_rng.pt")
    if manifest:
        write_manifest(path, synthetic_manifest(spec, iteration, world, checkpoint_format="torch"))
    return path


def load_reference(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint at its global shape, with plain torch only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    reader = FileSystemReader(str(path))
    md = reader.read_metadata()
    state = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return state


def reference_average(
    paths: list[str | os.PathLike], coefficients: list[float]
) -> dict[str, torch.Tensor]:
    """The naive reference: load every input fully, average its float tensors in float64."""
    out: dict[str, torch.Tensor] = {}
    for path, coef in zip(paths, coefficients):
        for key, value in load_reference(path).items():
            if key.startswith("optimizer.") or not value.is_floating_point():
                continue
            out[key] = out.get(key, 0) + coef * value.double()
    return out


def check_loaded_shards(prefix: str, world: int, merged: dict[str, torch.Tensor]) -> int:
    """Compare the shards a ``load`` job wrote for ``world`` ranks with the merged global
    tensors; returns how many shards matched exactly (AssertionError on a mismatch)."""
    matched = 0
    for rank in range(world):
        shards = torch.load(f"{prefix}.rank{rank}.pt", weights_only=True)
        for key, pieces in shards.items():
            full = merged[key]
            for offset, local in pieces:
                lead = len(offset) - local.dim()  # stacked (layer/expert) axes are squeezed
                view = full[tuple(offset[:lead])] if lead else full
                index = tuple(slice(o, o + n) for o, n in zip(offset[lead:], local.shape))
                if not torch.equal(view[index], local):
                    raise AssertionError(f"{key} at {offset}: loaded shard differs")
                matched += 1
    return matched


# ----------------------------------------------------------------------------- job runner
#
# Tests and the benchmark build checkpoints in a child process tree, so that megatron-core's
# process groups, its CPU shims and its save workers never live in the caller's process:
#
#     python -m megatron_wsm.testing.synthetic JOB.json
#
# JOB = {"save": [{"path", "seed", "iteration", "world", "spec": {...}, "with_optimizer",
#                  "manifest", "kind"}...],
#        "load": [{"ckpt", "out", "world", "spec": {...}}...]}
# "load" entries load a checkpoint with megatron-core's dist_checkpointing.load (resharding to
# ``world`` ranks when it differs from the saving layout) and torch.save each rank's model
# shards as {key: [(global_offset, tensor), ...]} to ``out``.rank<r>.pt.


#: The checkpoints of the merge tests (tests/unit/test_merge.py and
#: tests/distributed/test_merge_distributed.py share one build per pytest session): a window
#: w10/w20/w30 (the newest a full checkpoint with optimizer state) saved by 2 ranks, and
#: checkpoints that differ from it in shapes, dtypes, and parallel layout.
TEST_JOB: dict[str, Any] = {
    "save": [
        {"path": "{dir}/w10", "seed": 1, "iteration": 10, "world": 2, "spec": {"dtype": "bf16"}},
        {"path": "{dir}/w20", "seed": 2, "iteration": 20, "world": 2, "spec": {"dtype": "bf16"}},
        {"path": "{dir}/w30", "seed": 3, "iteration": 30, "world": 2, "spec": {"dtype": "bf16"},
         "with_optimizer": True, "kind": "full"},
        {"path": "{dir}/shape40", "seed": 4, "iteration": 40, "world": 2,
         "spec": {"dtype": "bf16", "hidden": 48}},
        {"path": "{dir}/fp32_40", "seed": 5, "iteration": 40, "world": 2,
         "spec": {"dtype": "fp32"}},
        {"path": "{dir}/layout40", "seed": 6, "iteration": 40, "world": 2,
         "spec": {"dtype": "bf16", "alt_layout": True}},
        # megatron-core >= 0.19's layout (common state inside the shard files), no manifest,
        # no iteration in the name: the merge must find the iteration and strip the optimizer.
        {"path": "{dir}/embedded_a", "seed": 2, "iteration": 20, "world": 2,
         "spec": {"dtype": "bf16"}, "manifest": False, "embed_common": True},
        {"path": "{dir}/embedded_b", "seed": 3, "iteration": 30, "world": 2,
         "spec": {"dtype": "bf16"}, "with_optimizer": True, "manifest": False,
         "embed_common": True},
    ]
}


def spec_from_json(data: dict[str, Any]) -> SyntheticSpec:
    """SyntheticSpec from a JSON dict (``dtype`` as "bf16"/"fp32"/"fp16")."""
    data = dict(data)
    names = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    data["dtype"] = names[data.get("dtype", "fp32")]
    return SyntheticSpec(**data)


def _job_worker(rank: int, world: int, port: int, entries: list[dict[str, Any]], op: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for entry in entries:
            spec = spec_from_json(entry.get("spec", {}))
            if op == "save":
                save_torch_dist(
                    entry["path"], spec, entry["seed"], iteration=entry["iteration"],
                    with_optimizer=entry.get("with_optimizer", False),
                    manifest=entry.get("manifest", True), kind=entry.get("kind", "window"),
                    embed_common=entry.get("embed_common", False),
                )
            else:
                _load_with_megatron(entry, spec, rank, world)
        # Let every rank finish its collectives before any tears the group down: a gloo
        # peer destroyed mid-operation aborts the other ("terminate called ...").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _load_with_megatron(entry: dict[str, Any], spec: SyntheticSpec, rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_wsm import cpu_compat

    cpu_compat.apply()
    template = sharded_state_dict(spec, 0, rank, world)
    loaded = dist_checkpointing.load({"model": template["model"]}, entry["ckpt"])
    shards: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
    for name, sharded in template["model"].items():
        if isinstance(sharded, ShardedTensor):
            value = loaded["model"][name]
            shards.setdefault(sharded.key, []).append((tuple(sharded.global_offset), value))
    torch.save(shards, f"{entry['out']}.rank{rank}.pt")


def run_job(job: dict[str, Any]) -> None:
    """Run a save/load job: one process group per distinct world size and operation (world 1
    runs in this process, larger worlds in spawned processes)."""
    import torch.multiprocessing as mp

    for op in ("save", "load"):
        by_world: dict[int, list[dict[str, Any]]] = {}
        for entry in job.get(op, []):
            by_world.setdefault(int(entry.get("world", 1)), []).append(entry)
        for world, entries in sorted(by_world.items()):
            if world == 1:
                _job_worker(0, 1, free_port(), entries, op)
            else:
                mp.spawn(
                    _job_worker, args=(world, free_port(), entries, op), nprocs=world, join=True
                )


#: The window checkpoints of :data:`TEST_JOB`, oldest first.
TEST_WINDOW = ("w10", "w20", "w30")


def build_test_checkpoints(basetemp: str | os.PathLike) -> Path:
    """:data:`TEST_JOB`'s checkpoints under ``basetemp`` (pytest's base temporary directory),
    saved on first use and shared by every test module of the session."""
    return run_job_cached(TEST_JOB, Path(basetemp) / "merge_ckpts")


def run_job_cached(job: dict[str, Any], directory: str | os.PathLike, timeout: float = 600) -> Path:
    """Run ``job`` in a child process once per ``directory`` (reused while its job is the same).

    Paths in the job may use ``{dir}``; returns the directory. Lets several test modules of one
    pytest session share checkpoints that are slow to build (megatron-core start-up).
    """
    import fcntl
    import hashlib
    import json
    import subprocess
    import sys

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(job, sort_keys=True).replace("{dir}", str(directory))
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    done = directory / f".job-{digest}.done"
    with open(directory / ".job.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            job_file = directory / f".job-{digest}.json"
            job_file.write_text(text)
            env = dict(os.environ)
            repo = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
            for _attempt in range(2):  # one retry: a crash at gloo teardown is not ours
                proc = subprocess.run(
                    [sys.executable, "-m", "megatron_wsm.testing.synthetic", str(job_file)],
                    capture_output=True, text=True, timeout=timeout, env=env,
                )
                if proc.returncode == 0:
                    break
            if proc.returncode != 0:
                raise RuntimeError(
                    f"synthetic job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                )
            done.touch()
    return directory


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_wsm.testing.synthetic JOB.json``."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        print("usage: python -m megatron_wsm.testing.synthetic JOB.json")
        return 2
    with open(args[0]) as f:
        run_job(json.load(f))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
