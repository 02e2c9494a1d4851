"""Megatron-LM launch flags that ``pretrain_moe.py`` accepts without effect, or refuses.

A Megatron-LM launch script should run here unchanged. Its flags fall in three kinds:

* flags a config class declares (``megatron_wsm.config``): parsed with their meaning;
* :data:`NO_EFFECT`: flags that only select kernels, fusions, overlap, memory behaviour or
  logging extras on a GPU. They are accepted with Megatron-LM's syntax (a switch or a value,
  from :data:`megatron_lm_options.OPTIONS`) and reported once ("accepted, no effect here");
  :data:`ACCEPTED_VALUES` limits the values of those whose other values would matter;
* anything else is refused before any process group starts, every offending flag in one
  message (:func:`unknown_flag_report`): a Megatron-LM flag with its reason
  (:data:`UNSUPPORTED`, else "not supported by megatron-wsm yet"), or a flag Megatron-LM does
  not know either, with the closest known flag.

The tables are data about Megatron-LM's interface; the generated option list is
``megatron_lm_options.py`` (its header names the command and the Megatron-LM commit).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence

from megatron_wsm.megatron_lm_options import OPTIONS

__all__ = [
    "ACCEPTED_VALUES",
    "NO_EFFECT",
    "UNSUPPORTED",
    "add_no_effect_flags",
    "given_no_effect",
    "unknown_flag_report",
]

_FUSION = (
    "selects a fused GPU kernel only (same model, same results up to rounding); megatron-wsm "
    "leaves this fusion off"
)
_OVERLAP = (
    "overlaps GPU communication with compute (same results); not wired to megatron-core here: "
    "the communication is not overlapped"
)
_NOT_TB = "Megatron-LM's extra timers/memory logging do not exist here"

#: Megatron-LM option -> why it has no effect here (accepted, reported once).
NO_EFFECT: dict[str, str] = {
    "--use-mcore-models": "megatron-wsm always builds megatron-core's GPTModel",
    "--no-bias-swiglu-fusion": _FUSION,
    "--no-bias-gelu-fusion": _FUSION,
    "--no-persist-layer-norm": _FUSION,
    "--cross-entropy-loss-fusion": _FUSION,
    "--cross-entropy-fusion-impl": _FUSION,
    "--moe-permute-fusion": _FUSION,
    "--use-flash-attn": (
        "the attention kernel follows the layer spec (Transformer Engine picks its own backend)"
    ),
    "--attention-backend": (
        "the attention kernel follows the layer spec here (Transformer Engine's where it is "
        "usable, megatron-core's local DotProductAttention otherwise)"
    ),
    "--tp-comm-overlap": _OVERLAP,
    "--overlap-moe-expert-parallel-comm": _OVERLAP,
    "--overlap-param-gather-with-optimizer-step": _OVERLAP,
    "--overlap-p2p-communication-warmup-flush": _OVERLAP,
    "--no-overlap-p2p-communication": "pipeline send/receive is not overlapped here anyway",
    "--te-rng-tracker": "megatron-core's own RNG tracker is used (a CPU one without CUDA)",
    "--no-create-attention-mask-in-dataloader": (
        "megatron-wsm never builds attention masks in the dataloader (causal mask type)"
    ),
    "--log-throughput": (
        "throughput is always logged (console tok/s, TensorBoard throughput/tokens-per-sec)"
    ),
    "--log-validation-ppl-to-tensorboard": (
        "validation perplexity is always written (validation/lm loss ppl)"
    ),
    "--tensorboard-log-interval": "TensorBoard scalars are written every iteration",
    "--tensorboard-queue-size": "the TensorBoard writer's queue is fixed (50)",
    "--log-timers-to-tensorboard": _NOT_TB + " (iteration-time is written)",
    "--log-memory-to-tensorboard": _NOT_TB,
    "--log-world-size-to-tensorboard": _NOT_TB,
    "--no-log-loss-scale-to-tensorboard": "no loss scaling here (fp32 or bf16)",
    "--timing-log-level": _NOT_TB,
    "--timing-log-option": _NOT_TB,
    "--empty-unused-memory-level": "the CUDA caching allocator is left alone",
    "--manual-gc": "Python's garbage collector is left alone",
    "--manual-gc-interval": "Python's garbage collector is left alone",
    "--ckpt-format": "full checkpoints are always torch_dist (megatron-core dist_checkpointing)",
    "--auto-detect-ckpt-format": "checkpoints are always torch_dist",
}

#: Megatron-LM option -> the values accepted without effect (others would change the run).
ACCEPTED_VALUES: dict[str, tuple[str, ...]] = {
    "--ckpt-format": ("torch_dist",),
}

#: Megatron-LM option -> why megatron-wsm refuses it (others: "not supported ... yet").
UNSUPPORTED: dict[str, str] = {
    "--fp16": "fp16 with loss scaling is not supported; use --bf16",
    "--fp8-format": "FP8 training (Transformer Engine) is not supported",
    "--use-torch-fsdp2": "FSDP is not supported; use --use-distributed-optimizer",
    "--use-megatron-fsdp": "FSDP is not supported; use --use-distributed-optimizer",
    "--num-layers-per-virtual-pipeline-stage": "the interleaved pipeline schedule is not "
    "supported yet",
    "--num-virtual-stages-per-pipeline-rank": "the interleaved pipeline schedule is not "
    "supported yet",
    "--decoder-first-pipeline-num-layers": "uneven pipeline stages are not supported yet",
    "--decoder-last-pipeline-num-layers": "uneven pipeline stages are not supported yet",
    "--expert-tensor-parallel-size": "expert tensor parallelism follows "
    "--tensor-model-parallel-size here",
    "--mtp-num-layers": "multi-token prediction is not supported yet",
    "--log-params-norm": "the parameter norm is not logged yet",
    "--log-num-zeros-in-grad": "zeros in the gradient are not counted yet",
}

_DEST = "megatron_lm_no_effect__"


def _takes(option: str) -> str:
    return OPTIONS.get(option, "0")


def add_no_effect_flags(parser: argparse.ArgumentParser) -> None:
    """Add every :data:`NO_EFFECT` option the parser does not already have (a config class
    that declares one wins), with Megatron-LM's syntax: a switch or its number of values."""
    have = {s for action in parser._actions for s in action.option_strings}
    group = parser.add_argument_group(
        "Megatron-LM flags accepted without effect here (each reported once)"
    )
    for option in sorted(set(NO_EFFECT) - have):
        dest = _DEST + option.lstrip("-").replace("-", "_")
        note = f"no effect here: {NO_EFFECT[option]}"
        arity = _takes(option)
        if arity == "0":
            group.add_argument(option, dest=dest, action="store_const", const=True, help=note)
            continue
        kw = {} if arity == "1" else {"nargs": int(arity) if arity.isdigit() else arity}
        choices = ACCEPTED_VALUES.get(option)
        group.add_argument(option, dest=dest, choices=choices, metavar="VALUE", help=note, **kw)


