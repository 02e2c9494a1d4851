"""Make the Megatron-LM fixture checkpoints with Megatron-LM's own trainer, on CPU.

Megatron-LM (``pretrain_gpt.py``, ``megatron.training``) is NOT part of this project and is
never copied here: pass a checkout of it (the release matching our megatron-core, tag
``core_v0.16.1``)::

    git clone -q https://github.com/NVIDIA/Megatron-LM /tmp/mlm
    git -C /tmp/mlm checkout -q core_v0.16.1
    .venv/bin/python tests/data/megatron_lm/make_fixtures.py --mlm-dir /tmp/mlm

Each fixture is one ``torchrun --nproc-per-node 2`` run of ``pretrain_gpt.py`` (gloo, CPU) on
megatron-core's mock data; its ``--save`` directory is copied to
``tests/data/megatron_lm/<name>/`` (README.md there lists what each holds).

The script re-runs itself under torchrun in ``--worker`` mode: there it installs the CPU shims
listed in :func:`install_shims` (each one says which Megatron-LM line needs it), then runs
``pretrain_gpt.py`` as ``__main__``. Only Megatron-LM's *training* package needs shims beyond
megatron-wsm's own megatron-core shims (``megatron_wsm.cpu_compat``), which are reused.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

#: The tiny MoE GPT: the architecture megatron-wsm builds (RMSNorm, SwiGLU, no linear biases,
#: RoPE, untied embeddings, no dropout), as small as it goes. 511 tokens + EOD = 512 = the padded
#: vocabulary megatron-wsm's trainer builds for its tiny test model (--vocab-size 512: a
#: multiple of 128 x TP for TP=1 and TP=2), so pretrain_moe.py can load the weights as they are.
MODEL = [
    "--use-mcore-models",
    "--transformer-impl", "local",
    "--num-layers", "2",
    "--hidden-size", "16",
    "--ffn-hidden-size", "32",
    "--num-attention-heads", "4",
    "--seq-length", "32",
    "--max-position-embeddings", "32",
    "--num-experts", "4",
    "--moe-router-topk", "2",
    "--moe-ffn-hidden-size", "32",
    "--moe-token-dispatcher-type", "alltoall",
    "--moe-aux-loss-coeff", "0.01",
    "--moe-router-load-balancing-type", "aux_loss",
    "--normalization", "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights",
    "--hidden-dropout", "0.0",
    "--attention-dropout", "0.0",
    "--init-method-std", "0.02",
    "--seed", "1234",
]  # fmt: skip

DATA = [
    "--mock-data",
    "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "511",
    "--make-vocab-size-divisible-by", "64",
    "--split", "98,1,1",
]  # fmt: skip

TRAIN = [
    "--micro-batch-size", "2",
    "--global-batch-size", "4",
    "--train-iters", "3",
    "--lr", "1e-3",
    "--min-lr", "1e-3",
    "--lr-decay-style", "constant",
    "--lr-warmup-iters", "0",
    "--weight-decay", "0.01",
    "--clip-grad", "1.0",
    "--adam-beta1", "0.9",
    "--adam-beta2", "0.95",
    "--eval-iters", "1",
    "--eval-interval", "1000",
    "--log-interval", "1",
    "--distributed-backend", "gloo",
    # CUDA-only kernels, off: their CPU fallbacks are the same arithmetic.
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    # Checkpointing: torch_dist, every iteration, synchronous.
    "--ckpt-format", "torch_dist",
    "--save-interval", "1",
]  # fmt: skip

#: name -> extra flags. 2 processes each: EP=2 (TP=1, DP=2) or TP=2 (+SP, DP=1; ETP=TP).
FIXTURES: dict[str, list[str]] = {
    "ep2_plain": ["--expert-model-parallel-size", "2"],
    "ep2_distopt": ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"],
    "tp2_plain": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "tp2_distopt": [
        "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--use-distributed-optimizer",
    ],
}  # fmt: skip


def fixture_argv(name: str, save: Path) -> list[str]:
    """``pretrain_gpt.py`` flags of fixture ``name`` saving into ``save``."""
    return [*MODEL, *DATA, *TRAIN, *FIXTURES[name], "--save", str(save)]


# ----------------------------------------------------------------------------------- worker


def _cpu_placeholder_cuda_rng_state(*args, **kwargs):
    import torch

    # What torch.cuda.get_rng_state() returns on a GPU: a 16-byte uint8 tensor (Philox seed +
    # offset). Zeros here: the CPU run has no CUDA generator.
    return torch.zeros(16, dtype=torch.uint8)


def install_shims(mlm_dir: Path) -> None:
    """Everything that lets Megatron-LM's trainer (core_v0.16.1) run on a CPU-only torch.

    Must run before ``megatron.training`` is imported.
    """
    # S0. Imports: megatron.core from the venv's megatron-core 0.16.1 wheel (same code as the
    #     checkout's megatron/core, plus the compiled dataset helper helpers_cpp that the
    #     checkout lacks and cannot build here: no pybind11); megatron.training / .legacy and
    #     pretrain_gpt's gpt_builders / model_provider from the checkout. `megatron` is a
    #     namespace package in both, so appending the checkout after site-packages does that.
    sys.path.append(str(mlm_dir))
    # S1. megatron-wsm's import-time shims (megatron.core's jit_fuser eager instead of
    #     torch.compile on CPU; the accelerator warnings filtered), before megatron.core.
    import megatron_wsm.mcore_prelude  # noqa: F401

    import megatron.core

    assert "site-packages" in megatron.core.__file__, megatron.core.__file__

    import torch

    # S2. megatron-wsm's megatron-core CPU shims (CPU RNG tracker for
    #     model_parallel_cuda_manual_seed, torch.cuda streams/events/current_device, Tensor.cuda,
    #     device="cuda" factories in megatron-core modules, grad clipping's CUDA type asserts,
    #     the MoE all-to-all split sizes, the optimizers' torch.cuda.*Tensor type checks).
    from megatron_wsm import cpu_compat

    assert cpu_compat.apply(), "CUDA is available: run Megatron-LM without shims"

    # S3. megatron.training.initialize imports enable_batch_invariant_mode from megatron-core's
    #     batch_invariant_kernels, a module of triton kernels (CPU torch has no triton): a
    #     stand-in module; the feature (--batch-invariant-mode) stays off.
    import types

    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")

    def enable_batch_invariant_mode(*args, **kwargs):
        raise RuntimeError("batch invariant mode needs triton (GPU)")

    stub.enable_batch_invariant_mode = enable_batch_invariant_mode
    sys.modules.setdefault(stub.__name__, stub)

    import megatron.training.checkpointing as mlm_ckpt
    import megatron.training.initialize as mlm_init
    import megatron.training.training as mlm_training
    import megatron.training.utils as mlm_utils

    # S4. initialize_megatron() asserts torch.cuda.is_available() unless allow_no_cuda=True, and
    #     pretrain() passes no allow_no_cuda.
    real_initialize = mlm_init.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return real_initialize(*args, **kwargs)

    mlm_training.initialize_megatron = initialize_megatron

    # S4b. validate_args() asks get_device_arch_version() (torch.cuda.get_device_properties)
    #      whenever TP > 1, to decide on the CUDA_DEVICE_MAX_CONNECTIONS=1 requirement: report a
    #      Hopper (9; the launcher sets CUDA_DEVICE_MAX_CONNECTIONS=1 as on one).
    import megatron.training.arguments as mlm_arguments

    mlm_arguments.get_device_arch_version = lambda: 9

    # S5. _initialize_distributed() calls mpu.initialize_model_parallel() and _set_random_seed()
    #     seeds the model-parallel RNG tracker only `if torch.cuda.device_count() > 0`; with 0
    #     no TP/EP groups would exist. One "device" per process, set_device a no-op.
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *a, **k: None

    # S6. device="cuda" tensors in megatron.training (start-time all-reduce in pretrain(),
    #     checkpointing's iteration all-reduce, training_log/evaluate loss dicts,
    #     _warmup_jit_function, get_batch_on_this_tp_rank, ...): the same device-rewriting torch
    #     proxy cpu_compat gives megatron-core modules.
    proxy = cpu_compat._CpuTorchProxy()
    for module in (mlm_training, mlm_ckpt, mlm_init, mlm_utils):
        module.torch = proxy

    # S7. get_model(): model_module.cuda(torch.cuda.current_device()).
    torch.nn.Module.cuda = lambda self, *a, **k: self

    # S8. Checkpoint RNG state: get_rng_state() saves torch.cuda.get_rng_state() (CPU torch:
    #     "Torch not compiled with CUDA"); a 16-byte placeholder as on a GPU. Loading sets it
    #     back with torch.cuda.set_rng_state: a no-op.
    torch.cuda.get_rng_state = _cpu_placeholder_cuda_rng_state
    torch.cuda.set_rng_state = lambda *a, **k: None

    # S9. _compile_dependencies(): compile_helpers() runs `make` in megatron/core/datasets (the
    #     wheel ships helpers_cpp built; the checkout's Makefile needs pybind11), and
    #     fused_kernels.load() builds CUDA kernels with nvcc (unused by mcore models).
    import megatron.core.datasets.utils as ds_utils

    ds_utils.compile_helpers = lambda: None
    mlm_init.fused_kernels.load = lambda args: None

    # S10. report_memory() (first training_log and around each save) reads torch.cuda memory
    #     counters: zeros on CPU.
    for counter in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                    "max_memory_reserved"):  # fmt: skip
        setattr(torch.cuda, counter, lambda *a, **k: 0)

    _sequence_parallel_torch_norm()


def _sequence_parallel_torch_norm() -> None:
    """S12. MoE with TP > 1 must run with --sequence-parallel (MoELayer.forward raises
    otherwise), and the local spec's norm without apex, WrappedTorchNorm, asserts
    ``not config.sequence_parallel``. Built as without SP and its weight tagged
    ``sequence_parallel`` (what apex's FusedLayerNorm and TE's norms do), so
    finalize_model_grads all-reduces the weight's gradient over TP: the arithmetic and the
    checkpoint keys (``...layernorm.weight``) of Megatron-LM's local spec with apex."""
    import copy

    from megatron.core.transformer import torch_norm

    real_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, *args, **kwargs):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = real_new(cls, config, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)


