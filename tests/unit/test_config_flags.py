"""The generated ``pretrain_moe.py`` parser keeps every flag, exactly as before the dataclasses
became the single source of configuration (frozen in ``data/pretrain_flags.json``)."""

import json
from pathlib import Path
from typing import Any

from megatron_wsm.arguments import build_parser

FROZEN = Path(__file__).parent / "data" / "pretrain_flags.json"


def _actions() -> dict[str, dict[str, Any]]:
    out = {}
    for a in build_parser()._actions:
        if not a.option_strings or a.dest == "help":
            continue
        out[a.option_strings[0]] = {
            "options": list(a.option_strings),
            "dest": a.dest,
            "action": type(a).__name__,
            "type": getattr(a.type, "__name__", None),
            "default": a.default,
            "choices": list(a.choices) if a.choices else None,
            "const": a.const,
            "help": a.help,
        }
    return out


def test_every_flag_keeps_name_type_default_choices_and_help() -> None:
    frozen = json.loads(FROZEN.read_text())
    now = _actions()
    assert sorted(now) == sorted(frozen)
    for flag, want in frozen.items():
        assert now[flag] == want, flag
