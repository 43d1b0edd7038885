"""Side-by-side benchmarks of pyro_nf's flow guides against Pyro's built-in guides.

Run ``python -m benchmarks.guides --help``; the results and the exact command live in
``docs/benchmarks.md``.
"""
