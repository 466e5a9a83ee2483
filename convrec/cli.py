"""The ``convrec`` command line: train, evaluate, recommend, export, demo, bench.

Errors end the command with one line, ``convrec: error: <message>``, and an exit code that says
what kind of problem it was (``EXIT_CODES``); ``--debug`` shows the traceback instead. Ctrl-C
stops with ``convrec: interrupted`` (130); atomic writes leave no torn file behind.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
from typing import NoReturn

from convrec import __version__
from convrec.readouts import READOUTS
from convrec.training.config import ConfigError, TrainConfig

# Exit codes by kind of problem (README "Errors and exit codes").
EXIT_ERROR = 1  # the work itself failed (e.g. the loss diverged)
EXIT_USAGE = 2  # a bad flag or setting (argparse uses 2 too)
EXIT_INPUT = 3  # an input file is missing, malformed, or not what it claims to be
EXIT_OUTPUT = 4  # the output cannot be written: folder in use, holds a run, not writable
EXIT_INTERRUPTED = 130  # Ctrl-C


class UsageError(ValueError):
    """A flag value refused before any work."""


def _exit_code(error: BaseException) -> int:
    """The exit code for an error (see the ``EXIT_*`` constants)."""
    from convrec.checkpoint_file import CheckpointError
    from convrec.data.dataset import DataFormatError
    from convrec.serving.export import ExportError
    from convrec.training.run_folder import RunFolderError

    if isinstance(error, UsageError | ConfigError):
        return EXIT_USAGE
    if isinstance(error, RunFolderError | FileExistsError | PermissionError):
        return EXIT_OUTPUT
    if isinstance(error, FileNotFoundError | DataFormatError | CheckpointError | ExportError):
        return EXIT_INPUT
    return EXIT_ERROR


def _one_line(error: BaseException) -> str:
    """The error's message on one line; unexpected kinds of error also say their type."""
    lines = str(error).strip().splitlines() or [""]
    message = lines[0] + (" ..." if len(lines) > 1 else "")
    expected = (ValueError, OSError, RuntimeError, TypeError, ArithmeticError)
    if not isinstance(error, expected) or not message:
        message = f"{type(error).__name__}: {message}".rstrip(": ")
    return message


