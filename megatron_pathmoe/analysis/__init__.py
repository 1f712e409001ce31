"""Expert-path analysis (paper sections 3.1, 3.3, 5, 7 and Appendix A).

- ``path_arrays``: the on-disk recording format (the only module that defines it);
- ``recorder``: forward hooks on megatron routers that stream top-k experts to a recording;
- ``forward``: evaluation forwards over a token stream (data, micro-batch plan, perplexity);
- ``paths``: the top-1 path distribution: entropy, unique paths, coverage, frequent paths;
- ``alignment``: matching expert indices across layers (Hungarian);
- ``consistency``: correlation, Jaccard consistency, sustained engagement, usage entropy;
- ``load``: expert load and balance statistics;
- ``categories``: Table 9 token categories and path specialisation;
- ``robustness``: perplexity under random expert permutations;
- ``report`` / ``plots`` / ``pipeline`` / ``cli``: the tools/analyze_paths.py pipeline;
- ``record_paths``: the most frequent top-1 paths of a checkpoint (for
  ``--moe-path-restriction``), counted by the recorder's ``Top1PathRecorder``;
- ``synthetic``: routing recordings with a known structure.

The metric modules never import megatron: they run on a recording alone. The rest loads models
through ``checkpoint/`` on ``runtime/``, never through ``training/``.
"""

from megatron_pathmoe.analysis.path_arrays import (
    ExpertPaths,
    PathFormatError,
    PathWriter,
    load_paths,
    save_paths,
)
from megatron_pathmoe.analysis.report import path_report

__all__ = ["ExpertPaths", "PathFormatError", "PathWriter", "load_paths", "path_report",
           "save_paths"]
