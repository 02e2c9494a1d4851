"""Every command of the README's "Using it" block runs, in order, as a user would type it.

The commands are read from README.md itself (not copied here), so the README cannot promise
what does not work. Only sizes are shrunk (:data:`TINY_SIZES`, the tiny model, the shared
corpus cache); ``torchrun ...`` / ``pretrain_moe.py ...`` stand for "the training command
above", as a reader understands them. Each runs in bash as a newcomer's shell has it (issue 29):
``.venv/bin`` is not on ``PATH`` except through the README's own activation line, run first.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.distributed.newcomer import VENV, newcomer_env, readme_activation
from tests.helpers import ROOT, TINY_MODEL, free_port

pytestmark = pytest.mark.distributed

#: README value -> tiny value, per flag (everything else is taken as written).
TINY_SIZES = {
    "--train-iters": {"1000": "24", "1200": "30", "2000": "36"},
    "--load": {"runs/x/ckpt/iter_0001000": "runs/x/ckpt/iter_0000024"},
    "--save-interval": {"500": "12"},
    "--wsm-interval": {"25": "3"},
    "--wsm-window": {"200": "9"},
    "--lr-warmup-iters": {"30": "2"},
    "--eval-interval": {"50": "9"},
    "--lr-wsd-decay-iters": {"200": "6"},
    # The tiny runs consume 128 tokens per step: 1e9 tokens would be 7.8 M planned steps.
    "--budget-tokens": {"1e9": "2e4"},
}
#: Runs whose logs the README's planner command reads: (name, extra flags) of tiny runs.
PLANNER_RUNS = {
    "const": ["--lr-decay-style", "constant"],
    "wsd20": ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "6"],
    "wsd40": ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "12"],
}


def readme_commands(readme: str) -> list[str]:
    """The shell commands of the README's "Using it" code block, continuation lines joined,
    comments dropped."""
    section = readme.split("## Using it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        line = line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not line and not current:
            continue
        current += " " + line.strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        commands.append(" ".join(current.split()))
        current = ""
    return commands


def shrink(argv: list[str]) -> list[str]:
    """``argv`` with the README's sizes replaced by tiny ones (:data:`TINY_SIZES`)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in TINY_SIZES and out[i + 1] in TINY_SIZES[arg]:
            out[i + 1] = TINY_SIZES[arg][out[i + 1]]
    return out