def worker(mlm_dir: Path, argv: list[str]) -> None:
    install_shims(mlm_dir)
    # S11. The torch_dist writer's results queue lives in a multiprocessing Manager started
    #      with the "spawn" context on the first save; a spawned child re-imports the main
    #      module, which inside runpy.run_path is pretrain_gpt.py (without the shims above: it
    #      dies importing triton). Started here, the child re-imports this script instead.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue()
    os.chdir(mlm_dir)
    sys.argv = [str(mlm_dir / "pretrain_gpt.py"), *argv]
    runpy.run_path(str(mlm_dir / "pretrain_gpt.py"), run_name="__main__")


# ------------------------------------------------------------------------------------- main


def run_fixture(name: str, mlm_dir: Path, work_dir: Path, out_dir: Path, port: int) -> Path:
    save = work_dir / name
    if save.exists():
        shutil.rmtree(save)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", "2", "--master-port", str(port),
        str(Path(__file__).resolve()), "--worker", "--mlm-dir", str(mlm_dir), "--",
        *fixture_argv(name, save),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    print("+", " ".join(cmd), flush=True)
    log = work_dir / f"{name}.log"
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{name}: pretrain_gpt.py failed (rc {rc}), see {log}")
    dest = out_dir / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(save, dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlm-dir", type=Path, required=True, help="Megatron-LM checkout")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mlm_fixtures"))
    parser.add_argument("--only", nargs="*", choices=sorted(FIXTURES), default=sorted(FIXTURES))
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.mlm_dir.resolve(), rest[1:] if rest[:1] == ["--"] else rest)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        dest = run_fixture(name, args.mlm_dir.resolve(), args.work_dir, args.out_dir, args.port)
        print(f"{name}: {dest}", flush=True)


if __name__ == "__main__":
    main()
