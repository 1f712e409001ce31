"""The paper's comparison on a CPU: which variants (``variants``), how each run is trained,
evaluated and analysed (``runner``), and how the runs become tables with seed statistics:
the final models of the small study (``report``, ``benchmarks/paper_small.py``) and the
checkpoint trajectories of the medium study (``trajectory``, ``benchmarks/paper_medium.py``,
on the mixed-domain corpus of ``corpus``)."""
