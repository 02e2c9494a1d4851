"""Hugging Face export: a trained tiny model, exported, equals our model (logits, greedy, loss).

Needs the ``hf`` extra (transformers, safetensors); skipped without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, TINY_MODEL, _env, run_pretrain, run_script

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.distributed

#: Layouts the export must read (dist_checkpointing stores global tensors whatever the layout).
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "ep2": ["--expert-model-parallel-size", "2"],
}
GQA = ["--num-query-groups", "2"]


def export(ckpt, out, *extra, check=True) -> subprocess.CompletedProcess:
    """``tools/export_hf.py`` in a fresh process (no torchrun: it needs no process group)."""
    cmd = [sys.executable, str(ROOT / "tools/export_hf.py"), "--load", str(ckpt), "--save",
           str(out), *map(str, extra)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"export failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def reference(ckpt, tmp_path, data_cache, tokens) -> dict:
    """Our model's logits / greedy tokens / held-out loss (tests/export_reference.py)."""
    tokens_file, out = tmp_path / "tokens.pt", tmp_path / "ref.pt"
    torch.save(tokens, tokens_file)
    run_script("tests/export_reference.py",
               [ckpt, tokens_file, out, "--data-cache-dir", data_cache])
    return torch.load(out)


def held_out_texts(data_cache) -> list[str]:
    from megatron_wsm.data.corpus import read_jsonl

    (root,) = [p for p in Path(data_cache).iterdir() if (p / "corpus" / "valid.jsonl").is_file()]
    return [d.text for d in read_jsonl(root / "corpus" / "valid.jsonl")]


