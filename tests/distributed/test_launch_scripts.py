"""The launch scripts run as shipped (issue 25, part 2) and find the environment (issue 29).

* every script of ``examples/`` finds the project's environment itself
  (``examples/use_env.sh``), from a shell without ``.venv/bin`` on ``PATH``;
* the default sizes of ``train_multinode.sh`` / ``train.slurm`` are a valid trainer
  configuration for the launch they describe (2 nodes × 8 GPUs, ...);
* ``train_multinode.sh`` as two nodes on one machine (two torchrun agents, node ranks 0 and 1,
  rendezvous on 127.0.0.1) trains a tiny MoE with a WSM window, which is then merged;
* ``train.slurm`` submitted with ``sbatch`` to a real Slurm (``slurmctld`` + ``slurmd`` for this
  machine as one node, started here; ``slurm-wlm`` installed with apt when missing).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.distributed.newcomer import VENV, newcomer_env
from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.distributed

#: A PATH with the system's tools only: no python environment of ours on it.
BARE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

#: The tiny MoE (tests.helpers.TINY_MODEL) as the launch scripts' size variables.
TINY_SIZES = {
    "NUM_LAYERS": "2", "HIDDEN_SIZE": "32", "NUM_HEADS": "4", "NUM_QUERY_GROUPS": "4",
    "NUM_EXPERTS": "4", "TOPK": "2", "MOE_FFN_HIDDEN_SIZE": "32", "SEQ_LENGTH": "32",
    "MICRO_BATCH": "2", "BF16": "0", "ITERS": "6", "WARMUP": "1", "SAVE_INTERVAL": "6",
    "WSM_INTERVAL": "2", "WSM_WINDOW": "4",
}
#: Flags passed through the scripts to pretrain_moe.py (logging of the tiny runs).
TINY_FLAGS = ["--log-interval", "1", "--eval-interval", "0", "--eval-iters", "2",
              "--no-progress-bar"]


def _bash(cmd: str, env: dict[str, str], cwd: Path = ROOT, timeout: int = 60):
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _need_venv() -> None:
    assert (VENV / "bin" / "activate").is_file(), (
        f"{VENV} is missing: the README's set-up (bash scripts/test.sh) creates it")


# ---- issue 29: the scripts find the environment ----

def test_every_example_script_finds_the_environment():
    """Each shell script of examples/ sources use_env.sh right after moving to the repository
    root (train.slurm runs train_multinode.sh, which does)."""
    scripts = sorted(p for p in (ROOT / "examples").glob("*.sh") if p.name != "use_env.sh")
    assert {p.name for p in scripts} >= {"train_multinode.sh", "train_tiny_cpu.sh",
                                          "wsm_vs_wsd.sh", "anneal_check.sh"}
    for script in scripts:
        lines = script.read_text().splitlines()
        cd = lines.index('cd "$(dirname "$0")/.."')
        sourced = [i for i, line in enumerate(lines) if line.startswith(". examples/use_env.sh")]
        assert sourced and sourced[0] > cd, script.name
        first_tool = min((i for i, line in enumerate(lines)
                          if line.lstrip().startswith(("torchrun", "exec torchrun", '"$PYTHON"'))),
                         default=len(lines))
        assert sourced[0] < first_tool, script.name
    slurm = (ROOT / "examples" / "train.slurm").read_text()
    assert "bash examples/train_multinode.sh" in slurm


def test_use_env_activates_the_venv_from_a_fresh_shell():
    _need_venv()
    env = newcomer_env({"PATH": BARE_PATH})
    proc = _bash(". examples/use_env.sh && command -v torchrun python && echo \"$VIRTUAL_ENV\"",
                 env)
    assert proc.returncode == 0, proc.stderr
    torchrun, python, active = proc.stdout.split()
    assert Path(torchrun).parent.samefile(VENV / "bin"), proc.stdout
    assert Path(python).parent.samefile(VENV / "bin"), proc.stdout
    assert Path(active).samefile(VENV)


def test_use_env_keeps_an_environment_that_has_the_package(tmp_path):
    """A shell whose python finds torch and megatron-core and which has torchrun (an activated
    env of the user's own, a container's python) is left as it is."""
    own = tmp_path / "own_env" / "bin"
    own.mkdir(parents=True)
    for name, run in (("python", ""), ("torchrun", "-m torch.distributed.run ")):
        (own / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {run}"$@"\n')
        (own / name).chmod(0o755)
    env = newcomer_env({"PATH": f"{own}:{BARE_PATH}"})
    proc = _bash(". examples/use_env.sh && command -v torchrun python && "
                 "echo \"active=${VIRTUAL_ENV:-}\"", env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(own / "torchrun"), str(own / "python"), "active="]


def test_use_env_says_what_to_do_without_any_environment(tmp_path):
    """No usable environment and no .venv: one clear message, the script stops."""
    shutil.copy(ROOT / "examples" / "use_env.sh", tmp_path / "use_env.sh")
    proc = _bash(". ./use_env.sh; echo reached", newcomer_env({"PATH": BARE_PATH}), cwd=tmp_path)
    assert proc.returncode == 1 and "reached" not in proc.stdout
    assert "bash scripts/demo.sh" in proc.stderr and "pip install -e ." in proc.stderr


# ---- issue 25: the launch scripts' sizes ----

def _fake_slurm(tmp_path: Path) -> Path:
    """``srun`` (run the command once, as node 0) and ``scontrol`` stubs: train.slurm's own
    logic without a Slurm."""
    stubs = tmp_path / "slurm_stubs"
    stubs.mkdir()
    (stubs / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    (stubs / "scontrol").write_text('#!/bin/sh\necho gpu-node-017\necho gpu-node-018\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return stubs


@pytest.mark.parametrize(("script", "launch", "world", "expect"), [
    # train.slurm's defaults: 2 nodes × 8 GPUs, TP=2 + SP → DP 8, EP 8, 8 experts
    ("train.slurm", {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}, 16,
     {"tp": 2, "ep": 8, "gbs": 64, "nproc": 8, "master": "gpu-node-017"}),
    ("train.slurm", {"SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "8"}, 32,
     {"tp": 2, "ep": 8, "gbs": 128, "nproc": 8}),
    # train_multinode.sh on one 8-GPU node, TP=1 → DP 8, EP 8; on 2 nodes with PP=2 → DP 8
    ("train_multinode.sh", {"NPROC_PER_NODE": "8"}, 8, {"tp": 1, "ep": 8, "gbs": 64}),
    ("train_multinode.sh", {"NNODES": "2", "NPROC_PER_NODE": "8", "PP": "2", "TP": "2"}, 16,
     {"tp": 2, "ep": 4, "gbs": 32}),
    ("train_multinode.sh", {"NNODES": "3", "NPROC_PER_NODE": "4", "GRAD_ACCUM": "2"}, 12,
     {"tp": 1, "ep": 4, "gbs": 192}),
])
def test_launch_defaults_are_valid_configurations(script, launch, world, expect, tmp_path):
    """The command each script would run (DRY_RUN=1) parses and validates for its world size:
    experts divisible by EP, EP dividing DP, the global batch divisible by micro batch × DP."""
    from megatron_wsm.arguments import parse_run_config

    env = newcomer_env({"DRY_RUN": "1", **launch})
    cmd = f"bash examples/{script} --lr 2e-4"
    if script == "train.slurm":
        env.update(PATH=f"{_fake_slurm(tmp_path)}:{env['PATH']}", SLURM_JOB_ID="4242",
                   SLURM_JOB_NODELIST="gpu-node-[017-018]")
    proc = _bash(cmd, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun "), line
    argv = shlex.split(line)[1:]
    launcher = argv[1:argv.index("pretrain_moe.py")]
    opts = dict(zip(launcher[::2], launcher[1::2]))
    assert int(opts["--nnodes"]) * int(opts["--nproc-per-node"]) == world
    if "nproc" in expect:
        assert opts["--nproc-per-node"] == str(expect["nproc"])
    if "master" in expect:  # the first node of the allocation, a port of the job's own
        assert opts["--master-addr"] == expect["master"] and opts["--master-port"] == "24242"
    cfg, _ = parse_run_config(argv[argv.index("pretrain_moe.py") + 1:])
    cfg.validate(world_size=world, cuda=False)
    par, model, train = cfg.parallel, cfg.model, cfg.training
    assert par.tensor_model_parallel_size == expect["tp"]
    assert par.sequence_parallel == (expect["tp"] > 1)
    assert par.expert_model_parallel_size == expect["ep"]
    assert train.global_batch_size == expect["gbs"]
    assert model.num_experts == 8 and cfg.optim.lr == 2e-4  # passed-through flag wins
    assert cfg.data.data_source == "env-python" and cfg.data.vocab_size == 16384


def test_train_multinode_refuses_an_impossible_layout():
    proc = _bash("bash examples/train_multinode.sh",
                 newcomer_env({"DRY_RUN": "1", "NPROC_PER_NODE": "3", "TP": "2"}))
    assert proc.returncode == 2
    assert "world size 3" in proc.stderr and "TP × PP = 2 × 1" in proc.stderr


# ---- issue 25: the launch scripts for real ----

def _check_tiny_run(out: Path, log: str) -> None:
    """What a tiny 6-iteration run of the launch scripts leaves: history, full checkpoint,
    window of iterations 2, 4, 6."""
    assert "world 2 (TP 1, PP 1, EP 2)" in log, log[-3000:]
    result = json.loads((out / "r.json").read_text())
    assert [h["iteration"] for h in result["train_history"]] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(h["loss"]) for h in result["train_history"])
    assert result["consumed_tokens"] == 6 * 4 * 32  # global batch 4 = micro 2 × DP 2
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    window = sorted(p.name for p in (out / "ckpt" / "wsm_window").iterdir() if p.is_dir())
    assert window == ["iter_0000002", "iter_0000004", "iter_0000006"], window


def _merge_and_verify(window: Path, merged: Path) -> None:
    """Merge the window (1-sqrt) with the README's tools, CRC-check the result."""
    env = newcomer_env()
    for argv in (
        [sys.executable, "tools/merge_wsm.py", "--load-dir", str(window), "--method", "1-sqrt",
         "--save", str(merged)],
        [sys.executable, "tools/list_checkpoints.py", str(merged), "--verify"],
    ):
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=180)
        assert proc.returncode == 0, f"{shlex.join(argv)}:\n{proc.stdout}\n{proc.stderr}"
    manifest = json.loads((merged / "wsm_manifest.json").read_text())
    assert manifest["kind"] == "merged" and manifest["complete"]
    prov = json.loads((merged / "wsm_merge_provenance.json").read_text())
    assert [i["iteration"] for i in prov["inputs"]] == [2, 4, 6]
    assert sum(i["coefficient"] for i in prov["inputs"]) == pytest.approx(1.0)


