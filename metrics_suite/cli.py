"""The ``metrics-suite`` command.

* ``metrics-suite demo [--out DIR] [--epochs N] [--seed S] [--devices N]`` — the end-to-end demo
  (also ``python -m metrics_suite demo``);
* ``metrics-suite plot RESULTS.json [-o FIGURE.png] [--stage STAGE]`` — render a results file;
* ``metrics-suite suites`` — the registered suites and metrics.

A missing optional dependency or a bad results file is a message on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main", "positive_int"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (its name appears in argparse's "invalid positive_int value")."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``metrics-suite``."""
    parser = argparse.ArgumentParser(
        prog="metrics-suite", description="Distributed-ready diagnostics for models trained with a transform."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a tiny noisy-embedding LM on CPU processes and run all four suites",
        description="Train a tiny causal transformer with a learnable noise transform on its input "
        "embeddings (synthetic Markov-chain tokens, no downloads) with Lightning, evaluate every "
        "suite each validation epoch, and write results.json and results.png.",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)"
    )
    demo.add_argument("--epochs", type=positive_int, default=6, help="training epochs (default: 6)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, model and noise (default: 0)")
    demo.add_argument(
        "--devices", type=positive_int, default=2, help="CPU processes; 2+ run DDP over gloo (default: 2)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    plot = commands.add_parser("plot", help="render a results.json as a figure")
    plot.add_argument("results", type=Path, help="results file (results.json of the demo)")
    plot.add_argument("-o", "--output", type=Path, help="figure path (default: next to the results, .png)")
    plot.add_argument("--stage", default="val", help="stage drawn as curves and bars (default: val)")

    commands.add_parser("suites", help="list the registered suites and metrics")
    return parser


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot take the demo's files (None when it can): created if missing, probed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".metrics_suite_write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"{err.strerror or err}: {err.filename or folder}"
    return None


def _demo(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("pytorch_lightning") is None:
        print(
            "metrics-suite demo needs pytorch_lightning, not installed: "
            "pip install -e '.[lightning,plots]' in the checkout",
            file=sys.stderr,
        )
        return 1
    # checked before training: the results would otherwise be lost after the run
    reason = _unwritable(args.out)
    if reason is not None:
        print(f"metrics-suite demo: cannot write to --out {args.out}: {reason}", file=sys.stderr)
        return 1
    from metrics_suite.demo.figure import format_tables, save_figure
    from metrics_suite.demo.training import DemoConfig, run_demo

    config = DemoConfig(
        out=str(args.out),
        epochs=args.epochs,
        seed=args.seed,
        devices=args.devices,
        progress=not args.no_progress,
    )
    print(
        f"metrics-suite demo: {config.epochs} epochs on {config.devices} CPU process(es), output in {args.out}/"
    )
    results = run_demo(config)
    print()
    print(format_tables(results))
    print()
    print(f"wall time {results['wall_time_s']:.1f} s on {results['world_size']} process(es)")
    written = [str(args.out / "results.json")]
    try:
        written.append(str(save_figure(results, args.out / "results.png")))
    except ImportError:
        print(
            "no figure: it needs matplotlib, the [plots] extra (pip install -e '.[plots]'); "
            f"then: metrics-suite plot {args.out / 'results.json'}"
        )
    print(f"wrote {' and '.join(written)}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from metrics_suite.plots import plot_results

    output = args.output or args.results.with_suffix(".png")
    try:
        plot_results(args.results, output, stage=args.stage)
    except (OSError, ValueError, ImportError) as err:
        reason = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else err
        print(f"metrics-suite plot: {reason}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


def _suites() -> int:
    import metrics_suite as ms

    registered = ms.registered()
    for suite, names in ms.available().items():
        print(suite)
        for entry in (e for e in registered if e.suite == suite and e.name in names):
            note = "  (needs configuration)" if entry.needs_config else ""
            print(f"  {entry.name:<26}{entry.cls.__name__}{note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metrics-suite`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "plot":
        return _plot(args)
    return _suites()
