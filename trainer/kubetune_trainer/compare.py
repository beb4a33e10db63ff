"""`kubetune compare RUN_OR_DIR...`: runs side by side, from their output directories or from
TrainingRuns in a cluster. Also a kubectl plugin: `kubectl kubetune compare ...`.

A local argument is a run's output.dir (config.yaml, metrics.json, and eval.json when the run had
a test split). Any other argument names a TrainingRun, `NAME` in the current namespace or
`NAMESPACE/NAME`, read through the kubeconfig (`--kubeconfig`, `KUBECONFIG` or ~/.kube/config).
Imports neither torch nor transformers, so it answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from kubetune_trainer import contract
from kubetune_trainer.errors import ConfigError, KubetuneError
from kubetune_trainer.sinks import format_duration


@dataclass
class RunSummary:
    """One row of the comparison: the same fields from a directory or a TrainingRun."""

    name: str
    source: str  # the directory, or trainingrun/NAMESPACE/NAME
    model: str | None = None
    phase: str | None = None  # TrainingRuns only
    lora_r: int | None = None
    lora_alpha: float | None = None
    learning_rate: float | None = None
    batch: int | None = None  # effective: batchSize x gradientAccumulationSteps
    steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    test: dict[str, float] = field(default_factory=dict)  # the fine-tuned model on the test split
    base: dict[str, float] = field(default_factory=dict)  # the base model on the same split
    duration_seconds: float | None = None
    tokens_per_second: float | None = None


# --------------------------------------------------------------------------- reading runs


def _snake(d: dict[str, Any] | None) -> dict[str, float]:
    from pydantic.alias_generators import to_snake

    return {to_snake(k): v for k, v in (d or {}).items() if isinstance(v, int | float)}


def _hyperparameters(spec: dict[str, Any]) -> dict[str, Any]:
    """Model and key settings from a TrainConfig-shaped mapping (camelCase or snake_case)."""
    from kubetune_trainer.config import TrainConfig

    known = {k: spec[k] for k in TrainConfig.model_fields if k in spec}
    try:
        cfg = TrainConfig.model_validate(known)
    except ValueError:  # an older or partial config: show what can be shown
        return {}
    t = cfg.training
    return {
        "model": cfg.model.name_or_path,
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "learning_rate": t.learning_rate,
        "batch": t.batch_size * t.gradient_accumulation_steps,
    }


def from_output_dir(path: Path) -> RunSummary:
    metrics_file = path / contract.METRICS_FILE
    if not metrics_file.is_file():
        raise ConfigError(
            f"{path}: no metrics.json, so not the output.dir of a finished kubetune run. Point at the directory "
            "holding adapter_model.safetensors and metrics.json."
        )
    config_file, eval_file = path / contract.CONFIG_FILE, path / contract.EVAL_FILE
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        evaluation = json.loads(eval_file.read_text(encoding="utf-8")) if eval_file.is_file() else {}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the run's files ({exc}).") from None
    return RunSummary(
        name=path.parent.name if path.name == "output" else path.name,
        source=str(path),
        **_hyperparameters(config or {}),
        steps=metrics.get("global_step"),
        train_loss=metrics.get("train_loss_last"),
        eval_loss=metrics.get("eval_loss"),
        test=_snake(evaluation.get("finetuned"))
        or ({"loss": metrics["test_loss"]} if metrics.get("test_loss") is not None else {}),
        base=_snake(evaluation.get("base")),
        duration_seconds=metrics.get("wall_seconds"),
        tokens_per_second=metrics.get("tokens_per_second"),
    )


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start:
        return None

    def parse(stamp: str) -> datetime:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # Python 3.10 refuses the Z

    try:
        finish = parse(end) if end else datetime.now(parse(start).tzinfo)
        return (finish - parse(start)).total_seconds()
    except ValueError:
        return None


def from_trainingrun(obj: dict[str, Any]) -> RunSummary:
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
    progress, evaluation = status.get("progress") or {}, status.get("evaluation") or {}
    return RunSummary(
        name=meta.get("name", "?"),
        source=f"trainingrun/{meta.get('namespace', '?')}/{meta.get('name', '?')}",
        phase=status.get("phase"),
        **_hyperparameters(spec),
        steps=progress.get("step"),
        train_loss=progress.get("trainLoss"),
        eval_loss=evaluation.get("evalLoss", progress.get("evalLoss")),
        test=_snake(evaluation.get("test"))
        or ({"loss": evaluation["testLoss"]} if evaluation.get("testLoss") is not None else {}),
        base=_snake(evaluation.get("base")),
        duration_seconds=_seconds_between(status.get("startTime"), status.get("completionTime")),
        tokens_per_second=progress.get("tokensPerSecond"),
    )


def cluster_reader(kubeconfig: str | None, context: str | None) -> tuple[Callable[[str, str], dict | None], str]:
    """get(namespace, name) -> the TrainingRun or None, and the kubeconfig context's namespace."""
    import kubernetes
    import urllib3

    try:
        contexts, current = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c["name"] == context), current) if context else current
        namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
        client = kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise ConfigError(
            f"No local output directory by that name, and no cluster to look in ({exc}). Pass output "
            "directories, or TrainingRun names with a working kubeconfig (--kubeconfig or KUBECONFIG)."
        ) from None
    api = kubernetes.client.CustomObjectsApi(client)

    def get(ns: str, name: str) -> dict | None:
        try:
            return api.get_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, ns, contract.API_PLURAL, name, _request_timeout=30
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise ConfigError(f"Reading TrainingRun {ns}/{name}: HTTP {exc.status} {exc.reason}.") from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # refused, timed out, retries used up
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(
                f"Reading TrainingRun {ns}/{name}: the API server is unreachable ({reason}). Check that the cluster "
                "is up and the kubeconfig's server (--kubeconfig, --context) is right."
            ) from None

    return get, namespace