def _threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (intra-op threads of this process) before any work."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _levels(text: str) -> list[list[int]]:
    """ "2,2 5,5 7,7" -> [[2, 2], [5, 5], [7, 7]]."""
    try:
        return [[int(v) for v in pair.split(",")] for pair in text.split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"levels must look like '2,2 5,5 7,7', got {text!r}"
        ) from None


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """Flags of TrainConfig; absent flags keep the config file's value or the default."""
    s = argparse.SUPPRESS
    d = TrainConfig()
    p.add_argument("--data", default=s, help=f"dataset path or 'synthetic' (default {d.data})")
    p.add_argument(
        "--format",
        default=s,
        choices=["auto", "s3rec", "recbole", "movielens", "synthetic"],
        help="dataset format (default auto: detected from the files present)",
    )
    p.add_argument("--timestamps", default=s, help="S3-Rec: aligned timestamp file")
    p.add_argument("--min-length", type=int, default=s, help="drop users with fewer items (3)")
    p.add_argument("--k-core", type=int, default=s, help="iterative k-core filter (>= 1)")
    p.add_argument("--model", default=s, choices=["convrec", "sasrec"], help="default convrec")
    p.add_argument("--max-len", type=int, default=s, help=f"history length (default {d.max_len})")
    p.add_argument("--d-model", type=int, default=s, help=f"width (default {d.d_model})")
    p.add_argument("--levels", type=_levels, default=s, help="convrec levels, e.g. '2,2 5,5 7,7'")
    p.add_argument("--heads", type=int, default=s, help="conv heads (1) / attention heads (2)")
    p.add_argument("--blocks", type=int, default=s, help="sasrec blocks (2)")
    p.add_argument("--dropout", type=float, default=s, help="0.1 convrec, 0.2 sasrec")
    p.add_argument(
        "--mask-aware", action="store_true", default=s, help="exclude padding from pools"
    )
    p.add_argument(
        "--input-dropout", type=float, default=s, help="convrec: on history item vectors (0)"
    )
    p.add_argument(
        "--readout",
        dest="readouts",
        action="append",
        choices=list(READOUTS),
        default=s,
        metavar="NAME",
        help="convrec: add a readout's term to the user vector (repeatable): "
        + "; ".join(
            f"{name}: {spec.adds} (reads the {spec.reads})" for name, spec in READOUTS.items()
        ),
    )
    p.add_argument(
        "--faithful", action="store_true", default=s, help="the authors' model (convrec.compat)"
    )
    p.add_argument(
        "--leak-target-date",
        action="store_true",
        default=s,
        help="faithful: give candidates the target's date, the paper code's protocol "
        "(leaks the answer's timestamp; sampled loss and protocol only)",
    )
    p.add_argument(
        "--streaming",
        action="store_true",
        default=s,
        help="convrec: windows anchored at the first event, so all-positions trains every "
        "target of a window in one forward (levels need kernel = stride)",
    )
    p.add_argument(
        "--newest-last",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="streaming: each level's open window holds the items that have arrived in its "
        "last slots, so the newest meets the last kernel offset (default for --streaming; "
        "--no-newest-last keeps them in place, a push state k vectors per level smaller)",
    )
    p.add_argument(
        "--no-attributes",
        dest="use_attributes",
        action="store_false",
        default=s,
        help="ignore the dataset's item attributes",
    )
    p.add_argument(
        "--use-time", action="store_true", default=s, help="time context from timestamps"
    )
    p.add_argument(
        "--backend",
        default=s,
        choices=["auto", "reference", "triton", "cpp", "cuda"],
        help="operator implementation (default auto: the fastest that runs here)",
    )
    p.add_argument("--loss", default=s, choices=["full", "sampled"], help="full softmax (default)")
    p.add_argument("--negatives", type=int, default=s, help="sampled-softmax negatives (100)")
    p.add_argument(
        "--train-sampling",
        default=s,
        choices=["random-cut", "all-prefixes", "all-positions"],
        help="one target per user, every prefix, or every slot of a causal model (sasrec, "
        "or convrec --streaming)",
    )
    p.add_argument(
        "--window-step",
        type=int,
        default=s,
        help="all-positions: windows of --max-len step back by this many targets and train "
        "only their last ones, the earlier slots serving as context (default --max-len: "
        "disjoint windows; a smaller step gives every target at least max-len - step earlier "
        "items)",
    )
    p.add_argument("--epochs", type=int, default=s, help=f"maximum epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=s, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=s, help=f"AdamW learning rate (default {d.lr})")
    p.add_argument("--weight-decay", type=float, default=s, help=f"default {d.weight_decay}")
    p.add_argument("--grad-clip", type=float, default=s, help="max gradient norm, 0 = off (1.0)")
    p.add_argument("--patience", type=int, default=s, help="epochs without improvement (10)")
    p.add_argument(
        "--select", default=s, help="validation metric to keep the best of (default full/NDCG@10)"
    )
    p.add_argument(
        "--protocols",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        default=s,
        help="evaluation protocols, comma-separated (default full,sampled; sampled needs 99 "
        "unseen items per user, so give 'full' for datasets of fewer than 100 items)",
    )
    p.add_argument("--eval-batch-size", type=int, default=s, help=f"default {d.eval_batch_size}")
    p.add_argument(
        "--time-budget",
        type=float,
        default=s,
        help="seconds of training; checked after every step, the epoch it runs out in is the last",
    )
    p.add_argument("--seed", type=int, default=s, help=f"random seed (default {d.seed})")
    p.add_argument("--device", default=s, choices=["cpu", "cuda"], help="default cpu")
    p.add_argument(
        "--compile",
        action="store_true",
        default=s,
        help="run the training step under torch.compile (CUDA graphs on CUDA)",
    )


def _train(args: argparse.Namespace) -> None:
    from convrec.training.allocator import keep_freed_memory
    from convrec.training.config import read_config_file
    from convrec.training.trainer import train

    values = read_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    try:
        config = TrainConfig.from_dict(values | flags).check()
    except ConfigError as error:  # name where the setting came from: the flag or the file
        if error.key in flags:
            flag = args.flag_names.get(error.key, error.key)
            message = str(error)
            if message.startswith((f"{error.key} must", f"{error.key}=")):
                message = flag + message[len(error.key) :]
            else:
                message = f"{flag}: {message}"
            raise ConfigError(error.key, message) from None
        if args.config:
            raise ConfigError(error.key, f"{args.config}: {error}") from None
        raise
    keep_freed_memory()  # a training loop reuses its large blocks (convrec.training.allocator)
    summary = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process prints
        print(json.dumps(summary["test"], indent=2, sort_keys=True))


def _load_for_inference(checkpoint: str, data_path: str | None):
    """(checkpoint payload, its config with ``data_path`` applied, the model in eval mode)."""
    from convrec.checkpoint_file import load_checkpoint
    from convrec.registry import build_model

    saved = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(saved["config"])
    if data_path is not None:
        config.data = data_path
    model = build_model(saved["model_spec"])
    model.load_state_dict(saved["model"])
    model.eval()
    return saved, config, model


def _training_data(config: TrainConfig, given: str | None):
    """The dataset a checkpoint was trained on (or ``--data``), with a hint when it is gone."""
    from convrec.data.load import check_data_path
    from convrec.training.trainer import load_training_data

    if given is None and config.data != "synthetic":
        try:
            check_data_path(config.data)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error} (the checkpoint's training data): pass --data PATH"
            ) from None
    return load_training_data(config)


