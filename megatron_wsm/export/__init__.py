"""Export checkpoints to Hugging Face: Mixtral, Qwen3-MoE, DeepSeek-V2 or DeepSeek-V3."""
