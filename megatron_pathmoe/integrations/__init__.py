"""Integrations of PathMoE routing into other training stacks (top of the layer contract:
nothing in the package imports these). Each sub-package imports its stack lazily."""
