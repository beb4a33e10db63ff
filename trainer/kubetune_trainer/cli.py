"""`kubetune-train`: a thin command line over the library.

Heavy imports (torch, transformers) happen inside the commands, so `--help` and
`fields` answer at once. A KubetuneError prints its message and exits with its code
(ARCHITECTURE.md, contract 3); only a bug shows a traceback.

SIGTERM and Ctrl-C are handled from the first line of `main`: in a container the trainer is
PID 1, which ignores any signal it has no handler for. Until `run` takes over (it saves a
checkpoint first while training), a signal stops the command at once with exit 143 (130).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import (
    GRACE_EXPIRED_EXIT_CODE,
    Interrupted,
    KubetuneError,
    Stopped,
    first_line,
    report_failure,
)

log = logging.getLogger("kubetune_trainer")

EXIT_CODES = f"""exit codes:
  0    done
  2    invalid configuration, or a dataset that cannot be read: the message names the setting,
       file and line; retrying cannot help
  3    a preflight check failed (config, model, data, disk or GPU): the message names each
  4    training diverged (non-finite loss)
  5    a volume is full
  6    the GPU ran out of memory
  {GRACE_EXPIRED_EXIT_CODE}   stopped by SIGTERM, but no checkpoint could be saved within checkpoints.graceSeconds;
       a rerun resumes from the previous one
  143  stopped by SIGTERM (130: Ctrl-C) after saving a checkpoint, or before there was anything to save"""


def _cmd_run(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import load_config

    cfg = load_config(args.config, args.set)
    from kubetune_trainer.train import run

    run(cfg, expect_gpus=args.expect_gpus)
    return 0


def _cmd_preflight(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import load_config

    cfg = load_config(args.config, args.set)
    from kubetune_trainer.checkpoints import claim_output_dir
    from kubetune_trainer.model import Hardware
    from kubetune_trainer.preflight import publish, run_preflight

    claim_output_dir(Path(cfg.output.dir))  # a user's folder is refused before anything is written to it
    report = run_preflight(cfg, hardware=Hardware.detect(), expect_gpus=args.expect_gpus, stage="run").report
    publish(report, Path(cfg.output.dir), title=None)  # printed below
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.verbose or not report.failed:
        print(report.render())
    report.raise_if_failed()  # the failed checks, once, on stderr; exit 3 (2 when the dataset cannot be read)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import load_config

    cfg = load_config(args.config, args.set)
    from kubetune_trainer.checkpoints import claim_output_dir
    from kubetune_trainer.model import Hardware, fetch_model
    from kubetune_trainer.preflight import publish, run_preflight
    from kubetune_trainer.sinks import Reporter, default_sinks

    claim_output_dir(Path(cfg.output.dir))
    fetch_model(cfg.model)
    pf = run_preflight(cfg, hardware=Hardware(cuda=False), expect_gpus=0, stage="prepare")
    publish(pf.report, Path(cfg.output.dir), title="Preflight (data and model)")
    reporter = Reporter(default_sinks(cfg))
    try:
        reporter.preflight(pf.report.to_dict())  # the TrainingRun's status.preflight, while it is Initializing
    finally:
        reporter.close()
    pf.report.raise_if_failed()
    if not cfg.dataset.prepared_dir:
        log.warning("dataset.preparedDir is not set: the data was checked but not saved for `run` to reuse")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import load_config

    cfg = load_config(args.config, args.set)
    from kubetune_trainer.evaluate import run_eval

    run_eval(cfg, Path(args.adapter) if args.adapter else None, Path(args.out) if args.out else None)
    return 0


def _cmd_make_qa(args: argparse.Namespace) -> int:
    import yaml

    from kubetune_trainer.qa import make_qa

    made = make_qa(
        Path(args.records),
        Path(args.template),
        Path(args.out),
        validation=args.validation_split,
        test=args.test_split,
        seed=args.seed,
    )
    print(made.describe())
    snippet = yaml.safe_dump({"dataset": made.dataset_config()}, sort_keys=False)
    print(f"Train on them with this in the config:\n{snippet}", end="")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from kubetune_trainer import quickstart

    return quickstart.main(Path(args.dir), max_steps=args.steps, branches=args.branches, samples=args.samples)


def _cmd_fields(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import iter_fields

    for path, type_name, default, description in iter_fields():
        if args.prefix and not path.startswith(args.prefix):
            continue
        print(f"{path}  ({type_name}, default {default!r})\n    {description}")
    return 0


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (the TrainConfig shape; see `kubetune-train fields`)")
    # -v after the command works too (argparse.SUPPRESS: the global -v's value stands when absent)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set training.learningRate=1e-4 (repeatable; YAML values)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune-train",
        description="LoRA fine-tuning from one config file, on a laptop or in a kubetune TrainingRun.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, library warnings and the full preflight table"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="train, evaluate and export an adapter as CONFIG says (resumes by default)")
    add_config_arguments(p)
    p.add_argument(
        "--expect-gpus",
        type=int,
        default=0,
        metavar="N",
        help="fail preflight unless N GPUs are visible (the operator passes the GPUs it requested)",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "preflight",
        help="check config, model, data, disk and GPU without training",
        description="Check config, model, data, disk and GPU without training, and write output/preflight.json. "
        "Prints the table when every check passes (with -v always), else only the failed checks. Exits 0 when "
        "nothing failed (warnings never stop a run), 3 when a check failed, 2 when the dataset cannot be read "
        "(a missing file, a line without its field: named with file and line).",
    )
    add_config_arguments(p)
    p.add_argument("--expect-gpus", type=int, default=0, metavar="N", help="fail unless N GPUs are visible")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_preflight)

    p = sub.add_parser(
        "prepare", help="the CPU half of a run: fetch the model, check and tokenize the data into dataset.preparedDir"
    )
    add_config_arguments(p)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "eval", help="evaluate an exported adapter and its base model on CONFIG's test split (eval.json)"
    )
    add_config_arguments(p)
    p.add_argument("--adapter", metavar="DIR", help="the adapter's directory (default: the config's output.dir)")
    p.add_argument("--out", metavar="DIR", help="where eval.json and predictions.jsonl go (default: the adapter's)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("make-qa", help="question/answer pairs from a table of records, split for training")
    p.add_argument("records", help="a .csv (with a header) or .jsonl file of records")
    p.add_argument("--template", required=True, metavar="FILE", help="YAML question templates with {field}s")
    p.add_argument("--out", required=True, metavar="DIR", help="where train/validation/test.jsonl go")
    p.add_argument("--validation-split", type=float, default=0.1, help="share of questions (default: %(default)s)")
    p.add_argument("--test-split", type=float, default=0.1, help="share of questions (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed of the split (default: %(default)s)")
    p.set_defaults(func=_cmd_make_qa)

    p = sub.add_parser(
        "quickstart", help="build a tiny model and QA data locally, fine-tune it on CPU and show what it learned"
    )
    p.add_argument("--dir", default="kubetune-quickstart", help="working directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default: %(default)s)")
    p.add_argument("--branches", type=int, default=40, help="bank branches in the generated table")
    p.add_argument("--samples", type=int, default=6, help="answers to print before and after")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("fields", help="list every config setting with its type, default and description")
    p.add_argument("prefix", nargs="?", default="", help="only settings under this path, e.g. training")
    p.set_defaults(func=_cmd_fields)
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:
        # Library chatter (deprecations, "no GPU found") hides the lines a user needs.
        for name in (
            "transformers",
            "datasets",
            "peft",
            "accelerate",
            "torch",
            "httpx",
            "urllib3",
            "filelock",
            "matplotlib",
        ):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Our own bar is the only one: library bars (weight loading, map) interleave with it.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stop_now(signum: int, frame: Any) -> None:
    raise Stopped(signal.Signals(signum))


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and Ctrl-C raise Stopped until a command installs its own handling (train.run does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _stop_now) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    with stop_on_signals():
        try:
            args = build_parser().parse_args(argv)
            setup_logging(args.verbose)
            return _main(args)
        except Stopped as stopped:
            error = Interrupted.by(stopped.signal, "before there was anything to save.")
            return report_failure(error)


def _main(args: argparse.Namespace) -> int:
    from kubetune_trainer.errors import OutOfMemoryError, StorageFullError, disk_full_message

    try:
        return args.func(args)
    except KubetuneError as exc:
        return report_failure(exc)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            return report_failure(
                OutOfMemoryError(
                    f"The GPU ran out of memory ({first_line(exc)}). Lower training.batchSize or "
                    "dataset.maxSeqLength, set training.gradientCheckpointing: true, or use a larger GPU; "
                    "`kubetune-train preflight` estimates the memory a config needs."
                )
            )
        # A full disk can surface from any writer (the datasets cache, a log, an export).
        message = disk_full_message(exc)
        if message is None:
            raise
        return report_failure(StorageFullError(message))
    except KeyboardInterrupt:
        print("kubetune-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
