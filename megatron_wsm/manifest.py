"""Checkpoint manifests: the small JSON file that says what a checkpoint directory holds.

Every checkpoint directory written by megatron-wsm (full, window or merged) carries
``wsm_manifest.json``. It is written *last*, by rank 0, after every rank has finished
writing its shards, and atomically (temporary file + ``os.replace``), so a directory
without a manifest whose ``complete`` is true is, by definition, not a finished checkpoint.
Retention and the merge tool only ever act on directories that have our manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

MANIFEST_NAME = "wsm_manifest.json"
MANIFEST_FORMAT = "megatron-wsm-manifest"
MANIFEST_VERSION = 1

#: The kinds of checkpoint we write.
KIND_FULL = "full"  # model + optimizer + scheduler + RNG + data position, for resuming
KIND_WINDOW = "window"  # model only, saved densely over the trailing merge window
KIND_MERGED = "merged"  # output of tools/merge_wsm.py
KINDS = (KIND_FULL, KIND_WINDOW, KIND_MERGED)

#: ``extra`` key of full checkpoints: ``{"optimizer": "plain" | "distributed", "sharding":
#: None | "dp_reshardable" | "fully_reshardable"}`` (how the optimizer state was saved).
#: Absent in full checkpoints written before it existed: those hold plain-optimizer state.
EXTRA_OPTIMIZER = "optimizer"


@dataclasses.dataclass
class ParallelLayout:
    """The parallel sizes a checkpoint was written with."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    data_parallel_size: int = 1
    world_size: int = 1


@dataclasses.dataclass
class CheckpointManifest:
    """What a checkpoint directory holds; serialised as ``wsm_manifest.json``.

    Attributes:
        kind: one of ``full``, ``window``, ``merged``.
        iteration: training iteration after which the checkpoint was taken.
        consumed_samples: training samples consumed up to ``iteration``.
        consumed_tokens: training tokens consumed up to ``iteration``.
        learning_rate: LR of the last step before saving.
        parallel: the parallel layout of the writer.
        model_config_hash: :func:`config_hash` of the model config; inputs of a merge must agree.
        model_config: the model config itself (JSON-able subset), for humans and for checks.
        checkpoint_format: dist_checkpointing backend (``torch_dist``) or ``torch`` (legacy).
        megatron_core_version: version of megatron-core that wrote the shards.
        model_spec: the writer's layer spec (``local`` or ``transformer_engine``), the
            checkpoint key scheme and the TE version; informational (both specs share keys).
        complete: True once every rank finished; never true on a half-written directory.
        created_unix: wall-clock time of writing the manifest.
        extra: free-form (e.g. merge provenance).
    """

    kind: str
    iteration: int
    consumed_samples: int = 0
    consumed_tokens: int = 0
    learning_rate: float = 0.0
    parallel: ParallelLayout = dataclasses.field(default_factory=ParallelLayout)
    model_config_hash: str = ""
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint_format: str = "torch_dist"
    megatron_core_version: str = ""
    model_spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    complete: bool = False
    created_unix: float = dataclasses.field(default_factory=time.time)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict with the format tag and version."""
        data = dataclasses.asdict(self)
        data["format"] = MANIFEST_FORMAT
        data["version"] = MANIFEST_VERSION
        return data

    def run_info(self) -> dict[str, Any]:
        """The run info (``RunConfig.to_json`` of the writer) for ``RunConfig.from_json``; for
        a manifest without one (a merge of checkpoints from an older version) the model shapes
        and the tokenizer's vocabulary, the rest left to the config's defaults."""
        run = self.extra.get("run")
        if run:
            return dict(run)
        model = {k: v for k, v in self.model_config.items() if k != "padded_vocab_size"}
        return {"model": model, "vocab_size": self.model_config.get("vocab_size")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointManifest:
        """Inverse of :meth:`to_json`; raises ValueError on a foreign or malformed file."""
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a megatron-wsm manifest (format={data.get('format')!r})")
        if int(data.get("version", 0)) > MANIFEST_VERSION:
            raise ValueError(
                f"manifest version {data.get('version')} is newer than this tool "
                f"understands ({MANIFEST_VERSION}); upgrade megatron-wsm"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["parallel"] = ParallelLayout(**data.get("parallel", {}))
        if kwargs.get("kind") not in KINDS:
            raise ValueError(f"manifest has unknown kind {kwargs.get('kind')!r}")
        return cls(**kwargs)


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able model config (sorted keys)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_manifest(checkpoint_dir: str | os.PathLike, manifest: CheckpointManifest) -> Path:
    """Atomically write ``manifest`` into ``checkpoint_dir`` (temp file, fsync, rename)."""
    path = Path(checkpoint_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(checkpoint_dir: str | os.PathLike) -> CheckpointManifest | None:
    """Read a checkpoint's manifest; None when the directory has none (not ours, or unfinished).

    A manifest that exists but cannot be parsed raises ValueError: that is corruption, and the
    caller must not treat the checkpoint as usable.
    """
    path = Path(checkpoint_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt manifest {path}: {e}") from e
    return CheckpointManifest.from_json(data)


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    """True when the directory has our manifest and it says ``complete``."""
    try:
        manifest = read_manifest(checkpoint_dir)
    except ValueError:
        return False
    return manifest is not None and manifest.complete
