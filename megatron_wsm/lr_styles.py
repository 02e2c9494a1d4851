"""The learning-rate schedule names we accept and megatron-core's name for each (pure tables).

Standard library only, so that ``config`` can offer them as ``--lr-decay-style`` /
``--lr-wsd-decay-style`` choices and check a schedule without importing megatron-core;
``lr.py`` maps them when it builds megatron-core's ``OptimizerParamScheduler``.
"""

from __future__ import annotations

#: ``--lr-decay-style`` values and the megatron-core style each maps to. ``stable`` (warmup,
#: then the peak LR held to the end: the "S" of WSM) is our name for megatron-core's ``constant``.
DECAY_STYLES = {
    "stable": "constant",
    "constant": "constant",
    "WSD": "WSD",
    "cosine": "cosine",
    "linear": "linear",
    "inverse-square-root": "inverse-square-root",
}

#: ``--lr-wsd-decay-style`` values and the megatron-core name of each (``1-sqrt`` is what
#: megatron-core calls ``minus_sqrt``).
WSD_DECAY_STYLES = {
    "linear": "linear",
    "cosine": "cosine",
    "exponential": "exponential",
    "1-sqrt": "minus_sqrt",
    "minus_sqrt": "minus_sqrt",
}
