"""The shared-prompt path: each prompt through the model once, log-probs, entropies and gradients unchanged."""

from __future__ import annotations

import types

import pytest
import torch
from accelerate import Accelerator
from conftest import random_qwen2
from peft import LoraConfig, get_peft_model
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    SiglipVisionConfig,
)
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from nanopost_trl.shared_prompt import (
    IGNORE_INDEX,
    PADDING_SEGMENT,
    pack_by_prompt,
    shared_prompt_attention_mask,
    shared_prompt_logprobs,
    shared_prompt_unsupported,
    shuffle_whole_groups,
)

TEMPERATURE = 0.7
TRL_SELF = types.SimpleNamespace(accelerator=Accelerator())  # all the unshared TRL method reads from its trainer


def left_padded(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    return ids, (torch.arange(width) >= width - torch.tensor([len(row) for row in rows])[:, None]).long()


def right_padded(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    return ids, (torch.arange(width) < torch.tensor([len(row) for row in rows])[:, None]).long()


def micro_batch(eos: int) -> tuple[torch.Tensor, ...]:
    """Two prompts of different lengths (left padding), 3 completions each, rows interleaved: completions of
    different lengths, one ending in EOS before the longest (padding after it), one masked out entirely."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 18, (n,), generator=generator).tolist()

    long_prompt, short_prompt = tokens(7), tokens(3)
    completions = [tokens(6), tokens(3) + [eos], tokens(2), tokens(6), [], tokens(1)]
    prompt_ids, prompt_mask = left_padded([long_prompt, short_prompt] * 3, width=8)
    completion_ids, completion_mask = right_padded(completions, width=6)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def unshared_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """TRL's own learner log-probs on the unpacked rows."""
    logprobs, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
        TRL_SELF,
        model,
        torch.cat([prompt_ids, completion_ids], dim=1),
        torch.cat([prompt_mask, completion_mask], dim=1),
        completion_ids.size(1),
        compute_entropy=True,
    )
    return logprobs, entropies


def policy_model(tokenizer, attention: str, variant: str) -> torch.nn.Module:
    model = random_qwen2(tokenizer, hidden_size=32, layers=2)
    model.config._attn_implementation = attention
    add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    if "lora" in variant:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora)
    if "checkpointing" in variant:
        model.activation_checkpointing_enable()
        if "lora" in variant:
            model.enable_input_require_grads()
    model.train()
    return model


def logprobs_and_grads(model, forward, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs, entropies, and the gradients of a loss that weighs every token and entropy differently."""
    model.zero_grad()
    logprobs, entropies = forward(model, *batch)
    weights = torch.linspace(-1.0, 1.0, logprobs.numel()).view_as(logprobs)
    ((logprobs * weights).sum() + (entropies * weights.flip(0)).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), entropies.detach(), grads


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["full", "lora", "checkpointing", "lora+checkpointing"])
def test_logprobs_entropies_and_gradients_equal_the_unshared_path(tokenizer, attention, variant):
    model = policy_model(tokenizer, attention, variant)
    batch = micro_batch(tokenizer.eos_token_id)
    shared = logprobs_and_grads(model, shared_prompt_logprobs_with_entropy, batch)
    unshared = logprobs_and_grads(model, unshared_logprobs, batch)

    completion_mask = batch[3].bool()
    assert (shared[0][~completion_mask] == 0).all() and (shared[1][~completion_mask] == 0).all()
    assert (shared[0][completion_mask] < 0).all()
    torch.testing.assert_close(shared[0], unshared[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared[1], unshared[1], rtol=1e-5, atol=1e-6)
    assert shared[2].keys() == unshared[2].keys()
    if "lora" in variant:
        assert all("lora_" in name for name in shared[2])
    for name, grad in shared[2].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, unshared[2][name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(shared_prompt_logprobs_with_entropy(model, *batch), (shared[0], shared[1]))


def shared_prompt_logprobs_with_entropy(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    return shared_prompt_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, compute_entropy=True)


def test_each_prompt_is_packed_once_with_its_completions():
    """Rows 0 and 2 share prompt [5, 6, 7], row 1 has [8, 9] (left-padded); row 2's completion ends at EOS (2)."""
    prompt_ids, prompt_mask = left_padded([[5, 6, 7], [8, 9], [5, 6, 7]], width=3)
    completion_ids, completion_mask = right_padded([[10, 11, 12], [13], [14, 2]], width=3)
    packed = pack_by_prompt(prompt_ids, prompt_mask, completion_ids, completion_mask)
    pad, ignore = PADDING_SEGMENT, IGNORE_INDEX
    # group 0: prompt[:-1] = [5, 6] | row 0: [7, 10, 11] -> [10, 11, 12] | row 2: [7, 14] -> [14, 2]
    # group 1: prompt[:-1] = [8] | row 1: [9] -> [13]
    assert packed.input_ids.tolist() == [[5, 6, 7, 10, 11, 7, 14], [8, 9, 0, 0, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 0, 0, 0, 0]]
    assert packed.segment_ids.tolist() == [[0, 0, 1, 1, 1, 3, 3], [0, 2, pad, pad, pad, pad, pad]]
    assert packed.shift_labels.tolist() == [
        [ignore, ignore, 10, 11, 12, 14, 2],
        [ignore, 13, ignore, ignore, ignore, ignore, ignore],
    ]
    assert packed.token_group.tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert packed.token_position.tolist() == [[2, 3, 4], [1, 0, 0], [5, 6, 0]]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_completions_see_the_prompt_and_themselves_only(tokenizer, attention):
    prompt_ids, prompt_mask = left_padded([[5, 6, 7], [5, 6, 7]], width=3)
    completion_ids, completion_mask = right_padded([[10, 11], [12, 13]], width=2)
    packed = pack_by_prompt(prompt_ids, prompt_mask, completion_ids, completion_mask)
    model = random_qwen2(tokenizer)
    model.config._attn_implementation = attention
    mask = shared_prompt_attention_mask(model, packed)
    # tokens: 5 6 | 7 10 | 7 12 -> prompt[:-1] (causal), row 0's segment, row 1's segment
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    attends = mask[0, 0] if attention == "sdpa" else mask[0, 0] == 0
    assert mask.shape == (1, 1, 6, 6) and torch.equal(attends, expected)


def test_masks_that_are_not_one_sided_are_refused():
    prompt_ids, prompt_mask = left_padded([[5, 6, 7]], width=4)
    completion_ids, completion_mask = right_padded([[10, 11]], width=3)
    with pytest.raises(ValueError, match="prompt_mask padded on the left only"):
        pack_by_prompt(prompt_ids, prompt_mask.flip(1), completion_ids, completion_mask)
    with pytest.raises(ValueError, match="completion_mask padded on the right only"):
        pack_by_prompt(prompt_ids, prompt_mask, completion_ids, completion_mask.flip(1))
    with pytest.raises(ValueError, match="at least one prompt token"):
        pack_by_prompt(prompt_ids, torch.zeros_like(prompt_mask), completion_ids, completion_mask)


def test_entropies_need_the_entropy_output_of_the_fused_head(tokenizer):
    model = random_qwen2(tokenizer)
    add_fused_lm_head(model)
    prompt_ids, prompt_mask = left_padded([[5, 6, 7]], width=3)
    completion_ids, completion_mask = right_padded([[10, 11]], width=2)
    with pytest.raises(ValueError, match='"entropy" among its outputs'):
        shared_prompt_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, compute_entropy=True)


