"""A newcomer's shell for the tests that run our commands and scripts (issue 29).

The test process itself runs from ``.venv``, whose ``bin`` may be on ``PATH`` (``scripts/test.sh``
activates it). A newcomer's shell does not have it there: only what the README says to do (its
activation line) or what a script does by itself may put it there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.helpers import ROOT, _env

#: The environment the README's set-up creates.
VENV = ROOT / ".venv"


def _same(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def newcomer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's child environment (:func:`tests.helpers._env`) as a fresh shell has it: no
    activated virtualenv, ``.venv/bin`` (and any active env's ``bin``) off ``PATH``."""
    env = _env()
    active = env.pop("VIRTUAL_ENV", None)
    env.pop("VIRTUAL_ENV_PROMPT", None)
    drop = [VENV / "bin"] + ([Path(active) / "bin"] if active else [])
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep)
        if p and not any(_same(p, d) for d in drop)
    )
    env.update(extra or {})
    return env


def readme_activation(readme: str) -> str:
    """The README's activation line: the indented command of the set-up ("## The two
    commands") that sources an ``activate`` script."""
    setup = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^    ((?:\.|source) \S*/activate)\s*$", setup, re.M)
    assert len(found) == 1, f"no single activation line in the README's set-up: {found}"
    return found[0]
