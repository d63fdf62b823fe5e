"""benchmarks/gpu_presets.py: the architectures have the public parameter counts; the synthetic prompts keep their
length through the saved tokenizer; a shrunk preset runs on CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanopost_trl.config import Preset
from nanopost_trl.models import load_model_and_tokenizer

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_presets.py"


@pytest.fixture(scope="module")
def gpu_presets():
    spec = importlib.util.spec_from_file_location("gpu_presets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Model cards: Qwen2.5 0.49B / 1.54B / 3.09B; Gemma 3 1B (999.9M). Tied embeddings count once.
@pytest.mark.parametrize(
    ("model_id", "parameters"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.494e9),
        ("Qwen/Qwen2.5-1.5B-Instruct", 1.54e9),
        ("Qwen/Qwen2.5-3B-Instruct", 3.09e9),
        ("google/gemma-3-1b-it", 1.0e9),
    ],
)
def test_architectures_have_the_public_sizes(gpu_presets, model_id, parameters):
    with torch.device("meta"):  # shapes only, nothing allocated
        model = AutoModelForCausalLM.from_config(gpu_presets.architecture(model_id))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.005)


def test_every_model_sized_preset_is_covered(gpu_presets):
    assert {"QWEN_0_5B_SMOKE", "QWEN_1_5B_1xA100", "GEMMA_1B_1x80GB", "QWEN_3B_LORA_24GB"} <= set(
        gpu_presets.GPU_PRESETS
    )
    assert {preset.name for preset in Preset if preset.value.target is not None} <= set(gpu_presets.GPU_PRESETS)


def test_shrunk_preset_runs_on_cpu_and_reports_a_row(gpu_presets, tmp_path, capsys):
    out = tmp_path / "presets.md"
    argv = ["--presets", "QWEN_0_5B_SMOKE", "--shrink", "--steps", "2", "--out", str(out), "--workdir", str(tmp_path)]
    gpu_presets.main(argv)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| QWEN_0_5B_SMOKE |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[1] == "CPU" and cells[3] == "2 x 4 / 8" and cells[5].endswith("GiB RSS")
    assert float(cells[7]) > 0 and float(cells[8]) >= 0  # generation tokens/s, learning s/step
    assert rows[0] in capsys.readouterr().out


@pytest.mark.parametrize("model_id", ["Qwen/Qwen2.5-0.5B-Instruct", "google/gemma-3-1b-it"])
def test_prompts_keep_their_length_through_the_saved_tokenizer(gpu_presets, tmp_path, model_id):
    """The synthetic tokenizer as the trainer reloads it (transformers picks the model family's tokenizer class):
    one token per prompt word, a few for the chat template, and the words back when decoded."""
    path = gpu_presets.model_dir(model_id, shrink=True, workdir=tmp_path)
    _, tokenizer = load_model_and_tokenizer(Preset.TINY_SMOKE.make(model=str(path)))
    assert len(tokenizer) == gpu_presets.SHRINK["vocab_size"]
    (task,) = gpu_presets.synthetic_tasks(count=1)
    ids = tokenizer.apply_chat_template(task.prompt, add_generation_prompt=True)["input_ids"]
    assert gpu_presets.PROMPT_WORDS <= len(ids) <= gpu_presets.PROMPT_WORDS + 10, len(ids)
    prompt_ids = tokenizer(" " + task.prompt[0]["content"], add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) == gpu_presets.PROMPT_WORDS
    assert tokenizer.decode(prompt_ids).split() == task.prompt[0]["content"].split()
