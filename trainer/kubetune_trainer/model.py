"""Base model, tokenizer and LoRA adapter.

The choices that depend on the machine (precision, attention kernel) are pure functions
of a `Hardware` record, so they are tested without the hardware.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError, safe_open

from kubetune_trainer.config import LoraConfig, ModelConfig
from kubetune_trainer.errors import ConfigError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    device_count: int = 0
    bf16: bool = False
    flash_attn: bool = False
    device_name: str = "cpu"

    @classmethod
    def detect(cls) -> Hardware:
        if not torch.cuda.is_available():
            return cls(cuda=False)
        major, _ = torch.cuda.get_device_capability(0)
        return cls(
            cuda=True,
            device_count=torch.cuda.device_count(),
            bf16=torch.cuda.is_bf16_supported(),
            # flash-attn 2 needs Ampere (sm80) or newer.
            flash_attn=major >= 8 and importlib.util.find_spec("flash_attn") is not None,
            device_name=torch.cuda.get_device_name(0),
        )


def resolve_precision(requested: str, hw: Hardware) -> str:
    """'bf16', 'fp16' or 'fp32' for this machine; refuses what the hardware cannot do."""
    if requested == "auto":
        if not hw.cuda:
            return "fp32"
        return "bf16" if hw.bf16 else "fp16"
    if requested in ("bf16", "fp16") and not hw.cuda:
        # CPU autocast in fp16 is unsupported and bf16 is slower than fp32 on most CPUs.
        raise ConfigError(
            f"training.precision={requested} needs a GPU, and none is visible. Use precision auto or fp32 on CPU."
        )
    if requested == "bf16" and not hw.bf16:
        raise ConfigError(
            f"training.precision=bf16 is not supported by {hw.device_name}. Use precision auto (fp16 here)."
        )
    return requested


def resolve_attention(requested: str, hw: Hardware) -> str:
    if requested != "auto":
        if requested == "flash_attention_2" and not hw.flash_attn:
            raise ConfigError(
                "model.attnImplementation=flash_attention_2 needs an Ampere or newer GPU and the flash-attn "
                "package. Use attnImplementation auto or sdpa."
            )
        return requested
    return "flash_attention_2" if hw.flash_attn else "sdpa"


def download_patterns(repo_files: list[str], trust_remote_code: bool) -> list[str]:
    """What to fetch of a Hub repository: config, tokenizer and one copy of the weights, safetensors when the
    repository has them (many also carry the same weights as pytorch_model.bin), else the .bin files."""
    patterns = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    patterns.append("*.safetensors" if any(f.endswith(".safetensors") for f in repo_files) else "*.bin")
    if trust_remote_code:
        patterns.append("*.py")
    return patterns


def fetch_model(cfg: ModelConfig) -> None:
    """Download a Hub model into the cache (HF_HOME) so the training Job loads it from disk."""
    if Path(cfg.name_or_path).is_dir():
        return
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(cfg.name_or_path, revision=cfg.revision)
        patterns = download_patterns(files, cfg.trust_remote_code)
        path = snapshot_download(cfg.name_or_path, revision=cfg.revision, allow_patterns=patterns)
    except Exception as exc:  # network, auth and repository errors come from several libraries
        raise ConfigError(
            f"model.nameOrPath={cfg.name_or_path!r}: cannot download it ({type(exc).__name__}: "
            f"{first_line(exc)}). Check the id and revision, "
            "the network, and HF_TOKEN for gated models."
        ) from None
    log.info("Model %s is in the cache at %s", cfg.name_or_path, path)


def load_tokenizer(cfg: ModelConfig) -> Any:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(_load_failure("tokenizer", cfg, exc)) from None
    if tokenizer.pad_token_id is None:
        # Safe because the collator masks padding by position, not by id (see data.py).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, precision: str, attention: str) -> transformers.PreTrainedModel:
    # The base weights are frozen, so bf16 base + fp32 adapter (peft's default) loses nothing
    # and halves memory; fp16 bases stay fp32 because fp16 weights overflow more easily.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
            attn_implementation=attention,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(_load_failure("model", cfg, exc)) from None
    except (SafetensorError, RuntimeError) as exc:
        # A truncated or altered weights file (an interrupted download or copy). torch's RuntimeErrors
        # also mean a GPU that failed or ran out of memory: those stay crashes unless a file is broken.
        broken = next(((f, why) for f in _weight_files(cfg) if (why := weight_file_problem(f))), None)
        if broken is None and isinstance(exc, RuntimeError):
            raise
        where, why = broken if broken else (None, first_line(exc, 10_000))
        raise ConfigError(
            f"model.nameOrPath={cfg.name_or_path!r}: cannot load the model weights: "
            f"{where or 'a weights file'} is unreadable ({why}); it is truncated or damaged. "
            + (
                "Copy or save the model there again."
                if Path(cfg.name_or_path).is_dir()
                else "Delete it from the Hugging Face cache (HF_HOME) and run prepare again to download it."
            )
        ) from None
    return model


def weight_file_problem(path: Path) -> str | None:
    """Why a weights file cannot be read, or None. Reads only headers and directories, not tensors."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                pass  # the header is checked against the file size: a truncated file fails here
        elif path.suffix == ".bin":
            with zipfile.ZipFile(path):  # torch.save's format; a cut-off file has no central directory
                pass
    except (SafetensorError, zipfile.BadZipFile, OSError) as exc:
        return first_line(exc, 10_000)
    return None


