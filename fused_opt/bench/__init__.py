"""Benchmark of fused_opt's optimizer steps against torch.optim: `python -m fused_opt.bench --help`.

workloads.py and implementations.py say what is measured, harness.py measures it, report.py prints and
stores the results, and __main__.py is the command line that joins them.
"""
