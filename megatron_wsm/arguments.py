"""Command-line flags (Megatron-LM names and meanings) → :class:`RunConfig`.

The parser is generated from the dataclasses in ``config``, which hold every flag's default,
help and choices; ``parse_run_config`` is the only place that looks at ``argparse`` output and
the rest of the code receives the typed config. Validation lives on the config classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from typing import Any

from megatron_wsm.config import SECTIONS, ConfigError, RunConfig
from megatron_wsm.megatron_flags import add_no_effect_flags, given_no_effect, unknown_flag_report

__all__ = [
    "ConfigError",
    "build_parser",
    "parse_megatron_lm_flags",
    "parse_run_config",
    "validate",
    "validate_accelerator_flags",
]

_DESCRIPTION = (
    "Pretrain a Mixture-of-Experts GPT on megatron-core with Warmup-Stable-Merge. "
    "Run with torchrun for several processes; without --data-path it trains on the "
    "embedded corpus (Python's own documentation)."
)


def _scalar_type(cls: type, field: dataclasses.Field) -> type:
    """The non-None type of a field (``int | None`` → ``int``)."""
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def flag_of(field: dataclasses.Field) -> str | None:
    """The command-line option of a config field (None: set by the program, not a flag)."""
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _add_field(
    group: Any, cls: type, field: dataclasses.Field, default: Any, base_default: bool
) -> None:
    meta = field.metadata
    flag = flag_of(field)
    assert flag is not None
    kw: dict[str, Any] = {"help": meta.get("help")}
    if "convert" in meta:  # a store_true flag whose value the field derives (--bf16)
        # With a base config, None marks "not given": the base's value then stands.
        given_default = False if base_default else None
        group.add_argument(
            flag, dest=meta["dest"], action="store_true", default=given_default, **kw
        )
        return
    if "const" in meta:  # an option that stores a constant in the field
        group.add_argument(
            flag,
            dest=field.name,
            action="store_const",
            const=meta["const"],
            default=default,
            **kw,
        )
        return
    kind = _scalar_type(cls, field)
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if "nargs" in meta:  # a word list (Megatron-LM's --data-path: nargs='*' of strings)
        if choices is not None:  # each word one of them (--moe-router-load-balancing-type)
            kw["choices"] = choices
        elif kind in (int, float):  # numbers (--moe-aux-loss-coeff: float | list[float])
            kw["type"] = kind
        group.add_argument(flag, dest=field.name, nargs=meta["nargs"], default=default, **kw)
        return
    if kind is bool:
        group.add_argument(flag, dest=field.name, action="store_true", default=default, **kw)
        return
    if choices is not None:
        kw["choices"] = choices
    elif kind is not str:  # argparse's own default type is str
        kw["type"] = kind
    group.add_argument(flag, dest=field.name, default=default, **kw)


def build_parser(base: RunConfig | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``pretrain_moe.py``, generated from the config dataclasses.

    ``base``: a config whose values become the flags' defaults (a checkpoint's run, so that
    flags given on the command line override it); default: the dataclasses' defaults.
    """
    p = argparse.ArgumentParser(
        prog="pretrain_moe.py",
        description=_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # as Megatron-LM: a prefix of a flag is not that flag
    )
    groups: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section = getattr(base, name) if base is not None else cls()
        for field in dataclasses.fields(cls):
            if flag_of(field) is None:
                continue
            title = field.metadata.get("group", cls.GROUP)
            if title not in groups:
                groups[title] = p.add_argument_group(title)
            default = field.default if base is None else getattr(section, field.name)
            _add_field(groups[title], cls, field, default, base is None)
    add_no_effect_flags(p)
    return p


def _rank0() -> bool:
    """Whether this process is global rank 0 (parsing happens before any process group)."""
    return os.environ.get("RANK", "0") == "0"


def parse_megatron_lm_flags(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv``; every word no option took is refused in ONE message (each flag with its
    reason, see :func:`megatron_flags.unknown_flag_report`) through ``parser.error``; returns
    the namespace and the notes of the Megatron-LM flags accepted without effect."""
    ns, rest = parser.parse_known_args(argv)
    if rest:
        known = {s for action in parser._actions for s in action.option_strings}
        lines = unknown_flag_report(rest, known)
        # parser.exit, not parser.error: the usage of ~200 flags would bury the list.
        parser.exit(
            2,
            f"{parser.prog}: error: {len(lines)} flag(s) refused, nothing was started "
            f"(--help lists the flags):\n  " + "\n  ".join(lines) + "\n",
        )
    return ns, given_no_effect(ns)


def parse_run_config(
    argv: Sequence[str] | None = None, base: RunConfig | None = None
) -> tuple[RunConfig, argparse.Namespace]:
    """Parse flags into a :class:`RunConfig` (not yet validated against the world size).

    ``base``: the values of flags not given (default: the dataclasses' defaults).
    """
    ns, notes = parse_megatron_lm_flags(build_parser(base), argv)
    values = vars(ns)
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            meta = field.metadata
            given = values.get(meta.get("dest", field.name))
            if flag_of(field) is None or given is None and "convert" in meta:
                if base is not None:  # not a flag, or a derived flag not given
                    kwargs[field.name] = getattr(getattr(base, name), field.name)
                continue
            if "convert" in meta:
                kwargs[field.name] = meta["convert"](given)
            else:
                kwargs[field.name] = values[field.name]
        sections[name] = cls(**kwargs)
    cfg = RunConfig(**sections)
    sp_note = cfg.parallel.disable_sequence_parallel_without_tp()
    if sp_note:
        notes.append(sp_note)
    notes.extend(cfg.model.accelerator_notes())  # kernel flags this machine cannot honour
    if notes and _rank0():  # reported once per run, before anything starts
        print("\n".join(f"note: {n}" for n in notes), flush=True)
    return cfg, ns


def validate(cfg: RunConfig, world_size: int, cuda: bool) -> None:
    """Raise :class:`ConfigError` with one clear message for an impossible configuration."""
    cfg.validate(world_size, cuda)


def validate_accelerator_flags(cfg: RunConfig, cuda: bool, te: bool | None = None) -> None:
    """Refuse GPU-only performance flags where they cannot run (``te``: TE usable; probed
    when None)."""
    cfg.model.validate_accelerator(cuda, te)
    cfg.parallel.validate_overlap()
