"""The embedding's rows: Megatron-LM's vocabulary padding, and a checkpoint's recorded one.

Megatron-LM pads the tokenizer's vocabulary to a multiple of ``--make-vocab-size-divisible-by``
times the tensor-parallel size (``_vocab_size_with_padding``), so the padding depends on TP: a
vocabulary of 512 with ``--make-vocab-size-divisible-by 192`` has 768 rows at TP=2 and 576 at
TP=1. A checkpoint stores the embedding and output layer as global tensors of its writer's
rows (``args.padded_vocab_size``, our manifest's ``model_config``). A model read at another TP
must have those rows, not this TP's padding: Megatron-LM's ``--use-checkpoint-args`` copies
``padded_vocab_size`` from the checkpoint for exactly this reason, and ``tools/evaluate.py``
(which reads the model from the checkpoint, as that flag does) passes it in
``DataConfig.padded_vocab_size``. Pure functions, no megatron-core import.
"""

from __future__ import annotations

from megatron_wsm.config import ConfigError


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary so it splits evenly over TP ranks."""
    step = multiple * tp_size
    return ((vocab_size + step - 1) // step) * step


def model_vocab_rows(
    vocab_size: int, tp_size: int, multiple: int, recorded: int | None = None
) -> int:
    """The embedding's rows for a model of ``vocab_size`` tokens at TP ``tp_size``.

    ``recorded``: the rows of the checkpoint the model is read from (None: a new model, padded
    as Megatron-LM pads for this TP). A recorded size is taken as it is (the checkpoint's
    global shape; its padded rows stay what they were, never tokens) once it is checked to
    hold every token and split evenly over this run's TP ranks (megatron-core's
    ``VocabParallelEmbedding`` needs that); otherwise ConfigError names the way out.
    """
    if recorded is None:
        return padded_vocab_size(vocab_size, tp_size, multiple)
    if recorded < vocab_size:
        raise ConfigError(
            f"the checkpoint's embedding has {recorded} rows, fewer than the tokenizer's "
            f"{vocab_size} tokens: another tokenizer than the one the model was trained with?"
        )
    if recorded % tp_size:
        fits = [tp for tp in range(1, min(recorded, 16) + 1) if recorded % tp == 0]
        raise ConfigError(
            f"the checkpoint's embedding has {recorded} rows (its vocabulary padded at the "
            f"writer's TP size), which do not split over --tensor-model-parallel-size "
            f"{tp_size}; read it at a TP size dividing {recorded} "
            f"({', '.join(map(str, fits))})"
        )
    return recorded


def padding_mismatch_hint(recorded: int, vocab_size: int | None, tp_size: int) -> str:
    """Why a checkpoint's embedding rows (``recorded``) differ from this run's, and the
    Megatron-LM flag that gives this run the same rows: ``--make-vocab-size-divisible-by
    recorded / TP`` pads any vocabulary of at most ``recorded`` tokens to exactly
    ``recorded`` rows. An empty string when no such flag exists (the rows do not split over
    this TP, or the vocabulary is larger)."""
    if recorded % tp_size or (vocab_size is not None and vocab_size > recorded):
        return ""
    return (
        f"the checkpoint's vocabulary is padded to {recorded} rows, this run's TP "
        f"{tp_size} pads it differently (Megatron-LM pads to a multiple of "
        "--make-vocab-size-divisible-by times the TP size); to continue training it at this "
        f"TP pass --make-vocab-size-divisible-by {recorded // tp_size}, which gives the same "
        f"{recorded} rows (tools/evaluate.py and tools/export_hf.py take them from the "
        "checkpoint themselves)"
    )
