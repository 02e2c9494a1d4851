"""Our tools on checkpoints Megatron-LM's own trainer wrote (issue 28, "ours reading
Megatron-LM's"): the fixtures in ``tests/data/megatron_lm/`` (``core_v0.16.1``, EP=2 or TP=2 on 2
processes, plain or distributed optimizer, iterations 1-3; README there).

- ``merge_wsm.py`` merges a window of them, from the save directory (``--load-dir``, ordered by
  each common state's iteration) and from explicit ``--inputs``, with no flag: the merged
  checkpoint's manifest carries the data position, LR and model from Megatron-LM's ``args``.
- ``evaluate.py`` builds the model from those ``args`` (``--use-checkpoint-args``) and reads
  Megatron-LM's local key names: the merge that keeps only iteration 3 evaluates to the
  validation loss Megatron-LM itself logged after iteration 3 (same mock-data samples).
- ``export_hf.py`` exports a Megatron-LM checkpoint and a merge of them to a Mixtral with logit
  parity (the NullTokenizer run is exported with a SentencePiece model of the same 512 ids).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import run_script

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # 2-process merges/evaluations

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "megatron_lm"
#: Megatron-LM's validation loss after iteration 3 (its fixture logs; eval-iters 1, 4 samples).
MEGATRON_LM_VALID = {"ep2": 6.226568, "tp2": 6.219274}
TOL = 3e-6
LAYOUT = {
    "ep2": ["--expert-model-parallel-size", "2"],
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
}
#: The fixtures' evaluation as Megatron-LM ran it (its valid samples depend on these).
EVAL = ["--eval-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "3"]  # fmt: skip


def _merge(source: list[str], weights: str, out: Path) -> dict:
    run_script("tools/merge_wsm.py", [*source, "--weights", weights, "--save", out], nproc=2)
    return json.loads((out / "wsm_manifest.json").read_text())


def _evaluate(ckpt: Path, layout: str, tmp_path: Path) -> dict:
    out = tmp_path / f"eval_{ckpt.name}.json"
    run_script("tools/evaluate.py", ["--load", ckpt, *EVAL, *LAYOUT[layout],
                                     "--output-json", out], nproc=2)  # fmt: skip
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "fixture, source",
    [
        ("ep2_plain", "load-dir"),
        ("ep2_distopt", "inputs"),
        ("tp2_plain", "inputs"),
        ("tp2_distopt", "load-dir"),
    ],
)
def test_merge_of_megatron_lm_window_evaluates_as_megatron_lm_did(fixture, source, tmp_path):
    """Weights 0, 0, 1: the merged model is iteration 3's, so its evaluation (model from the
    merged manifest, in the fixture's own layout) is Megatron-LM's logged validation loss."""
    from megatron_wsm.checkpoint import megatron_lm

    root = FIXTURES / fixture
    given = ["--load-dir", str(root)] if source == "load-dir" else [
        "--inputs", *(str(root / f"iter_{i:07d}") for i in (2, 3, 1))  # reordered by iteration
    ]  # fmt: skip
    merged = tmp_path / "merged"
    manifest = _merge(given, "0,0,1", merged)
    newest = megatron_lm.synthesized_manifest(megatron_lm.recognise(root / "iter_0000003"))
    assert manifest["kind"] == "merged" and manifest["iteration"] == 3
    assert (manifest["consumed_samples"], manifest["consumed_tokens"]) == (12, 12 * 32)
    assert manifest["learning_rate"] == pytest.approx(1e-3)
    assert manifest["model_config_hash"] == newest.model_config_hash
    assert manifest["model_config"]["padded_vocab_size"] == 512
    layout = fixture.split("_")[0]
    result = _evaluate(merged, layout, tmp_path)
    assert result["loss"] == pytest.approx(MEGATRON_LM_VALID[layout], abs=TOL)
    # The Megatron-LM checkpoint itself, evaluated directly (its save root: the tracker's).
    direct = _evaluate(root, layout, tmp_path)
    assert direct["loss"] == pytest.approx(MEGATRON_LM_VALID[layout], abs=TOL)
    assert direct["iteration"] == 3 and direct["consumed_tokens"] == 12 * 32


def test_merge_averages_megatron_lm_weights(tmp_path):
    """A real merge: every model tensor is the weighted sum of the inputs' (read back by the
    export's reader, global tensors), and the merged model evaluates to another loss."""
    from megatron_wsm.export.reader import CheckpointReader

    root = FIXTURES / "ep2_plain"
    merged = tmp_path / "merged"
    _merge(["--load-dir", str(root)], "0.2,0.3,0.5", merged)
    out = CheckpointReader(merged)
    ins = [CheckpointReader(root / f"iter_{i:07d}") for i in (1, 2, 3)]
    keys = out.model_tensors()
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys  # Megatron-LM's names kept
    for key in keys:
        want = sum(c * r.read(key) for c, r in zip((0.2, 0.3, 0.5), ins))
        torch.testing.assert_close(out.read(key), want, rtol=1e-6, atol=1e-7)
    loss = _evaluate(merged, "ep2", tmp_path)["loss"]
    assert abs(loss - MEGATRON_LM_VALID["ep2"]) > 1e-5 and loss < 7.0


def _tokenizer(data_cache: str) -> Path:
    (model,) = [p / "tokenizer.model" for p in Path(data_cache).iterdir()
                if (p / "tokenizer.model").is_file()]  # fmt: skip
    return model


@pytest.mark.parametrize("which", ["megatron_lm", "merged"])
def test_export_of_megatron_lm_checkpoint_has_logit_parity(which, data_cache, tmp_path):
    pytest.importorskip("transformers")
    from tests.distributed.test_export_hf import export

    root = FIXTURES / "tp2_plain"
    if which == "merged":
        ckpt = tmp_path / "merged"
        _merge(["--load-dir", str(root)], "0,0.5,0.5", ckpt)
    else:
        ckpt = tmp_path / "save"
        shutil.copytree(root, ckpt)
        ckpt = ckpt / "iter_0000003"
    hf = tmp_path / "hf"
    export(ckpt, hf, "--tokenizer-model", _tokenizer(data_cache))
    config = json.loads((hf / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["hidden_size"] == 16
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    tokens_file, ref_file = tmp_path / "tokens.pt", tmp_path / "ref.pt"
    torch.save(tokens, tokens_file)
    run_script("tests/export_reference.py", [ckpt, tokens_file, ref_file, *EVAL])
    _check_parity(hf, torch.load(ref_file), tokens)


def _check_parity(hf_dir: Path, ref: dict, tokens: torch.Tensor) -> None:
    """Logits within 1e-4, the same greedy continuation, and the loss of the 4 validation
    samples evaluated (``EVAL``; the mock data's split holds millions) within 1e-5."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        err = (model(tokens).logits - ref["logits"]).abs().max().item()
        assert err < 1e-4, f"max abs logit difference {err}"
        out = model.generate(tokens[:1, :8], max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        assert out[0, 8:].tolist() == ref["greedy"]
        n = 4
        logits = model(ref["valid_tokens"][:n]).logits
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ref["valid_labels"][:n].flatten(), reduction="none"
        )
        mask = ref["valid_loss_mask"][:n].flatten().float()
    assert float((nll * mask).sum() / mask.sum()) == pytest.approx(ref["valid_loss"], abs=1e-5)
