"""Megatron-LM's data flags (blends, per-split paths, data-args files, mock data) through
megatron-core's BlendedMegatronDatasetBuilder: parsing, refusals, sample counts and the samples
themselves compared with megatron-core built as Megatron-LM's pretrain_gpt.py builds it."""

from __future__ import annotations

import json
from pathlib import Path

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import numpy as np
import pytest
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

from megatron_wsm.config import ConfigError
from megatron_wsm.config.blends import megatron_num_samples
from megatron_wsm.data.datasets import datasets_from_flags
from megatron_wsm.data.tokenizers import tokenizer_from_config
from megatron_wsm.testing.config import tiny_run_config

MOCK = ("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "511")


def _megatron_lm_config(tokenizer, seq_length: int, seed: int, **fields) -> GPTDatasetConfig:
    """GPTDatasetConfig as Megatron-LM's core_gpt_dataset_config_from_args fills it for
    default flags (core_v0.16.1 pretrain_gpt.py)."""
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=True,
        **fields,
    )


def _same_samples(ours, ref, indices) -> None:
    for i in indices:
        a, b = ours[i], ref[i]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


# ----------------------------------------------------------------------------- sample counts


def test_num_samples_follow_megatron_lm_formula() -> None:
    # get_train_valid_test_num_samples: train_iters*gbs, (train_iters//eval_interval+1)*eval_iters
    # *gbs, eval_iters*gbs.
    assert megatron_num_samples(10, 4, 3, 2) == (40, (10 // 3 + 1) * 2 * 4, 8)
    assert megatron_num_samples(10, 4, 0, 2) == (40, 8, 8)  # no periodic eval: the final one
    assert megatron_num_samples(10, 4, 3, 0) == (40, None, None)  # whole split, one pass


# ----------------------------------------------------------------------------- mock data


def test_mock_data_is_megatron_cores_mock_dataset_in_megatron_lm_order() -> None:
    cfg = tiny_run_config("--train-iters", 5, "--eval-interval", 2, *MOCK)
    cfg.data.validate()
    tokenizer = tokenizer_from_config(cfg.data)
    t = cfg.training
    sizes = megatron_num_samples(t.train_iters, t.global_batch_size, t.eval_interval, t.eval_iters)
    ours = datasets_from_flags(cfg.data, tokenizer, cfg.model.seq_length, t.seed, sizes)
    # Megatron-LM with --mock-data: no blend, split None (megatron-core: 1,1,1), MockGPTDataset.
    ref_cfg = _megatron_lm_config(tokenizer, cfg.model.seq_length, t.seed)
    ref = BlendedMegatronDatasetBuilder(MockGPTDataset, list(sizes), lambda: True, ref_cfg).build()
    for mine, theirs, size in zip(ours, ref, sizes, strict=True):
        assert isinstance(mine, MockGPTDataset)
        assert len(mine) == len(theirs) >= size
        _same_samples(mine, theirs, range(size))


def test_mock_data_needs_a_tokenizer_and_no_other_source(tmp_path: Path) -> None:
    cfg = tiny_run_config("--mock-data")
    with pytest.raises(ConfigError, match="--mock-data needs a tokenizer"):
        cfg.data.validate()
    cfg = tiny_run_config(*MOCK, "--data-path", str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="one data source, not --mock-data and --data-path"):
        cfg.data.validate()


# ----------------------------------------------------------------------------- fixtures

VOCAB = 511  # NullTokenizer --vocab-size 511: ids 0..510, EOD 511


def _write_indexed(prefix: Path, num_docs: int, seed: int, offset: int) -> None:
    """An indexed dataset of random documents (ids in [offset, offset + 200), then EOD), so
    samples of different datasets are told apart by their ids."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        n = int(rng.integers(4, 40))
        doc = np.concatenate([rng.integers(offset, offset + 200, size=n), [VOCAB]])
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("blends")
    out = {}
    for name, docs, seed, offset in (("a", 60, 1, 0), ("b", 40, 2, 300), ("c", 20, 3, 150)):
        _write_indexed(root / name, docs, seed, offset)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A 1-process gloo world: megatron-core's BlendedDataset reads the rank when caching."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        created = True
    yield
    if created:
        dist.destroy_process_group()


def _cfg(tmp_path: Path, *flags: str | int, iters: int = 6):
    cfg = tiny_run_config(
        "--train-iters",
        iters,
        "--eval-interval",
        2,
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        VOCAB,
        "--data-cache-path",
        str(tmp_path / "cache"),
        *flags,
    )
    cfg.data.validate()
    return cfg


def _sizes(cfg) -> tuple[int, int | None, int | None]:
    t = cfg.training
    return megatron_num_samples(t.train_iters, t.global_batch_size, t.eval_interval, t.eval_iters)


def _ours(cfg):
    return datasets_from_flags(
        cfg.data,
        tokenizer_from_config(cfg.data),
        cfg.model.seq_length,
        cfg.training.seed,
        _sizes(cfg),
    )


def _reference(cfg, cache: Path, without_test: bool = False, **blend_fields):
    """Built as Megatron-LM's pretrain_gpt.py builds it for the same flags (its own cache).

    ``without_test``: leave the test split out, as ours does when the split holds no document
    (megatron-core, and so Megatron-LM, would loop forever building it)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    ref_cfg = _megatron_lm_config(
        tokenizer_from_config(cfg.data),
        cfg.model.seq_length,
        cfg.training.seed,
        path_to_cache=str(cache),
        **blend_fields,
    )
    if without_test:
        ref_cfg.split_matrix[2] = None
    sizes = list(_sizes(cfg))
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, ref_cfg).build()


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "words",
    [
        ["A"],
        ["A", "B"],
        ["A", "B", "C"],
        ["0.3", "A", "0.7", "B"],
        ["1", "A"],
        ["2", "A", "1e-1", "B"],
    ],
)
def test_parse_blend_reads_megatron_cores_forms(words: list[str]) -> None:
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_wsm.config.blends import parse_blend

    assert parse_blend(words, "--data-path") == get_blend_from_list(words)


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ([], "no dataset given"),
        (["0.5", "A", "0.5"], "weight without its prefix"),
        (["0.3", "A", "B", "C"], "weight without its prefix"),
        (["0.5", "A", "0.5", "0.5"], "a prefix position holds a number"),
        (["0", "A", "1", "B"], "finite positive"),
        (["-1", "A", "2", "B"], "finite positive"),
        (["nan", "A", "1", "B"], "finite positive"),
        (["inf", "A", "1", "B"], "finite positive"),
    ],
)
def test_parse_blend_refuses_what_megatron_core_would_misread(
    words: list[str], message: str
) -> None:
    from megatron_wsm.config.blends import BlendError, parse_blend

    with pytest.raises(BlendError, match=message):
        parse_blend(words, "--data-path")


