"""Reading Megatron-LM's checkpoints (issue 28, "ours reading Megatron-LM's"): the restricted
common-state reader, recognition of its save directories, args → RunConfig, key aliases, and
the tools (list, merge) on the fixtures its own trainer wrote (``tests/data/megatron_lm/``)."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_wsm.checkpoint import common_pickle, megatron_lm
from megatron_wsm.checkpoint import common_state as ckpt_common

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "megatron_lm"
NAMES = ("ep2_plain", "ep2_distopt", "tp2_plain", "tp2_distopt")
ROOT = Path(__file__).resolve().parents[2]


def _iter(name: str, iteration: int = 3) -> Path:
    return FIXTURES / name / f"iter_{iteration:07d}"


def _copy_root(name: str, dest: Path) -> Path:
    shutil.copytree(FIXTURES / name, dest)
    return dest


# ----------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("name", NAMES)
def test_fixture_common_states_read_without_megatron_core_types(name):
    state = ckpt_common.read_common_state(_iter(name))
    args = state["args"]
    assert isinstance(args, argparse.Namespace)
    assert state["iteration"] == 3 and args.consumed_train_samples == 12
    # megatron-core's enums come back as stand-ins that keep the name and value
    assert isinstance(args.attention_backend, common_pickle.ForeignEnum)
    assert args.attention_backend.name == "auto" and args.attention_backend.value == 5
    assert args.model_type.name == "encoder_or_decoder"
    import signal

    import torch

    assert args.exit_signal is signal.SIGTERM and args.params_dtype is torch.float32


def test_reader_does_not_import_megatron_core():
    """The merge and list processes never import megatron-core: the reader must not either."""
    code = (
        "import sys; from megatron_wsm.checkpoint import common_state as c;"
        f"s = c.read_common_state({str(_iter('ep2_plain'))!r});"
        "assert s['args'].attention_backend.name == 'auto';"
        "print(sorted(m for m in sys.modules if m.startswith('megatron.core')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_plain_optimizer_tensor_is_rebuilt():
    state = ckpt_common.read_common_state(_iter("ep2_plain"))
    step = state["optimizer"][0]["state"]["common_step"]
    assert float(step) == 3.0 and step.shape == ()


def test_stand_ins_are_written_back_as_megatron_cores_types(tmp_path):
    """A merged common.pt carries the stand-ins under their real names: megatron-core's own
    loader (its allow-list registered at import) reads the real enums."""
    state = ckpt_common.read_common_state(_iter("tp2_plain"))
    out = tmp_path / "common.pt"
    common_pickle.dump_common(state, out)
    again = ckpt_common.read_common_state(tmp_path)
    assert vars(again["args"]) == vars(state["args"])
    import megatron_wsm.mcore_prelude  # noqa: F401

    import megatron.core  # noqa: F401  (registers megatron-core's safe globals)
    import torch
    from megatron.core.transformer.enums import AttnBackend

    real = torch.load(out, weights_only=True)
    assert real["args"].attention_backend is AttnBackend.auto
    assert real["args"].attention_backend == state["args"].attention_backend


def _torch_zip(payload: bytes) -> bytes:
    """A torch.save-shaped zip whose data.pkl is ``payload``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


class _Run:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _hostile_payloads(marker: Path) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    return {
        "os.system": pickle.dumps({"args": _Run(cmd)}, protocol=2),
        "eval": pickle.dumps({"x": _Eval(f"open({str(marker)!r}, 'w')")}, protocol=2),
        "getattr": b"\x80\x02cbuiltins\ngetattr\nq\x00.",
        "nested torch.load": b"\x80\x02ctorch\nload\nq\x00.",
        "codecs non-latin1": (
            b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-8\x86R."
        ),
    }


class _Eval:
    def __init__(self, expr: str) -> None:
        self.expr = expr

    def __reduce__(self):
        return (eval, (self.expr,))


@pytest.mark.parametrize("kind", ["os.system", "eval", "getattr", "nested torch.load",
                                  "codecs non-latin1"])  # fmt: skip
def test_hostile_common_state_is_refused_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "iter_0000003"
    ckpt.mkdir()
    (ckpt / "common.pt").write_bytes(_torch_zip(_hostile_payloads(marker)[kind]))
    with pytest.raises(ckpt_common.CommonStateError, match="restricted common-state reader"):
        ckpt_common.read_common_state(ckpt)
    assert not marker.exists()