def tiny_mistral(sliding_window: int | None) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=sliding_window,
    )
    return MistralForCausalLM(config)


def test_the_path_applies_to_dense_text_models_with_eager_or_sdpa_only(tokenizer):
    model = random_qwen2(tokenizer)
    for attention in ["eager", "sdpa"]:
        model.config._attn_implementation = attention
        assert shared_prompt_unsupported(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "'flash_attention_2' reads no custom 4D mask" in shared_prompt_unsupported(model)

    sliding = random_qwen2(tokenizer)
    sliding.config.layer_types = ["full_attention", "sliding_attention"]
    assert "has sliding_attention layers" in shared_prompt_unsupported(sliding)
    assert "has sliding_attention layers" in shared_prompt_unsupported(tiny_mistral(sliding_window=4))
    assert shared_prompt_unsupported(tiny_mistral(sliding_window=None)) is None

    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=model.config))
    assert "llava is multimodal" in shared_prompt_unsupported(llava)

    lora = get_peft_model(random_qwen2(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    assert shared_prompt_unsupported(lora) is None


def test_shuffling_whole_groups_keeps_each_micro_batch_whole():
    prompts = torch.arange(6).repeat_interleave(4)[:, None].expand(-1, 3)  # 6 groups of 4 rows
    batch = {"prompt_ids": prompts, "row": list(range(24)), "num_items_in_batch": torch.tensor(24), "images": None}
    torch.manual_seed(0)
    shuffled = shuffle_whole_groups(batch, group_size=4)
    assert shuffled["num_items_in_batch"] is batch["num_items_in_batch"] and shuffled["images"] is None
    assert sorted(shuffled["row"]) == list(range(24)) and shuffled["row"] != list(range(24))
    assert torch.equal(shuffled["prompt_ids"], prompts[shuffled["row"]])
    for group in shuffled["prompt_ids"].split(4):
        assert (group == group[0]).all()
    with pytest.raises(ValueError, match="24 rows do not split into whole groups of 5"):
        shuffle_whole_groups(batch, group_size=5)


def test_the_group_shuffle_draws_from_the_random_stream_as_trl_shuffle_does():
    """A seed gives the same random stream after either shuffle (so sampling that follows matches TRL's run)."""
    from trl.trainer.grpo_trainer import shuffle_sequence_dict

    batch = {"x": torch.arange(12.0)}
    after = []
    for shuffle in (shuffle_sequence_dict, lambda b: shuffle_whole_groups(b, group_size=3)):
        torch.manual_seed(0)
        shuffle(batch)
        after.append(torch.rand(4))
    torch.testing.assert_close(after[0], after[1])
