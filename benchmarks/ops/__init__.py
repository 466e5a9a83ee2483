"""One module per op benchmark (its shapes, input factory and cost model) and their common
form (``spec``). ``benchmarks.registry`` gathers them.

Importing this package switches Triton to its CPU interpreter when ``CONVREC_BENCH_INTERPRET=1``
and no GPU is visible: the switch only works before triton is imported, which importing
``convrec`` does, and every op module imports ``convrec`` after this file has run.
"""

import os

import torch

INTERPRET = os.environ.get("CONVREC_BENCH_INTERPRET") == "1" and not torch.cuda.is_available()
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")
