"""A restricted reader (and writer) for torch_dist *common states*: the ``torch.save`` blob
megatron-core keeps in ``common.pt`` (≤ 0.18) or in a ``common_state`` item (≥ 0.19).

What Megatron-LM 0.16-0.19 writes there, and nothing else, is admitted (:data:`ADMITTED`):

- ``argparse.Namespace`` (its ``args``), ``types.SimpleNamespace``, ``collections.OrderedDict``,
  ``pathlib.PosixPath``, ``set``/``frozenset``, ``signal.Signals`` (``args.exit_signal``);
- torch dtypes (``args.params_dtype``…), ``torch.Size``, tensors (``torch._utils.
  _rebuild_tensor_v2`` over the typed storages of the zip: the plain optimizer's
  ``common_step``), ``_codecs.encode`` with latin-1 (how protocol 2 pickles ``bytes``);
- megatron-core's enums that Megatron-LM's ``args`` hold (``ModelType`` in both of its
  modules, ``AttnBackend``, ``CudaGraphScope``, ``Fp8Recipe``, ``Fp4Recipe``,
  ``RerunDiagnostic``, ``RerunMode``, ``RerunState``: megatron-core's own ``SAFE_GLOBALS``
  plus the recipes ``TransformerConfig`` fields turn into flags) and ``OptimizerConfig``.

Why not ``torch.load(weights_only=True)``: it needs the real megatron-core classes registered
(process-wide, with torch's ``safe_globals`` context removing them again on exit), and the merge,
``list_checkpoints`` and the export never import megatron-core (seconds of imports, CUDA-only
submodules). So the megatron-core types are rebuilt as **stand-ins** (:class:`ForeignEnum`
members keep the qualified class name and the value, :class:`ForeignRecord` an attribute dict):
no megatron-core import, no code of the checkpoint's choosing, and any value a newer release
adds is still read. :func:`dump_common` writes the stand-ins back under their original names,
so megatron-core (whose import registers the real classes) loads a merged ``common.pt`` with
the real enums.

Everything else (``os.system``, ``builtins.eval``, ``getattr``…) is refused by name in
:meth:`_Unpickler.find_class` before anything is called; storages are read from the zip
(CRC-checked by :mod:`zipfile`), never through torch's unpickler.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import io
import pathlib
import pickle
import signal
import types
import zipfile
from typing import Any, ClassVar


class CommonPickleError(ValueError):
    """The blob is not a torch zip file, is corrupt, or names a global that is not admitted."""


# ----------------------------------------------------------------------------- stand-ins


class ForeignEnum:
    """A member of a megatron-core enum, read without megatron-core: the class's module and
    name (class attributes of the per-enum subclass) and the member's value.

    Compares equal to the real member (same class name and value) and to another stand-in of
    the same enum; ``name`` is the member's name where known (megatron-core 0.16's members)."""

    MODULE: ClassVar[str] = ""
    QUALNAME: ClassVar[str] = ""
    MEMBERS: ClassVar[dict[Any, str]] = {}

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        if not isinstance(value, (int, str, float)) or isinstance(value, bool):
            raise CommonPickleError(
                f"{self.QUALNAME}: member value {value!r} is not an int or a string"
            )
        self.value = value

    @property
    def name(self) -> str:
        return self.MEMBERS.get(self.value, str(self.value))

    def __eq__(self, other: object) -> bool:
        cls = type(other)
        return (
            getattr(cls, "__qualname__", None) == self.QUALNAME
            or getattr(cls, "QUALNAME", None) == self.QUALNAME
        ) and getattr(other, "value", None) == self.value

    def __hash__(self) -> int:
        return hash((self.QUALNAME, self.value))

    def __repr__(self) -> str:
        return f"<{self.QUALNAME}.{self.name}: {self.value!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.value,))


class ForeignRecord:
    """An instance of a megatron-core dataclass (``OptimizerConfig``), read as its attributes
    (strings to plain values), without running the class's code."""

    MODULE: ClassVar[str] = ""
    QUALNAME: ClassVar[str] = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]  # (dict, slots) form
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CommonPickleError(f"{self.QUALNAME}: state is not a dict of attributes")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<{self.QUALNAME} stand-in {self.__dict__!r}>"


def _register(cls: type) -> type:
    """Make a stand-in class an attribute of this module, so that the standard pickler (a
    process group's object broadcast) pickles it by reference; :func:`dump_common` writes it
    under the megatron-core name instead."""
    name = "Foreign_" + f"{cls.MODULE}.{cls.QUALNAME}".replace(".", "_")  # type: ignore[attr-defined]
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


