"""The runtime: ``solver.LayerParallelSolve`` runs a ``SolvePlan`` (``ir.plan``); ``scan`` holds the
corrections' prefix scans; ``handle.SolveHandle`` is the public handle of its run-time state. The
runtime imports no pass."""