def given_no_effect(ns: argparse.Namespace) -> list[str]:
    """One line per accepted-without-effect flag given on the command line."""
    lines = []
    for option in sorted(NO_EFFECT):
        value = getattr(ns, _DEST + option.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        shown = option if value is True else f"{option} {_words(value)}"
        lines.append(f"accepted, no effect here: {shown}: {NO_EFFECT[option]}")
    return lines


def _words(value: object) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _closest(option: str, known: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(option, sorted(known), n=1, cutoff=0.6)
    return match[0] if match else None


def _is_value(word: str) -> bool:
    """A word that is not an option (``-1`` and ``-1e-3`` are values)."""
    if not word.startswith("-"):
        return True
    try:
        float(word)
    except ValueError:
        return False
    return True


def _values_of(option: str, words: Sequence[str], start: int) -> int:
    """How many of ``words[start:]`` are the values of Megatron-LM ``option``."""
    arity = _takes(option)
    if arity.isdigit():
        return min(int(arity), len(words) - start)
    n = 0
    while start + n < len(words) and _is_value(words[start + n]):
        n += 1
        if arity == "?":
            break
    return n


def unknown_flag_report(words: Sequence[str], known: Iterable[str]) -> list[str]:
    """One line per word of ``words`` (argparse's leftovers) that no parser option took.

    ``known``: the options ``pretrain_moe.py`` accepts (for "did you mean"). A Megatron-LM
    flag's values are skipped (not reported as strays); ``--flag=value`` is one word.
    """
    known = set(known)
    lines: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-") or word in ("-", "--"):
            lines.append(f"{word!r}: a value without its flag")
            continue
        option, has_value, _ = word.partition("=")
        if option in OPTIONS:
            if not has_value:
                i += _values_of(option, words, i)
            if option in known:  # ours, but argparse left it (a value it could not take)
                reason = "its value is missing or malformed"
            else:
                reason = UNSUPPORTED.get(option, "not supported by megatron-wsm yet")
            lines.append(f"{option}: a Megatron-LM flag; {reason}")
            continue
        values = []
        while not has_value and i < len(words) and _is_value(words[i]):
            values.append(words[i])  # its value(s), taken with it rather than as strays
            i += 1
        guess = _closest(option, known | set(OPTIONS))
        hint = f"; did you mean {guess}?" if guess else ""
        lines.append(f"{' '.join([option, *values])}: unknown to Megatron-LM as well{hint}")
    return lines