def test_bit_flip_in_common_state_is_refused(tmp_path):
    ckpt = tmp_path / "iter_0000003"
    ckpt.mkdir()
    data = bytearray((_iter("ep2_plain") / "common.pt").read_bytes())
    at = data.find(b"consumed_train_samples")
    assert at > 0
    data[at + 3] ^= 0x01
    (ckpt / "common.pt").write_bytes(bytes(data))
    with pytest.raises(ckpt_common.CommonStateError, match="CRC|crc|corrupt|Bad"):
        ckpt_common.read_common_state(ckpt)


# ----------------------------------------------------------------------------- recognition


@pytest.mark.parametrize("name", NAMES)
def test_fixtures_are_complete_megatron_lm_checkpoints(name):
    for iteration in (1, 2, 3):
        found = megatron_lm.recognise(_iter(name, iteration))
        assert found is not None and found.complete, found and found.problems
        assert found.iteration == iteration
    manifest = megatron_lm.synthesized_manifest(found)
    assert manifest.kind == "full" and manifest.complete
    assert (manifest.consumed_samples, manifest.consumed_tokens) == (12, 12 * 32)
    assert manifest.learning_rate == pytest.approx(1e-3)
    layout = manifest.parallel
    expected = (1, 2, 2) if name.startswith("ep2") else (2, 1, 1)
    got = (
        layout.tensor_model_parallel_size,
        layout.expert_model_parallel_size,
        layout.data_parallel_size,
    )
    assert got == expected
    assert manifest.extra["megatron_lm"]["optimizer"] == (
        "distributed" if name.endswith("distopt") else "plain"
    )


def test_one_model_config_hash_for_all_fixtures():
    hashes = {
        megatron_lm.synthesized_manifest(megatron_lm.recognise(_iter(n))).model_config_hash
        for n in NAMES
    }
    assert len(hashes) == 1


def test_our_own_checkpoint_is_not_megatron_lms(tmp_path):
    ckpt = shutil.copytree(_iter("ep2_plain"), tmp_path / "iter_0000003")
    (ckpt / "wsm_manifest.json").write_text("{}")
    assert megatron_lm.recognise(ckpt) is None


def test_tracker_decides_which_saves_megatron_lm_committed(tmp_path):
    root = _copy_root("ep2_plain", tmp_path / "save")
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    assert megatron_lm.recognise(root / "iter_0000002").complete
    newer = megatron_lm.recognise(root / "iter_0000003")
    assert not newer.complete and "tracker names iteration 2" in newer.problems[0]
    (root / "latest_checkpointed_iteration.txt").unlink()
    alone = megatron_lm.recognise(root / "iter_0000003")
    assert not alone.complete and "not committed" in alone.problems[0]
    assert megatron_lm.recognise(root / "iter_0000003", need_tracker=False).complete


def test_inconsistent_files_are_not_complete(tmp_path):
    root = _copy_root("tp2_plain", tmp_path / "save")
    # renamed: the name and the common state disagree
    os.rename(root / "iter_0000002", root / "iter_0000005")
    found = megatron_lm.recognise(root / "iter_0000005")
    assert "names iteration 5 but its common state says 2" in found.problems[0]
    # a shard file the .metadata does not name
    shutil.copy(root / "iter_0000003" / "__0_0.distcp", root / "iter_0000003" / "__9_0.distcp")
    assert "not named by its .metadata" in megatron_lm.recognise(root / "iter_0000003").problems[0]
    # megatron-core's last file missing: unfinished
    (root / "iter_0000001" / "metadata.json").unlink()
    assert "metadata.json" in megatron_lm.recognise(root / "iter_0000001").problems[0]
    # a truncated shard
    shard = root / "iter_0000005" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert not megatron_lm.recognise(root / "iter_0000005").complete


def test_hostile_common_state_makes_an_unreadable_checkpoint(tmp_path):
    root = _copy_root("ep2_plain", tmp_path / "save")
    marker = tmp_path / "ran"
    (root / "iter_0000003" / "common.pt").write_bytes(
        _torch_zip(_hostile_payloads(marker)["os.system"])
    )
    found = megatron_lm.recognise(root / "iter_0000003")
    assert found.unreadable and not found.complete and not marker.exists()


# ----------------------------------------------------------------------------- args → config


