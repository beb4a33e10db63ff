"""TrainConfig: everything the trainer needs, in one typed tree.

This module is the single source of truth for trainer settings: the operator's
CRD schema is generated from these models, `kubetune-train fields` prints them,
and `--set` overrides address them by path. It imports nothing heavier than
pydantic and PyYAML because the operator imports it too.

YAML keys are camelCase (Kubernetes API conventions); the Python attributes are
snake_case; both spellings are accepted on input.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel, to_snake

from kubetune_trainer.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "DatasetConfig",
    "EvaluationConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "ReportingConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "iter_fields",
    "load_config",
    "parse_config",
]


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        validate_default=True,
    )
    # The same rules as this model's validators, in CEL, for the Kubernetes API server to enforce on a
    # TrainingRun (rendered into its CRD); a test checks each pair agrees. (rule, message) on camelCase fields.
    cel_rules: ClassVar[tuple[tuple[str, str], ...]] = ()


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Base model: a local directory holding config.json, weights and tokenizer files, "
        "or a Hugging Face Hub id such as Qwen/Qwen2.5-0.5B-Instruct.",
        min_length=1,
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) to load; ignored for a local directory."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code shipped in the model repository to run. Leave off unless needed."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel. auto picks flash_attention_2 on GPUs where the flash-attn "
        "package is installed, sdpa otherwise.",
    )


class DatasetConfig(Section):
    path: str = Field(
        min_length=1,
        description="Training data file: .jsonl, .json, .csv or .parquet. When no validation or test "
        "file is given, those splits are carved out of this file.",
    )
    validation_path: str | None = Field(None, description="Optional validation file in the same format.")
    test_path: str | None = Field(None, description="Optional test file in the same format.")
    format: Literal["auto", "prompt_completion", "chat", "text"] = Field(
        "auto",
        description="Row format. prompt_completion: a prompt and a completion column; chat: a list of "
        "{role, content} messages rendered with the tokenizer's chat template; text: one text column. "
        "auto detects it from the columns present.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt (prompt_completion).")
    completion_field: str = Field("completion", description="Column holding the completion (prompt_completion).")
    messages_field: str = Field("messages", description="Column holding the chat messages (chat).")
    text_field: str = Field("text", description="Column holding the text (text).")
    max_seq_length: int = Field(
        1024, ge=8, description="Longest tokenized sample in tokens; longer samples are truncated and counted."
    )
    train_on_prompt: bool = Field(
        False,
        description="Also compute the loss on prompt tokens and non-assistant turns. By default only "
        "completions and assistant turns are learned.",
    )
    validation_split: float = Field(
        0.1, ge=0, lt=1, description="Share of rows held out for validation when validationPath is not set."
    )
    test_split: float = Field(
        0.1, ge=0, lt=1, description="Share of rows held out for testing when testPath is not set."
    )
    split_seed: int = Field(
        42, description="Seed of the train/validation/test split; the same seed gives the same split."
    )
    max_samples: int | None = Field(
        None, ge=1, description="Use only the first N rows of the training file (quick trials)."
    )
    prepared_dir: str | None = Field(
        "prepared",
        description="Directory of kubetune's own where the tokenized splits are saved (by `prepare` or the first "
        "`run`) and reused while the files, settings and tokenizer stay the same; null to tokenize every time.",
    )

    cel_rules = (
        (
            "(has(self.validationPath) ? 0.0 : self.validationSplit) + (has(self.testPath) ? 0.0 : self.testSplit)"
            " < 1.0",
            "validationSplit + testSplit must stay below 1 to leave rows for training",
        ),
    )

    @model_validator(mode="after")
    def _splits_leave_training_rows(self) -> DatasetConfig:
        carved = (0 if self.validation_path else self.validation_split) + (0 if self.test_path else self.test_split)
        if carved >= 1:
            raise ValueError(
                f"validationSplit + testSplit = {carved:g} leaves no rows for training; keep their sum below 1"
            )
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank: the width of the low-rank update matrices.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] = Field(
        ["all-linear"],
        min_length=1,
        description="Module names (or name suffixes) that get LoRA adapters; [all-linear] adapts every "
        "linear layer except the output head. A single name may be written without the list.",
    )
    modules_to_save: list[str] = Field(
        [],
        description="Modules trained in full and saved with the adapter, such as embed_tokens or lm_head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r).")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainingConfig(Section):
    epochs: float = Field(3.0, gt=0, description="Passes over the training split; ignored when maxSteps is set.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps instead of counting epochs."
    )
    batch_size: int = Field(8, ge=1, description="Samples per device per forward pass.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forward passes per optimizer step; the effective batch is batchSize times this."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the schedule.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="Share of the optimizer steps spent warming up; see warmupSteps."
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Warmup length in optimizer steps; when set it replaces warmupRatio."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the trained parameters.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping threshold; 0 turns clipping off.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30% slower."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Numeric precision. auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.",
    )
    seed: int = Field(42, description="Seed for weight initialisation of the adapter, dropout and data order.")
    logging_steps: int = Field(10, ge=1, description="Record the training loss every N optimizer steps.")
    group_by_length: bool = Field(
        True,
        description="Batch samples of similar length together so less compute is spent on padding.",
    )
    max_non_finite_steps: int = Field(
        3,
        ge=1,
        description="Stop with reason Diverged (exit 4) after this many consecutive steps with a non-finite "
        "loss. Such steps are skipped, so the weights stay finite.",
    )


class EvaluationConfig(Section):
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate on the validation split every N optimizer steps. Default: a tenth of the run, "
        "so the loss curve gets about ten points.",
    )
    batch_size: int | None = Field(None, ge=1, description="Evaluation batch size; default: training.batchSize.")
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop when the validation loss has not improved for this many evaluations; off when unset.",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="Smallest drop in validation loss that counts as an improvement."
    )
    load_best_at_end: bool = Field(
        True, description="Export the adapter of the evaluation with the lowest validation loss, not the last."
    )
    high_loss_samples: int = Field(
        10,
        ge=0,
        description="After each evaluation, append the N training samples with the highest loss since the "
        "previous one to output/high_loss_samples.jsonl; 0 turns this off.",
    )
    generate: bool = Field(
        True,
        description="After training, also score greedy generations on the test split (prompt_completion and "
        "chat data) by exact match, character and word error rate, BLEU and ROUGE-L.",
    )
    max_new_tokens: int = Field(
        128,
        ge=1,
        description="Most tokens generated per test prompt; fewer when every reference is shorter (1.5 times the "
        "longest reference, plus 8).",
    )
    max_generation_samples: int | None = Field(
        500,
        ge=1,
        description="Generate for at most this many test samples (generation is the slow part); loss and "
        "perplexity use the whole test split. Null: every sample.",
    )
    baseline: bool = Field(
        True,
        description="Evaluate the base model without the adapter on the same test split too, so eval.json shows "
        "base and fine-tuned side by side with the deltas.",
    )


class CheckpointConfig(Section):
    dir: str = Field("checkpoints", description="Directory for checkpoints; put it on the run's volume.")
    every_steps: int | None = Field(None, ge=1, description="Save a checkpoint every N optimizer steps.")
    every_minutes: float | None = Field(
        10.0,
        gt=0,
        description="Save a checkpoint when this many minutes have passed since the last one (checked after "
        "each step). With everySteps, whichever comes first.",
    )
    keep: int = Field(2, ge=1, description="Newest checkpoints to keep; the one with the best eval loss is kept too.")
    resume: bool = Field(
        True, description="Continue from the newest checkpoint in dir that verifies, when there is one."
    )
    grace_seconds: float = Field(
        25.0,
        gt=0,
        description="After SIGTERM, save at the next safe point and exit 143 within this many seconds. Keep it "
        "below the pod's terminationGracePeriodSeconds.",
    )


class OutputConfig(Section):
    dir: str = Field(
        "output",
        description="Directory for the adapter, tokenizer, resolved config, metrics.json and loss curves.",
    )


class ReportingConfig(Section):
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve the run's Prometheus metrics (step, losses, throughput, ETA, GPU memory) on this port; "
        "off when unset. TrainingRuns default to 9400.",
    )
    status_interval_seconds: float = Field(
        5.0,
        gt=0,
        description="In a TrainingRun, update its status.progress at most this often (and at evaluations, "
        "checkpoints and the end).",
    )


class TrainConfig(Section):
    """A whole training run. A local config file has exactly this shape."""

    model: ModelConfig = Field(description="The base model to adapt.")
    dataset: DatasetConfig = Field(description="Where the data is and how to read it.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapter.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="The optimisation.")
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig,
        description="Validation during training, early stopping, and the final evaluation on the test split.",
    )
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
    reporting: ReportingConfig = Field(
        default_factory=ReportingConfig,
        description="Where progress goes besides the terminal and output/progress.jsonl: Prometheus, and the "
        "TrainingRun's status when running in one.",
    )

    cel_rules = (
        (
            "!has(self.evaluation.earlyStoppingPatience) || has(self.dataset.validationPath)"
            " || self.dataset.validationSplit > 0.0",
            "evaluation.earlyStoppingPatience needs a validation split: set dataset.validationSplit above 0 or "
            "dataset.validationPath",
        ),
    )

    @model_validator(mode="after")
    def _early_stopping_needs_validation(self) -> TrainConfig:
        has_validation = self.dataset.validation_path is not None or self.dataset.validation_split > 0
        if self.evaluation.early_stopping_patience is not None and not has_validation:
            raise ValueError(
                "evaluation.earlyStoppingPatience needs a validation split: set dataset.validationSplit "
                "above 0 or dataset.validationPath"
            )
        return self

    @model_validator(mode="after")
    def _working_directories_apart(self) -> TrainConfig:
        # Each is replaced or pruned by kubetune; nested in another, it would take the other's files with it.
        dirs = {"output.dir": self.output.dir, "checkpoints.dir": self.checkpoints.dir}
        if self.dataset.prepared_dir:
            dirs["dataset.preparedDir"] = self.dataset.prepared_dir
        resolved = {name: Path(os.path.normpath(os.path.abspath(d))) for name, d in dirs.items()}
        for a, pa in resolved.items():
            for b, pb in resolved.items():
                if a < b and (pa == pb or pa in pb.parents or pb in pa.parents):
                    raise ValueError(f"{a} and {b} must be separate directories, neither inside the other")
        return self

    def to_yaml(self) -> str:
        """The resolved config, every default filled in, in the file's own camelCase shape."""
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML or JSON config file, apply ``--set key.path=value`` overrides, validate.

    Every problem becomes a ConfigError whose message names the file, line and setting.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}. Pass the path of a YAML config file.") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason}). Save the config as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc.strerror}.") from None
    return parse_config(text, source=str(path), overrides=overrides)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys without a word; in a config that hides a setting."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given beside it override the base's
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                given = key in seen
            except TypeError:  # a list or mapping as a key: SafeLoader's own error names the line
                break
            if given:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The YAML document, and its node tree (for the lines of settings in later messages); a key given twice
    or a syntax error is a ConfigError naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader), yaml.compose(text)  # a SafeLoader refusing duplicate keys
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML ({problem}). Fix the syntax on that line.") from None


