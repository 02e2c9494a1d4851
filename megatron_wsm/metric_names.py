"""TensorBoard tags of the trainer, defined once (MoE violation tags live in moe_metrics)."""

LM_LOSS = "lm loss"
LM_LOSS_VS_TOKENS = "lm loss vs tokens"
LEARNING_RATE = "learning-rate"
LEARNING_RATE_VS_TOKENS = "learning-rate vs tokens"
GRAD_NORM = "grad-norm"
TOKENS_PER_SECOND = "throughput/tokens-per-sec"
ITERATION_TIME = "iteration-time"
CONSUMED_TOKENS = "consumed-tokens"
CONSUMED_SAMPLES = "consumed-samples"
MOE_AUX_LOSS = "load_balancing_loss"  # megatron-core's own tracker name
VALID_LOSS = "validation/lm loss"
VALID_PPL = "validation/lm loss ppl"


def wsm_readout(tag: str, method: str) -> str:
    """The tag of a merged-window readout (``--wsm-eval-methods``) next to the live ``tag``:
    ``validation/lm loss`` → ``validation/lm loss wsm-1-sqrt``; the perplexity tag keeps its
    ``ppl`` suffix last (``validation/lm loss wsm-1-sqrt ppl``)."""
    if tag.endswith(" ppl"):
        return f"{tag[: -len(' ppl')]} wsm-{method} ppl"
    return f"{tag} wsm-{method}"