def test_missing_prefix_is_refused_before_start(tmp_path: Path, corpora) -> None:
    missing = str(tmp_path / "nope")
    for flags in (
        ("--data-path", "0.5", corpora["a"], "0.5", missing),
        ("--train-data-path", corpora["a"], "--valid-data-path", missing),
    ):
        with pytest.raises(ConfigError, match=f"indexed dataset not found: {missing}.bin"):
            _cfg(tmp_path, *flags)


def test_data_args_files_hostile_inputs(tmp_path: Path, corpora) -> None:
    bad = tmp_path / "args.txt"
    cases = {
        "odd.txt": (f"0.4 {corpora['a']} 0.6", "--data-args-path", "weight without its prefix"),
        "zero.txt": (f"0 {corpora['a']} 1 {corpora['b']}", "--data-args-path", "positive"),
        "bin.txt": (b"\xff\xfe\x00", "--data-args-path", "not UTF-8"),
        "keys.json": (json.dumps({"train": corpora["a"]}), "--per-split", "missing key"),
        "list.json": ("[1, 2]", "--per-split", "JSON object"),
        "bad.json": ("{train:", "--per-split", "not JSON"),
        "type.json": (
            json.dumps({"train": {"x": 1}, "valid": None, "test": None}),
            "--per-split",
            "string or a list",
        ),
        "notrain.json": (
            json.dumps({"train": None, "valid": corpora["a"], "test": None}),
            "--per-split",
            "training dataset is required",
        ),
    }
    for name, (content, flag, message) in cases.items():
        bad = tmp_path / name
        if isinstance(content, bytes):
            bad.write_bytes(content)
        else:
            bad.write_text(content)
        option = "--data-args-path" if flag == "--data-args-path" else "--per-split-data-args-path"
        with pytest.raises(ConfigError, match=message):
            _cfg(tmp_path, option, str(bad))
    with pytest.raises(ConfigError, match="file not found"):
        _cfg(tmp_path, "--data-args-path", str(tmp_path / "absent.txt"))


