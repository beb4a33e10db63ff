"""`kubetune-train`: a thin command line over the library.

Heavy imports (torch, transformers) happen inside the commands, so `--help` and
`fields` answer at once. A KubetuneError prints its message and exits with its code
(ARCHITECTURE.md, contract 3); only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from kubetune_trainer.contract import TERMINATION_LOG_ENV
from kubetune_trainer.errors import KubetuneError

log = logging.getLogger("kubetune_trainer")


def _cmd_run(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import load_config

    cfg = load_config(args.config, args.set)
    from kubetune_trainer.train import run

    run(cfg, expect_gpus=args.expect_gpus)
    return 0


def _cmd_preflight(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import load_config

    cfg = load_config(args.config, args.set)
    from kubetune_trainer.model import Hardware
    from kubetune_trainer.preflight import run_preflight

    report = run_preflight(cfg, hardware=Hardware.detect(), expect_gpus=args.expect_gpus, stage="run").report
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    if report.failed:
        print(f"kubetune-train: preflight failed: {', '.join(c.name for c in report.failed)}", file=sys.stderr)
    return report.exit_code()


def _cmd_prepare(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import load_config

    cfg = load_config(args.config, args.set)
    from kubetune_trainer.model import Hardware, fetch_model
    from kubetune_trainer.preflight import run_preflight, write_report

    fetch_model(cfg.model)
    pf = run_preflight(cfg, hardware=Hardware(cuda=False), expect_gpus=0, stage="prepare")
    write_report(pf.report, Path(cfg.output.dir) / "preflight.json")
    log.info("Preflight (data and model):\n%s", pf.report.render())
    pf.report.raise_if_failed()
    if not cfg.dataset.prepared_dir:
        log.warning("dataset.preparedDir is not set: the data was checked but not saved for `run` to reuse")
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
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, library warnings included")
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

    p = sub.add_parser("preflight", help="check config, model, data, disk and GPU without training")
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


def report_failure(error: KubetuneError) -> int:
    """Print the error; in a pod, also leave it as the container's termination message, which
    Kubernetes keeps in the pod status (the operator shows it in the TrainingRun)."""
    print(f"kubetune-train: error: {error}", file=sys.stderr)
    path = os.environ.get(TERMINATION_LOG_ENV)
    if path:
        try:
            Path(path).write_text(json.dumps({"reason": error.reason, "message": str(error)})[:4000])
        except OSError as exc:
            log.warning("could not write the termination message to %s: %s", path, exc)
    return error.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from kubetune_trainer.errors import OutOfMemoryError, StorageFullError, disk_full_message

    try:
        return args.func(args)
    except KubetuneError as exc:
        return report_failure(exc)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            return report_failure(
                OutOfMemoryError(
                    f"The GPU ran out of memory ({str(exc).splitlines()[0][:200]}). Lower training.batchSize or "
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