FIXTURE_FLAGS = (
    "--num-layers 2 --hidden-size 16 --ffn-hidden-size 32 --num-attention-heads 4 "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 4 --tokenizer-type NullTokenizer "
    "--vocab-size 511 --make-vocab-size-divisible-by 64 --mock-data"
).split()


def test_args_give_the_model_our_trainer_builds_for_the_same_flags():
    """--use-checkpoint-args: the model identity from Megatron-LM's args equals the one our
    trainer hashes for the same model flags (so merged manifests and evaluate agree)."""
    from megatron_wsm.arguments import parse_run_config
    from megatron_wsm.config.model import model_identity_fields

    ours, _ = parse_run_config(FIXTURE_FLAGS)
    ours.model.vocab_size = 512  # what the trainer sets from the NullTokenizer (511 + EOD)
    import dataclasses

    ident = model_identity_fields(dataclasses.asdict(ours.model))
    ident["padded_vocab_size"] = 512
    args = ckpt_common.read_common_state(_iter("ep2_plain"))["args"]
    assert megatron_lm.model_config(args) == ident
    cfg = megatron_lm.run_config_from_args(args)
    assert cfg.data.tokenizer_type == "NullTokenizer" and cfg.data.vocab_size == 511
    assert cfg.data.mock_data and cfg.training.seed == 1234
    assert cfg.parallel.expert_model_parallel_size == 2
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.lr_decay_style == "constant"


def test_every_config_field_named_in_args_is_mapped_without_edits():
    """A ModelConfig field whose name (flag) is a Megatron-LM arg maps by itself."""
    args = argparse.Namespace(
        num_layers=3, hidden_size=32, num_attention_heads=8, rotary_base=500000,
        qk_layernorm=True, moe_router_score_function="sigmoid", norm_epsilon=1e-6,
        bf16=True, num_experts=0, kv_channels=4, group_query_attention=False,
        num_query_groups=1, use_rotary_position_embeddings=True,
        position_embedding_type="learned_absolute", distributed_backend="nccl",
        save="/elsewhere", moe_layer_freq=[0, 1, 1],
    )  # fmt: skip
    cfg = megatron_lm.run_config_from_args(args)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.rotary_base, m.qk_layernorm) == (3, 32, 500000, True)
    assert m.moe_router_score_function == "sigmoid" and m.layernorm_epsilon == 1e-6
    assert m.params_dtype == "bf16" and m.num_experts is None
    assert m.kv_channels is None and m.num_query_groups is None  # derived defaults
    assert m.position_embedding_type == "rope"
    assert m.moe_layer_freq == [0, 1, 1]
    # this run's settings, not the checkpoint's
    assert cfg.parallel.distributed_backend is None and cfg.training.save is None


def test_key_aliases():
    key = "decoder.layers.pre_mlp_layernorm.weight"
    theirs = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    assert megatron_lm.megatron_lm_names(key) == [theirs]
    assert megatron_lm.our_name(theirs, moe_layer=True) == key
    assert megatron_lm.our_name(theirs, moe_layer=False) == theirs  # dense: the fused norm
    assert megatron_lm.megatron_lm_names("decoder.layers.mlp.router.weight") == []


def test_admitted_globals_are_listed():
    admitted = {f"{m}.{n}" for m, n in common_pickle.ADMITTED}
    for name in (
        "argparse.Namespace",
        "megatron.core.transformer.enums.AttnBackend",
        "megatron.core.enums.ModelType",
        "signal.Signals",
        "torch._utils._rebuild_tensor_v2",
    ):
        assert name in admitted
    assert json.dumps(sorted(admitted))  # plain strings


# ----------------------------------------------------------------------------- the tools


def test_list_verify_lists_and_verifies_a_megatron_lm_save_dir(capsys):
    from megatron_wsm.cli.list_checkpoints import main as list_main

    assert list_main([str(FIXTURES / "tp2_distopt"), "--verify", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["iteration"], r["kind"], r["complete"], r["verify"]) for r in rows] == [
        (i, "full", True, "OK") for i in (1, 2, 3)
    ]
    assert rows[-1]["consumed_tokens"] == 12 * 32


def test_list_verify_does_not_pass_when_nothing_was_verified(tmp_path, capsys):
    from megatron_wsm.cli.list_checkpoints import EXIT_PROBLEMS
    from megatron_wsm.cli.list_checkpoints import main as list_main

    root = _copy_root("ep2_plain", tmp_path / "save")
    (root / "latest_checkpointed_iteration.txt").unlink()  # nothing committed
    assert list_main([str(root), "--verify", "--json"]) == EXIT_PROBLEMS
    rows = json.loads(capsys.readouterr().out)
    assert not any(r["complete"] for r in rows)
    assert "not committed" in rows[0]["note"]


