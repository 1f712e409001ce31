"""megatron-pathmoe: Path-Constrained Mixture-of-Experts (block-shared routers) on Megatron-Core.

The data path reads through the subpackages: ``data`` (tokenizer, .bin/.idx, GPTDataset) ->
``training`` (megatron-core schedules, DDP, optimizer) over a model from ``model`` whose routers
come from ``routing``; ``platform`` lets the same code run on CPU over gloo.
"""

__version__ = "0.1.0"
