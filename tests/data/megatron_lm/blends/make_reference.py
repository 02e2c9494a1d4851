"""Megatron-LM's own datasets for data-flag sets, as reference data for megatron-wsm's tests.

Runs Megatron-LM (core_v0.16.1) code on CPU, in one process: its argument parser and
``validate_args`` (the legacy ``--split`` default), ``pretrain_gpt.py``'s
``train_valid_test_datasets_provider`` (``core_gpt_dataset_config_from_args`` →
``get_blend_and_blend_per_split``, its tokenizer, megatron-core's
``BlendedMegatronDatasetBuilder``) at the sample counts of ``megatron.training.training.
get_train_valid_test_num_samples``. The indexed datasets are the deterministic corpora of
``tests/unit/test_data_blends.py`` (``_write_indexed``), rebuilt here. Writes ``reference.json``:
per case, the sample counts, each split's length, a SHA-256 of the token ids of the samples a
run reads, and the train blend's dataset index.

    .venv/bin/python tests/data/megatron_lm/blends/make_reference.py --mlm-dir /tmp/mlm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
sys.path.insert(0, str(REPO))

#: Model and loop flags around the data flags (the tiny sizes of the unit tests).
BASE = (
    "--num-layers 2 --hidden-size 16 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 --train-iters 6 "
    "--eval-interval 2 --eval-iters 2 --seed 1234 --tokenizer-type NullTokenizer "
    "--vocab-size 511 --lr 1e-3"
).split()

#: case -> data flags; {a}, {b}, {c} stand for the corpora's prefixes, {dir} for their folder.
CASES: dict[str, list[str]] = {
    "weighted": "--data-path 0.3 {a} 0.7 {b} --split 80,10,10".split(),
    "prefixes": "--data-path {a} {b} --split 90,5,5".split(),
    "per_split": "--train-data-path 2 {a} 1 {b} --valid-data-path {c} --test-data-path {b}".split(),
    "per_split_file": ["--per-split-data-args-path", "{dir}/per_split.json"],
    "data_args_file": "--data-args-path {dir}/args.txt --split 80,10,10".split(),
    "mock": ["--mock-data"],
}

#: The corpora (name, documents, seed, id offset) and the data-args files.
CORPORA = (("a", 60, 1, 0), ("b", 40, 2, 300), ("c", 20, 3, 150))


def write_corpora(root: Path) -> dict[str, str]:
    """The corpora and data-args files of the cases under ``root``; returns the substitutions."""
    # Imported by run_megatron_lm before Megatron-LM's checkout (which has its own ``tests``).
    from tests.unit.test_data_blends import _write_indexed

    subs = {"dir": str(root)}
    for name, docs, seed, offset in CORPORA:
        _write_indexed(root / name, docs, seed, offset)
        subs[name] = str(root / name)
    (root / "per_split.json").write_text(
        json.dumps(
            {"train": "2 {a} 1 {b}".format(**subs), "valid": [subs["c"]], "test": [subs["b"]]}
        )
    )
    (root / "args.txt").write_text("0.3 {a}\n0.7 {b}\n".format(**subs))
    return subs


def case_flags(name: str, subs: dict[str, str]) -> list[str]:
    return [w.format(**subs) for w in CASES[name]]


def digest(dataset, count: int | None) -> str:
    # An unweighted blend holds one epoch of its members, possibly fewer samples than asked.
    n = len(dataset) if count is None else min(count, len(dataset))
    h = hashlib.sha256()
    for i in range(n):
        h.update(dataset[i]["tokens"].numpy().astype("int64").tobytes())
    return h.hexdigest()


def summary(datasets, sizes) -> dict:
    out: dict = {"num_samples": list(sizes), "splits": []}
    for ds, size in zip(datasets, sizes, strict=True):
        if ds is None:
            out["splits"].append(None)
            continue
        out["splits"].append({"length": len(ds), "tokens_sha256": digest(ds, size)})
    train = datasets[0]
    if hasattr(train, "dataset_index"):
        out["train_dataset_index"] = [int(i) for i in train.dataset_index[: sizes[0]]]
    return out


def run_megatron_lm(mlm_dir: Path, root: Path) -> dict:
    """Every case through Megatron-LM's own code (one process, a world of one)."""
    import importlib.util

    import tests.unit.test_data_blends  # noqa: F401  (ours, before the checkout's ``tests``)

    spec = importlib.util.spec_from_file_location("make_fixtures", HERE.parent / "make_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    fixtures.install_shims(mlm_dir)  # Megatron-LM importable on a CPU-only torch

    import torch.distributed as dist

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=0, world_size=1)
    sys.path.insert(0, str(mlm_dir))
    import pretrain_gpt
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.training import get_train_valid_test_num_samples

    # Every rank builds (the PP-stage test of is_dataset_built_on_rank needs parallel_state).
    pretrain_gpt.is_dataset_built_on_rank = lambda vp_stage=None: True
    subs = write_corpora(root)
    result = {}
    for name in CASES:
        sys.argv = ["pretrain_gpt.py", *BASE, *case_flags(name, subs),
                    "--data-cache-path", str(root / f"cache-{name}")]  # fmt: skip
        args = parse_args()
        validate_args(args)
        global_vars._GLOBAL_ARGS = args
        sizes = get_train_valid_test_num_samples()
        datasets = pretrain_gpt.train_valid_test_datasets_provider(sizes)
        result[name] = summary(datasets, sizes)
        result[name]["flags"] = CASES[name]
        result[name]["split"] = args.split
    dist.destroy_process_group()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mlm-dir", type=Path, required=True, help="Megatron-LM checkout (core_v0.16.1)"
    )
    p.add_argument("--output", type=Path, default=HERE / "reference.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_megatron_lm(a.mlm_dir.resolve(), Path(tmp))
    a.output.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
