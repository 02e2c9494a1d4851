"""``--moe-layer-freq``: which layers are MoE, parsed without ``eval`` (a pure function).

Megatron-LM's ``moe_freq_type`` takes an integer N (one MoE layer every N layers, layer 0 first)
or a Python list expression such as ``"([0]+[1]*26)"`` or ``"[0]*3+[1]*58"`` and ``eval()``s the
latter. A launch script is data here: the expression is parsed with :mod:`ast` and only list
literals of 0/1, ``+`` (concatenation), ``*`` by a non-negative integer and parentheses are
evaluated; anything else (names, calls, attributes, other operators, huge repetitions) is
refused with a message that says what was found.
"""

from __future__ import annotations

import ast

#: Longest pattern accepted (far above any real model's layer count; bounds memory and time).
MAX_PATTERN_LENGTH = 100_000
#: Longest expression text accepted.
MAX_EXPRESSION_CHARS = 10_000


class LayerFreqError(ValueError):
    """A ``--moe-layer-freq`` value that is not an integer or a 0/1 list expression."""


def _length(node: ast.AST, text: str) -> int:
    """Length of the list ``node`` evaluates to, checked before anything is built."""
    if isinstance(node, ast.List):
        for elt in node.elts:
            if not (
                isinstance(elt, ast.Constant) and type(elt.value) is int and elt.value in (0, 1)
            ):
                raise LayerFreqError(
                    f"--moe-layer-freq {text!r}: list elements must be 0 (dense) or 1 (MoE), "
                    f"found {ast.unparse(elt)!r}"
                )
        return len(node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _length(node.left, text) + _length(node.right, text)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        lst, count = node.left, node.right
        if isinstance(lst, ast.Constant):  # 3*[0] as well as [0]*3
            lst, count = count, lst
        if not (isinstance(count, ast.Constant) and type(count.value) is int):
            raise LayerFreqError(
                f"--moe-layer-freq {text!r}: a list can only be repeated by an integer literal, "
                f"found {ast.unparse(node)!r}"
            )
        if count.value < 0:
            raise LayerFreqError(f"--moe-layer-freq {text!r}: negative repetition")
        n = _length(lst, text) * count.value
        if n > MAX_PATTERN_LENGTH:
            raise LayerFreqError(
                f"--moe-layer-freq {text!r}: pattern longer than {MAX_PATTERN_LENGTH} layers"
            )
        return n
    raise LayerFreqError(
        f"--moe-layer-freq {text!r}: only list literals of 0/1, '+', '*' by an integer and "
        f"parentheses are allowed, found {ast.unparse(node)!r}"
    )


def _build(node: ast.AST) -> list[int]:
    """Evaluate a node that :func:`_length` accepted."""
    if isinstance(node, ast.List):
        return [elt.value for elt in node.elts]  # type: ignore[attr-defined]
    assert isinstance(node, ast.BinOp)
    if isinstance(node.op, ast.Add):
        return _build(node.left) + _build(node.right)
    lst, count = node.left, node.right
    if isinstance(lst, ast.Constant):
        lst, count = count, lst
    return _build(lst) * count.value  # type: ignore[attr-defined]


def parse_moe_layer_freq(value: int | str | list[int]) -> int | list[int]:
    """``--moe-layer-freq`` → an int N ≥ 1 or a list of 0/1 (1: MoE layer), as megatron-core's
    ``TransformerConfig.moe_layer_freq`` takes it.

    ``"2"`` → 2; ``"([0]+[1]*3)"`` → ``[0, 1, 1, 1]``. A list is checked and returned as a
    new list; whether its length matches ``--num-layers`` is the caller's check.
    """
    if isinstance(value, bool):
        raise LayerFreqError(f"--moe-layer-freq {value!r}: not an integer or a list")
    if isinstance(value, int):
        if value < 1:
            raise LayerFreqError(f"--moe-layer-freq {value}: must be ≥ 1")
        return value
    if isinstance(value, list):
        if not all(type(v) is int and v in (0, 1) for v in value):
            raise LayerFreqError(f"--moe-layer-freq {value!r}: list elements must be 0 or 1")
        if len(value) > MAX_PATTERN_LENGTH:
            raise LayerFreqError(f"--moe-layer-freq: pattern longer than {MAX_PATTERN_LENGTH}")
        return list(value)
    if not isinstance(value, str):
        raise LayerFreqError(f"--moe-layer-freq {value!r}: not an integer or a list expression")
    text = value.strip()
    if len(text) > MAX_EXPRESSION_CHARS:
        raise LayerFreqError(f"--moe-layer-freq: expression longer than {MAX_EXPRESSION_CHARS}")
    if "[" not in text:  # Megatron-LM: a plain integer, given as a string
        try:
            number = int(text)
        except ValueError:
            raise LayerFreqError(
                f"--moe-layer-freq {value!r}: not an integer or a list expression"
            ) from None
        return parse_moe_layer_freq(number)
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise LayerFreqError(f"--moe-layer-freq {value!r}: not a list expression ({e})") from None
    try:
        _length(tree.body, value)
        return _build(tree.body)
    except RecursionError:
        raise LayerFreqError(f"--moe-layer-freq {value!r}: expression nested too deeply") from None


def moe_layer_pattern(freq: int | list[int], num_layers: int) -> list[int]:
    """Per layer (global index from 0): 1 for an MoE layer, 0 for a dense one, as megatron-core's
    ``get_gpt_decoder_layer_specs`` lays them out (int N: layer i is MoE when i % N == 0)."""
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    if len(freq) != num_layers:
        raise LayerFreqError(
            f"--moe-layer-freq gives {len(freq)} layers but --num-layers is {num_layers}"
        )
    return list(freq)