def _enum(module: str, qualname: str, members: dict[str, Any]) -> type[ForeignEnum]:
    return _register(
        type(
            f"Foreign{qualname}",
            (ForeignEnum,),
            {
                "MODULE": module,
                "QUALNAME": qualname,
                "MEMBERS": {v: k for k, v in members.items()},
                "__slots__": (),
            },
        )
    )


_M = "megatron.core"
#: megatron-core's enums Megatron-LM's ``args`` can hold (members as of megatron-core 0.16.1;
#: other values are read too, named by their value).
FOREIGN_ENUMS: dict[tuple[str, str], type[ForeignEnum]] = {
    (m, n): _enum(m, n, members)
    for m, n, members in (
        (f"{_M}.enums", "ModelType", {"encoder_or_decoder": 1}),
        (f"{_M}.transformer.enums", "ModelType", {"encoder_or_decoder": 1}),
        (
            f"{_M}.transformer.enums",
            "AttnBackend",
            {"flash": 1, "fused": 2, "unfused": 3, "local": 4, "auto": 5},
        ),
        (
            f"{_M}.transformer.enums",
            "CudaGraphScope",
            {
                "full_iteration": 1,
                "attn": 2,
                "mlp": 3,
                "moe": 4,
                "moe_router": 5,
                "moe_preprocess": 6,
                "mamba": 7,
            },
        ),  # fmt: skip
        (
            f"{_M}.enums",
            "Fp8Recipe",
            {k: k for k in ("delayed", "tensorwise", "mxfp8", "blockwise", "custom")},
        ),
        (f"{_M}.enums", "Fp4Recipe", {"nvfp4": "nvfp4", "custom": "custom"}),
        (
            f"{_M}.rerun_state_machine",
            "RerunDiagnostic",
            {
                "CORRECT_RESULT": "correct_result",
                "TRANSIENT_ERROR": "transient_error",
                "PERSISTENT_ERROR": "persistent_error",
            },
        ),  # fmt: skip
        (
            f"{_M}.rerun_state_machine",
            "RerunMode",
            {
                "DISABLED": "disabled",
                "VALIDATE_RESULTS": "validate_results",
                "REPORT_DETERMINISM_STATS": "report_determinism_stats",
            },
        ),  # fmt: skip
        (
            f"{_M}.rerun_state_machine",
            "RerunState",
            {
                "NOT_RUNNING_YET": 0,
                "INITIAL_RUN": 1,
                "RERUNNING_IN_PLACE": 2,
                "WILL_RERUN_FROM_CHECKPOINT": 3,
                "RERUNNING_FROM_CHECKPOINT": 4,
                "RERUNNING_AGAIN_FROM_CHECKPOINT": 5,
            },
        ),  # fmt: skip
    )
}

#: megatron-core dataclasses megatron-core's own allow-list admits (read as attribute records).
FOREIGN_RECORDS: dict[tuple[str, str], type[ForeignRecord]] = {
    (m, n): _register(type(f"Foreign{n}", (ForeignRecord,), {"MODULE": m, "QUALNAME": n}))
    for m, n in ((f"{_M}.optimizer.optimizer_config", "OptimizerConfig"),)
}


# ----------------------------------------------------------------------------- reading


def _storage_dtypes() -> dict[str, Any]:
    """torch's legacy typed-storage names (how ``torch.save`` names a tensor's storage)."""
    import torch

    names = {
        "Double": torch.float64, "Float": torch.float32, "Half": torch.float16,
        "BFloat16": torch.bfloat16, "Long": torch.int64, "Int": torch.int32,
        "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8, "Bool": torch.bool,
        "ComplexDouble": torch.complex128, "ComplexFloat": torch.complex64,
    }  # fmt: skip
    return {f"{k}Storage": v for k, v in names.items()}


