"""python -m bench study: the 2013 ABI debate measured (issue 11), and its decision report.

Every experiment is a set of configurations; a configuration (one seed of it) is one task that
runs in a subprocess on a Dask worker and returns plain results (runner.py). The report
(report.py, plots.py) and the decisions (decisions.py) are computed from those results only.
"""
