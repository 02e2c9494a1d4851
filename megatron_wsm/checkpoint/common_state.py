"""A torch_dist checkpoint's *common state* (iteration, scheduler, args…), whichever
megatron-core wrote it, read without trusting its pickle (no process groups).

megatron-core up to 0.18 writes the non-tensor part of a state dict to ``common.pt``. From 0.19
it stores the same dict as one ``ShardedObject`` named ``common_state`` inside the ``.distcp``
shard files (a ``torch.save`` of ``[state]``), and still reads ``common.pt`` when one exists.
The merge and the input ordering need that dict (the iteration of a foreign checkpoint; the
scheduler state a merged checkpoint carries), so this module is the one place that finds it:

- the item is located through :func:`.integrity.load_metadata` (restricted unpickler) and
  :func:`.integrity.storage_location` (a shard file inside the checkpoint, nothing else);
- its zip records' CRC-32 are checked, then it is loaded by the restricted unpickler of
  :mod:`.common_pickle`, which admits exactly the types Megatron-LM 0.16-0.19 writes there
  (``argparse.Namespace``, megatron-core's enums as stand-ins, dtypes, tensors…) and refuses
  every other global before anything is called;
- every file is opened through :func:`.integrity.open_regular` (a regular file inside the
  checkpoint: no FIFO, device or symlink).

A torch_dist checkpoint without a readable common state is not complete: megatron-core cannot
load it (:func:`common_state_problems`, :func:`common_state_missing`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_wsm.checkpoint import common_pickle
from megatron_wsm.checkpoint import integrity as ckpt_integrity

#: The file megatron-core ≤ 0.18 writes (and 0.19 still reads first).
COMMON_FILE = "common.pt"
#: Keys of the ``ShardedObject`` megatron-core ≥ 0.19 stores the common state in
#: (``common_state/shard_0_1``).
COMMON_STATE_KEY = re.compile(r"^common_state($|/)")


class CommonStateError(ValueError):
    """The common state exists but is unreadable, corrupt, or needs unsafe pickles."""


def is_common_state_key(fqn: str) -> bool:
    """Whether a ``.metadata`` key is megatron-core ≥ 0.19's embedded common state."""
    return bool(COMMON_STATE_KEY.match(fqn))


@contextlib.contextmanager
def allowed_globals(types: list[Any]) -> Iterator[None]:
    """Admit ``types`` to ``torch.load(weights_only=True)`` for the duration, leaving the
    process-wide allow-list as it was: torch's own ``safe_globals`` context removes its types on
    exit even when someone registered them before (megatron-core registers ``Namespace`` and
    more at import), which would break megatron-core's own later loads."""
    import torch.serialization as ts

    before = set(map(id, ts.get_safe_globals()))
    added = [t for t in types if id(t) not in before]
    ts.add_safe_globals(added)
    try:
        yield
    finally:
        current = [g for g in ts.get_safe_globals() if not any(g is t for t in added)]
        ts.clear_safe_globals()
        ts.add_safe_globals(current)


def _load_bytes(data: Any, where: str) -> Any:
    """The common state in ``data`` (bytes, or a file object read to its end), through the
    restricted unpickler of :mod:`.common_pickle`: Megatron-LM's types and nothing else, with no
    megatron-core import and no change to torch's process-wide allow-list."""
    try:
        blob = data if isinstance(data, bytes) else data.read()
    except OSError as e:
        raise CommonStateError(f"{where}: unreadable ({e.strerror or e})") from e
    try:
        return common_pickle.load_common(blob)
    except common_pickle.CommonPickleError as e:
        raise CommonStateError(
            f"{where}: not loadable by the restricted common-state reader ({e}); refusing an "
            "unverified pickle"
        ) from e


def _crc_problems(data: bytes, where: str) -> list[str]:
    def read_at(pos: int, size: int) -> bytes:
        return data[pos : pos + size]

    return ckpt_integrity.blob_crc_problems(read_at, len(data), where)


