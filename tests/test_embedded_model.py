"""The embedded tiny model (nanopost_trl/assets/tiny), its offline addition task, and held_out_accuracy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2ForCausalLM

from nanopost_trl.assets import TINY_MODEL_PATH
from nanopost_trl.base import TaskInstance
from nanopost_trl.evaluation import held_out_accuracy, prompt_ids
from nanopost_trl.tasks import addition, get_task_loader


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(TINY_MODEL_PATH)


def test_checkpoint_is_a_small_qwen2_with_a_real_tokenizer(model, tokenizer):
    assert isinstance(model, Qwen2ForCausalLM) and model.config.model_type == "qwen2"
    assert model.dtype == torch.float32
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    weights_mb = sum(f.stat().st_size for f in TINY_MODEL_PATH.glob("*.safetensors")) / 2**20
    assert 0.5 < weights_mb < 12


def test_chat_template_renders_and_tokenizes_per_character(tokenizer):
    messages = [{"role": "user", "content": "47+38="}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>47+38=<|assistant|>"
    ids = prompt_ids(tokenizer, messages)
    assert len(ids) == 8 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "47+38="
    answered = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "58"}], tokenize=False)
    assert answered.endswith("58" + tokenizer.eos_token)


def test_greedy_generation_stops_at_eos(model, tokenizer):
    ids = torch.tensor([prompt_ids(tokenizer, instance.prompt) for instance in addition.load("test")[:16]])
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    output = output[:, ids.shape[1] :]
    assert output.shape[1] < 10  # every row ended before the limit
    for row in output.tolist():
        end = row.index(tokenizer.eos_token_id)
        assert 2 <= end <= 3  # two or three answer digits
        assert all(token == tokenizer.pad_token_id for token in row[end + 1 :])


def test_splits_are_disjoint_deterministic_and_registered():
    train, test = addition.operand_pairs("train"), addition.operand_pairs("test")
    assert len(test) == addition.TEST_SIZE and len(train) + len(test) == 90 * 90
    assert not set(train) & set(test)
    assert addition.operand_pairs("test") == test
    instances = get_task_loader("addition")("test")
    assert [i.prompt for i in instances] == [i.prompt for i in addition.load("test")]
    assert instances[0].prompt == [{"role": "user", "content": addition.prompt_text(*test[0])}]
    with pytest.raises(ValueError, match="train, test"):
        addition.load("validation")


def test_target_is_least_significant_digit_first():
    assert addition.target_completion(47, 38) == "58"
    assert addition.target_completion(99, 99) == "891"
    assert addition.target_completion(10, 10) == "02"


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("58", 1.0),
        (" 58\n", 1.0),
        ("85", 0.0),
        ("58 58", 0.0),
        ("5", 0.0),
        ("", 0.0),
        ("5" * 100_000, 0.0),
        ("\u0665\u0668", 0.0),
        ("\uff15\uff18", 0.0),
        ("58\x00", 0.0),
    ],
)
def test_grader_is_exact(completion, score):
    instance = addition.make_instance(47, 38)
    assert instance.eval_fn(completion) == score


def test_shipped_checkpoint_has_room_to_improve(model, tokenizer):
    accuracy = held_out_accuracy(model, tokenizer, addition.load("test")[:200], max_new_tokens=4)
    assert set(accuracy) == {"addition"}
    assert 0.10 <= accuracy["addition"] <= 0.45


def test_held_out_accuracy_groups_by_task_and_restores_training_mode(model, tokenizer):
    prompts = [instance.prompt for instance in addition.load("test")[:5]]
    instances = [TaskInstance("always", p, lambda c: 1.0) for p in prompts]
    instances += [TaskInstance("never", p, lambda c: 0.0) for p in prompts]
    instances.append(TaskInstance("digits", prompts[0], lambda c: float(c.isdigit())))
    model.train()
    try:
        accuracy = held_out_accuracy(model, tokenizer, instances, max_new_tokens=4, batch_size=3)
        assert model.training
    finally:
        model.eval()
    assert accuracy == {"always": 1.0, "never": 0.0, "digits": 1.0}


def test_best_of_k_scores_each_instance_on_its_own_k_samples(model, tokenizer):
    seen: dict[int, list[str]] = {i: [] for i in range(6)}

    def recording(index: int, grade):
        return lambda completion: seen[index].append(completion) or grade(completion)

    instances = [
        TaskInstance(f"task{i % 2}", instance.prompt, recording(i, instance.eval_fn))
        for i, instance in enumerate(addition.load("test")[:6])
    ]
    torch.manual_seed(123)
    next_draw = torch.rand(1)
    torch.manual_seed(123)
    best_of_4 = held_out_accuracy(model, tokenizer, instances, 4, batch_size=10, samples=4, temperature=1.5, seed=7)
    assert torch.rand(1) == next_draw  # training's RNG stream is untouched
    assert all(len(completions) == 4 for completions in seen.values())
    assert any(len(set(completions)) > 1 for completions in seen.values())  # sampled, not greedy
    for task in ("task0", "task1"):
        indices = [i for i in range(6) if instances[i].name == task]
        want = sum(max(addition.load("test")[i].eval_fn(c) for c in seen[i]) for i in indices) / len(indices)
        assert best_of_4[task] == want
    first_draw = {i: list(completions) for i, completions in seen.items()}
    for completions in seen.values():
        completions.clear()
    assert held_out_accuracy(model, tokenizer, instances, 4, batch_size=10, samples=4, temperature=1.5, seed=7) == (
        best_of_4
    )
    assert seen == first_draw  # the same seed draws the same samples
