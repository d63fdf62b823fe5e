"""The adapter: TRL's GRPOTrainer whose loss and advantage estimator come from a `LossFn`.

Each override (the hooks listed in `trl_bridge.HOOKS`) is a short delegation to a feature in a module of its own
(`learner`: the batch's tensors and checks; `logprobs`; `sampling`; `refill`; `model_copies`; `tools`); everything
that names a TRL private lives in `nanopost_trl.trl_bridge`, and TRL's own trainer attributes are read through its
checked view (`self.grpo`). Read top to bottom, a step is:
1. `_generate_and_score_completions`: TRL samples (with the actor's weights under `sync_interval > 1`, the reference
   on the device; without vLLM through `_generate_single_turn`: `nanopost_trl.sampling`) and scores;
   `_calculate_rewards` keeps the step's rewards; then the loss's advantages over whole groups, the groups it keeps,
   and the truncation flags join TRL's output; a few of the main process's rows go to the completions log
   (`run_log.CompletionsLog`).
2. `_compute_loss`, per micro-batch: the policy's log-probs and entropies (`_get_per_token_logps_and_entropies`:
   TRL's fused LM head in `cfg`'s tiles, or the full logits), a `LearnerBatch`, the `LossFn`, checked, scaled for
   gradient accumulation as TRL does.
3. `training_step`: once, that the LossFn's loss was the tensor back-propagated.
"""

from __future__ import annotations

import collections
import functools
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer

from nanopost_trl import base, chat_templates, checkpoints, learner, logprobs, sampling, tools, trl_bridge, trl_config
from nanopost_trl.config import TrainConfig
from nanopost_trl.launch import check_launch, check_vllm_server
from nanopost_trl.model_copies import ActorCopy, ReferenceOffload
from nanopost_trl.refill import GroupRefill
from nanopost_trl.run_log import CompletionsLog
from nanopost_trl.run_paths import output_paths
from nanopost_trl.shared_prompt import shared_prompt_setting
from nanopost_trl.trl_bridge import log_metrics

# tool calls that failed, by kind: raised, timed out (tools.guarded_call), or their result dropped by TRL for length
TOOL_FAILURES = ("errors", "timeouts", "overlong")


class NanopostGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer, taking TRL's arguments unchanged, whose loss and advantage estimator come from a `LossFn`.

    `loss_fn` None: the built-in that reproduces GRPOConfig's `loss_type` and loss options
    (`trl_bridge.loss_from_grpo_config`). A `loss_fn` of the user's: the GRPOConfig loss options it would ignore are
    refused (`trl_bridge.check_loss_options`), and the reference model loads exactly when it reads one.
    `instances` (the `TaskInstance`s a dataset's `instance_id` column indexes) adds the per-task bookkeeping; `cfg`
    sets the adapter's own features (`TrainConfig`: actor staleness, shared prompt, fused-head tiles, refills, ...).
    """

    def __init__(
        self,
        *args: Any,
        loss_fn: base.LossFn | None = None,
        instances: Sequence[base.TaskInstance] | None = None,
        cfg: TrainConfig | None = None,
        **kwargs: Any,
    ) -> None:
        trl_bridge.check_trl()
        arguments = trl_bridge.grpo_trainer_arguments(args, kwargs)
        grpo_args = arguments["args"]
        if loss_fn is None:
            loss_fn = trl_bridge.loss_from_grpo_config(grpo_args)
        else:
            loss_fn = trl_bridge.filled_from_grpo_config(loss_fn, grpo_args)
            trl_bridge.check_loss_options(grpo_args, loss_fn)
        arguments["args"] = trl_bridge.with_reference(grpo_args, loss_fn.uses_reference)
        if cfg is not None and (ignored := trl_config.grpo_disagreements(cfg, grpo_args)):
            raise ValueError(
                "TrainConfig fields that TRL's GRPOConfig sets here (args is the trainer's config): "
                + "; ".join(ignored)
            )
        cfg = cfg or TrainConfig()
        self.loss_fn, self.instances, self.cfg = loss_fn, instances, cfg
        # tools and environments go to TRL's tool loop, each call guarded (errors, time-outs counted)
        self.tool_counts: collections.Counter[str] = collections.Counter()
        arguments |= tools.guarded_tool_loop(
            arguments.get("tools"), arguments.get("environment_factory"), self.tool_counts, cfg.tool_timeout_s
        )
        self.actor = ActorCopy(cfg.sync_interval)
        self.reference = ReferenceOffload(cfg.offload_reference)
        self.entropy_control = learner.AdaptiveEntropy.from_grpo_config(grpo_args)
        self.backprop_check, self.fused_head_check = trl_bridge.BackpropCheck(), trl_bridge.FusedHeadCheck()
        self.step_rewards: torch.Tensor | None = None  # (N, C) of the step being scored, from `_calculate_rewards`
        self.step_texts: tuple[list, list] = ([], [])  # this process's prompts and completions, likewise
        self.completions_log = CompletionsLog(
            output_paths(cfg)["completions"] if cfg.run_name else None, cfg.completions_per_step_logged
        )
        # TRL's vLLM client lives on the global main process (RANK 0): it checks the server there
        if grpo_args.use_vllm and grpo_args.vllm_mode == "server" and int(os.environ.get("RANK", "0")) == 0:
            check_vllm_server(grpo_args.vllm_server_host, grpo_args.vllm_server_port, grpo_args.vllm_server_base_url)
        super().__init__(**arguments)
        self.grpo = trl_bridge.GRPOView(self)  # the GRPOTrainer attributes read below, each checked here
        check_launch(self, cfg)
        if cfg.offload_reference and self.grpo.ref_model is not None:
            self.grpo.ref_model.to("cpu")
        if self.entropy_control is not None:  # the controller starts from the loss's coefficient
            trl_bridge.set_entropy_state(self, self.loss_fn.entropy_coef, *trl_bridge.entropy_state(self)[1:])
        self.shared_prompt = shared_prompt_setting(cfg, self.accelerator.unwrap_model(self.model), self.args)
        self.sampler = sampling.FastSampler(self, cfg.fast_sampling)

    @property
    def group_size(self) -> int:
        """Completions per prompt in the current pass (TRL's `num_generations_eval` in evaluation)."""
        return self.grpo.num_generations if self.model.training else self.grpo.num_generations_eval

    # --- checkpoints: written into a staging directory, checked, renamed into place (`checkpoints.save_checkpoint`)
    def _save_checkpoint(self, model, trial):
        checkpoints.save_checkpoint(self, functools.partial(super()._save_checkpoint, model, trial))

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def tokenizer(self):
        """The text tokenizer (of a multimodal processor too)."""
        return getattr(self.processing_class, "tokenizer", self.processing_class)

    def weighted_rewards(self, components: torch.Tensor) -> torch.Tensor:
        """(N,) from (N, C): TRL's weighted sum, a NaN component (an environment's `get_reward` gave None) skipped."""
        return (components * self.grpo.reward_weights.to(components.device)).nansum(dim=1)

    # --- rewards: keep the step's per-function rewards; log grader errors, time-outs, tool use and per-task means
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self.step_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.step_texts = (prompts, completions)
        counts = [
            func.take_counts() for func in self.grpo.reward_funcs if hasattr(func, "take_counts")
        ]  # not get_reward
        log_metrics(
            self, {"reward_errors": sum(c[0] for c in counts), "reward_timeouts": sum(c[1] for c in counts)}, "sum"
        )
        if self.grpo.tools:  # multi-turn episodes: turns, calls, malformed calls, failed calls by kind
            failures = dict(self.tool_counts)
            self.tool_counts.clear()  # the guarded tools hold this Counter
            failures["overlong"] = tools.dropped_tool_results(failures.pop("executed", 0), completions)
            log_metrics(self, tools.episode_stats(completions, chat_templates.tool_call_marker(self.tokenizer)))
            log_metrics(self, {f"tool_{kind}": float(failures.get(kind, 0)) for kind in TOOL_FAILURES}, "sum")
        if self.instances is not None and self.model.training:  # per-task means, where the rows name their task
            rewards = self.weighted_rewards(self.step_rewards)
            task_names = self.task_names(gather_object(inputs))
            log_metrics(
                self,
                {
                    f"task_{task}_reward_mean": rewards[[name == task for name in task_names]].mean().item()
                    for task in sorted(set(task_names))
                },
            )
        return self.step_rewards

    def task_names(self, rows: list[dict]) -> list[str | None]:
        """The task of each dataset row (its `instance_id` into `instances`); None without instances."""
        if self.instances is None:
            return [None] * len(rows)
        return [self.instances[row["instance_id"]].name for row in rows]

    # --- advantages: the loss's estimator over whole groups, before the batch is split across processes
    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        params = self._trainable_params()
        staleness = self.actor.staleness(self.state.global_step, params) if self.model.training else 0
        with (
            self.reference.on_device(self.grpo.ref_model, self.accelerator.device),
            self.actor.weights(params) if staleness else nullcontext(),
            self.accelerator.autocast(),  # bf16: sample in bf16 too (TRL generates outside autocast), weights stay fp32
            self.sampler.session(),  # tool rounds continue from the cache of the call before, released after
        ):
            scored = [self._scored_groups(inputs, staleness)]
            refill = GroupRefill(self.group_size, len(inputs), self.accelerator.num_processes)
            rounds = self.cfg.refill_rounds if self.model.training else 0
            while len(scored) <= rounds and refill.short(keep for _, keep in scored):
                seed = hash((self.args.seed, self.state.global_step, len(scored), self.accelerator.process_index))
                scored.append(self._scored_groups(refill.rows(self.train_dataset, seed), staleness))
        outputs, keeps = zip(*scored, strict=True)
        output = trl_bridge.concat_generation_outputs(list(outputs), self.tokenizer.pad_token_id)
        rank = self.accelerator.process_index
        rows, kept = refill.select([refill.local(keep, rank) for keep in keeps])
        output = trl_bridge.keep_rows(self, trl_bridge.select_rows(output, rows), kept)
        log_metrics(
            self,
            {
                "prompt_len_mean": trl_bridge.prompt_lengths(self, output).mean().item(),
                "generation_time_s": time.perf_counter() - start,
                "actor_staleness": float(staleness),
                "groups_dropped": sum(float((~keep).sum()) for keep in keeps) / self.group_size,
                "groups_refilled": (len(scored) - 1) * refill.groups_per_process * self.accelerator.num_processes,
            },
        )
        return output

    def _scored_groups(self, inputs: list[dict], staleness: int) -> tuple[dict, torch.Tensor]:
        """TRL's generation output for `inputs` with this process's advantages, rewards, reward components and
        truncation flags, and the (all processes') rows whose group the loss keeps."""
        output = super()._generate_and_score_completions(inputs)
        if staleness:
            with torch.no_grad():
                output["old_per_token_logps"] = self._policy_logprobs(self.model, output, scoring=True)[0]
        components, self.step_rewards = self.step_rewards, None
        if components is None:
            raise trl_bridge.UnsupportedTRL(
                "TRL's _generate_and_score_completions did not call _calculate_rewards, where the adapter takes the "
                "step's rewards; " + trl_bridge.supported()
            )
        rewards = self.weighted_rewards(components)
        rank, size = self.accelerator.process_index, len(inputs)
        local = slice(rank * size, (rank + 1) * size)
        keep = learner.kept_rows(self.loss_fn, rewards, self.group_size)
        if trl_bridge.declares_advantages(self.loss_fn):  # the loss's estimator, over whole groups
            advantages = learner.loss_advantages(
                self.loss_fn, rewards, components, self.grpo.reward_func_names, self.group_size
            )[local]
        else:  # TRL's own (GRPOConfig's scale_rewards, multi_objective_aggregation)
            advantages = output["advantages"]
        if self.model.training and self.accelerator.is_main_process:  # from the main process's own rows
            self.completions_log.record(
                self.state.global_step + 1, self.task_names(inputs), *self.step_texts, rewards[local], advantages
            )
        completion_ids, _ = trl_bridge.completions(output)
        return output | {
            "advantages": advantages,
            "rewards": rewards[local],
            "reward_components": components[local],
            "truncated": learner.truncated(
                completion_ids, self.grpo.max_completion_length, [*self.grpo.eos_token_ids, self.tokenizer.pad_token_id]
            ),
        }, keep

    # --- sampling without vLLM: each distinct prompt prefilled once, tool rounds continued from the cache
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.grpo.use_vllm or not self.sampler.applies(images, multimodal_fields):  # vLLM samples with its own cache
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        return self.sampler.sample(self, prompt_ids), None  # no sampler log-probs, as TRL's transformers path

    # --- log-probs: TRL's fused LM head in the configured tiles, or the model's full logits
    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        if not self.cfg.chunked_logprobs:
            return logprobs.materialized_logprobs(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, self.grpo.temperature,
                self.accelerator.autocast, **kwargs,
            )  # fmt: skip
        vocab_chunk = self.cfg.vocab_chunk(triton=trl_bridge.kernel_uses_triton(input_ids.device))
        extra_inputs = any(value is not None and value is not False for value in kwargs.values())
        scored = bool(attention_mask[:, -logits_to_keep:].any())  # every completion masked (truncated): TRL's path
        with trl_bridge.fused_head_tiles(vocab_chunk, self.fused_head_check):
            if self.shared_prompt.applies and not extra_inputs and scored:  # multimodal or MoE-router: TRL's path
                result = logprobs.shared_prompt_pass(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                    self.accelerator.autocast,
                )  # fmt: skip
            else:
                result = super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
                )
        self.fused_head_check.verify(attention_mask[: batch_size or None], logits_to_keep, vocab_chunk)
        return result

    def _policy_logprobs(self, model, inputs: dict, scoring: bool = False):
        """Policy log-probs, entropies and MoE router loss (None without one) of a micro-batch; with a loss that
        declares `backward_rows`, the grad-carrying forward runs on its kept rows only. `scoring`: log-probs only,
        in TRL's scoring batch size."""
        input_ids, attention_mask, logits_to_keep = trl_bridge.model_inputs(inputs)
        batch_size = self.args.per_device_train_batch_size if scoring else None

        def forward(rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            return self._get_per_token_logps_and_entropies(
                model, input_ids[rows], attention_mask[rows], logits_to_keep, batch_size,
                compute_entropy=not scoring, compute_aux_loss=self.grpo.aux_loss_enabled and not scoring,
            )  # fmt: skip

        if scoring or not logprobs.declares_backward_rows(self.loss_fn):
            return forward(slice(None))
        policy_logprobs, entropies, router_loss, kept = logprobs.gated_policy_logprobs(
            forward, lambda lp, ent: self.loss_fn.backward_rows(trl_bridge.learner_batch(self, inputs, lp, ent))
        )
        log_metrics(self, {} if kept is None else {"backward_rows_frac": kept})
        return policy_logprobs, entropies, router_loss

    # --- loss: a LearnerBatch from TRL's tensors, then the LossFn
    def _compute_loss(self, model, inputs):
        policy_logprobs, entropies, router_loss = self._policy_logprobs(model, inputs)
        ratio = trl_bridge.importance_sampling_ratio(inputs)
        if ratio is not None and not self.loss_fn.corrects_sampler_mismatch:
            policy_logprobs = learner.sampler_corrected(policy_logprobs, ratio)
        batch = trl_bridge.learner_batch(self, inputs, policy_logprobs, entropies)
        if self.entropy_control is not None:  # this step's coefficient, from the last step's entropy
            self.loss_fn.entropy_coef = self.entropy_control.applied(*trl_bridge.entropy_state(self))
        loss, metrics = self.loss_fn(batch)
        loss, skipped = learner.checked_loss(
            loss, policy_logprobs, type(self.loss_fn).__name__, self.state.global_step + 1, self.cfg.skip_nonfinite,
            needs_grad=torch.is_grad_enabled(),  # TRL's evaluation computes the loss without grad
        )  # fmt: skip
        log_metrics(
            self,
            {f"loss_{name}": float(value) for name, value in metrics.items()}
            | learner.batch_stats(batch)
            | {"nonfinite_skipped": float(skipped)},  # the fraction of micro-batches whose step was skipped
        )
        self._log_trl_metrics(metrics, batch)
        if router_loss is not None:  # a MoE model's load-balancing loss, added as TRL adds it
            loss = loss + self.grpo.router_aux_loss_coef * router_loss
            log_metrics(self, {"aux_loss": router_loss.item()})
        normalizer = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return self.backprop_check.watch(loss / normalizer)

    def _log_trl_metrics(self, metrics: dict[str, float], batch: base.LearnerBatch) -> None:
        """The loss's metrics that TRL computes too, under TRL's names (`LossFn.trl_metrics`) and reductions; with an
        entropy bonus, TRL's `entropy_coef` at each optimizer step's end (and the adaptive controller's update)."""
        renamed = {trl_name: metrics[name] for name, trl_name in self.loss_fn.trl_metrics.items() if name in metrics}
        # one reduction (a collective over processes) per kind the loss declares: the same on every process
        for reduction in sorted({trl_bridge.trl_reduction(name) for name in self.loss_fn.trl_metrics.values()}):
            chosen = {name: value for name, value in renamed.items() if trl_bridge.trl_reduction(name) == reduction}
            log_metrics(self, chosen, reduction)
        if not (self.model.training and (getattr(self.loss_fn, "entropy_coef", 0.0) or self.entropy_control)):
            return
        if self.entropy_control is not None:
            self.entropy_control.observe(batch.entropies, batch.mask)
        if self.accelerator.sync_gradients:  # the optimizer step's last micro-batch
            coef = self.loss_fn.entropy_coef
            if self.entropy_control is not None:
                coef, entropy = self.entropy_control.step_end(
                    trl_bridge.entropy_state(self)[0], lambda totals: self.accelerator.reduce(totals, "sum")
                )
                trl_bridge.set_entropy_state(self, coef, entropy)
            log_metrics(self, {"entropy_coef": coef})

    def _prepare_inputs(self, generation_batch):
        """TRL's, shuffling whole prompt groups where micro-batches hold whole groups (the shared prompt's saving)."""
        whole_groups = self.shared_prompt.whole_groups
        with trl_bridge.shuffled_by_group(self.grpo.num_generations) if whole_groups else nullcontext():
            return super()._prepare_inputs(generation_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.backprop_check.verify()  # once: the LossFn's loss was the one back-propagated
        return loss