def _evaluate(args: argparse.Namespace) -> None:
    from convrec.evaluation.protocols import PROTOCOLS, evaluate, format_metrics

    saved, config, model = _load_for_inference(args.checkpoint, args.data)
    data = _training_data(config, args.data)
    if data.item_ids != saved["item_ids"]:
        raise ValueError(f"{config.data} does not have the item ids this checkpoint was trained on")
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    metrics = evaluate(
        model,
        data,
        args.split,
        protocols,
        max_len=config.max_len,
        batch_size=config.eval_batch_size,
    )
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        print(format_metrics(metrics, data, f"{config.model} on {data.name}, {args.split} split"))


def _recommend(args: argparse.Namespace) -> None:
    import torch

    if args.k < 1:
        raise UsageError(f"-k/--k must be >= 1, got {args.k}")
    if args.history is not None and not args.history.split():
        raise UsageError("--history is empty: give original item ids, e.g. --history '12 873'")
    saved, config, model = _load_for_inference(args.checkpoint, args.data)
    item_ids = saved["item_ids"]
    index = {orig: i for i, orig in enumerate(item_ids) if i > 0}
    times = None
    if args.user is not None:
        data = _training_data(config, args.data)
        users = data.user_index()
        if args.user not in users:
            raise ValueError(f"user {args.user!r} is not in {config.data}")
        history = data.sequences[users[args.user]].tolist()
        if data.timestamps is not None:
            times = data.timestamps[users[args.user]].tolist()
    else:
        unknown = [t for t in args.history.split() if t not in index]
        if unknown:
            raise ValueError(f"unknown item ids in --history: {' '.join(unknown)}")
        history = [index[t] for t in args.history.split()]
    if model.item_encoder.use_time and times is None:
        raise UsageError(
            "this model uses time context: use --user with a dataset that has timestamps"
        )
    history = history[-config.max_len :]
    ids = torch.tensor([[0] * (config.max_len - len(history)) + history])
    stamps = None
    if model.item_encoder.use_time:
        times = times[-config.max_len :]
        stamps = torch.tensor([[0] * (config.max_len - len(times)) + times])
    exclude = None if args.include_seen else ids
    k = min(args.k, model.num_items)  # items left after the exclusions: fewer rows, below
    scores, top = model.recommend(ids, k=k, exclude=exclude, timestamps=stamps)
    print("rank\titem\tscore")
    for rank, (item, score) in enumerate(zip(top[0].tolist(), scores[0].tolist(), strict=True), 1):
        if score != float("-inf"):  # an excluded item: fewer than k were left
            print(f"{rank}\t{item_ids[item]}\t{score:.4f}")


def _export(args: argparse.Namespace) -> None:
    from convrec.serving.export import check_export_path, export_model

    if args.k < 1:
        raise UsageError(f"-k/--k must be >= 1, got {args.k}")
    try:
        check_export_path(args.format, args.out)
    except ValueError as error:
        raise UsageError(str(error)) from None
    export_model(args.checkpoint, args.format, args.out, args.k)
    print(f"wrote {args.out}")


def _demo(args: argparse.Namespace) -> None:
    from convrec.demo import run_demo

    if not args.seconds > 0:
        raise UsageError(f"--seconds must be > 0, got {args.seconds}")
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="convrec-demo-"))
    run_demo(out, seconds=args.seconds, seed=args.seed, progress=not args.no_progress)


