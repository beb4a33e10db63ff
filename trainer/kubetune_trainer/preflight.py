"""Preflight: refuse a doomed run before it holds a GPU for long.

Each check is a pure function from observed facts to a `Check` (pass / warn / fail, a
message that says what to change, and the numbers behind it); `run_preflight` gathers
the facts (config, model metadata on the meta device, data, disk, GPU) and keeps the
objects it built (tokenizer, tokenized data) for the run that follows.

Exit codes (ARCHITECTURE.md, contract 3): any failed check exits 3 (PreflightFailed), whether
its fix is in the config (steps, warmup, target modules, chat template, the model path) or in
the environment (GPU, memory, disk). Only a dataset that cannot be read (`input_error`: a
missing file, a line without its field, an empty split, each named with file and line) exits
2, like any invalid configuration. Neither is retried. A check that cannot run because an
earlier one failed is reported as "skipped: needs ..." (status warn) rather than left out.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubetune_trainer import checkpoints, contract
from kubetune_trainer.config import TrainConfig, steps_per_epoch, total_steps, warmup_steps
from kubetune_trainer.errors import ConfigError, DataError, PreflightError
from kubetune_trainer.report import utc_now

log = logging.getLogger(__name__)

Status = Literal["pass", "warn", "fail"]
GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Check:
    name: str
    status: Status
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    input_error: bool = False  # the dataset could not be read (a DataError): exit 2, not 3


def skipped(name: str, needs: str, detail: str = "", **data: Any) -> Check:
    """A check that could not run because what it needs failed: said, not left out."""
    return Check(name, "warn", f"skipped: needs {needs}{'; ' + detail if detail else ''}", {"skipped": True, **data})


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    created: str = field(default_factory=utc_now)

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]

    def exit_code(self) -> int:
        if not self.failed:
            return 0
        return 2 if any(c.input_error for c in self.failed) else 3

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": not self.failed,
            "created": self.created,
            "checks": [{k: v for k, v in asdict(c).items() if k != "input_error"} for c in self.checks],
        }

    def render(self) -> str:
        width = max((len(c.name) for c in self.checks), default=10)
        return "\n".join(f"  {c.status.upper():4}  {c.name:<{width}}  {c.message}" for c in self.checks)

    def summary(self) -> str:
        """The failed checks only, and how many warnings: what a user must act on, once."""
        warned = len(self.warnings)
        counts = f"{len(self.failed)} of {len(self.checks)} checks failed" + (
            f", {warned} warning{'s' if warned != 1 else ''}" if warned else ""
        )
        return (
            f"Preflight failed ({counts}; -v or output/preflight.json shows all):\n"
            + "\n".join(f"  {c.name}: {c.message}" for c in self.failed)
            + "\nNothing was trained; fix the above and run again (`kubetune-train preflight CONFIG` "
            "checks without training)."
        )

    def raise_if_failed(self) -> None:
        """ConfigError (exit 2) when the dataset could not be read, else PreflightError (exit 3)."""
        if self.failed:
            raise (ConfigError if self.exit_code() == 2 else PreflightError)(self.summary())


# --------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class ModelInfo:
    parameters: int
    trainable: int
    hidden_size: int
    layers: int
    vocab_size: int


def estimate_memory(
    info: ModelInfo,
    *,
    precision: str,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    eval_batch_size: int | None = None,
    eval_seq_len: int | None = None,
) -> dict[str, int]:
    """Bytes the peak of a LoRA run needs on the device, by part (a planning estimate, not a promise).

    Activations follow Korthikanti et al. (2022) with fused attention: about 34 bytes per token
    per hidden unit per layer at 16 bits (2 per layer when checkpointing, plus one layer in full);
    the logits and the loss's float32 temporaries take batch x seq x vocab x (width + 8) bytes.
    An evaluation batch (evaluation.batchSize, often larger) keeps no activations for a backward
    pass, only the layer in flight, but its logits can be the peak. The total is the resident
    parts plus the larger of the training step (activations, logits) and the evaluation step
    (eval_activations, eval_logits).
    """
    width = 2 if precision in ("bf16", "fp16") else 4

    def layer(tokens: int) -> int:
        return 34 * tokens * info.hidden_size * width // 2

    def logits(tokens: int) -> int:
        return tokens * info.vocab_size * (width + 8)

    tokens = batch_size * seq_len
    activations = (
        (2 * tokens * info.hidden_size * width * info.layers + layer(tokens))
        if gradient_checkpointing
        else (layer(tokens) * info.layers)
    )
    eval_tokens = (eval_batch_size or batch_size) * (eval_seq_len or seq_len)
    parts = {
        "weights": info.parameters * (2 if precision == "bf16" else 4),
        "adapter_and_optimizer": info.trainable * 16,  # fp32 weights, gradients, Adam's two moments
        "activations": activations,
        "logits": logits(tokens),
        "eval_activations": layer(eval_tokens),
        "eval_logits": logits(eval_tokens),
        "runtime": 600 * MiB,  # CUDA context, allocator slack
    }
    resident = parts["weights"] + parts["adapter_and_optimizer"] + parts["runtime"]
    step = max(parts["activations"] + parts["logits"], parts["eval_activations"] + parts["eval_logits"])
    parts["total"] = resident + step
    return parts


def checkpoint_bytes(info: ModelInfo) -> int:
    """One checkpoint on disk: fp32 adapter and Adam's two moments, the tokenizer files (about
    64 bytes per vocabulary entry, as Qwen's and Llama's are) and small state files."""
    return info.trainable * 12 + info.vocab_size * 64 + 64 * 1024


def export_bytes(info: ModelInfo) -> int:
    """The exported adapter (fp32), tokenizer, reports and plot."""
    return info.trainable * 4 + info.vocab_size * 64 + 1 * MiB


# --------------------------------------------------------------------------- pure checks


def check_learning_rate(lr: float) -> Check:
    data = {"learning_rate": lr}
    if lr > 1e-2:
        return Check(
            "config.learning_rate",
            "warn",
            f"training.learningRate={lr:g} is high for LoRA "
            "(usual: 5e-5 to 5e-4); expect divergence on a pretrained model",
            data,
        )
    if lr < 1e-6:
        return Check(
            "config.learning_rate", "warn", f"training.learningRate={lr:g} is so low the adapter will barely move", data
        )
    return Check("config.learning_rate", "pass", f"learning rate {lr:g}", data)


def check_steps(cfg: TrainConfig, train_rows: int) -> list[Check]:
    t = cfg.training
    per_epoch = steps_per_epoch(train_rows, t)
    total = total_steps(t, train_rows)
    warmup = warmup_steps(t, total)
    data = {"steps_per_epoch": per_epoch, "total_steps": total, "warmup_steps": warmup}
    checks = []
    if per_epoch <= 0 or total <= 0:
        checks.append(
            Check(
                "config.steps",
                "fail",
                f"{train_rows} training rows give no optimizer step; add data or lower training.batchSize",
                data,
            )
        )
    else:
        checks.append(Check("config.steps", "pass", f"{_n(total, 'optimizer step')} ({per_epoch} per epoch)", data))
    if warmup >= total > 0:
        checks.append(
            Check(
                "config.warmup",
                "fail",
                f"warmup ({_n(warmup, 'step')}) is not shorter than the run "
                f"({_n(total, 'step')}); lower training.warmupSteps or warmupRatio",
                data,
            )
        )
    else:
        checks.append(Check("config.warmup", "pass", f"{_n(warmup, 'warmup step')} of {total}", data))
    return checks


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def check_gpu(hw: Any, expect_gpus: int) -> list[Check]:
    data = {"cuda": hw.cuda, "device_count": hw.device_count, "expected": expect_gpus, "device": hw.device_name}
    if expect_gpus and not hw.cuda:
        return [
            Check(
                "gpu.cuda",
                "fail",
                f"{expect_gpus} GPU(s) requested but CUDA sees none: check the node's "
                "NVIDIA driver and device plugin, and that the image has a CUDA build of torch",
                data,
            )
        ]
    if hw.device_count < expect_gpus:
        return [Check("gpu.count", "fail", f"{expect_gpus} GPU(s) requested, {hw.device_count} visible", data)]
    if not hw.cuda:
        return [Check("gpu.cuda", "pass", "no GPU requested; training on CPU", data)]
    return [Check("gpu.count", "pass", f"{hw.device_count} x {hw.device_name}", data)]


def check_memory(estimate: dict[str, int], free: int, total: int) -> Check:
    need = estimate["total"]
    data = {"estimate_bytes": estimate, "free_bytes": free, "total_bytes": total}
    text = f"needs about {need / GiB:.1f} GiB of {free / GiB:.1f} GiB free"
    if need > free:
        biggest = max((k for k in estimate if k != "total"), key=estimate.get)
        fix = (
            "lower evaluation.batchSize or dataset.maxSeqLength"
            if biggest.startswith("eval_")
            else "lower training.batchSize or dataset.maxSeqLength, or set training.gradientCheckpointing: true"
        )
        return Check("gpu.memory", "fail", f"{text} (largest part: {biggest}); {fix}", data)
    if need > 0.85 * free:
        return Check("gpu.memory", "warn", f"{text}: little headroom, an unusually long batch may not fit", data)
    return Check("gpu.memory", "pass", text, data)


def check_disk(
    name: str, setting: str, path: Path, *, minimum: int, want: int, free: int | None, writable: str | None
) -> Check:
    """Fail below `minimum` (the run cannot save at all); warn below `want` (it may run out later)."""
    data = {"path": str(path), "minimum_bytes": minimum, "want_bytes": want, "free_bytes": free}
    if writable:
        return Check(name, "fail", f"{setting}={path} is not writable ({writable})", data)
    assert free is not None
    text = f"{_mib(free)} free, about {_mib(want)} wanted"
    if free < minimum:
        return Check(
            name,
            "fail",
            f"{setting}={path}: {_mib(free)} free, at least {_mib(minimum)} needed; free space or enlarge the volume",
            data,
        )
    if free < want:
        return Check(name, "warn", f"{setting}={path}: {text}: it may fill up before the run ends", data)
    return Check(name, "pass", text, data)


def _mib(size: int) -> str:
    return f"{size / MiB:,.1f} MiB" if size < 10 * MiB else f"{size / MiB:,.0f} MiB"


def check_lengths(stats: dict[str, Any], max_seq_length: int) -> Check:
    train = stats["train"]
    share = train["truncated"] / max(train["rows"] + train["dropped"], 1)
    data = {
        **{k: train[k] for k in ("p50_length", "p95_length", "max_length")},
        "truncated": train["truncated"],
        "truncated_share": round(share, 4),
        "dropped": train["dropped"],
    }
    text = f"tokens per sample p50 {train['p50_length']}, p95 {train['p95_length']}, max {train['max_length']}"
    if share > 0.05:
        return Check(
            "dataset.lengths",
            "warn",
            f"{text}; {share:.0%} of samples are cut at "
            f"dataset.maxSeqLength={max_seq_length}: raise it if the endings matter",
            data,
        )
    return Check("dataset.lengths", "pass", f"{text}; {train['truncated']} truncated", data)


def check_splits(stats: dict[str, Any], batch: int, eval_batch: int) -> list[Check]:
    rows = {name: s["rows"] for name, s in stats.items() if name != "format"}
    data = {"rows": rows, "batch": batch}
    checks = []
    if rows.get("train", 0) < batch:
        checks.append(
            Check(
                "dataset.splits",
                "fail",
                f"the train split has {rows.get('train', 0)} samples, "
                f"fewer than one batch of {batch}; add data or lower the batch",
                data,
            )
        )
    small = [n for n in ("validation", "test") if n in rows and rows[n] < eval_batch]
    if small:
        checks.append(
            Check(
                "dataset.splits",
                "warn",
                f"{' and '.join(small)} split(s) smaller than one "
                f"evaluation batch of {eval_batch}: their losses will be noisy",
                data,
            )
        )
    if not checks:
        checks.append(Check("dataset.splits", "pass", ", ".join(f"{n} {r}" for n, r in rows.items()), data))
    return checks


def check_duplicates(keys: list[str], locations: int = 3) -> Check:
    counts = Counter(keys)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    data = {"rows": len(keys), "duplicate_rows": duplicates}
    if duplicates:
        first = [i for i, k in enumerate(keys) if counts[k] > 1][:locations]
        return Check(
            "dataset.duplicates",
            "warn",
            f"{duplicates} of {len(keys)} training rows repeat another "
            f"(e.g. rows {', '.join(map(str, first))}): they weigh more than the rest",
            data,
        )
    return Check("dataset.duplicates", "pass", f"no duplicate rows among {len(keys)}", data)


# --------------------------------------------------------------------------- gathering facts


@dataclass
class Preflight:
    """The report, and what was built to make it (reused by the run that follows)."""

    report: Report
    hardware: Any
    precision: str | None = None
    attention: str | None = None
    tokenizer: Any = None
    data: Any = None
    model_info: ModelInfo | None = None


def model_info(cfg: TrainConfig) -> ModelInfo:
    """Parameter counts of the model with its adapter, built on the meta device: no weights are read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune_trainer.model import add_lora

    m = cfg.model
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as exc:
        from kubetune_trainer.model import _load_failure

        raise ConfigError(_load_failure("model config", m, exc)) from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    wrapped = add_lora(model, cfg.lora)  # every targetModules / modulesToSave entry must match a module
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return ModelInfo(
        parameters=total,
        trainable=trainable,
        hidden_size=int(getattr(text, "hidden_size", 0) or 0),
        layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
    )


