"""Accuracy benchmark on the S3-Rec data: ConvRec vs our SASRec vs published numbers.

    python benchmarks/accuracy.py benchmarks/configs/accuracy/*.toml --jobs 2

is ``convrec bench accuracy`` (see ``convrec.bench.accuracy``); writes accuracy.md/.csv to --out.
"""

from __future__ import annotations

import argparse
import sys

from convrec.bench.accuracy import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(), "python " + " ".join(sys.argv))