def _bench_encoder(args: argparse.Namespace) -> None:
    from convrec.bench.encoder_cost import compare_encoders, format_table, write_results

    rows = compare_encoders(args.lengths, args.batch_size, args.d_model, args.repeats, args.seed)
    table = format_table(rows)
    print(table)
    if args.out:
        write_results(pathlib.Path(args.out), "encoder_cpu", rows, table, "convrec bench encoder")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line (not the whole usage) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="convrec",
        description="ConvRec: linear-cost sequential recommendation.",
        epilog="Errors print one line and exit with 2 (bad flag or setting), 3 (bad or missing "
        "input file), 4 (output folder in use or not writable), 1 (anything else) or 130 "
        "(Ctrl-C); --debug shows the traceback.",
    )
    parser.add_argument("--version", action="version", version=f"convrec {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model and evaluate its best checkpoint")
    _add_train_flags(train)
    train.add_argument("--config", help="JSON or TOML file of settings (flags override it)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--out", required=True, help="folder for checkpoints, logs and metrics")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(
        run=_train,
        flag_names={a.dest: a.option_strings[0] for a in train._actions if a.option_strings},
    )

    evaluate = commands.add_parser("evaluate", help="metrics of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    evaluate.add_argument("--data", help="dataset path (default: the one it was trained on)")
    evaluate.add_argument(
        "--protocol",
        default="both",
        choices=["full", "sampled", "both"],
        help="full ranking, sampled negatives, or both (default)",
    )
    evaluate.add_argument(
        "--split", default="test", choices=["valid", "test"], help="targets (default test)"
    )
    evaluate.add_argument("--json", action="store_true", help="print JSON (as in metrics.json)")
    evaluate.set_defaults(run=_evaluate)

    recommend = commands.add_parser("recommend", help="top-k items for a user or a history")
    recommend.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    who = recommend.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="original user id (its whole history is used)")
    who.add_argument("--history", help="original item ids, oldest first, space-separated")
    recommend.add_argument(
        "-k", "--k", type=int, default=10, help="items to list (10; fewer if fewer are left)"
    )
    recommend.add_argument("--data", help="dataset path for --user (default: the training data)")
    recommend.add_argument("--include-seen", action="store_true", help="allow history items")
    recommend.set_defaults(run=_recommend)

    export = commands.add_parser(
        "export", help="a checkpoint as a torch.export program or ONNX model for serving"
    )
    export.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    export.add_argument(
        "--format",
        required=True,
        choices=["torch-export", "onnx"],
        help="torch-export writes a .pt2 program, onnx a .onnx model",
    )
    export.add_argument("--out", required=True, help="output file (.pt2 or .onnx)")
    export.add_argument("-k", "--k", type=int, default=100, help="items returned per history (100)")
    export.set_defaults(run=_export)

    demo = commands.add_parser("demo", help="train ConvRec and SASRec on synthetic data")
    demo.add_argument("--seconds", type=float, default=75.0, help="training budget per model")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--out", help="output folder (default: a new temporary folder)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    doctor = commands.add_parser(
        "doctor", help="what this installation can run: convrec._C, Triton, auto's choices"
    )
    doctor.set_defaults(run=_doctor)

    bench = commands.add_parser(
        "bench", help="benchmarks (research ones: python -m benchmarks.<name> in a checkout)"
    ).add_subparsers(dest="bench", required=True)
    encoder = bench.add_parser(
        "encoder",
        help="forward+backward time and saved-activation bytes, ConvRecEncoder vs SASRec",
    )
    encoder.add_argument(
        "--lengths", type=int, nargs="+", default=[50, 512, 2048], help="history lengths"
    )
    encoder.add_argument("--batch-size", type=int, default=32, help="histories per batch (32)")
    encoder.add_argument("--d-model", type=int, default=64, help="width (64)")
    encoder.add_argument("--repeats", type=int, default=5, help="timed repeats, median (5)")
    encoder.add_argument("--seed", type=int, default=0, help="random seed (0)")
    encoder.add_argument("--out", help="also write encoder_cpu.csv and .md into this folder")
    encoder.set_defaults(run=_bench_encoder)
    for sub in (train, evaluate, demo):
        sub.add_argument(
            "--threads",
            type=int,
            help="CPU threads of this process (default: torch's, the core count; on a busy "
            "host 1 can be much faster than 2)",
        )
    for sub in (train, evaluate, recommend, export, demo, encoder):
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def _doctor(args: argparse.Namespace) -> None:
    from convrec.ops.report import backend_report

    print("\n".join(backend_report()))


def main(argv: list[str] | None = None) -> None:
    """Run a command; errors end it with one line and an exit code (see ``EXIT_CODES``)."""
    args = build_parser().parse_args(argv)
    try:
        _threads(args)
        args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("convrec: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:  # e.g. piped into head: nobody reads any more; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_ERROR) from None
    except Exception as error:
        if args.debug:
            raise
        print(f"convrec: error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(_exit_code(error)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
