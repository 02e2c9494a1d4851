"""A checkpoint our trainer wrote at TP=2, read at TP=1 where its vocabulary pads differently.

512 tokens with ``--make-vocab-size-divisible-by 192`` pad to 768 rows at TP=2 and to 576 at
TP=1 (Megatron-LM's padding: a multiple of 192 x TP). ``tools/evaluate.py`` on one process used
to refuse the checkpoint (``differ in {'padded_vocab_size': (768, 576)}``) although every tensor
is there. Now the tools build the model with the checkpoint's rows (model/vocab.py):

- evaluation at TP=1 equals evaluation at TP=2 (same checkpoint, same held-out split);
- the HF export (one process, no model) has logit parity with our model read at TP=1, and only
  the 512 tokens (the padded rows are stripped);
- ``merge_wsm.py`` on one process merges the TP=2 window (global tensors), and that merge
  evaluated at TP=1 equals ``evaluate.py --load-dir`` (the same merge in memory at TP=1);
- ``pretrain_moe.py --load`` at TP=1 is refused with the flag that gives the same rows, and
  with that flag resumes (optimizer included) with the losses of a TP=2 resume.

Slow: eleven trainer/tool launches (the fast case is in tests/unit/test_tp_vocab_padding.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_wsm.testing.config import TINY_MODEL
from megatron_wsm.testing.launch import losses, run_pretrain, run_script

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
#: 512 tokens: 768 rows at TP 2, 576 at TP 1.
PAD = ["--make-vocab-size-divisible-by", "192"]


@pytest.fixture(scope="module")
def tp2_save(tmp_path_factory: pytest.TempPathFactory, data_cache: str) -> Path:
    """A TP=2 run of 6 iterations: full checkpoint at 6, window checkpoints at 2, 4, 6."""
    tmp = tmp_path_factory.mktemp("tp2_vocab")
    run_pretrain(
        [*TINY_MODEL, *TP2, *PAD, "--train-iters", "6", "--save", tmp / "ckpt",
         "--wsm-interval", "2", "--wsm-window", "4", "--data-cache-dir", data_cache],
        tmp / "train.json",
        nproc=2,
    )  # fmt: skip
    manifest = json.loads((tmp / "ckpt" / "iter_0000006" / "wsm_manifest.json").read_text())
    assert manifest["model_config"]["padded_vocab_size"] == 768
    return tmp / "ckpt"


def _evaluate(args: list, data_cache: str, out: Path, nproc: int = 1) -> dict:
    args = [*args, "--data-cache-dir", data_cache, "--output-json", out]
    run_script("tools/evaluate.py", args, nproc=nproc)
    return json.loads(out.read_text())


def test_evaluation_and_export_at_tp1_of_a_tp2_checkpoint(tp2_save, data_cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron_wsm.data.tokenizer import SentencePieceTokenizer
    from tests.distributed.test_export_hf import export, held_out_texts, reference

    ckpt = tp2_save / "iter_0000006"
    at_tp1 = _evaluate(["--load", ckpt], data_cache, tmp_path / "tp1.json")
    at_tp2 = _evaluate(["--load", ckpt, *TP2], data_cache, tmp_path / "tp2.json", nproc=2)
    assert at_tp1["iteration"] == at_tp2["iteration"] == 6
    assert at_tp1["tokens"] == at_tp2["tokens"]
    assert at_tp1["loss"] == pytest.approx(at_tp2["loss"], abs=1e-5)

    hf = tmp_path / "hf"
    export(ckpt, hf, "--data-cache-dir", data_cache)
    config = json.loads((hf / "config.json").read_text())
    assert config["vocab_size"] == 512  # the tokenizer's ids: no padded row is a token
    texts = "\n".join(held_out_texts(data_cache))
    ids = SentencePieceTokenizer(hf / "tokenizer.model").tokenize(texts)
    tokens = torch.tensor(ids[: 4 * 24]).view(4, 24)
    ref = reference(ckpt, tmp_path, data_cache, tokens)  # our model at TP 1: 768 rows
    assert ref["vocab"] == 512
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert model.get_input_embeddings().weight.shape[0] == 512
    with torch.no_grad():
        logits = model(tokens).logits  # ours: its first 512 columns (tests/export_reference.py)
        assert (logits - ref["logits"]).abs().max().item() < 1e-4
        out = model.generate(tokens[:1, :8], max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        assert out[0, 8:].tolist() == ref["greedy"]
        lg = model(ref["valid_tokens"]).logits
    nll = torch.nn.functional.cross_entropy(
        lg.flatten(0, 1), ref["valid_labels"].flatten(), reduction="none"
    )
    mask = ref["valid_loss_mask"].flatten().float()
    hf_loss = float((nll * mask).sum() / mask.sum())
    # Our loss normalises over all 768 rows, as Megatron-LM's (the 256 padded rows, never
    # targets, still hold probability after 6 iterations); the export's 512 tokens do not:
    # its loss is lower by the padded rows' share (about ln(768 / 512) this early).
    assert 0 < ref["valid_loss"] - hf_loss < 0.45


def test_one_process_merge_of_the_tp2_window_evaluates_at_tp1(tp2_save, data_cache, tmp_path):
    window = tp2_save / "wsm_window"
    merged = tmp_path / "merged"
    run_script("tools/merge_wsm.py",
               ["--load-dir", window, "--method", "mean", "--save", merged], nproc=1)  # fmt: skip
    manifest = json.loads((merged / "wsm_manifest.json").read_text())
    assert manifest["model_config"]["padded_vocab_size"] == 768
    written = _evaluate(["--load", merged], data_cache, tmp_path / "merged.json")
    in_memory = _evaluate(["--load-dir", window, "--method", "mean"], data_cache,
                          tmp_path / "in_memory.json")  # fmt: skip
    assert written["loss"] == pytest.approx(in_memory["loss"], abs=1e-6)
    last = _evaluate(["--load", window / "iter_0000006"], data_cache, tmp_path / "last.json")
    assert abs(written["loss"] - last["loss"]) > 1e-6  # a real merge, not the last input


def test_training_resumes_at_tp1_with_the_flag_the_refusal_names(tp2_save, data_cache, tmp_path):
    resume = [*TINY_MODEL, "--train-iters", "8", "--load", tp2_save,
              "--data-cache-dir", data_cache]  # fmt: skip
    refused = run_script("pretrain_moe.py", [*resume, *PAD, "--save", tmp_path / "no"],
                         check=False)  # fmt: skip
    assert refused.returncode != 0  # torchrun's exit code (the trainer's own is 2)
    assert "pass --make-vocab-size-divisible-by 768, which gives the same 768 rows" in (
        refused.stdout + refused.stderr
    )
    at_tp1 = run_pretrain(
        [*resume, "--make-vocab-size-divisible-by", "768", "--save", tmp_path / "tp1"],
        tmp_path / "tp1.json",
    )
    at_tp2 = run_pretrain(
        [*resume, *TP2, *PAD, "--save", tmp_path / "tp2"], tmp_path / "tp2.json", nproc=2
    )
    assert at_tp1["iteration"] == 8 and len(losses(at_tp1)) == 2
    # The optimizer state was resharded to TP 1 (without it the second step differs).
    assert losses(at_tp1) == pytest.approx(losses(at_tp2), abs=1e-5)
    saved = json.loads((tmp_path / "tp1" / "iter_0000008" / "wsm_manifest.json").read_text())
    assert saved["model_config"]["padded_vocab_size"] == 768
