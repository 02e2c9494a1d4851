"""What importing megatron-wsm drags in: the pure modules load neither torch nor megatron-core and
install no import hook; every module that uses megatron-core imports ``mcore_prelude`` first."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

#: Standard library only: configuration and its tables, the probes, the free-port helper, the
#: merge-coefficient math.
STDLIB_ONLY = (
    "megatron_wsm",
    "megatron_wsm.config",
    "megatron_wsm.arguments",
    "megatron_wsm.lr_styles",
    "megatron_wsm.accelerators",
    "megatron_wsm.ports",
    "megatron_wsm.coefficients",
)


def _imported_after(modules: tuple[str, ...], code: str = "") -> dict[str, object]:
    """In a fresh interpreter: import ``modules`` (then run ``code``) and report what is loaded."""
    script = (
        "import json, sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + code
        + "print(json.dumps({\n"
        "    'loaded': sorted(k for k in ('torch', 'megatron', 'megatron.core', 'numpy',\n"
        "                                 'megatron_wsm.mcore_prelude') if k in sys.modules),\n"
        "    'hooks': [type(f).__name__ for f in sys.meta_path\n"
        "              if type(f).__module__.startswith('megatron_wsm')],\n"
        "}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pure_modules_import_the_standard_library_only():
    """Parsing flags, validating a configuration and computing merge coefficients load neither
    torch nor megatron-core, and leave ``sys.meta_path`` as it was."""
    code = (
        "from megatron_wsm.arguments import parse_run_config\n"
        "cfg, _ = parse_run_config(['--train-iters', '10', '--lr-decay-style', 'WSD',\n"
        "                           '--lr-wsd-decay-iters', '4'])\n"
        "cfg.validate(world_size=1, cuda=False)\n"
    )
    assert _imported_after(STDLIB_ONLY, code) == {"loaded": [], "hooks": []}


def test_the_annealing_planner_does_not_load_megatron_core():
    report = _imported_after(("megatron_wsm.annealing",))
    assert not {"torch", "megatron", "megatron.core", "megatron_wsm.mcore_prelude"} & set(
        report["loaded"]
    )
    assert report["hooks"] == []


def test_the_prelude_installs_its_one_shot_hook_and_megatron_core_removes_it():
    if importlib.util.find_spec("megatron.core") is None:
        pytest.skip("megatron-core is not installed")
    report = _imported_after(("megatron_wsm.mcore_prelude",))
    assert report == {"loaded": ["megatron_wsm.mcore_prelude"],
                      "hooks": ["_MegatronCoreImportHook"]}
    report = _imported_after(("megatron_wsm.lr",))
    assert {"torch", "megatron.core", "megatron_wsm.mcore_prelude"} <= set(report["loaded"])
    assert report["hooks"] == []  # used up by the import of megatron.core


def _first_line(tree: ast.AST, wanted) -> int | None:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            lines += [node.lineno for alias in node.names if wanted(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if wanted(node.module) or any(wanted(f"{node.module}.{a.name}") for a in node.names):
                lines.append(node.lineno)
    return min(lines, default=None)


def _is_megatron(name: str) -> bool:
    return name == "megatron" or name.startswith("megatron.")


def _python_sources() -> list:
    files = sorted((ROOT / "megatron_wsm").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    return [f for f in files if f.name != "mcore_prelude.py"]


@pytest.mark.parametrize("path", _python_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_megatron_core_is_imported_after_the_prelude(path):
    """The CPU import shims must be in place whichever module imports megatron-core first."""
    tree = ast.parse(path.read_text(), str(path))
    first_megatron = _first_line(tree, _is_megatron)
    if first_megatron is None:
        return
    prelude = _first_line(tree, lambda name: name == "megatron_wsm.mcore_prelude")
    assert prelude is not None and prelude < first_megatron, (
        f"{path.relative_to(ROOT)} imports megatron-core (line {first_megatron}) without "
        "`import megatron_wsm.mcore_prelude` before it"
    )


def test_production_code_does_not_import_test_support():
    for path in sorted((ROOT / "megatron_wsm").rglob("*.py")):
        if "testing" in path.relative_to(ROOT / "megatron_wsm").parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        assert _first_line(tree, lambda n: n.startswith("megatron_wsm.testing")) is None, path
