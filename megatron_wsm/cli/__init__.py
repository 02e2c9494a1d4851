"""Command-line entry points of megatron-wsm (thin wrappers live in ``tools/``)."""