def test_one_data_source_and_split_rules(tmp_path: Path, corpora) -> None:
    a, b = corpora["a"], corpora["b"]
    with pytest.raises(ConfigError, match="one data source"):
        _cfg(tmp_path, "--data-path", a, "--train-data-path", b)
    args = tmp_path / "args.txt"
    args.write_text(a)
    with pytest.raises(ConfigError, match="one data source"):
        _cfg(tmp_path, "--data-path", a, "--data-args-path", str(args))
    with pytest.raises(ConfigError, match="--split cuts --data-path datasets"):
        _cfg(tmp_path, "--train-data-path", a, "--valid-data-path", b, "--split", "1,1,1")
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        tiny_run_config("--data-path", a).data.validate()


# ----------------------------------------------------------------------------- blends


def test_weighted_blend_draws_megatron_cores_exact_shares(tmp_path: Path, corpora, world) -> None:
    """``--data-path 0.3 A 0.7 B``: a BlendedDataset whose dataset index holds, per dataset,
    exactly the sample count megatron-core's builder targets (ceil(size x normalized weight)),
    and whose every prefix of the train samples is within one sample of the weights; the
    samples equal Megatron-LM's (same builder, same config) one for one."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        _get_size_per_split_per_dataset,
    )
    from megatron.core.datasets.utils import normalize

    a, b = corpora["a"], corpora["b"]
    cfg = _cfg(tmp_path, "--data-path", "0.3", a, "0.7", b, "--split", "80,10,10")
    train, valid, test = _ours(cfg)
    assert isinstance(train, BlendedDataset)
    weights = normalize([0.3, 0.7])
    sizes = _sizes(cfg)
    targets = _get_size_per_split_per_dataset(weights, list(sizes))  # per dataset, per split
    for split, ds in enumerate((train, valid, test)):
        counts = np.bincount(np.asarray(ds.dataset_index), minlength=2).tolist()
        assert counts == [targets[0][split], targets[1][split]]
    n = sizes[0]  # the samples training reads: train_iters x global batch
    index = np.asarray(train.dataset_index)
    for end in range(1, n + 1):
        seen = np.bincount(index[:end], minlength=2)
        assert np.all(np.abs(seen - end * np.asarray(weights)) < 1.0), end
    # Dataset ids tell the sources apart: A's ids < 200 <= C < 300 <= B's.
    first = [int(np.asarray(train[i]["tokens"])[0]) for i in range(n)]
    assert all((t < 200 or t == VOCAB) if d == 0 else (t >= 300) for t, d in zip(first, index))
    ref = _reference(cfg, tmp_path / "ref", blend=([a, b], [0.3, 0.7]), split="80,10,10")
    for mine, theirs, size in zip((train, valid, test), ref, sizes, strict=True):
        np.testing.assert_array_equal(mine.dataset_index, theirs.dataset_index)
        _same_samples(mine, theirs, range(size))


def test_prefixes_without_weights_and_legacy_split(tmp_path: Path, corpora, world) -> None:
    a, b = corpora["a"], corpora["b"]
    cfg = _cfg(tmp_path, "--data-path", a, b, "--split", "80,10,10")
    ours = _ours(cfg)
    ref = _reference(cfg, tmp_path / "ref", blend=([a, b], None), split="80,10,10")
    for mine, theirs in zip(ours, ref, strict=True):
        assert len(mine) == len(theirs)
        _same_samples(mine, theirs, range(len(mine)))
    # One prefix without --split: Megatron-LM's legacy "969, 30, 1" (warns there, same cut).
    cfg = _cfg(tmp_path, "--data-path", a)
    assert cfg.data.split is None
    with pytest.warns(RuntimeWarning, match="leaves no test document"):
        ours = _ours(cfg)  # 60 documents: round(0.999 x 60) = 60, no test document
    assert ours[2] is None
    ref = _reference(
        cfg, tmp_path / "ref1", without_test=True, blend=([a], None), split="969, 30, 1"
    )
    for mine, theirs, size in zip(ours[:2], ref[:2], _sizes(cfg), strict=False):
        _same_samples(mine, theirs, range(size))


def test_blend_member_without_documents_in_a_split_is_refused(
    tmp_path: Path, corpora, world
) -> None:
    from megatron_wsm.config.blends import BlendError

    cfg = _cfg(tmp_path, "--data-path", "1", corpora["a"], "1", corpora["c"], "--split", "99,1,0")
    with pytest.raises(BlendError, match="leaves no valid document in"):
        _ours(cfg)


def test_whole_split_of_a_weighted_blend_is_refused(tmp_path: Path, corpora, world) -> None:
    from megatron_wsm.config.blends import BlendError

    a, b = corpora["a"], corpora["b"]
    weighted = ("--data-path", "1", a, "3", b, "--split", "80,10,10", "--eval-iters", "0")
    with pytest.raises(BlendError, match="whole valid split .* give --eval-iters N"):
        _ours(_cfg(tmp_path, *weighted))
    # Unweighted: the whole split is one pass over each member (megatron-core's exhaustive blend).
    train, valid, _ = _ours(
        _cfg(tmp_path, "--data-path", a, b, "--split", "80,10,10", "--eval-iters", "0")
    )
    assert len(valid) == sum(len(d) for d in valid.datasets)


def test_per_split_paths_and_args_files_build_megatron_lms_datasets(
    tmp_path: Path, corpora, world
) -> None:
    a, b, c = corpora["a"], corpora["b"], corpora["c"]
    flags = ("--train-data-path", "2", a, "1", b, "--valid-data-path", c, "--test-data-path", b)
    cfg = _cfg(tmp_path, *flags)
    ours = _ours(cfg)
    per_split = [([a, b], [2.0, 1.0]), ([c], None), ([b], None)]
    ref = _reference(cfg, tmp_path / "ref", blend_per_split=per_split)
    sizes = _sizes(cfg)
    for mine, theirs, size in zip(ours, ref, sizes, strict=True):
        _same_samples(mine, theirs, range(size))
    # The valid split is the whole of C, the test split the whole of B (no --split cut).
    valid_ids = {int(t) for i in range(sizes[1]) for t in np.asarray(ours[1][i]["tokens"])}
    assert valid_ids <= set(range(150, 350)) | {VOCAB}

    per_split_file = tmp_path / "per_split.json"
    per_split_file.write_text(json.dumps({"train": f"2 {a} 1 {b}", "valid": [c], "test": [b]}))
    args_file = tmp_path / "args.txt"
    args_file.write_text(f"0.3 {a}\n0.7   {b}\n")
    for file_flags, same_as in (
        (("--per-split-data-args-path", str(per_split_file)), ours),
        (
            ("--data-args-path", str(args_file), "--split", "80,10,10"),
            _ours(_cfg(tmp_path, "--data-path", "0.3", a, "0.7", b, "--split", "80,10,10")),
        ),
    ):
        from_file = _ours(_cfg(tmp_path, *file_flags))
        for mine, theirs, size in zip(from_file, same_as, sizes, strict=True):
            _same_samples(mine, theirs, range(size))


def test_trainer_feeds_megatron_cores_samples_at_megatron_lms_indices(
    tmp_path: Path, corpora, world
) -> None:
    """build_data (the trainer's call site) and the trainer's batch iterator, against
    megatron-core's dataset built for Megatron-LM's num-samples formula: the first global
    batches hold the token ids of samples consumed..consumed+G-1 (Megatron-LM's sampler)."""
    import torch

    from megatron_wsm.batches import global_batch_iterator, micro_batch_indices
    from megatron_wsm.pretrain import build_data

    a, b = corpora["a"], corpora["b"]
    cfg = _cfg(tmp_path, "--data-path", "0.3", a, "0.7", b, "--split", "80,10,10")
    datasets, vocab, source = build_data(cfg)
    assert vocab == VOCAB + 1 and "0.3" in source
    ref = _reference(cfg, tmp_path / "ref", blend=([a, b], [0.3, 0.7]), split="80,10,10")[0]
    t = cfg.training
    mbs, gbs = t.micro_batch_size, t.global_batch_size
    for step in range(3):
        consumed = step * gbs
        for dp_rank in range(2):  # DP=2: each rank's share of the same global batch
            num_micro = gbs // (mbs * 2)
            batches = list(
                global_batch_iterator(
                    datasets["train"], consumed, mbs, 2, dp_rank, num_micro, torch.device("cpu")
                )
            )
            wanted = micro_batch_indices(consumed, mbs, 2, dp_rank, num_micro)
            for batch, indices in zip(batches, wanted, strict=True):
                expect = np.stack([np.asarray(ref[i]["tokens"]) for i in indices])
                np.testing.assert_array_equal(batch["tokens"].numpy(), expect)


# ----------------------------------------------------------------------------- Megatron-LM itself

REFERENCE = Path(__file__).parents[1] / "data" / "megatron_lm" / "blends"


def _reference_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_reference", REFERENCE / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_datasets_equal_megatron_lms_own_for_the_same_flags(tmp_path: Path, world) -> None:
    """Each case of tests/data/megatron_lm/blends (made by Megatron-LM's parser, validate_args,
    num-samples formula and pretrain_gpt.py's dataset provider): same sample counts, split
    lengths, train blend index and token ids of every sample a run reads."""
    ref = _reference_module()
    expected = json.loads((REFERENCE / "reference.json").read_text())
    assert set(expected) == set(ref.CASES)
    subs = ref.write_corpora(tmp_path)
    for name in ref.CASES:
        cfg = tiny_run_config(
            "--train-iters", 6, "--eval-interval", 2, "--eval-iters", 2, "--seed", 1234,
            "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB,
            "--data-cache-path", str(tmp_path / f"cache-{name}"),
            *ref.case_flags(name, subs),
        )  # fmt: skip
        cfg.data.validate()
        got = ref.summary(_ours(cfg), _sizes(cfg))
        want = {k: v for k, v in expected[name].items() if k not in ("flags", "split")}
        assert got == want, name


def test_per_split_paths_with_a_sentencepiece_tokenizer_model(tmp_path: Path, world) -> None:
    """``--tokenizer-model`` (our sentencepiece wrapper, no --tokenizer-type) with per-split
    paths: the embedded corpus's own files, read through the trainer's build_data, give the
    samples of megatron-core's GPTDataset over each whole file."""
    from megatron_wsm.data.prepare import prepare_embedded_data
    from megatron_wsm.data.tokenizer import SentencePieceTokenizer
    from megatron_wsm.pretrain import build_data

    data = prepare_embedded_data(tmp_path / "emb", vocab_size=600, seed=3)
    cfg = tiny_run_config(
        "--train-iters", 3, "--eval-interval", 0,
        "--train-data-path", data.train_prefix, "--valid-data-path", data.valid_prefix,
        "--tokenizer-model", data.tokenizer_model, "--data-cache-path", str(tmp_path / "c"),
    )  # fmt: skip
    cfg.data.validate()
    datasets, vocab, _ = build_data(cfg)
    assert datasets["test"] is None  # no test path: the trainer does not read one
    tokenizer = SentencePieceTokenizer(data.tokenizer_model)
    assert vocab == tokenizer.vocab_size
    ref = _reference(
        cfg,
        tmp_path / "ref",
        blend_per_split=[([data.train_prefix], None), ([data.valid_prefix], None), None],
    )
    _same_samples(datasets["train"], ref[0], range(_sizes(cfg)[0]))
    _same_samples(datasets["valid"], ref[1], range(_sizes(cfg)[1]))
