"""Megatron-LM's own launch scripts, flags verbatim, end to end on CPU (issue 27, "Must show").

Each case reads a flag list kept verbatim in ``tests/data/megatron_lm/launch/`` (Megatron-LM
core_v0.16.1, commit named in each file's header), substitutes its shell variables with tiny
local files (the Llama2Tokenizer sentencepiece model and the data Megatron-LM's own
``tools/preprocess_data.py`` wrote, ``tests/data/megatron_lm/preprocess/``), APPENDS size
overrides (a later flag wins, as in Megatron-LM's argparse) and the ``--wsm-*`` flags, and runs
``torchrun --nproc-per-node 2 pretrain_moe.py`` on CPU; then ``tools/merge_wsm.py`` on the
window, ``tools/evaluate.py`` on the merge and ``tools/export_hf.py`` with logit parity.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_wsm.checkpoint.layout import list_checkpoints, list_window
from tests.helpers import ROOT, _env, run_script, torchrun_cmd

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.distributed

LAUNCH = ROOT / "tests" / "data" / "megatron_lm" / "launch"
PREPROCESS = ROOT / "tests" / "data" / "megatron_lm" / "preprocess"
#: Size overrides appended to every script (tiny model, tiny batches, few iterations). The
#: vocabulary padding is chosen so that TP 1 and TP 2 pad alike (400 and 420 -> 512): the tools
#: evaluate on 1 process, and a padded size that depends on TP differs otherwise, as in
#: Megatron-LM.
SIZES = (
    "--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 "
    "--num-experts 4 --moe-ffn-hidden-size 32 --moe-router-topk 2 --seq-length 32 "
    "--max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 4 "
    "--make-vocab-size-divisible-by 128 --train-iters 6 --eval-interval 3 --eval-iters 2 "
    "--log-interval 1 --save-interval 6 --no-progress-bar"
).split()
#: WSM appended as docs/megatron_lm.md tells a user to: the stable LR, a window.
WSM = "--lr-decay-style stable --lr-warmup-iters 1 --wsm-interval 2 --wsm-window 4".split()


def expand(name: str, shell_vars: dict[str, str]) -> list[str]:
    """The flag words of a ``.flags`` file as bash passes them (``${V:-"d"}`` -> d)."""
    lines = (LAUNCH / name).read_text().splitlines()
    assert "55ac7082517c3878ae653c07c09c534b8aed49f6" in lines[1]
    words: list[str] = []
    for line in lines:
        if not line.startswith("--"):
            continue
        line = re.sub(r'\$\{(\w+):-"([^"]*)"\}', lambda m: m.group(2), line)
        line = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: shell_vars[m.group(1) or m.group(2)], line)
        words += shlex.split(line)
    return words


def local_data(tmp: Path, name: str) -> str:
    """A copy of Megatron-LM's preprocessed ``<name>_text_document`` (megatron-core writes its
    index cache next to the data: never into tests/data)."""
    for ext in ("bin", "idx"):
        shutil.copy(PREPROCESS / "megatron_lm" / f"{name}_text_document.{ext}", tmp)
    return str(tmp / f"{name}_text_document")


def export(ckpt: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "tools/export_hf.py"),
        "--load",
        str(ckpt),
        "--save",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def train(argv: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 pretrain_moe.py <argv>`` (W&B offline, under <save>)."""
    env = {**_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = torchrun_cmd("pretrain_moe.py", 2) + [*argv, "--output-json", str(tmp / "train.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def merge_evaluate_export(save: Path, tmp: Path, data: str) -> dict:
    """Merge the window (2 merge ranks), evaluate the merge, export it; the exported model's
    logits are ours and its tokenizer gives the ids Megatron-LM's preprocess tool wrote."""
    window = list_window(save / "wsm_window")
    assert [c.iteration for c in window] == [2, 4, 6]
    merged = tmp / "merged"
    run_script("tools/merge_wsm.py", ["--load-dir", save / "wsm_window", "--method", "1-sqrt",
                                      "--save", merged, "--no-progress-bar"], nproc=2)  # fmt: skip
    # The held-out split of 17 documents is 6 samples: evaluate them in batches of 2.
    batch = ["--micro-batch-size", "1", "--global-batch-size", "2"]
    run_script("tools/evaluate.py", ["--load", merged, "--output-json", tmp / "eval.json", *batch])
    result = json.loads((tmp / "eval.json").read_text())
    assert math.isfinite(result["loss"]) and result["iteration"] == 6
    hf = tmp / "hf"
    export(merged, hf)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp / "tokens.pt")
    run_script("tests/export_reference.py", [merged, tmp / "tokens.pt", tmp / "ref.pt"])
    ref = torch.load(tmp / "ref.pt")["logits"]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits[..., : ref.shape[-1]]
    # The scripts train in bf16: our forward runs in bf16, the export's bf16 weights in fp32,
    # so the logits agree to bf16 rounding (a wrong mapping is off by the logits' own size).
    err = (logits - ref).abs().max().item()
    assert err < 2e-2 * ref.abs().max().item(), (err, ref.abs().max().item())
    import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(data)
    docs = [json.loads(line)["text"] for line in (PREPROCESS / "corpus.jsonl").open()][:3]
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    for i, text in enumerate(docs):  # each document + the EOD the tool appended
        assert auto(text, add_special_tokens=False)["input_ids"] == ds[i].tolist()[:-1]
    return json.loads((hf / "config.json").read_text())


def test_mixtral_8x7b_script_verbatim(tmp_path):
    """examples/mixtral/train_mixtral_8x7b_distributed.sh: its 55 flags verbatim (bf16,
    distributed optimizer, overlap flags, --moe-grouped-gemm, W&B, --load = --save on a fresh
    directory), EP 2 instead of PP 4 × EP 8, then merge, evaluate, export (Mixtral)."""
    ckpt = tmp_path / "ckpt"
    data = local_data(tmp_path, "llama2")
    shell = {
        "CHECKPOINT_PATH": str(ckpt),
        "TOKENIZER_MODEL": str(PREPROCESS / "spm.model"),
        "DATA_PATH": data,
    }
    layout = "--pipeline-model-parallel-size 1 --expert-model-parallel-size 2 --num-query-groups 2"
    # 17 documents: the script's 99990,8,2 split would leave the held-out splits empty.
    argv = [*expand("mixtral_8x7b.flags", shell), *SIZES, *layout.split(), "--split", "80,10,10",
            *WSM]  # fmt: skip
    proc = train(argv, tmp_path)
    out = proc.stdout + proc.stderr
    assert "no checkpoint there; starting from random initialization" in out
    assert "accepted, no effect here: --moe-grouped-gemm" in out
    assert "accepted, no effect here: --use-mcore-models" in out
    assert [c.iteration for c in list_checkpoints(ckpt) if c.complete] == [6]
    assert (ckpt / "tensorboard").is_dir() and (ckpt / "wandb").is_dir()
    config = merge_evaluate_export(ckpt, tmp_path, data)
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_key_value_heads"]) == (4, 2)


def _model_config_script(name: str, extra: str, tmp_path: Path) -> tuple[dict, str]:
    """A modelopt model-config script (MODEL_ARGS only) with the HF tokenizer directory and the
    data Megatron-LM's preprocess tool made with it, sizes, ``extra``, WSM; trained on 2
    processes; returns the export's config.json and the training output."""
    ckpt = tmp_path / "ckpt"
    data = local_data(tmp_path, "hf")
    argv = [*expand(name, {}), "--tokenizer-model", str(PREPROCESS / "hf"), "--data-path", data,
            "--split", "80,10,10", "--save", str(ckpt), *SIZES, *extra.split(), *WSM]  # fmt: skip
    proc = train(argv, tmp_path)
    config = merge_evaluate_export(ckpt, tmp_path, data)
    return config, proc.stdout + proc.stderr


@pytest.mark.slow
def test_qwen3_30b_a3b_model_config_verbatim(tmp_path, monkeypatch):
    """examples/post_training/modelopt/conf/Qwen/Qwen3-30B-A3B.sh (HuggingFaceTokenizer with a
    local tokenizer directory, offline), TP 2 with sequence parallelism → Qwen3-MoE."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    config, out = _model_config_script(
        "Qwen3-30B-A3B.flags",
        "--num-query-groups 2 --kv-channels 16 --tensor-model-parallel-size 2",
        tmp_path,
    )
    assert "--sequence-parallel turned off" not in out  # TP 2: kept, as in Megatron-LM
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["num_experts"], config["head_dim"], config["num_key_value_heads"]) == (4, 16, 2)


@pytest.mark.slow
def test_deepseek_v2_lite_model_config_verbatim(tmp_path, monkeypatch):
    """examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-V2-Lite.sh: MLA, shared
    experts, a dense first layer (--moe-layer-freq), --moe-grouped-gemm; EP 2 → DeepSeek-V2."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    config, out = _model_config_script(
        "DeepSeek-V2-Lite.flags",
        "--num-layers 3 --moe-layer-freq ([0]+[1]*2) --kv-lora-rank 16 --v-head-dim 8 "
        "--qk-head-dim 8 --qk-pos-emb-head-dim 8 --moe-shared-expert-intermediate-size 32 "
        "--expert-model-parallel-size 2",
        tmp_path,
    )
    assert "accepted, no effect here: --moe-grouped-gemm" in out
    assert config["architectures"] == ["DeepseekV2ForCausalLM"]
    assert (config["first_k_dense_replace"], config["n_routed_experts"]) == (1, 4)
    assert config["n_shared_experts"] == 1  # 32 = 1 × --moe-ffn-hidden-size