class _StorageType:
    """What ``torch.<X>Storage`` resolves to: a token naming the dtype, not callable."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for ``bytes`` (latin-1 only)."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise CommonPickleError("_codecs.encode is admitted for latin-1 byte strings only")
    return text.encode("latin1")


_PLAIN = {
    ("argparse", "Namespace"): argparse.Namespace,
    ("types", "SimpleNamespace"): types.SimpleNamespace,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("signal", "Signals"): signal.Signals,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_encode,
}

#: Every (module, name) a common state may name, for docs and tests.
ADMITTED = (
    sorted(_PLAIN)
    + sorted(FOREIGN_ENUMS)
    + sorted(FOREIGN_RECORDS)
    + [("torch", "<dtype>"), ("torch", "<X>Storage"), ("torch", "Size"),
       ("torch._utils", "_rebuild_tensor_v2")]
)  # fmt: skip


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages: dict[str, bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self._storages = storages
        self._loaded: dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _PLAIN.get((module, name)) or FOREIGN_ENUMS.get((module, name))
        found = found or FOREIGN_RECORDS.get((module, name))
        if found is not None:
            return found
        if module == "torch":
            import torch

            value = getattr(torch, name, None) if not name.startswith("_") else None
            if isinstance(value, torch.dtype):
                return value
            if name == "Size":
                return torch.Size
            if name == "UntypedStorage":
                return _StorageType(torch.uint8)
            dtype = _storage_dtypes().get(name)
            if dtype is not None:
                return _StorageType(dtype)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        raise CommonPickleError(
            f"refusing the global {module}.{name}: not a type Megatron-LM's common state holds"
        )

    def persistent_load(self, pid: Any) -> Any:
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CommonPickleError(f"unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str):
            raise CommonPickleError(f"unexpected storage reference {pid!r:.80}")
        if key in self._loaded:
            return self._loaded[key]
        raw = self._storages.get(key)
        itemsize = torch.empty(0, dtype=kind.dtype).element_size()
        if raw is None or not isinstance(numel, int) or len(raw) != numel * itemsize:
            raise CommonPickleError(f"storage {key!r}: missing or of the wrong size")
        flat = (
            torch.frombuffer(bytearray(raw), dtype=kind.dtype)
            if raw
            else torch.empty(0, dtype=kind.dtype)
        )
        self._loaded[key] = flat
        return flat

    @staticmethod
    def _rebuild_tensor(
        storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
        hooks: Any = None, metadata: Any = None,
    ) -> Any:  # fmt: skip
        import torch

        ints = (
            (offset, *size, *stride)
            if isinstance(size, tuple) and isinstance(stride, tuple)
            else None
        )
        if (
            not isinstance(storage, torch.Tensor)
            or ints is None
            or len(size) != len(stride)
            or not all(isinstance(i, int) and i >= 0 for i in ints)
            or hooks
            or metadata
        ):
            raise CommonPickleError("malformed tensor record")
        if all(size):
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if last >= storage.numel():
                raise CommonPickleError("tensor record reaches past its storage")
        return storage.as_strided(size, stride, offset).requires_grad_(bool(requires_grad))


def load_common(data: bytes) -> Any:
    """The object in a ``torch.save`` zip blob, read by the restricted unpickler.

    Raises:
        CommonPickleError: not a torch zip file, a record fails its CRC, the pickle is corrupt
            or names a global that is not :data:`ADMITTED` (nothing is called before that).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CommonPickleError("not a torch.save file (no data.pkl)")
            prefix = pkl[0][: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in names and archive.read(order).strip() not in (b"little", b""):
                raise CommonPickleError("big-endian tensors are not supported")
            storages = {
                n[len(prefix) + 5 :]: archive.read(n)
                for n in names
                if n.startswith(f"{prefix}data/")
            }
            blob = archive.read(pkl[0])
    except CommonPickleError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise CommonPickleError(f"not a readable torch.save zip file ({e})") from e
    try:
        return _Unpickler(blob, storages).load()
    except CommonPickleError:
        raise
    except Exception as e:  # corrupt pickles raise many types
        raise CommonPickleError(f"corrupt pickle ({type(e).__name__}: {str(e)[:200]})") from e


# ----------------------------------------------------------------------------- writing


class _Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """The pure-Python pickler with the stand-in classes written under their original names
    (``megatron.core.transformer.enums AttnBackend``…); torch sets ``persistent_id``."""

    def save_global(self, obj: Any, name: Any = None) -> None:
        if isinstance(obj, type) and issubclass(obj, (ForeignEnum, ForeignRecord)):
            if self.proto >= 4:
                self.save(obj.MODULE)
                self.save(obj.QUALNAME)
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + f"{obj.MODULE}\n{obj.QUALNAME}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _PickleModule(types.SimpleNamespace):
    """What ``torch.save(pickle_module=...)`` reads: a ``Pickler`` class."""


PICKLE_MODULE = _PickleModule(Pickler=_Pickler, __name__="megatron_wsm_common_pickle")


def dump_common(state: Any, path: Any) -> None:
    """``torch.save(state, path)`` with the stand-ins written as the megatron-core types they
    stand for (megatron-core's loader, which registers those types, reads the real ones)."""
    import torch

    torch.save(state, path, pickle_module=PICKLE_MODULE)
