"""The adapter: TRL's GRPOTrainer whose loss and advantage estimator come from a `LossFn`.

Each override (the hooks listed in `trl_bridge.HOOKS`) is a short delegation to a feature in `nanopost_trl.learner`;
everything that names a TRL private lives in `nanopost_trl.trl_bridge`. Read top to bottom, a step is:
1. `_generate_and_score_completions`: TRL samples (with the actor's weights under `sync_interval > 1`, the reference
   on the device) and scores; `_calculate_rewards` keeps the step's rewards; then the loss's advantages over whole
   groups, the groups it keeps, and the truncation flags join TRL's output.
2. `_compute_loss`, per micro-batch: the policy's log-probs and entropies (`_get_per_token_logps_and_entropies`:
   TRL's fused LM head in `cfg`'s tiles, or the full logits), a `LearnerBatch`, the `LossFn`, checked, scaled for
   gradient accumulation as TRL does.
3. `training_step`: once, that the LossFn's loss was the tensor back-propagated.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer

from nanopost_trl import base, learner, multiturn, trl_bridge
from nanopost_trl.config import TrainConfig
from nanopost_trl.trl_bridge import log_metrics

TOOL_FAILURES = ("errors", "timeouts", "non_string")  # tool calls that failed, by kind (multiturn.guarded_call)


class NanopostGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss and advantage estimator come from a `LossFn`."""

    def __init__(
        self,
        *args: Any,
        loss_fn: base.LossFn,
        instances: Sequence[base.TaskInstance],
        cfg: TrainConfig,
        tools: Sequence[Callable] = (),
        environment_factory: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        trl_bridge.check_trl()
        self.loss_fn, self.instances, self.cfg = loss_fn, instances, cfg
        # tools and environments go to TRL's tool loop, each call guarded (errors, non-strings, time-outs counted)
        self.tool_counts: collections.Counter[str] = collections.Counter()
        kwargs["tools"] = [multiturn.guarded(tool, self.tool_counts, cfg.tool_timeout_s) for tool in tools] or None
        if environment_factory is not None:
            kwargs["environment_factory"] = multiturn.guarded_environments(
                environment_factory, self.tool_counts, cfg.tool_timeout_s
            )
        self.actor = learner.ActorCopy(cfg.sync_interval)
        self.reference = learner.ReferenceOffload(cfg.offload_reference)
        self.backprop_check, self.fused_head_check = trl_bridge.BackpropCheck(), trl_bridge.FusedHeadCheck()
        self.step_rewards: torch.Tensor | None = None  # (N, C) of the step being scored, from `_calculate_rewards`
        super().__init__(*args, **kwargs)
        trl_bridge.check_trainer(self)
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if cfg.sync_interval > 1 and zero3:
            raise ValueError("sync_interval > 1 keeps a full actor copy of the weights: not supported with ZeRO-3")
        if cfg.offload_reference and self.is_deepspeed_enabled:
            raise ValueError("offload_reference: use DeepSpeed's own offload_param_device for the reference instead")
        if cfg.offload_reference and self.ref_model is not None:
            self.ref_model.to("cpu")

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def tokenizer(self):
        """The text tokenizer (of a multimodal processor too)."""
        return getattr(self.processing_class, "tokenizer", self.processing_class)

    def weighted_rewards(self, components: torch.Tensor) -> torch.Tensor:
        """(N,) from (N, C): TRL's weighted sum, a NaN component (an environment's `get_reward` gave None) skipped."""
        return (components * self.reward_weights.to(components.device)).nansum(dim=1)

    # --- rewards: keep the step's per-function rewards; log grader errors, time-outs and per-task means
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self.step_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        counts = [func.take_counts() for func in self.reward_funcs if hasattr(func, "take_counts")]  # not get_reward
        log_metrics(
            self, {"reward_errors": sum(c[0] for c in counts), "reward_timeouts": sum(c[1] for c in counts)}, "sum"
        )
        if self.tools:  # multi-turn episodes: turns, calls, malformed calls, failed calls by kind
            failures = dict(self.tool_counts)
            self.tool_counts.clear()  # the guarded tools hold this Counter
            log_metrics(self, multiturn.episode_stats(completions, multiturn.tool_call_marker(self.tokenizer)))
            log_metrics(self, {f"tool_{kind}": float(failures.get(kind, 0)) for kind in TOOL_FAILURES}, "sum")
        rewards = self.weighted_rewards(self.step_rewards)
        task_names = [self.instances[i].name for i in gather_object([x["instance_id"] for x in inputs])]
        log_metrics(
            self,
            {
                f"task_{task}_reward_mean": rewards[[name == task for name in task_names]].mean().item()
                for task in sorted(set(task_names))
            },
        )
        return self.step_rewards

    # --- advantages: the loss's estimator over whole groups, before the batch is split across processes
    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        params = self._trainable_params()
        staleness = self.actor.staleness(self.state.global_step, params) if self.model.training else 0
        with (
            self.reference.on_device(self.ref_model, self.accelerator.device),
            self.actor.weights(params) if staleness else contextlib.nullcontext(),
            self.accelerator.autocast(),  # bf16: sample in bf16 too (TRL generates outside autocast), weights stay fp32
        ):
            output = super()._generate_and_score_completions(inputs)
            if staleness:
                with torch.no_grad():
                    output["old_per_token_logps"] = self._policy_logprobs(self.model, output, scoring=True)[0]
        components, self.step_rewards = self.step_rewards, None
        rewards = self.weighted_rewards(components)
        advantages, keep = learner.group_advantages(
            self.loss_fn, rewards, components, self.reward_func_names, self.num_generations
        )
        rank, size = self.accelerator.process_index, len(inputs)
        local = slice(rank * size, (rank + 1) * size)
        output |= {"advantages": advantages[local], "rewards": rewards[local], "reward_components": components[local]}
        output["truncated"] = learner.truncated(
            output["completion_ids"], output["completion_mask"], [*self.eos_token_ids, self.tokenizer.pad_token_id]
        )
        if not keep.all():  # dropped groups: no loss, and out of the step's token count
            output["completion_mask"] = output["completion_mask"] * keep[local].unsqueeze(1)
            loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
            output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        prompt_tokens = self.accelerator.gather(output["prompt_mask"].sum(dim=1)).float()
        log_metrics(
            self,
            {
                "prompt_len_mean": prompt_tokens.mean().item(),
                "generation_time_s": time.perf_counter() - start,
                "actor_staleness": float(staleness),
                "groups_dropped": float((~keep).sum().item() / self.num_generations),
            },
        )
        return output

    # --- log-probs: TRL's fused LM head in the configured tiles, or the model's full logits
    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        if not self.cfg.chunked_logprobs:
            return learner.materialized_logprobs(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, self.temperature,
                self.accelerator.autocast, **kwargs,
            )  # fmt: skip
        vocab_chunk = self.cfg.vocab_chunk(triton=trl_bridge.kernel_uses_triton(input_ids.device))
        with trl_bridge.fused_head_tiles(vocab_chunk, self.fused_head_check):
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
            )
        self.fused_head_check.verify(attention_mask[: batch_size or None], logits_to_keep, vocab_chunk)
        return result

    def _policy_logprobs(self, model, inputs: dict, scoring: bool = False):
        """Policy log-probs, entropies and MoE router loss (None without one) of a micro-batch; with a loss that
        declares `backward_rows`, the grad-carrying forward runs on its kept rows only. `scoring`: log-probs only,
        in TRL's scoring batch size."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if scoring else None

        def forward(rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            return self._get_per_token_logps_and_entropies(
                model, input_ids[rows], attention_mask[rows], inputs["completion_ids"].size(1), batch_size,
                compute_entropy=not scoring, compute_aux_loss=self.aux_loss_enabled and not scoring,
            )  # fmt: skip

        if scoring or not learner.declares_backward_rows(self.loss_fn):
            return forward(slice(None))
        logprobs, entropies, router_loss, kept = learner.gated_policy_logprobs(
            forward, lambda lp, ent: self.loss_fn.backward_rows(trl_bridge.learner_batch(self, inputs, lp, ent))
        )
        log_metrics(self, {} if kept is None else {"backward_rows_frac": kept})
        return logprobs, entropies, router_loss

    # --- loss: a LearnerBatch from TRL's tensors, then the LossFn
    def _compute_loss(self, model, inputs):
        policy_logprobs, entropies, router_loss = self._policy_logprobs(model, inputs)
        ratio = trl_bridge.importance_sampling_ratio(inputs)
        if ratio is not None and not self.loss_fn.corrects_sampler_mismatch:
            policy_logprobs = learner.sampler_corrected(policy_logprobs, ratio)
        batch = trl_bridge.learner_batch(self, inputs, policy_logprobs, entropies)
        loss, metrics = self.loss_fn(batch)
        loss, skipped = learner.checked_loss(
            loss, policy_logprobs, type(self.loss_fn).__name__, self.state.global_step + 1, self.cfg.skip_nonfinite
        )
        log_metrics(
            self,
            {f"loss_{name}": float(value) for name, value in metrics.items()}
            | learner.batch_stats(batch)
            | {"nonfinite_skipped": float(skipped)},  # the fraction of micro-batches whose step was skipped
        )
        if router_loss is not None:  # a MoE model's load-balancing loss, added as TRL adds it
            loss = loss + self.router_aux_loss_coef * router_loss
            log_metrics(self, {"aux_loss": router_loss.item()})
        normalizer = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return self.backprop_check.watch(loss / normalizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.backprop_check.verify()  # once: the LossFn's loss was the one back-propagated
        return loss
