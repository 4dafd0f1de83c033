"""Benchmark of fused_opt's optimizer steps against torch.optim and the peer libraries:
`python -m fused_opt.bench --help`.

workloads.py, implementations.py and peers.py say what is measured, harness.py measures it (and only
that), report.py prints and stores the results, plot.py draws them, progress.py shows how far a run is,
and __main__.py is the command line that joins them.
"""
