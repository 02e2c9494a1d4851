"""megatron-core ``GPTDataset`` splits from indexed datasets, with or without torch.distributed.

Everything goes through megatron-core's ``BlendedMegatronDatasetBuilder`` and ``GPTDatasetConfig``,
the path Megatron-LM's ``pretrain_gpt.py`` takes: one prefix, a weighted blend
(``BlendedDataset`` over one ``GPTDataset`` per prefix), per-split blends, or ``MockGPTDataset``
(:func:`datasets_from_flags`, from Megatron-LM's data flags read by ``config/blends.py``). With the
same blend, split, seed, sequence length and sample counts, the sample order is Megatron-LM's.

Each dataset item is the dict megatron-core's ``GPTDataset.__getitem__`` returns, for a sequence
length ``S``:

* ``tokens``: int64 ``[S]``, the input ids;
* ``labels``: int64 ``[S]``, the next-token targets (``labels[i] == tokens[i + 1]``; the sample is
  drawn as ``S + 1`` consecutive ids and shifted, documents being concatenated with their EOD);
* ``loss_mask``: float32 ``[S]``, 1.0 except where the label is padding;
* ``attention_mask``: bool ``[1, S, S]``, True where attention is *masked* (future positions);
  present only when ``create_attention_mask`` is True;
* ``position_ids``: int64 ``[S]``, ``0..S-1``.

Caching: megatron-core writes the document/sample/shuffle indices of every split as ``.npy`` files
into ``path_to_cache`` (default: ``gpt_index_cache`` beside the first prefix's files) and reuses
them when the dataset, tokenizer and sizes match. Concurrency, as implemented here:

* without torch.distributed, the build holds an ``fcntl.flock`` on ``<path_to_cache>/.lock``, so
  independent processes sharing a cache never read a half-written index;
* with torch.distributed (world size > 1), megatron-core builds on global rank 0 first (which
  holds the same lock meanwhile), then the other ranks load rank 0's files. That requires
  ``path_to_cache`` to be visible to every rank; when it is not (node-local disks on several
  nodes), :func:`build_gpt_datasets` first lets rank 0 build, then ships the index files over
  torch.distributed to the ranks that cannot see them. All ranks must call the builders (they
  contain collectives); with NCCL, set the CUDA device first.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import megatron_wsm.mcore_prelude  # noqa: F401  (before megatron.core: its CPU import shims)

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_wsm.config.blends import Blend, BlendError, blends_from_flags
from megatron_wsm.data.prepare import file_lock
from megatron_wsm.data.tokenizer import SentencePieceTokenizer

#: ``num_samples`` entry meaning "exactly one pass over the split" (what evaluation wants).
ONE_EPOCH = None

_INDEX_AFFIXES = ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy")
_BLEND_AFFIXES = ("description.txt", "dataset_index.npy", "dataset_sample_index.npy")

#: Megatron-LM's ``--split`` when ``--data-path`` is given without one (its legacy default).
LEGACY_SPLIT = "969, 30, 1"


def _as_tokenizer(tokenizer: Any) -> Any:
    """Accept a tokenizer object or the path of a SentencePiece model."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return SentencePieceTokenizer(tokenizer)
    return tokenizer


def _default_cache(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "gpt_index_cache")


def _token_counts(prefix: str, split_matrix: Sequence[Any]) -> list[int | None]:
    """Tokens in each split's document range, computed the way megatron-core cuts the ranges."""
    indexed = IndexedDataset(prefix)
    # Copy: sequence_lengths is a view of the .idx mmap, which IndexedDataset.__del__ closes
    # (reading the view afterwards segfaults).
    lengths = indexed.sequence_lengths.copy()
    del indexed
    n = lengths.shape[0]
    counts: list[int | None] = []
    for bookends in split_matrix:
        if bookends is None:
            counts.append(None)
            continue
        beg, end = round(bookends[0] * float(n)), round(bookends[1] * float(n))
        counts.append(int(lengths[beg:end].sum()))
    return counts


