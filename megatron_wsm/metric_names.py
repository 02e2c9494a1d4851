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