def parse_config(text: str, *, source: str = "<config>", overrides: Sequence[str] = ()) -> TrainConfig:
    raw, root = read_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the config must be a mapping with sections model, dataset, lora, training, "
            f"evaluation, checkpoints, output; found a {type(raw).__name__}."
        )
    raw = apply_overrides(raw, overrides)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, TrainConfig, source, root, overrides)) from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` set; the value is parsed as YAML.

    A key may be written in either spelling; an existing key in the other spelling is replaced
    rather than duplicated.
    """
    result = _deep_copy(raw)
    for item in overrides:
        key, sep, value_text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set training.learningRate=1e-4")
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else None
        except yaml.YAMLError:
            value = value_text
        node = result
        for part in parts[:-1]:
            existing = _find_key(node, part)
            child = node.get(existing) if existing is not None else None
            if not isinstance(child, dict):
                child = {}
                node[existing or part] = child
            node = child
        existing = _find_key(node, parts[-1])
        node[existing or parts[-1]] = value
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _find_key(mapping: Mapping[str, Any], key: str) -> str | None:
    """The key of ``mapping`` that means ``key`` in either camelCase or snake_case."""
    for candidate in (key, to_camel(key), to_snake(key)):
        if candidate in mapping:
            return candidate
    return None


# --------------------------------------------------------------------------- error messages


def _explain(
    exc: ValidationError,
    model: type[BaseModel],
    source: str,
    root: yaml.Node | None,
    overrides: Sequence[str],
) -> str:
    lines = [f"Invalid configuration in {source}:"]
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if p != "__root__"]
        dotted = ".".join(str(_camel(p)) for p in loc)
        where = _where(loc, root, overrides)
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            hint = ""
            if parent is not None:
                known = [f.alias or n for n, f in parent.model_fields.items()]
                close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known settings here: {', '.join(known)}"
            lines.append(f"  {where}{dotted}: unknown setting{hint}")
        elif err["type"] == "missing":
            lines.append(f"  {where}{dotted}: required setting is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            shown = ""
            if err["type"] not in {"value_error", "assertion_error"} and "input" in err:
                shown = f" (got {err['input']!r})"
            lines.append(f"  {where}{dotted or '(top level)'}: {msg}{shown}")
    lines.append("Change these settings and run again; `kubetune-train fields` lists every setting.")
    return "\n".join(lines)


def _camel(part: int | str) -> int | str:
    return to_camel(part) if isinstance(part, str) else part


def _where(loc: Sequence[int | str], root: yaml.Node | None, overrides: Sequence[str]) -> str:
    """'line N, ' for the deepest YAML node on the path, or '--set ...' if an override set it."""
    wanted = [str(p) for p in loc]
    for item in reversed(overrides):
        parts = item.partition("=")[0].strip().split(".")
        if [to_snake(p) for p in parts] == [to_snake(p) for p in wanted[: len(parts)]]:
            return f"--set {item}: "
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next(
                ((k, v) for k, v in node.value if isinstance(k.value, str) and to_snake(k.value) == to_snake(part)),
                None,
            )
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return f"line {line}, " if line is not None else ""


def _model_at(model: type[BaseModel], path: Sequence[int | str]) -> type[BaseModel] | None:
    for part in path:
        field = next(
            (f for n, f in model.model_fields.items() if part in (n, f.alias)),
            None,
        )
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


# --------------------------------------------------------------------------- introspection


def iter_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """Yield (camelCase path, type, default, description) for every leaf setting."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, path + ".")
            continue
        if field.is_required():
            default: Any = "(required)"
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = field.default
        type_name = str(annotation).replace("typing.", "")
        if isinstance(annotation, type):
            type_name = annotation.__name__
        yield path, type_name, default, field.description or ""


def total_steps(training: TrainingConfig, num_train_rows: int) -> int:
    """Optimizer steps of the whole run: maxSteps, or epochs over the training split."""
    if training.max_steps is not None:
        return training.max_steps
    return math.ceil(training.epochs * steps_per_epoch(num_train_rows, training))


def warmup_steps(training: TrainingConfig, steps: int) -> int:
    """warmupSteps, or the floor of warmupRatio of the run: a very short run gets no warmup rather
    than a first step at learning rate 0."""
    return training.warmup_steps if training.warmup_steps is not None else math.floor(steps * training.warmup_ratio)


def steps_per_epoch(num_train_rows: int, training: TrainingConfig, world_size: int = 1) -> int:
    """Optimizer steps in one pass over the training split (the last partial batch counts)."""
    # Same rounding as transformers' Trainer: a trailing partial accumulation is a step.
    batches = math.ceil(num_train_rows / (training.batch_size * world_size))
    return math.ceil(batches / training.gradient_accumulation_steps)
