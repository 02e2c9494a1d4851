"""megatron-wsm: MoE pretraining on megatron-core with Warmup-Stable-Merge."""

__version__ = "0.1.0"
