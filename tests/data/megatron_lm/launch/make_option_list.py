"""Write ``megatron_wsm/megatron_lm_options.py``: every option string of Megatron-LM's parser.

Runs Megatron-LM's own ``megatron.training.arguments.add_megatron_arguments`` (no training, no
process group) and records each option with the number of command-line words it takes, so
``pretrain_moe.py`` can tell a Megatron-LM flag it does not support from a typo, and skip the
values of a refused flag instead of reporting them as flags. Megatron-LM is NOT part of this
project and nothing of its source is copied: only the option names and their arity, an
interface. Usage (the checkout of the release matching our megatron-core)::

    git clone -q https://github.com/NVIDIA/Megatron-LM /tmp/mlm
    git -C /tmp/mlm checkout -q core_v0.16.1
    .venv/bin/python tests/data/megatron_lm/launch/make_option_list.py --mlm-dir /tmp/mlm

Only one CPU shim is needed (shim S3 of ``../make_fixtures.py``: ``megatron.training``
imports a triton kernel module that a CPU torch cannot import).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
OUTPUT = REPO / "megatron_wsm" / "megatron_lm_options.py"


def arity(action: argparse.Action) -> str:
    """The words an option takes: ``0`` (a switch), ``1``, or argparse's ``*``/``+``/``?``/N."""
    if action.nargs is None:
        return "0" if isinstance(action, argparse._StoreConstAction) else "1"
    if action.nargs == 0:
        return "0"
    return str(action.nargs)


def option_table(mlm_dir: Path) -> dict[str, str]:
    """Option string → arity, from Megatron-LM's parser."""
    sys.path.append(str(mlm_dir))  # megatron.core stays the venv's (the same release)
    import megatron_wsm.mcore_prelude  # noqa: F401

    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *a, **k: None
    sys.modules.setdefault(stub.__name__, stub)
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    table: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            table[option] = arity(action)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlm-dir", type=Path, required=True)
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "-C", str(args.mlm_dir), "rev-parse", "HEAD"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    table = option_table(args.mlm_dir)
    lines = [
        '"""Every option of Megatron-LM\'s ``pretrain_gpt.py`` parser, with the words it takes.',
        "",
        "GENERATED: do not edit. Made by",
        "``.venv/bin/python tests/data/megatron_lm/launch/make_option_list.py --mlm-dir /tmp/mlm``",
        f"from Megatron-LM commit {commit} (tag core_v0.16.1):",
        "``megatron.training.arguments.add_megatron_arguments``. Arity: ``0`` a switch, ``1`` one",
        "value, ``*``/``+``/``?`` argparse's variable counts, a number: that many values.",
        '"""',
        "",
        f'MEGATRON_LM_COMMIT = "{commit}"',
        "",
        "#: option string -> arity",
        "OPTIONS: dict[str, str] = {",
    ]
    lines += [f'    "{opt}": "{table[opt]}",' for opt in sorted(table)]
    lines.append("}")
    OUTPUT.write_text("\n".join(lines) + "\n")
    print(f"{len(table)} options -> {OUTPUT}")


if __name__ == "__main__":
    main()