def _drop_empty_splits(config: GPTDatasetConfig, prefix: str) -> None:
    """Refuse an empty train split; turn empty valid/test splits into ``None`` with a warning.

    megatron-core 0.16.1 loops forever in ``GPTDataset._get_num_epochs`` when a split has no
    tokens and a sample count is requested (a small dataset with ``--split 949,50,1`` has no
    test document). Editing ``split_matrix`` after validation leaves the other splits' document
    ranges exactly as the split string defines them.
    """
    counts = _token_counts(prefix, config.split_matrix)
    names = ("train", "valid", "test")
    for i, count in enumerate(counts):
        if count == 0:
            if i == 0:
                raise ValueError(
                    f"split {config.split!r} leaves no training document in {prefix!r}"
                )
            warnings.warn(
                f"split {config.split!r} leaves no {names[i]} document in {prefix!r}; "
                f"the {names[i]} dataset is None",
                RuntimeWarning,
                stacklevel=3,
            )
            config.split_matrix[i] = None


def _refuse_empty_parts(config: GPTDatasetConfig) -> None:
    """Refuse a blend member whose part of a split holds no token (megatron-core would loop
    forever building it, see :func:`_drop_empty_splits`); a one-prefix ``--data-path`` is
    handled by :func:`_drop_empty_splits` instead."""
    names = ("train", "valid", "test")
    if config.blend is not None:
        for prefix in config.blend[0]:
            for i, count in enumerate(_token_counts(prefix, config.split_matrix)):
                if count == 0:
                    raise BlendError(
                        f"--split {config.split!r} leaves no {names[i]} document in {prefix!r} "
                        "(a blend member must hold documents in every split it feeds; change "
                        "--split, or use per-split paths)"
                    )
    for blend in config.blend_per_split or ():
        for prefix in blend[0] if blend is not None else ():
            if _token_counts(prefix, [(0.0, 1.0)])[0] == 0:
                raise BlendError(f"indexed dataset {prefix!r} holds no token")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _index_files(datasets: Sequence[Any], path_to_cache: str) -> list[str]:
    """The cache files megatron-core wrote for the given datasets (same naming as 0.16.1):
    each GPTDataset's, and each BlendedDataset's with those of its members."""
    files = []
    for ds in datasets:
        if isinstance(ds, BlendedDataset):
            base = f"{ds.unique_description_hash}-{type(ds).__name__}-{ds.split.name}"
            files += [os.path.join(path_to_cache, f"{base}-{affix}") for affix in _BLEND_AFFIXES]
            files += _index_files(ds.datasets, path_to_cache)
        elif isinstance(ds, GPTDataset):
            base = f"{ds.unique_description_hash}-{type(ds).__name__}-{ds.index_split.name}"
            files += [os.path.join(path_to_cache, f"{base}-{affix}") for affix in _INDEX_AFFIXES]
    return list(dict.fromkeys(files))


def _share_index_cache(config: GPTDatasetConfig, sizes: list[Any], cls: type) -> None:
    """Build the index cache on rank 0 and make sure every rank can read it.

    megatron-core's distributed build assumes a shared ``path_to_cache``: ranks other than 0
    never build, they load, and fail with ``FileNotFoundError`` on a node-local cache of another
    node. Here rank 0 builds alone (the other ranks take part in the builder's barriers), then
    ranks that do not see the files receive their bytes and write them (atomically: several local
    ranks of a node may write the same file).
    """
    dist = torch.distributed
    rank = dist.get_rank()
    builder = BlendedMegatronDatasetBuilder(cls, sizes, lambda: dist.get_rank() == 0, config)
    lock = file_lock(os.path.join(config.path_to_cache, ".lock")) if rank == 0 else None
    with lock or contextlib.nullcontext():
        built = builder.build()
    box: list[Any] = [_index_files(built, config.path_to_cache) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    files: list[str] = box[0]
    missing = [f for f in files if not os.path.isfile(f)]
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(missing))
    if not any(flags):
        return
    payload: list[Any] = [None]
    if rank == 0:
        payload[0] = {}
        for f in files:
            with open(f, "rb") as fh:
                payload[0][f] = fh.read()
    dist.broadcast_object_list(payload, src=0)
    for f in missing:
        os.makedirs(os.path.dirname(f) or ".", exist_ok=True)
        tmp = f"{f}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(payload[0][f])
        os.replace(tmp, f)
    dist.barrier()


