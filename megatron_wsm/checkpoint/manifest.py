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
    def from_json(cls, data: Any) -> CheckpointManifest:
        """Inverse of :meth:`to_json`; raises :class:`ManifestError` on a foreign or malformed
        file, naming every problem (:func:`manifest_problems`)."""
        problems = manifest_problems(data)
        if problems:
            raise ManifestError("; ".join(problems))
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        known = {f.name for f in dataclasses.fields(ParallelLayout)}
        kwargs["parallel"] = ParallelLayout(
            **{k: v for k, v in data.get("parallel", {}).items() if k in known}
        )
        return cls(**kwargs)


class ManifestError(ValueError):
    """A manifest that is not one, or breaks its schema; the message names every problem."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(problems: list[str], name: str, value: Any, ok: bool, what: str) -> None:
    if not ok:
        problems.append(f"{name}: {value!r} is not {what}")


#: Top-level fields: (type check, what it must be). ``kind``, ``iteration`` are required.
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "consumed_samples": (_is_int, "an integer"),
    "consumed_tokens": (_is_int, "an integer"),
    "learning_rate": (_is_number, "a number"),
    "model_config_hash": (lambda v: isinstance(v, str), "a string"),
    "model_config": (lambda v: isinstance(v, dict), "an object"),
    "checkpoint_format": (lambda v: isinstance(v, str), "a string"),
    "megatron_core_version": (lambda v: isinstance(v, str), "a string"),
    "model_spec": (lambda v: isinstance(v, dict), "an object"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "created_unix": (_is_number, "a number"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
}
#: Fields that count something: never negative.
_COUNTS = ("iteration", "consumed_samples", "consumed_tokens")
#: Entries of ``extra`` the tools read, and their type.
_EXTRA_OBJECTS = ("run", EXTRA_OPTIMIZER)


def manifest_problems(data: Any) -> list[str]:
    """Every way ``data`` (a parsed ``wsm_manifest.json``) breaks the manifest schema, one
    message per problem (empty: valid): a JSON object with our format tag, a version this tool
    understands, ``kind`` one of :data:`KINDS`, ``iteration`` (and the consumed counts) integers
    >= 0, ``complete`` a boolean, ``parallel`` an object of positive integers, and every other
    known field of its type. Unknown fields are ignored (a newer writer may add some)."""
    if not isinstance(data, dict):
        return [f"not a JSON object but a JSON {type(data).__name__} (not a manifest)"]
    if data.get("format") != MANIFEST_FORMAT:
        return [f"not a megatron-wsm manifest (format={data.get('format')!r})"]
    problems: list[str] = []
    version = data.get("version", 0)
    if not _is_int(version):
        problems.append(f"version: {version!r} is not an integer")
    elif version > MANIFEST_VERSION:
        return [
            f"manifest version {version} is newer than this tool understands "
            f"({MANIFEST_VERSION}); upgrade megatron-wsm"
        ]
    kind = data.get("kind")
    if kind not in KINDS:
        problems.append(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if "iteration" not in data:
        problems.append("iteration: missing")
    else:
        _check(problems, "iteration", data["iteration"], _is_int(data["iteration"]),
               "an integer")
    for name, (ok, what) in _FIELD_TYPES.items():
        if name in data:
            _check(problems, name, data[name], ok(data[name]), what)
    for name in _COUNTS:
        value = data.get(name)
        if _is_int(value) and value < 0:
            problems.append(f"{name}: {value} is negative")
    parallel = data.get("parallel", {})
    if not isinstance(parallel, dict):
        problems.append(f"parallel: {parallel!r} is not an object")
    else:
        for field in dataclasses.fields(ParallelLayout):
            if field.name in parallel:
                value = parallel[field.name]
                name = f"parallel.{field.name}"
                if not _is_int(value):
                    problems.append(f"{name}: {value!r} is not an integer")
                elif value < 1:
                    problems.append(f"{name}: {value} is not a positive size")
    extra = data.get("extra", {})
    if isinstance(extra, dict):
        for name in _EXTRA_OBJECTS:
            if name in extra and not isinstance(extra[name], dict):
                problems.append(f"extra.{name}: {extra[name]!r} is not an object")
    return problems


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

    A manifest that exists but is not a regular file (a FIFO, a symlink, a directory: read
    through :func:`.integrity.read_regular`, never followed nor blocked on), cannot be
    parsed, or breaks the schema (:func:`manifest_problems`) raises :class:`ManifestError`
    naming the file: that is corruption, and the caller must not treat the checkpoint as usable.
    """
    from megatron_wsm.checkpoint import integrity as ckpt_integrity

    path = Path(checkpoint_dir) / MANIFEST_NAME
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(ckpt_integrity.read_regular(path, ckpt_integrity.MAX_MANIFEST_BYTES))
    except ckpt_integrity.IntegrityError as e:
        raise ManifestError(f"unreadable manifest: {e}") from e
    except OSError as e:
        raise ManifestError(f"unreadable manifest {path}: {e.strerror or e}") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ManifestError(f"corrupt manifest {path}: {e}") from e
    try:
        return CheckpointManifest.from_json(data)
    except ValueError as e:
        raise ManifestError(f"malformed manifest {path}: {e}") from e