def _embedded_item(checkpoint_dir: Path, metadata: Any) -> tuple[str, bytes] | None:
    """(description, bytes) of the ``common_state`` item, or None when there is none."""
    for index, info in metadata.storage_data.items():
        if not is_common_state_key(index.fqn):
            continue
        try:
            rel, offset, length = ckpt_integrity.storage_location(info)
        except ckpt_integrity.IntegrityError as e:
            raise CommonStateError(f"{checkpoint_dir}: {index.fqn}: {e}") from e
        where = f"{checkpoint_dir}/{rel} item {index.fqn}"
        try:
            with ckpt_integrity.open_regular(checkpoint_dir / rel) as f:
                size = os.fstat(f.fileno()).st_size
                # Checked before reading: a crafted length must not make us allocate it.
                if offset + length > size:
                    raise CommonStateError(
                        f"{where}: past the end of the file ({offset} + {length} > {size} bytes)"
                    )
                data = os.pread(f.fileno(), length, offset)
        except ckpt_integrity.IntegrityError as e:
            raise CommonStateError(f"{where}: {e}") from e
        except OSError as e:
            raise CommonStateError(f"{where}: unreadable ({e})") from e
        if len(data) != length:
            raise CommonStateError(f"{where}: truncated ({len(data)} of {length} bytes)")
        problems = _crc_problems(data, where)
        if problems:
            raise CommonStateError(problems[0])
        return where, data
    return None


def read_common_state(checkpoint_dir: str | os.PathLike, metadata: Any = None) -> Any:
    """The checkpoint's common state dict, or None when it has none.

    ``common.pt`` wins when present (megatron-core 0.19 reads it first too); otherwise the
    embedded ``common_state`` item. ``metadata``: the already-read restricted ``.metadata``.

    Raises:
        CommonStateError: it exists but fails its CRC or does not load with ``weights_only``.
        ckpt_integrity.IntegrityError: ``.metadata`` is unreadable or unsafe.
    """
    path = Path(checkpoint_dir)
    common = path / COMMON_FILE
    if os.path.lexists(common):
        try:
            f = ckpt_integrity.open_regular(common, ckpt_integrity.MAX_COMMON_BYTES)
        except ckpt_integrity.IntegrityError as e:  # a FIFO, a symlink, a device...
            raise CommonStateError(str(e)) from e
        except OSError as e:
            raise CommonStateError(f"{common}: unreadable ({e.strerror or e})") from e
        with f:
            return _load_bytes(f, str(common))
    if metadata is None:
        if not os.path.lexists(path / ckpt_integrity.METADATA_FILE):
            return None
        metadata = ckpt_integrity.load_metadata(path)
    found = _embedded_item(path, metadata)
    if found is None:
        return None
    where, data = found
    state = _load_bytes(data, where)
    # megatron-core saves the ShardedObject's data as a one-element list.
    if isinstance(state, list) and len(state) == 1:
        state = state[0]
    return state


def _has_embedded(metadata: Any) -> bool:
    items = getattr(metadata, "state_dict_metadata", None) or {}
    return any(is_common_state_key(str(key)) for key in items)


def common_state_missing(checkpoint_dir: str | os.PathLike, metadata: Any) -> str | None:
    """Why a torch_dist checkpoint has no common state, cheaply (no data read): neither a
    ``common.pt`` that is a regular file nor an embedded ``common_state`` item in ``metadata``
    (its restricted ``.metadata``). None when one is there."""
    path = Path(checkpoint_dir)
    common = path / COMMON_FILE
    if os.path.lexists(common):
        try:
            ckpt_integrity.regular_size(common)
        except (ckpt_integrity.IntegrityError, OSError) as e:
            return str(e)
        return None
    if _has_embedded(metadata):
        return None
    return (
        f"{path}: no common state (neither {COMMON_FILE} nor an embedded common_state item): "
        "megatron-core cannot load it"
    )


def common_state_problems(
    checkpoint_dir: str | os.PathLike, metadata: Any = None, iteration: int | None = None
) -> list[str]:
    """Why a torch_dist checkpoint's common state cannot be trusted (empty: it can): missing,
    unreadable (not a regular file, CRC, needs unsafe pickles), not a dict, or (``iteration``
    given: what the manifest or the directory name says) at another iteration."""
    path = Path(checkpoint_dir)
    try:
        state = read_common_state(path, metadata)
    except (CommonStateError, ckpt_integrity.IntegrityError) as e:
        return [str(e)]
    if state is None:
        return [
            f"{path}: no common state (neither {COMMON_FILE} nor an embedded common_state "
            "item): megatron-core cannot load it"
        ]
    if not isinstance(state, dict):
        return [f"{path}: the common state is a {type(state).__name__}, not a dict"]
    saved = state.get("iteration")
    if iteration is not None and saved is not None and saved != iteration:
        return [
            f"{path}: the common state says iteration {saved!r} but the manifest/directory "
            f"name says {iteration}: parts of different checkpoints"
        ]
    return []