def _weight_files(cfg: ModelConfig) -> list[Path]:
    """The weights files of the model on disk: its directory, or its snapshot in the Hub cache."""
    directory = Path(cfg.name_or_path)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(cfg.name_or_path, revision=cfg.revision, local_files_only=True))
        except Exception:  # not in the cache (or not a Hub id): no file to name
            return []
    return sorted(p for pattern in ("*.safetensors", "*.bin") for p in directory.glob(pattern))


def _load_failure(what: str, cfg: ModelConfig, exc: Exception) -> str:
    local = Path(cfg.name_or_path)
    hint = (
        f"the directory {local} exists but holds no loadable {what}"
        if local.is_dir()
        else "it is neither a local directory nor a reachable Hugging Face Hub id"
    )
    first = first_line(exc, 10_000)
    return (
        f"model.nameOrPath={cfg.name_or_path!r}: cannot load the {what}: {hint} ({first}). "
        "Point model.nameOrPath at a directory made by save_pretrained or at a Hub id (online)."
    )


def build_lora_config(cfg: LoraConfig) -> peft.LoraConfig:
    """The one place where kubetune's LoRA settings become peft's."""
    return peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        # peft spells "every linear layer" as the string, not a one-element list.
        target_modules="all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
    )


def apply_lora(model: transformers.PreTrainedModel, cfg: LoraConfig, gradient_checkpointing: bool) -> Any:
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With frozen embeddings nothing before the first adapter requires grad; this keeps the graph alive.
        model.enable_input_require_grads()
    model.config.use_cache = False
    return add_lora(model, cfg)


def add_lora(model: torch.nn.Module, cfg: LoraConfig) -> peft.PeftModel:
    """peft.get_peft_model with every LoRA setting that matches no module refused (ConfigError).

    peft raises only when no target module matches at all; one misspelt name in a list, or any
    in modulesToSave, it ignores (at most a warning). Works on the meta device too (preflight)."""
    # Named before peft adds its own layers (lora_A, base_layer, ...) to the model, in place.
    linear, modules = _leaf_names(model, torch.nn.Linear), _leaf_names(model, torch.nn.Module)
    try:
        wrapped = peft.get_peft_model(model, build_lora_config(cfg))
    except ValueError as exc:
        raise ConfigError(
            f"lora.targetModules: {str(exc).strip()} Linear layers in this model: {', '.join(linear)}. "
            "Set lora.targetModules to some of these, or to all-linear.",
            check=LORA_CHECK,
        ) from None
    problems = unmatched_lora_modules(
        cfg,
        adapted=wrapped.base_model.targeted_module_names,
        saved=[name for name, m in wrapped.named_modules() if isinstance(m, ModulesToSaveWrapper)],
        linear=linear,
        modules=modules,
    )
    if problems:
        raise ConfigError(" ".join(problems), check=LORA_CHECK)
    return wrapped


LORA_CHECK = "model.target_modules"  # the preflight check these errors belong to


def unmatched_lora_modules(
    cfg: LoraConfig, *, adapted: Sequence[str], saved: Sequence[str], linear: Sequence[str], modules: Sequence[str]
) -> list[str]:
    """One message per lora.targetModules / lora.modulesToSave entry that matched no module. Pure.

    adapted: the modules peft put LoRA on; saved: those it wrapped to train in full; linear and
    modules: the base model's layer names, for suggestions. Matching is peft's: a target entry is a
    module's full name or its last dotted parts; a modulesToSave entry, any ending of the name.
    """
    problems = []
    if cfg.target_modules != ["all-linear"]:
        for i, entry in enumerate(cfg.target_modules):
            if not any(name == entry or name.endswith(f".{entry}") for name in adapted):
                problems.append(
                    f"lora.targetModules[{i}]={entry!r} matches no layer of this model{_did_you_mean(entry, linear)}"
                    f" Linear layers in this model: {', '.join(linear)}."
                )
    for i, entry in enumerate(cfg.modules_to_save):
        if not any(name.endswith(entry) for name in saved):
            problems.append(
                f"lora.modulesToSave[{i}]={entry!r} matches no module of this model{_did_you_mean(entry, modules)}"
                f" Modules in this model: {', '.join(modules)}."
            )
    return problems


def _did_you_mean(entry: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "."


def _leaf_names(model: torch.nn.Module, kind: type[torch.nn.Module]) -> list[str]:
    """The distinct last parts of the names of model's modules of a kind (layer indices left out)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kind)}
    return sorted(n for n in names if not n.isdigit())


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