def _build(
    config: GPTDatasetConfig,
    sizes: list[Any],
    is_built_on_rank: Callable[[], bool] | None,
) -> tuple[Any, Any, Any]:
    on_rank = is_built_on_rank or (lambda: True)
    cls = MockGPTDataset if config.mock else GPTDataset
    cache = config.path_to_cache
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        if cache is not None:
            _share_index_cache(config, sizes, cls)
        # Every rank now finds the cache: rank 0 loads first, then the others (megatron-core).
        built = BlendedMegatronDatasetBuilder(cls, sizes, on_rank, config).build()
    else:
        if not _dist_ready() and (config.blend is not None or config.blend_per_split):
            # megatron-core 0.16.1's BlendedDataset asks torch.distributed for the rank when it
            # writes its cache (GPTDataset checks is_initialized() first).
            blended = config.blend is not None and (
                len(config.blend[0]) > 1 or config.blend[1] is not None
            )
            blended = blended or any(
                b is not None and len(b[0]) > 1 for b in config.blend_per_split or ()
            )
            if blended:
                raise RuntimeError(
                    "a blend of several datasets needs torch.distributed initialized (a world "
                    "of one will do): megatron-core's BlendedDataset reads the rank"
                )
        lock = file_lock(os.path.join(cache, ".lock")) if cache is not None else None
        with lock or contextlib.nullcontext():
            built = BlendedMegatronDatasetBuilder(cls, sizes, on_rank, config).build()
    train, valid, test = built
    return train, valid, test


def gpt_dataset_config(
    tokenizer: Any,
    seq_length: int,
    seed: int,
    *,
    blend: Blend | None = None,
    blend_per_split: Sequence[Blend | None] | None = None,
    split: str | None = None,
    path_to_cache: str | None = None,
    num_dataset_builder_threads: int = 1,
    mmap_bin_files: bool = True,
    reset_position_ids: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
) -> GPTDatasetConfig:
    """megatron-core's ``GPTDatasetConfig`` as Megatron-LM's ``core_gpt_dataset_config_from_args``
    fills it for the same flags (the fields this trainer has flags for; others keep
    megatron-core's defaults, which are Megatron-LM's).

    Neither ``blend`` nor ``blend_per_split``: mock data (megatron-core then sets ``mock`` and,
    without ``split``, the split ``1,1,1``). ``blend`` without ``split``: Megatron-LM's legacy
    ``969, 30, 1``. ``path_to_cache`` defaults to ``gpt_index_cache`` beside the first prefix
    (mock data: no cache unless given).
    """
    prefixes = [
        p
        for b in ([blend] if blend is not None else list(blend_per_split or ()))
        if b
        for p in b[0]
    ]
    if path_to_cache is None and prefixes:
        path_to_cache = _default_cache(prefixes[0])
    if blend is not None and split is None:
        split = LEGACY_SPLIT
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=list(blend_per_split) if blend_per_split is not None else None,
        split=split,
        num_dataset_builder_threads=num_dataset_builder_threads,
        path_to_cache=os.fspath(path_to_cache) if path_to_cache is not None else None,
        mmap_bin_files=mmap_bin_files,
        tokenizer=_as_tokenizer(tokenizer),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )


def _refuse_whole_weighted_splits(
    config: GPTDatasetConfig, num_samples: Sequence[int | None]
) -> None:
    """A split read whole (``None`` samples: ``--eval-iters 0``) cannot come from a weighted
    blend: megatron-core draws a weighted blend only to a size (it asserts otherwise)."""
    names = ("train", "valid", "test")
    for i, size in enumerate(num_samples):
        if size is not None:
            continue
        if config.blend_per_split is not None:
            blend = config.blend_per_split[i]
            weighted = blend is not None and blend[1] is not None
        else:
            weighted = (
                config.blend is not None
                and config.blend[1] is not None
                and config.split_matrix[i] is not None
            )
        if weighted:
            raise BlendError(
                f"the whole {names[i]} split (--eval-iters 0) of a weighted blend is not "
                "defined (megatron-core blends to a sample count): give --eval-iters N"
            )


