"""``python benchmarks/scaling.py``: the scaling sweep of ``convrec bench scaling``, as a script."""

from __future__ import annotations

import argparse

from convrec.bench.scaling import DESCRIPTION, add_arguments, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/scaling.py", description=DESCRIPTION)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
