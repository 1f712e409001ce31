"""Arguments, the megatron-core training loop, and its logging."""