def test_list_verify_refuses_a_hostile_common_state_and_runs_nothing(tmp_path, capsys):
    from megatron_wsm.cli.list_checkpoints import EXIT_PROBLEMS
    from megatron_wsm.cli.list_checkpoints import main as list_main

    root = _copy_root("ep2_plain", tmp_path / "save")
    marker = tmp_path / "ran"
    (root / "iter_0000003" / "common.pt").write_bytes(
        _torch_zip(_hostile_payloads(marker)["os.system"])
    )
    assert list_main([str(root), "--verify", "--json"]) == EXIT_PROBLEMS
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1]["verify"] == "refused" and "posix.system" in rows[-1]["problems"][0]
    assert [r["verify"] for r in rows[:2]] == ["OK", "OK"]
    assert not marker.exists()


def _merge(*argv: str) -> tuple[int, str, str]:
    import contextlib

    from megatron_wsm.cli.merge_wsm import main as merge_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = merge_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_merge_dry_run_orders_a_save_dir_by_the_common_states(tmp_path):
    root = _copy_root("ep2_distopt", tmp_path / "save")
    # names that sort the wrong way round: the order comes from each common state
    for i in (1, 2, 3):
        os.rename(root / f"iter_{i:07d}", root / f"ckpt_{4 - i}_iter_{i:07d}")
    (root / "latest_checkpointed_iteration.txt").write_text("3")
    rc, out, err = _merge("--load-dir", str(root), "--method", "mean", "--dry-run")
    # the tracker's iter_0000003 no longer exists: not a save dir Megatron-LM can load
    assert rc != 0 and "missing" in err
    for i in (1, 2, 3):
        os.rename(root / f"ckpt_{4 - i}_iter_{i:07d}", root / f"iter_{i:07d}")
    rc, out, err = _merge("--load-dir", str(root), "--method", "mean", "--dry-run")
    assert rc == 0, err
    assert out.index("iter_0000001") < out.index("iter_0000002") < out.index("iter_0000003")


def test_merge_inputs_need_the_flag_only_without_the_tracker(tmp_path):
    root = _copy_root("tp2_plain", tmp_path / "save")
    inputs = [str(root / f"iter_{i:07d}") for i in (3, 1, 2)]
    rc, out, err = _merge("--inputs", *inputs, "--weights", "0,0.5,0.5", "--dry-run")
    assert rc == 0, err
    assert "reordered by iteration" in out
    (root / "latest_checkpointed_iteration.txt").write_text("2")  # 3 not committed
    rc, out, err = _merge("--inputs", *inputs, "--weights", "0,0.5,0.5", "--dry-run")
    assert rc != 0 and "--allow-no-manifest" in err and "tracker names iteration 2" in err
    rc, out, err = _merge(
        "--inputs", *inputs, "--weights", "0,0.5,0.5", "--dry-run", "--allow-no-manifest"
    )
    assert rc == 0, err


@pytest.mark.parametrize("allow", [False, True])
def test_merge_dry_run_refuses_a_hostile_common_state_and_runs_nothing(tmp_path, allow):
    root = _copy_root("ep2_plain", tmp_path / "save")
    marker = tmp_path / "ran"
    (root / "iter_0000003" / "common.pt").write_bytes(
        _torch_zip(_hostile_payloads(marker)["os.system"])
    )
    flags = ["--allow-no-manifest"] if allow else []
    for source in (
        ["--load-dir", str(root)],
        ["--inputs", *(str(p) for p in sorted(root.glob("iter_*")))],
    ):
        rc, out, err = _merge(*source, "--method", "mean", "--dry-run", *flags)
        assert rc != 0 and "posix.system" in err, (source, err)
    assert not marker.exists()


def test_stand_ins_survive_the_standard_pickler():
    """A multi-rank merge broadcasts the common state between ranks with plain pickle."""
    state = ckpt_common.read_common_state(_iter("ep2_plain"))
    again = pickle.loads(pickle.dumps(state))
    assert again["args"].attention_backend == state["args"].attention_backend
    assert type(again["args"].model_type) is type(state["args"].model_type)