def test_train_multinode_as_two_nodes_on_one_machine(data_cache, tmp_path):
    """Two torchrun agents, NNODES=2, node ranks 0 and 1, one process each, rendezvous on
    127.0.0.1, started from a shell without .venv/bin on PATH; then the window is merged."""
    _need_venv()
    out = tmp_path / "multinode"
    env = newcomer_env({
        **TINY_SIZES, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()), "OUT": str(out),
        "DATA_ARGS": f"--data-cache-dir {data_cache} --vocab-size 512",
    })
    args = [*TINY_FLAGS, "--output-json", str(out / "r.json")]
    nodes, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"node{rank}.log")
        with open(logs[-1], "w") as log:
            nodes.append(subprocess.Popen(
                ["bash", "examples/train_multinode.sh", *args], cwd=ROOT,
                env={**env, "NODE_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], f"node 0:\n{text[0][-4000:]}\nnode 1:\n{text[1][-4000:]}"
    _check_tiny_run(out, text[0])
    _merge_and_verify(out / "ckpt" / "wsm_window", tmp_path / "merged")


# ---- the Slurm test ----

def _slurm_or_skip() -> None:
    """Slurm's daemons and clients on this machine: installed with apt when missing."""
    tools = ("sbatch", "slurmctld", "slurmd", "munged", "scontrol")
    if os.geteuid() != 0:
        pytest.skip("not root: cannot install slurm-wlm nor run slurmd")
    if all(shutil.which(t, path=BARE_PATH) for t in tools):
        return
    if not shutil.which("apt-get"):
        pytest.skip("slurm-wlm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "slurm-wlm"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"apt-get install slurm-wlm failed: {proc.stderr[-500:]}")
    missing = [t for t in tools if not shutil.which(t, path=BARE_PATH)]
    assert not missing, f"slurm-wlm installed but {missing} not found"


def _slurm_conf(d: Path, host: str) -> str:
    """A one-node cluster: this machine (2 CPUs, no GPUs), its own ports, state and logs."""
    return "\n".join([
        "ClusterName=wsmtest",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={d}/munge.sock",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldLogFile={d}/slurmctld.log",
        f"SlurmdLogFile={d}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
        f"PartitionName=wsm Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _wait_for(what: str, check, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"== {p}:\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def _job_state(job: str, env: dict[str, str]) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True,
                          text=True, timeout=30)
    return dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)


@pytest.mark.slow  # ~1 min: daemons, sbatch, a tiny 2-process run (+ the apt install once)
def test_train_slurm_through_sbatch(data_cache, tmp_path):
    """sbatch examples/train.slurm on a real Slurm (this machine as one node, no GPUs: the
    script's --gpus-per-node=8 overridden on the sbatch command line), tiny sizes given with
    --export, from a shell without .venv/bin on PATH; the job completes with its checkpoints."""
    _need_venv()
    _slurm_or_skip()
    # Short, private paths: the munge socket's path must fit a sockaddr_un.
    d = Path(tempfile.mkdtemp(prefix="wsm-slurm-"))
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    (d / "munge.key").write_bytes(os.urandom(1024))
    (d / "munge.key").chmod(0o600)
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True,
                          check=True).stdout.strip()
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, host))
    env = newcomer_env({"SLURM_CONF": str(conf)})
    logs = [d / "munged.log", d / "slurmctld.log", d / "slurmd.log"]
    daemons: list[subprocess.Popen] = []

    def start(argv: list[str]) -> None:
        with open(d / f"{Path(argv[0]).name}.out", "w") as log:
            daemons.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))

    job = None
    try:
        start(["munged", "--foreground", "--force", f"--key-file={d}/munge.key",
               f"--socket={d}/munge.sock", f"--pid-file={d}/munged.pid",
               f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"])
        _wait_for("munged", lambda: (d / "munge.sock").exists(), 30, logs)
        start(["slurmctld", "-D", "-i", "-f", str(conf)])
        start(["slurmd", "-D", "-N", host, "-f", str(conf)])

        def idle() -> bool:
            proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                  text=True, timeout=30)
            return proc.stdout.strip() == "idle"

        _wait_for("the node to be idle", idle, 90, logs)

        out = tmp_path / "slurm_run"
        sizes = {**TINY_SIZES, "NPROC_PER_NODE": "2", "TP": "1", "OUT": str(out)}
        export = "ALL," + ",".join(f"{k}={v}" for k, v in sizes.items())
        submit_env = {**env, "DATA_ARGS": f"--data-cache-dir {data_cache} --vocab-size 512"}
        sbatch = ["sbatch", "--parsable", "--nodes", "1", "--gpus-per-node=0", "--time=10",
                  f"--output={tmp_path}/job-%j.out", f"--export={export}",
                  "examples/train.slurm", *TINY_FLAGS, "--output-json", str(out / "r.json")]
        proc = subprocess.run(sbatch, cwd=ROOT, env=submit_env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip().split(";")[0]

        def finished() -> dict[str, str] | None:
            state = _job_state(job, env)
            done = state.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING",
                                                 "COMPLETING")
            return state if done else None

        state = _wait_for(f"job {job}", finished, 600, logs)
        output = (tmp_path / f"job-{job}.out").read_text()
        assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), output[-5000:]
        assert f"train.slurm: job {job}, 1 node(s) ({host}), master {host}:" in output
        _check_tiny_run(out, output)
        assert (out / "ckpt" / "iter_0000006" / "wsm_manifest.json").is_file()
    finally:
        if job is not None and _job_state(job, env).get("JobState") != "COMPLETED":
            subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        for daemon in reversed(daemons):
            if daemon.args[0] == "munged":
                daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=30)
        shutil.rmtree(d, ignore_errors=True)