def collect(
    targets: Sequence[str], *, namespace: str | None, kubeconfig: str | None, context: str | None
) -> list[RunSummary]:
    rows, reader = [], None
    for target in targets:
        path = Path(target)
        if path.is_dir():
            rows.append(from_output_dir(path))
            continue
        if reader is None:
            reader = cluster_reader(kubeconfig, context)
        get, default_namespace = reader
        ns, _, name = target.rpartition("/")
        ns = ns or namespace or default_namespace
        obj = get(ns, name)
        if obj is None:
            raise ConfigError(f"{target}: no such directory, and no TrainingRun {name!r} in namespace {ns!r}.")
        rows.append(from_trainingrun(obj))
    return rows


# --------------------------------------------------------------------------- rendering (pure)


def _num(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _vs(row: RunSummary, metric: str, spec: str) -> str:
    """'base -> fine-tuned' when both are known, else the one that is."""
    tuned, base = row.test.get(metric), row.base.get(metric)
    if tuned is None:
        return "-"
    return f"{_num(base, spec)}->{_num(tuned, spec)}" if base is not None else _num(tuned, spec)


COLUMNS: tuple[tuple[str, Callable[[RunSummary], str]], ...] = (
    ("RUN", lambda r: r.name),
    ("PHASE", lambda r: r.phase or "-"),
    ("MODEL", lambda r: Path(r.model).name if r.model and Path(r.model).is_absolute() else (r.model or "-")),
    ("R", lambda r: _num(r.lora_r, "d")),
    ("LR", lambda r: _num(r.learning_rate, ".1e")),
    ("BATCH", lambda r: _num(r.batch, "d")),
    ("STEPS", lambda r: _num(r.steps, "d")),
    ("TRAIN", lambda r: _num(r.train_loss, ".4f")),
    ("EVAL", lambda r: _num(r.eval_loss, ".4f")),
    ("TEST", lambda r: _vs(r, "loss", ".4f")),
    ("EXACT", lambda r: _vs(r, "exact_match", ".0%")),
    ("CER", lambda r: _vs(r, "cer", ".3f")),
    ("BLEU", lambda r: _vs(r, "bleu", ".1f")),
    ("ROUGE-L", lambda r: _vs(r, "rouge_l", ".3f")),
    ("TIME", lambda r: format_duration(r.duration_seconds)),
    ("TOK/S", lambda r: _num(r.tokens_per_second, ",.0f")),
)


def render_table(rows: Sequence[RunSummary]) -> str:
    """An aligned table, one run per line; columns no run has (such as PHASE for directories) left out.
    Test-split metrics read base->fine-tuned."""
    cells = [[fn(r) for _, fn in COLUMNS] for r in rows]
    keep = [i for i, (title, _) in enumerate(COLUMNS) if title == "RUN" or any(c[i] != "-" for c in cells)]
    table = [[COLUMNS[i][0] for i in keep], *[[c[i] for i in keep] for c in cells]]
    widths = [max(len(line[i]) for line in table) for i in range(len(keep))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in table)


def to_json(rows: Sequence[RunSummary]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


# --------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="kubetune's client: compare fine-tuning runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("compare", help="runs side by side: settings, losses, test metrics against the base model")
    p.add_argument(
        "runs", nargs="+", metavar="RUN_OR_DIR", help="an output directory, or a TrainingRun [NAMESPACE/]NAME"
    )
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table (default) or json")
    p.add_argument("-n", "--namespace", help="namespace of TrainingRuns named without one (default: the context's)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = collect(args.runs, namespace=args.namespace, kubeconfig=args.kubeconfig, context=args.context)
    except KubetuneError as exc:
        print(f"kubetune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(to_json(rows) if args.output == "json" else render_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
