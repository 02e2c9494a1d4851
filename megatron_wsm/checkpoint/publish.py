"""Where a tool may write its output, and how it replaces one: the one rule for deleting.

The merge (``tools/merge_wsm.py``) and the Hugging Face export (``tools/export_hf.py``) both
write a new directory at ``--save`` and, with ``--overwrite``, replace an existing one. Both go
through this module, so that neither can delete what it did not write:

* ``--save`` never lies inside a checkpoint (anything the trainer, a merge or Megatron-LM
  wrote), never contains one of the tool's inputs, and is never one;
* an existing ``--save`` is replaced only when the tool can prove it wrote it itself: the
  tool's own marker file is there and valid, and nothing else is inside but the files that
  tool writes (regular files, no symbolic links); and never inside a run's save directory,
  which the trainer owns (a new output may be created there);
* the new directory is filled under a hidden temporary name beside ``--save`` and renamed into
  place as the last step; the old one is moved aside first and deleted only after the rename;
* what is published follows the umask, like any file the user creates (temporary directories
  are made private while they are being filled).

A tool describes itself with an :class:`OutputKind`; the checks return the reason a location is
refused (or None), and each tool raises its own error type with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from megatron_wsm.process_guard import pid_alive

#: Files whose presence makes a directory a checkpoint (ours, megatron-core's or Megatron-LM's).
CHECKPOINT_MARKERS = (".metadata", "metadata.json", "common.pt", "wsm_manifest.json")
#: Files or entries whose presence makes a directory a run's save directory.
SAVE_DIR_MARKERS = ("latest_checkpointed_iteration.txt", "wsm_window", ".wsm-trainer.lock")
_ITER_DIR = re.compile(r"^iter_\d+$")


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """What one tool writes: how :func:`replace_refusal` recognises its own output.

    ``tool``: the tool's name in messages ("the merge"); ``what``: its output ("a merged
    checkpoint");
    ``marker``: the file only this tool writes (checked by ``marker_ok``, which returns why the
    marker is not this tool's, or None); ``files``: the other file names it writes;
    ``patterns``: regular expressions of generated file names; ``subdirs``: patterns of
    directories it writes (their contents are checked with the same rule, one level down).
    """

    tool: str
    what: str
    marker: str
    marker_ok: Callable[[Path], str | None]
    files: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    subdirs: tuple[str, ...] = ()

    def knows_file(self, name: str) -> bool:
        """True when ``name`` is a file this tool writes."""
        return name == self.marker or name in self.files or any(
            re.fullmatch(p, name) for p in self.patterns
        )

    def knows_dir(self, name: str) -> bool:
        """True when ``name`` is a directory this tool writes."""
        return any(re.fullmatch(p, name) for p in self.subdirs)


def json_marker(check: Callable[[dict], str | None]) -> Callable[[Path], str | None]:
    """A ``marker_ok`` that reads the marker as a JSON object (a regular file, bounded) and
    applies ``check`` to it."""

    def marker_ok(path: Path) -> str | None:
        from megatron_wsm.checkpoint.integrity import IntegrityError, read_regular

        try:  # a regular file, never followed through a symlink, read with a bound
            data = json.loads(read_regular(path, 64 << 20))
        except IntegrityError as e:
            return f"has a {path.name} that cannot be read as a regular file ({e})"
        except (OSError, ValueError):
            return f"has an unreadable {path.name}"
        if not isinstance(data, dict):
            return f"has a {path.name} that is not a JSON object"
        return check(data)

    return marker_ok


def is_checkpoint(path: Path) -> bool:
    """True when ``path`` is a directory holding a checkpoint's files."""
    return path.is_dir() and any(os.path.lexists(path / m) for m in CHECKPOINT_MARKERS)


def is_save_dir(path: Path) -> bool:
    """True when ``path`` is a run's save directory (tracker file, window, trainer lock, or an
    ``iter_*`` checkpoint inside)."""
    if not path.is_dir():
        return False
    if any(os.path.lexists(path / m) for m in SAVE_DIR_MARKERS):
        return True
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    return any(_ITER_DIR.match(e.name) and is_checkpoint(Path(e.path)) for e in entries)


def location_refusal(
    output: Path,
    inputs: Sequence[str | os.PathLike] = (),
    protected: Sequence[str | os.PathLike] = (),
) -> str | None:
    """Why ``output`` is no place to write to (None: it is), without looking at whether it
    exists: it must not be, lie inside, or contain an input or ``protected`` directory, and must
    not lie inside a checkpoint."""
    out = output.resolve()
    for other in [*inputs, *protected]:
        real = Path(other).resolve()
        if out == real or real in out.parents:
            return f"is or lies inside {other}, an input or a directory of the run"
        if out in real.parents:
            return f"contains the input {other}"
    for ancestor in out.parents:
        if is_checkpoint(ancestor):
            return f"lies inside the checkpoint {ancestor}"
    return None


def enclosing_save_dir(output: Path) -> Path | None:
    """The run's save directory that ``output`` lies inside, if any (a new output may be
    created there, but nothing there is replaced: the trainer owns it)."""
    for ancestor in output.resolve().parents:
        if is_save_dir(ancestor):
            return ancestor
    return None


def replace_refusal(output: Path, kind: OutputKind) -> str | None:
    """Why the existing ``output`` must not be deleted by ``kind.tool`` (None: it wrote it)."""
    if output.is_symlink():
        return "is a symbolic link"
    if not output.is_dir():
        return "is not a directory"
    if not os.path.lexists(output / kind.marker):
        return f"has no {kind.marker} (not written by {kind.tool})"
    why = kind.marker_ok(output / kind.marker)
    if why:
        return why
    return _foreign_entry(output, kind, depth=0)


def _foreign_entry(directory: Path, kind: OutputKind, depth: int) -> str | None:
    try:
        entries = list(os.scandir(directory))
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    for entry in entries:
        name = entry.name
        if entry.is_symlink():
            return f"holds {name}, a symbolic link"
        if entry.is_file(follow_symlinks=False) and kind.knows_file(name):
            continue
        if depth == 0 and entry.is_dir(follow_symlinks=False) and kind.knows_dir(name):
            why = _foreign_entry(Path(entry.path), kind, depth + 1)
            if why:
                return f"{name}/ {why}"
            continue
        return f"holds {name}, which {kind.tool} does not write"
    return None


def writable_parent_refusal(output: Path) -> str | None:
    """Why ``output``'s parent cannot be created or written (None: it can)."""
    ancestor = output.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def output_refusal(
    output: Path,
    kind: OutputKind,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike] = (),
    protected: Sequence[str | os.PathLike] = (),
) -> str | None:
    """Every check before a tool starts writing ``output``; the reason it is refused, or None."""
    why = location_refusal(output, inputs, protected)
    if why:
        return f"--save {output} {why}; save elsewhere"
    if os.path.lexists(output):
        if not overwrite:
            return f"{output} already exists; pass --overwrite to replace it"
        why = replace_refusal(output, kind)
        if why:
            return (f"--overwrite replaces only {kind.what} written by {kind.tool}; {output} "
                    f"{why}: refusing to delete it")
        run = enclosing_save_dir(output)
        if run is not None:
            return (f"--overwrite: {output} lies inside the save directory {run} of a run, "
                    "which only the trainer changes: refusing to delete it")
    why = writable_parent_refusal(output)
    return f"--save {output}: {why}" if why else None


