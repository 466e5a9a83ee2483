"""Research harness of convrec, run from a checkout (never shipped in the wheel).

Each driver is a module run from the repository root::

    python -m benchmarks.accuracy benchmarks/configs/accuracy/*.toml   # S3-Rec accuracy
    python -m benchmarks.scaling --device cpu                          # time/memory vs L
    python -m benchmarks.kernels                                       # op microbenchmarks
    python -m benchmarks.downscale_table                               # downscale side by side
    python -m benchmarks.serving_throughput                            # Recommender requests/s

The op microbenchmarks share one registry of op cases (``benchmarks.registry``). Modules here
import ``convrec``; nothing in ``convrec`` imports them.
"""
