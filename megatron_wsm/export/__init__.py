"""Export checkpoints to the Hugging Face Mixtral layout."""
