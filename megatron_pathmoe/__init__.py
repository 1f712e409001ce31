"""megatron-pathmoe: Path-Constrained Mixture-of-Experts (block-shared routers) on Megatron-Core.

The data path reads through the subpackages: ``data`` (tokenizer, .bin/.idx, GPTDataset) ->
``training`` (megatron-core schedules, DDP, optimizer) over a model from ``model`` whose routers
come from ``routing`` -> ``checkpoint`` -> ``convert`` | ``analysis`` | ``eval``.

Layers, top to bottom (``lint-imports`` checks them; a module imports only from below):
``study`` -> ``eval`` | ``analysis`` -> ``training`` | ``convert`` | ``integrations`` ->
``checkpoint`` | ``monitoring`` -> ``runtime`` -> ``model`` -> ``parallel`` -> ``routing`` ->
``ops`` | ``data`` -> ``config`` -> ``platform`` | ``expert_paths``. See the README, "Layout".
"""

__version__ = "0.1.0"