def build_from_config(
    config: GPTDatasetConfig,
    num_samples: Sequence[int | None],
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[Any, Any, Any]:
    """``(train, valid, test)`` of megatron-core's builder for ``config`` (``MockGPTDataset``
    when ``config.mock``), after the empty-split checks megatron-core lacks."""
    _refuse_whole_weighted_splits(config, num_samples)
    if config.blend is not None and len(config.blend[0]) == 1 and config.blend[1] is None:
        _drop_empty_splits(config, config.blend[0][0])
    elif not config.mock:
        _refuse_empty_parts(config)
    return _build(config, list(num_samples), is_built_on_rank)


def datasets_from_flags(
    data: Any,
    tokenizer: Any,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None],
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[Any, Any, Any]:
    """The datasets Megatron-LM's ``pretrain_gpt.py`` builds for the data flags of a
    :class:`~megatron_wsm.config.DataConfig` (``--data-path``, ``--data-args-path``, the
    per-split paths or ``--mock-data``); ``num_samples`` per split, see
    :func:`megatron_wsm.config.blends.megatron_num_samples`."""
    blend, blend_per_split = blends_from_flags(data)
    if blend is None and blend_per_split is None and not data.mock_data:
        raise ValueError("no data flag given (--data-path, per-split paths or --mock-data)")
    config = gpt_dataset_config(
        tokenizer,
        seq_length,
        seed,
        blend=blend,
        blend_per_split=blend_per_split,
        split=data.split,
        path_to_cache=data.data_cache_path,
        num_dataset_builder_threads=data.num_dataset_builder_threads,
        mmap_bin_files=data.mmap_bin_files,
        reset_position_ids=data.reset_position_ids,
        eod_mask_loss=data.eod_mask_loss,
    )
    return build_from_config(config, num_samples, is_built_on_rank)


def build_gpt_datasets(
    train_prefix: str | None,
    valid_prefix: str | None,
    test_prefix: str | None,
    tokenizer: Any,
    seq_length: int,
    seed: int,
    num_samples: tuple[int | None, int | None, int | None],
    path_to_cache: str | None = None,
    *,
    split: str | None = None,
    create_attention_mask: bool = True,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[Any, Any, Any]:
    """Build train/valid/test ``GPTDataset``s, one indexed dataset per split (``blend_per_split``)
    or, with ``split``, all three from the one indexed dataset ``train_prefix``.

    Args:
        train_prefix, valid_prefix, test_prefix: indexed-dataset prefixes (no ``.bin``/``.idx``);
            ``None`` leaves that split out (returned as ``None``).
        tokenizer: a :class:`SentencePieceTokenizer` (or any megatron-core tokenizer with
            ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers``) or a model path.
        seq_length: tokens per sample (each sample reads ``seq_length + 1`` ids).
        seed: seed of the document and sample shuffles.
        num_samples: samples wanted per split; the dataset repeats epochs to reach it (its
            length is at least that). ``None`` (:data:`ONE_EPOCH`) means exactly one pass, the
            deterministic full-split evaluation.
        path_to_cache: where megatron-core caches the sample indices (created); defaults to
            ``gpt_index_cache`` next to the train prefix (or the first given prefix).
        split: Megatron's ``--split`` (e.g. ``"949,50,1"``), with ``train_prefix`` the only
            prefix: its documents are cut, in storage order, into three contiguous ranges with
            those weights, so the split is by document. A zero weight gives ``None`` for that
            split, and so does a range that holds no document (with a warning).
        create_attention_mask: include the dense causal ``attention_mask`` in samples.
        is_built_on_rank: with torch.distributed, which ranks get a dataset (others get
            ``None``); default: every rank.

    Returns:
        ``(train, valid, test)``; see the module docstring for the item format.
    """
    prefixes = [train_prefix, valid_prefix, test_prefix]
    given = [p for p in prefixes if p is not None]
    if not given:
        raise ValueError("at least one of train/valid/test prefixes is required")
    cache = os.fspath(path_to_cache) if path_to_cache is not None else _default_cache(given[0])
    if split is None:
        for p in given:
            # An empty indexed dataset would make megatron-core loop forever (see
            # _drop_empty_splits).
            if _token_counts(p, [(0.0, 1.0)])[0] == 0:
                raise ValueError(f"indexed dataset {p!r} holds no token")
        config = gpt_dataset_config(
            tokenizer,
            seq_length,
            seed,
            blend_per_split=[([p], None) if p is not None else None for p in prefixes],
            path_to_cache=cache,
            create_attention_mask=create_attention_mask,
        )
    elif given != [train_prefix]:
        raise ValueError("split cuts one indexed dataset: give train_prefix only")
    else:
        config = gpt_dataset_config(
            tokenizer,
            seq_length,
            seed,
            blend=([train_prefix], None),
            split=split,
            path_to_cache=cache,
            create_attention_mask=create_attention_mask,
        )
    return build_from_config(config, num_samples, is_built_on_rank)