# ----------------------------------------------------------------------------- temporary dirs


def temp_name(output: Path, tag: str) -> str:
    """A hidden temporary sibling name of ``output`` that says whose it is (host and PID), so a
    later run removes only leftovers of dead processes on this host."""
    host = _safe(socket.gethostname())
    return f".{output.name}.{tag}-{host}-{os.getpid()}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", text)[:64] or "host"


def stale_temp_dirs(parent: Path, output_name: str, tag: str) -> list[Path]:
    """Temporary directories of ``tag`` next to ``output_name`` left by dead processes of this
    host (a live process's, or another host's, are never listed)."""
    host = _safe(socket.gethostname())
    pattern = re.compile(rf"^\.{re.escape(output_name)}\.{re.escape(tag)}-(.+)-(\d+)$")
    stale = []
    for path in parent.glob(f".{output_name}.{tag}-*"):
        m = pattern.match(path.name)
        if not m or m.group(1) != host or path.is_symlink() or not path.is_dir():
            continue
        if not pid_alive(int(m.group(2))):
            stale.append(path)
    return sorted(stale)


def make_temp_dir(output: Path, tag: str) -> Path:
    """Create the private temporary directory :func:`temp_name` names (a leftover of this very
    PID is removed first; the name is unique per live process)."""
    tmp = output.parent / temp_name(output, tag)
    output.parent.mkdir(parents=True, exist_ok=True)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    os.mkdir(tmp, 0o700)
    return tmp


# ----------------------------------------------------------------------------- publishing


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give ``root`` and everything below it the modes a plain ``mkdir`` / ``open`` would have
    under the current umask (0644 files and 0755 directories with the usual 022)."""
    mask = current_umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
    os.chmod(root, 0o777 & ~mask)


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename into it is durable afterwards)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(
    tmp: Path, output: Path, kind: OutputKind, overwrite: bool, *, refuse: Callable[[str], None]
) -> None:
    """Rename the filled ``tmp`` to ``output``, replacing an existing ``output`` only when
    :func:`replace_refusal` allows it (checked again now: it may have changed while the tool
    ran). ``refuse(message)`` raises the tool's error."""
    follow_umask(tmp)
    fsync_dir(tmp)
    old = None
    if os.path.lexists(output):
        if not overwrite:
            refuse(f"{output} appeared meanwhile; pass --overwrite to replace it")
        why = replace_refusal(output, kind)
        if why:
            refuse(f"--overwrite: {output} {why}: refusing to delete it")
        if enclosing_save_dir(output) is not None:
            refuse(f"--overwrite: {output} lies inside a run's save directory: refusing to "
                   "delete it")
        old = output.parent / temp_name(output, "replaced")
        os.rename(output, old)
    try:
        os.rename(tmp, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_all(paths: Iterable[Path]) -> list[Path]:
    """Delete the given directories (stale temporaries); returns those removed."""
    removed = []
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