def check_parity(hf_dir, ref, tokens) -> None:
    """Logits within 1e-4, identical greedy continuation, held-out loss within 0.5 %."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(tokens).logits
        assert logits.shape == ref["logits"].shape
        err = (logits - ref["logits"]).abs().max().item()
        assert err < 1e-4, f"max abs logit difference {err}"
        out = model.generate(tokens[:1, :8], max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0, 8:].tolist() == ref["greedy"]
        lg = model(ref["valid_tokens"]).logits
        nll = torch.nn.functional.cross_entropy(
            lg.flatten(0, 1), ref["valid_labels"].flatten(), reduction="none")
        mask = ref["valid_loss_mask"].flatten().float()
        loss = float((nll * mask).sum() / mask.sum())
    assert loss == pytest.approx(ref["valid_loss"], rel=5e-3)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, data_cache):
    """A 1-process GQA run: its final full checkpoint (window checkpoints at 2, 4, 6 beside)."""
    tmp = tmp_path_factory.mktemp("export_1p")
    run_pretrain([*TINY_MODEL, *GQA, "--train-iters", "6", "--save", tmp / "ckpt",
                  "--wsm-interval", "2", "--wsm-window", "4",
                  "--data-cache-dir", data_cache], tmp / "train.json")
    return tmp / "ckpt" / "iter_0000006"


def test_export_matches_our_model(tiny_ckpt, data_cache, tmp_path):
    hf = tmp_path / "hf"
    proc = export(tiny_ckpt, hf, "--data-cache-dir", data_cache, "--max-shard-size", "40KB")
    assert "exported" in proc.stdout
    files = sorted(p.name for p in hf.iterdir())
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json",
                 "tokenizer.model", "tokenizer_config.json", "wsm_export.json", "README.md"):
        assert name in files
    assert sum(n.endswith(".safetensors") for n in files) > 1  # sharded past --max-shard-size
    config = json.loads((hf / "config.json").read_text())
    assert (config["num_key_value_heads"], config["num_local_experts"]) == (2, 4)
    prov = json.loads((hf / "wsm_export.json").read_text())
    assert (prov["kind"], prov["iteration"]) == ("full", 6)

    texts = held_out_texts(data_cache)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    from megatron_wsm.data.tokenizer import SentencePieceTokenizer

    ours = SentencePieceTokenizer(hf / "tokenizer.model")
    for text in texts[:50]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
    ids = ours.tokenize("\n".join(texts))[: 4 * 24]
    tokens = torch.tensor(ids).view(4, 24)
    check_parity(hf, reference(tiny_ckpt, tmp_path, data_cache, tokens), tokens)


@pytest.mark.slow
def test_export_tied_embeddings(data_cache, tmp_path):
    """A model trained with tied input/output embeddings exports as tie_word_embeddings (no
    lm_head tensor) and matches our model."""
    run_pretrain([*TINY_MODEL, "--tie-embeddings-and-output-weights", "--train-iters", "3",
                  "--save", tmp_path / "ckpt", "--data-cache-dir", data_cache],
                 tmp_path / "t.json")
    ckpt = tmp_path / "ckpt" / "iter_0000003"
    hf = tmp_path / "hf"
    export(ckpt, hf, "--data-cache-dir", data_cache)
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(hf / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    tokens = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    check_parity(hf, reference(ckpt, tmp_path, data_cache, tokens), tokens)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_export_parallel_layouts(layout, data_cache, tmp_path):
    run_pretrain([*TINY_MODEL, *GQA, *LAYOUTS[layout], "--train-iters", "4", "--save",
                  tmp_path / "ckpt", "--data-cache-dir", data_cache], tmp_path / "t.json", nproc=2)
    ckpt = tmp_path / "ckpt" / "iter_0000004"
    export(ckpt, tmp_path / "hf", "--data-cache-dir", data_cache)
    tokens = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    check_parity(tmp_path / "hf", reference(ckpt, tmp_path, data_cache, tokens), tokens)


@pytest.mark.slow
def test_export_refusals_write_nothing(tiny_ckpt, data_cache, tmp_path):
    hf = tmp_path / "hf"
    proc = export(tmp_path / "nowhere", hf, check=False)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    export(tiny_ckpt, hf, "--data-cache-dir", data_cache, "--dtype", "bf16")
    proc = export(tiny_ckpt, hf, "--data-cache-dir", data_cache, check=False)
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    config = json.loads((hf / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"

    # What Mixtral cannot express is refused before anything is written.
    bad = tmp_path / "layernorm"
    shutil.copytree(tiny_ckpt, bad)
    manifest = json.loads((bad / "wsm_manifest.json").read_text())
    manifest["extra"]["run"]["model"]["normalization"] = "LayerNorm"
    (bad / "wsm_manifest.json").write_text(json.dumps(manifest))
    proc = export(bad, tmp_path / "hf_ln", "--data-cache-dir", data_cache, check=False)
    assert proc.returncode == 2 and "no LayerNorm" in proc.stderr
    assert not (tmp_path / "hf_ln").exists()
    # A shard cut short is refused by the metadata/range checks, also before writing.
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_ckpt, damaged)
    shard = max(damaged.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:1000])
    proc = export(damaged, tmp_path / "hf_dmg", "--data-cache-dir", data_cache, check=False)
    assert proc.returncode == 2 and "lie past the end" in proc.stderr  # the --load checks
    assert not (tmp_path / "hf_dmg").exists()


@pytest.mark.slow
def test_killed_export_leaves_no_directory(tiny_ckpt, data_cache, tmp_path):
    """SIGKILL in the middle of writing shards: nothing at --save, and the leftover is hidden."""
    hf = tmp_path / "hf"
    script = (
        "import os, signal, sys; import safetensors.torch as st\n"
        "real = st.save_file; n = [0]\n"
        "def save(*a, **k):\n"
        "    real(*a, **k); n[0] += 1\n"
        "    if n[0] == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "st.save_file = save\n"
        "from megatron_wsm.cli.export_hf import main; sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "--load", str(tiny_ckpt), "--save", str(hf),
         "--data-cache-dir", data_cache, "--max-shard-size", "40KB"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not hf.exists()
    (leftover,) = list(tmp_path.iterdir())
    assert leftover.name.startswith(".hf.exporting-")
    assert len(list(leftover.glob("*.safetensors"))) == 2
    export(tiny_ckpt, hf, "--data-cache-dir", data_cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.slow
def test_export_merged_checkpoint_keeps_provenance(tiny_ckpt, data_cache, tmp_path):
    window = sorted((tiny_ckpt.parent / "wsm_window").glob("iter_*"))
    assert len(window) == 3
    merged = tmp_path / "merged"
    run_script("tools/merge_wsm.py", ["--inputs", *window, "--method", "1-sqrt", "--save",
                                      merged, "--no-progress-bar"])
    hf = tmp_path / "hf"
    export(merged, hf, "--data-cache-dir", data_cache)
    prov = json.loads((hf / "wsm_export.json").read_text())
    source = json.loads((merged / "wsm_manifest.json").read_text())["extra"]["provenance"]
    assert prov["kind"] == "merged"
    assert prov["merge"]["coefficients"] == source["coefficients"]
    assert prov["merge"]["inputs"] == source["inputs"] and len(source["inputs"]) == 3
    assert prov["merge"]["method"] == source["method"]
    card = (hf / "README.md").read_text()
    assert "merge: method" in card and str(window[0]) in card
    tokens = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    check_parity(hf, reference(merged, tmp_path, data_cache, tokens), tokens)


@pytest.mark.slow
def test_harness_scores_exported_model(tiny_ckpt, data_cache, tmp_path):
    """lm-eval (HF backend) runs offline on our held-out tasks and reports sane scores."""
    pytest.importorskip("lm_eval")
    hf = tmp_path / "hf"
    export(tiny_ckpt, hf, "--data-cache-dir", data_cache)
    out = tmp_path / "scores.json"
    env = {**_env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_wsm.export.harness", "--model", str(hf),
         "--data-cache-dir", data_cache, "--output-json", str(out), "--limit", "20"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(out.read_text())
    assert 0.0 <= scores["wsm_heldout_cloze"]["acc"] <= 1.0
    bpb = scores["wsm_heldout_ppl"]["bits_per_byte"]
    # A 6-iteration model is near uniform over 512 pieces: bits/byte finite and well above 0.
    assert 0.5 < bpb < 20


def test_export_refuses_non_finite_weights(tiny_ckpt, data_cache, tmp_path):
    """A diverged checkpoint (here: NaN written into an expert weight's storage) is refused,
    naming the tensor, and nothing is published (issue 24, item 3)."""
    from megatron_wsm.checkpoint import dcp_format as fmt

    bad = tmp_path / "nan_ckpt"
    shutil.copytree(tiny_ckpt, bad)
    md = fmt.read_metadata(str(bad))
    index, info = next((i, v) for i, v in md.storage_data.items() if "linear_fc1.weight" in i.fqn)
    path = bad / info.relative_path
    with open(path, "rb") as f:
        blob = fmt.describe_tensor_blob(fmt.BlobReader(
            lambda o, n: os.pread(f.fileno(), n, info.offset + o), info.length))
    with open(path, "r+b") as f:  # float32 NaN (0x7FC00000), element-aligned
        f.seek(info.offset + blob.data_offset + 8)
        f.write(b"\x00\x00\xc0\x7f" * 4)
    proc = export(bad, tmp_path / "hf", "--data-cache-dir", data_cache, check=False)
    assert proc.returncode == 2 and "non-finite" in proc.stderr and "linear_fc1" in proc.stderr
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf.exporting-*"))