def _writable(path: Path) -> str | None:
    try:
        checkpoints.make_dirs(path)  # created durably: the run's checkpoints go there
        with tempfile.NamedTemporaryFile(dir=path, prefix=".preflight-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _free_bytes(path: Path) -> int:
    existing = path
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _guard(report: Report, name: str, fn: Any) -> Any:
    """Run one fact-gathering step; a ConfigError becomes a failed check instead of an exception."""
    try:
        return fn()
    except ConfigError as exc:
        report.add(Check(exc.check or name, "fail", str(exc), input_error=isinstance(exc, DataError)))
        return None


def run_preflight(cfg: TrainConfig, *, hardware: Any, expect_gpus: int, stage: str) -> Preflight:
    """All checks for `stage` ("prepare": the CPU half; "run": everything)."""
    from kubetune_trainer.data import prepare_or_load
    from kubetune_trainer.model import load_tokenizer, resolve_attention, resolve_precision

    report = Report()
    pf = Preflight(report, hardware)
    report.add(check_learning_rate(cfg.training.learning_rate))

    pf.model_info = _guard(report, "model.config", lambda: model_info(cfg))
    if pf.model_info is not None:
        i = pf.model_info
        report.add(
            Check(
                "model.config",
                "pass",
                f"{i.parameters / 1e6:,.1f}M parameters, LoRA trains "
                f"{i.trainable / 1e6:,.2f}M ({100 * i.trainable / max(i.parameters, 1):.2f}%)",
                asdict(i),
            )
        )
    pf.tokenizer = _guard(report, "model.tokenizer", lambda: load_tokenizer(cfg.model))
    if pf.tokenizer is not None:
        report.add(Check("model.tokenizer", "pass", f"{len(pf.tokenizer):,} tokens"))
        pf.data = _guard(report, "dataset", lambda: prepare_or_load(cfg.dataset, pf.tokenizer))
        if pf.data is None:
            report.add(skipped("config.steps", "the data", "steps per epoch follow from the training rows"))
    else:
        report.add(skipped("dataset", "the tokenizer", "the data is tokenized to check it"))
    if pf.data is not None:
        stats = pf.data.summary()
        if pf.data.format == "chat":
            report.add(Check("model.chat_template", "pass", "the tokenizer has a chat template"))
        report.add(Check("dataset.read", "pass", f"{pf.data.format} rows from {cfg.dataset.path}", stats))
        report.add(check_duplicates(pf.data.row_keys()))
        report.add(check_lengths(stats, cfg.dataset.max_seq_length))
        t = cfg.training
        report.add(
            *check_splits(
                stats, t.batch_size * t.gradient_accumulation_steps, cfg.evaluation.batch_size or t.batch_size
            )
        )
        report.add(*check_steps(cfg, stats["train"]["rows"]))

    report.add(*_disk_checks(cfg, pf.model_info))

    if stage == "run":
        report.add(*check_gpu(hardware, expect_gpus))
        pf.precision = _guard(report, "gpu.precision", lambda: resolve_precision(cfg.training.precision, hardware))
        pf.attention = _guard(
            report, "gpu.attention", lambda: resolve_attention(cfg.model.attn_implementation, hardware)
        )
        if pf.precision is not None:
            report.add(Check("gpu.precision", "pass", f"{pf.precision}, attention {pf.attention}"))
        if hardware.cuda and pf.precision is not None:
            if pf.model_info is None:
                report.add(skipped("gpu.memory", "the model config"))
            else:
                import torch

                free, total = torch.cuda.mem_get_info()
                report.add(check_memory(_estimate(cfg, pf), free, total))
    return pf


def _estimate(cfg: TrainConfig, pf: Preflight) -> dict[str, int]:
    """The memory estimate for this config, at the data's longest samples (maxSeqLength without data)."""
    assert pf.model_info is not None and pf.precision is not None
    stats = pf.data.stats if pf.data is not None else {}
    train_len = stats["train"].max_length if "train" in stats else cfg.dataset.max_seq_length
    eval_lens = [stats[split].max_length for split in ("validation", "test") if split in stats]
    evaluates = bool(eval_lens) or pf.data is None  # without data, assume the config's splits exist
    return estimate_memory(
        pf.model_info,
        precision=pf.precision,
        batch_size=cfg.training.batch_size,
        seq_len=train_len,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
        eval_batch_size=(cfg.evaluation.batch_size or cfg.training.batch_size) if evaluates else None,
        eval_seq_len=max(eval_lens) if eval_lens else train_len,
    )


def _disk_checks(cfg: TrainConfig, info: ModelInfo | None) -> list[Check]:
    """Writable, and room for the checkpoints kept (one kept while the next is written, at least; the
    newest `keep`, the best and one in flight, ideally) and the export. Without the model config the
    sizes are unknown: writability is still checked, and the size check says it was skipped."""
    ckpt = checkpoint_bytes(info) if info is not None else 0
    export = export_bytes(info) if info is not None else 0
    checks = []
    for name, setting, path, minimum, want in (
        ("disk.checkpoints", "checkpoints.dir", Path(cfg.checkpoints.dir), 2 * ckpt, (cfg.checkpoints.keep + 2) * ckpt),
        ("disk.output", "output.dir", Path(cfg.output.dir), export, 2 * export),
    ):
        problem = _writable(path)
        free = None if problem else _free_bytes(path)
        if info is None and not problem:
            checks.append(skipped(name, "the model config", f"{setting}={path} is writable, {_mib(free or 0)} free"))
        else:
            checks.append(check_disk(name, setting, path, minimum=minimum, want=want, free=free, writable=problem))
    aside = checkpoints.set_aside_bytes(Path(cfg.checkpoints.dir))
    if aside:
        checks.append(
            Check(
                "disk.set_aside",
                "warn",
                f"{_mib(aside)} of checkpoints set aside in {Path(cfg.checkpoints.dir) / checkpoints.SET_ASIDE} "
                "(unverifiable ones; each has a SET_ASIDE_REASON.txt): delete them once you no longer need them",
                {"bytes": aside},
            )
        )
    return checks


def publish(report: Report, out_dir: Path, title: str | None = "Preflight") -> None:
    """preflight.json in output.dir, and (under `title`, unless None) the report in the log: whole at info when
    it passed; at debug when it failed, as the error names the failed checks (-v shows all).

    The write is best effort: when output.dir is what failed (a file, read-only), the report still reaches
    stderr and the run's status, and the failed disk.output check, not this write, must decide the exit. The
    caller has claimed the directory (checkpoints.claim_output_dir)."""
    path = out_dir / contract.PREFLIGHT_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.write_atomic(path, json.dumps(report.to_dict(), indent=2) + "\n")
    except OSError as exc:
        log.warning("Could not write the preflight report to %s: %s", path, exc.strerror or exc)
    if title is not None:
        log.log(logging.DEBUG if report.failed else logging.INFO, "%s:\n%s", title, report.render())