def _shell_argv(argv: list[str], train_args: list[str], data_cache: str) -> list[str]:
    """A README command as the argv to run from the test's working directory (``torchrun`` and
    ``python`` as typed: whatever the shell finds)."""
    if argv[0] == "torchrun":
        i = 1
        launcher = []
        while argv[i] != "..." and not argv[i].endswith(".py"):
            launcher.append(argv[i])
            i += 1
        if argv[i] == "...":  # "torchrun ... pretrain_moe.py ...": the launch of the training
            launcher, i = ["--nproc-per-node", "2"], i + 1
        script, rest = argv[i], argv[i + 1 :]
        if rest[:1] == ["..."]:
            rest = train_args + rest[1:]
        head = ["torchrun", *launcher, "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())]
    else:
        assert argv[0] == "python", argv
        head, script, rest = ["python"], argv[1], argv[2:]
    rest = shrink(rest)
    if script == "pretrain_moe.py":
        rest = [*TINY_MODEL, "--data-cache-dir", data_cache, *rest]
    if script == "tools/evaluate.py":
        rest = [*rest, "--data-cache-dir", data_cache, "--eval-iters", "2"]
    if script == "tools/export_hf.py":  # the run's tokenizer lives in its data cache
        rest = [*rest, "--data-cache-dir", data_cache]
    if script == "tools/eval_harness.py":  # held-out tasks from the same cache; a few items each
        rest = [*rest, "--data-cache-dir", data_cache, "--limit", "8"]
    return [*head, str(ROOT / script), *rest]


def _newcomer_shell(command: str, cwd: Path) -> list[str]:
    """bash running ``command`` in ``cwd`` after the README's activation line, which is run
    where the README's reader runs it: the repository root."""
    activation = readme_activation((ROOT / "README.md").read_text())
    return ["bash", "-c", f"cd {shlex.quote(str(ROOT))} && {activation} && "
            f"cd {shlex.quote(str(cwd))} && {command}"]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(_newcomer_shell(shlex.join(argv), cwd), env=newcomer_env(),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(
            f"README command failed ({proc.returncode}): {shlex.join(argv)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def test_readme_parser_sees_every_command():
    commands = readme_commands((ROOT / "README.md").read_text())
    scripts = [c.split(".py")[0].split()[-1] for c in commands]
    assert "pretrain_moe" in scripts[0]
    for tool in ("list_checkpoints", "wsm_weights", "merge_wsm", "evaluate", "plan_anneal",
                 "export_hf", "eval_harness"):
        assert any(tool in s for s in scripts), (tool, commands)
    assert sum("--load runs/x/ckpt" in c for c in commands) == 2, commands
    shrunk = shrink(shlex.split(commands[-2]))
    assert "runs/x/ckpt/iter_0000024" in shrunk and "30" in shrunk, shrunk
    # The set-up's activation line, before "Using it", is what the commands run under.
    readme = (ROOT / "README.md").read_text()
    assert readme_activation(readme) == ". .venv/bin/activate"
    assert readme.index(". .venv/bin/activate") < readme.index("## Using it")


def test_readme_shell_finds_the_package_only_through_the_activation(tmp_path):
    """The commands' shell: ``.venv/bin`` off PATH (no ambient activation), and after the
    README's activation line ``python`` / ``torchrun`` are the .venv's."""
    assert (VENV / "bin" / "activate").is_file(), f"{VENV} missing (bash scripts/test.sh)"
    env = newcomer_env()
    assert str(VENV / "bin") not in env["PATH"].split(":") and "VIRTUAL_ENV" not in env
    proc = subprocess.run(_newcomer_shell("command -v python torchrun", tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = [Path(p) for p in proc.stdout.split()]
    assert len(found) == 2 and all(p.parent.samefile(VENV / "bin") for p in found), found


def test_readme_using_it_commands_run(data_cache, tmp_path):
    commands = readme_commands((ROOT / "README.md").read_text())
    train_args: list[str] = []
    # The planner's inputs: three tiny runs logging to runs/<name>/tb.
    for name, flags in PLANNER_RUNS.items():
        _run(_shell_argv(
            ["python", "pretrain_moe.py", "--train-iters", "18", "--lr", "3e-3",
             "--lr-warmup-iters", "2", "--tensorboard-dir", f"runs/{name}/tb", *flags],
            [], data_cache), tmp_path)
    outputs = {}
    for command in commands:
        argv = shlex.split(command)
        if "pretrain_moe.py" in argv and not train_args:
            train_args = argv[argv.index("pretrain_moe.py") + 1 :]
        outputs[command] = _run(_shell_argv(argv, train_args, data_cache), tmp_path)

    runs = tmp_path / "runs" / "x"
    # The stable checkpoint was decayed into runs/x/wsd (24 → 30) and went on (24 → 36).
    assert (runs / "wsd" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (runs / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "36"
    # The merged readout during training (iteration 18: window 9..18 full) and without it.
    first = next(o.stdout for c, o in outputs.items() if "--wsm-eval-methods" in c)
    assert "wsm-1-sqrt lm loss" in first, first[-2000:]
    unwritten = next(o.stdout for c, o in outputs.items() if "--load-dir" in c and "evaluate" in c)
    assert "loaded merged (in memory)" in unwritten and "final validation" in unwritten
    listing = next(o.stdout for c, o in outputs.items() if "list_checkpoints" in c)
    assert "window" in listing and "iter_0000024" in listing, listing
    merged = json.loads((runs / "merged" / "wsm_manifest.json").read_text())
    assert merged["kind"] == "merged" and merged["complete"]
    result = json.loads((tmp_path / "m.json").read_text())
    assert math.isfinite(result["loss"])
    # lm-eval scored the exported merge on both held-out tasks.
    harness = json.loads((tmp_path / "h.json").read_text())
    assert 0.0 <= harness["wsm_heldout_cloze"]["acc"] <= 1.0, harness
    assert math.isfinite(harness["wsm_heldout_ppl"]["bits_per_byte"]), harness
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
