"""Load megatron-wsm checkpoints with Megatron-LM's own ``load_checkpoint`` and report.

Given a Megatron-LM checkout (tag ``core_v0.16.1``, see README.md) and our checkpoints, this
runs Megatron-LM's ``setup_model_and_optimizer`` (which calls
``megatron.training.checkpointing.load_checkpoint``) under ``torchrun --nproc-per-node 2`` on
CPU, with the shims of ``make_fixtures.py``, and prints per case one JSON line: whether it
loaded, the iteration and consumed samples Megatron-LM resumes at, and the LM loss of the
loaded model on a fixed batch; or the error.

    .venv/bin/python tests/data/megatron_lm/check_with_megatron_lm.py --mlm-dir /tmp/mlm \\
        --te-key-names --case full=runs/x/ckpt:--no-load-rng \\
        --case window=runs/x/ckpt/wsm_window:weights --parallel --expert-model-parallel-size 2

``--case NAME=PATH[:FLAGS]``: ``PATH`` is what Megatron-LM's ``--load`` takes, a save root
with ``latest_checkpointed_iteration.txt`` (``--exit-on-missing-checkpoint`` is set, so a
root without one is reported instead of trained from random weights); ``FLAGS`` is
``weights`` (``--finetune --no-load-optim --no-load-rng``, how Megatron-LM loads weights
alone) or Megatron-LM flags separated by commas. After ``--parallel``: the layout flags. The
model flags are the fixtures' tiny MoE (``make_fixtures.MODEL``, vocabulary 512): train ours
with the same shape (``--num-layers 2 --hidden-size 16 --ffn-hidden-size 32
--num-attention-heads 4 --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32
--seq-length 32 --vocab-size 512 --weight-decay 0.01``).
``--te-key-names`` makes Megatron-LM's local spec name the MoE pre-MLP norm
``pre_mlp_layernorm`` as a Transformer Engine spec (and megatron-wsm) does, instead of the
local spec's ``mlp.linear_fc1.layer_norm_weight``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_fixtures  # noqa: E402  (this directory: the shims and the model flags)

REPORT_PREFIX = "CHECK_RESULT "


def _te_key_names() -> None:
    """Local spec, MoE layers: keep ``pre_mlp_layernorm.`` (TE / megatron-wsm key names)."""
    from megatron.core.models.gpt import gpt_layer_specs

    real = gpt_layer_specs.get_gpt_layer_local_spec

    def spec(*args, **kwargs):
        layer = real(*args, **kwargs)
        if kwargs.get("num_experts") or (args and args[0]):
            keys = dict(layer.submodules.sharded_state_dict_keys_map)
            keys.pop("pre_mlp_layernorm.", None)
            layer.submodules.sharded_state_dict_keys_map = keys
        return layer

    gpt_layer_specs.get_gpt_layer_local_spec = spec


def _torch_adam_distributed_optimizer_loads() -> None:
    """S13 (CPU only): Megatron-LM's distributed optimizer with torch's Adam (no Apex / TE, as
    on a CPU) cannot build its load request before its first step (``state_dict`` asserts one
    shared ``step``: ``distrib_optimizer.py`` ``assert len(steps) == 1``), so on CPU it loads no
    distributed-optimizer checkpoint, its own included. Around ``load_checkpoint``: the state
    torch's Adam creates at its first step, and the step restored per parameter after the load
    (``megatron_wsm.cpu_compat``'s shims for our trainer; on a GPU TE's / Apex's Adam needs none).
    Under ``no_grad``: with fp32 parameters the distributed optimizer's main parameters are
    views of the model's, which its load copies into in place (a RuntimeError otherwise, on any
    device; bf16 runs have separate fp32 copies).
    """
    import torch
    from megatron.training import training as mlm_training

    from megatron_wsm import cpu_compat

    real = mlm_training.load_checkpoint

    def load_checkpoint(model, optimizer, *args, **kwargs):
        if optimizer is None:
            return real(model, optimizer, *args, **kwargs)
        cpu_compat.init_torch_adam_state(optimizer)
        with cpu_compat.loading_torch_adam_state(optimizer), torch.no_grad():
            return real(model, optimizer, *args, **kwargs)

    mlm_training.load_checkpoint = load_checkpoint


def worker(mlm_dir: Path, te_key_names: bool, argv: list[str]) -> None:
    make_fixtures.install_shims(mlm_dir)
    if te_key_names:
        _te_key_names()
    _torch_adam_distributed_optimizer_loads()
    from functools import partial

    import torch

    sys.argv = [str(mlm_dir / "pretrain_gpt.py"), *argv]
    import pretrain_gpt  # the checkout's module: its model_provider / gpt_builder
    from megatron.core.enums import ModelType
    from megatron.training import get_args
    from megatron.training import training as mlm_training

    result: dict = {}
    try:
        mlm_training.initialize_megatron(
            args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
            get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
        )
        args = get_args()
        model, optimizer, _sched = mlm_training.setup_model_and_optimizer(
            partial(pretrain_gpt.model_provider, pretrain_gpt.gpt_builder),
            ModelType.encoder_or_decoder,
        )
        result.update(
            loaded=True,
            iteration=args.iteration,
            consumed_train_samples=args.consumed_train_samples,
            consumed_valid_samples=args.consumed_valid_samples,
        )
        gpt = model[0].module if hasattr(model[0], "module") else model[0]
        gpt.eval()
        # A fixed batch (same on every rank): tokens 1..seq of every row shifted by the row.
        seq, vocab = args.seq_length, 511
        tokens = (torch.arange(seq + 1).repeat(2, 1) + torch.arange(2)[:, None] * 7) % vocab
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        position_ids = torch.arange(seq).repeat(2, 1)
        with torch.no_grad():
            losses = gpt(inputs, position_ids, None, labels=labels)
        result["loss_fixed_batch"] = float(losses.float().mean())
    except BaseException as e:  # report any failure (SystemExit included) and go on
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]  # a bare assert says nothing else
        result.update(
            loaded=False,
            error=f"{type(e).__name__}: {str(e)[:1500]}",
            raised_at=f"{where.filename}:{where.lineno}: {where.line}",
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if int(os.environ.get("RANK", "0")) == 0:
        print(REPORT_PREFIX + json.dumps(result), flush=True)
    os._exit(0)  # past Megatron-LM's atexit hooks: the report is out


def run_case(name: str, spec: str, args: argparse.Namespace, port: int) -> dict:
    path, _, mode = spec.partition(":")
    load = ["--load", str(Path(path).resolve()), "--ckpt-format", "torch_dist"]
    if mode == "weights":
        load += ["--finetune", "--no-load-optim", "--no-load-rng"]
    elif mode:
        load += mode.split(",")
    flags = [
        *make_fixtures.MODEL, *make_fixtures.DATA, *make_fixtures.TRAIN, *args.parallel,
        "--exit-on-missing-checkpoint", *load,
    ]  # fmt: skip
    # No --save: Megatron-LM only loads here (--save-interval dropped with it).
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(port), str(Path(__file__).resolve()), "--worker",
        "--mlm-dir", str(args.mlm_dir), *(["--te-key-names"] if args.te_key_names else []),
        "--", *_drop_save_interval(flags),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(make_fixtures.REPO), env.get("PYTHONPATH")) if p
    )
    log = args.work_dir / f"check_{name}.log"
    with open(log, "w") as fh:
        subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(REPORT_PREFIX):
            return {"case": name, "checkpoint": spec, **json.loads(line[len(REPORT_PREFIX) :])}
    return {"case": name, "checkpoint": spec, "loaded": False, "error": f"no report, see {log}"}


def _drop_save_interval(flags: list[str]) -> list[str]:
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
            continue
        if flag == "--save-interval":
            skip = True
            continue
        out.append(flag)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlm-dir", type=Path, required=True, help="Megatron-LM checkout")
    parser.add_argument("--case", action="append", default=[], metavar="NAME=PATH[:weights]")
    parser.add_argument("--te-key-names", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mlm_check"))
    parser.add_argument("--port", type=int, default=29631)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.mlm_dir.resolve(), args.te_key_names, rest[1:] if rest[:1] == ["--"] else rest)
        return
    # Everything after --parallel: Megatron-LM's parallel-layout flags.
    args.parallel = rest[rest.index("--parallel") + 1 :] if "--parallel" in rest else []
    args.mlm_dir = args.mlm_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for case in args.case:
        name, _, spec = case.partition("=")
        result = run_case(name, spec, args, args.port)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
