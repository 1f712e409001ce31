"""The paper's comparison at small scale (``benchmarks/paper_small.py``): which variants
(``variants``), how each run is trained, evaluated and analysed (``runner``), and how the runs
become the paper's tables with seed statistics (``report``)."""
