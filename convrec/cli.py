"""The ``convrec`` command line."""

from __future__ import annotations

import argparse
import sys


def _bench_encoder(args: argparse.Namespace) -> None:
    from convrec.bench.encoder_cost import compare_encoders, format_table

    rows = compare_encoders(args.lengths, args.batch_size, args.d_model, args.repeats, args.seed)
    print(format_table(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convrec", description="ConvRec: linear-cost sequential recommendation."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench", required=True
    )
    encoder = bench.add_parser(
        "encoder",
        help="forward+backward time and saved-activation bytes, ConvRecEncoder vs SASRec",
    )
    encoder.add_argument("--lengths", type=int, nargs="+", default=[50, 512, 2048])
    encoder.add_argument("--batch-size", type=int, default=32)
    encoder.add_argument("--d-model", type=int, default=64)
    encoder.add_argument("--repeats", type=int, default=5)
    encoder.add_argument("--seed", type=int, default=0)
    encoder.set_defaults(run=_bench_encoder)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
