"""The adapter: nanopost_trl's four types on TRL's GRPOTrainer, and the public `Trainer`.

Read top to bottom:
1. `RewardAdapter` turns a `RewardFn` over `TaskInstance`s into a TRL reward function (dataset rows carry an index).
2. `NanopostGRPOTrainer` subclasses `GRPOTrainer` at three hooks: `_calculate_rewards` (keep the gathered rewards),
   `_generate_and_score_completions` (advantages from the loss's estimator over whole groups), and `_compute_loss`
   (build a `LearnerBatch`, call the `LossFn`, scale for gradient accumulation as TRL does); and wraps
   `_get_per_token_logps_and_entropies` (TRL's fused LM head in `cfg`'s tiles, scoring only completion positions on
   CPU too; or, with `chunked_logprobs=False`, the model's full logits).
   `nanopost_trl.compat` checks at start-up that TRL still has them, and on the first step that the LossFn's loss is
   back-propagated.
3. `Trainer(cfg).run(loss_fn, tasks)` loads the model, builds the dataset, trains, evaluates, and returns a summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.trainer_callback import ProgressCallback
from trl import GRPOTrainer

from nanopost_trl import base, compat, hub, memory, rewards
from nanopost_trl.config import TrainConfig, output_paths, to_grpo_config
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import resolve_model_path
from nanopost_trl.run_log import QuietProgressCallback, RunLogger, RunSummary, runtime_info, write_run_config
from nanopost_trl.tasks import resolve_tasks, tasks_label

REWARD_FN_SIGNATURE = "reward_fn(completions: list[str], instances: list[TaskInstance]) -> list[float]"


class RewardAdapter:
    """A TRL reward function (`f(prompts, completions, instance_id, **kwargs)`) around a nanopost `RewardFn`.

    A grader that raises, or a score that is NaN/inf/not a number, scores 0.0 and is counted in `errors`.
    """

    def __init__(self, reward_fn: Callable, instances: Sequence[base.TaskInstance]) -> None:
        check_reward_fn_signature(reward_fn)
        self.reward_fn = reward_fn
        self.instances = instances
        self.__name__ = getattr(reward_fn, "name", None) or getattr(reward_fn, "__name__", type(reward_fn).__name__)
        self.errors = 0

    def __call__(self, prompts: list, completions: list, instance_id: list[int], **kwargs: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        batch = [self.instances[i] for i in instance_id]
        try:
            scores = list(self.reward_fn(texts, batch))
        except Exception as error:  # a crashed reward never kills the run
            warnings.warn(f"reward {self.__name__!r} raised {error!r}; scoring this batch 0", stacklevel=2)
            scores = [math.nan] * len(texts)
        if len(scores) != len(texts):
            raise ValueError(f"reward {self.__name__!r} returned {len(scores)} scores for {len(texts)} completions")
        cleaned = [to_finite_score(score) for score in scores]
        self.errors += sum(score is None for score in cleaned)
        return [0.0 if score is None else score for score in cleaned]


def to_finite_score(score: Any) -> float | None:
    """The score as a float, or None if it is not a finite number."""
    try:
        value = float(score)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_reward_fn_signature(reward_fn: Callable) -> None:
    """Fail at start-up, not mid-run, when a reward function cannot be called as `reward_fn(completions, instances)`."""
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable as {REWARD_FN_SIGNATURE}; got {reward_fn!r}")
    try:
        inspect.signature(reward_fn).bind([], [])
    except TypeError as error:
        raise TypeError(
            f"reward_fn {reward_fn!r} has the wrong signature ({error}); expected {REWARD_FN_SIGNATURE}"
        ) from None
    except ValueError:  # builtins without a signature: trust them
        pass


class NanopostGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss and advantage estimator come from a `LossFn`."""

    def __init__(
        self, *args: Any, loss_fn: base.LossFn, instances: Sequence[base.TaskInstance], cfg: TrainConfig, **kwargs: Any
    ) -> None:
        self.loss_fn = loss_fn
        self.instances = instances
        self.cfg = cfg
        self._gathered_rewards: torch.Tensor | None = None
        self._actor_params: list[torch.Tensor] = []  # the actor's copy of the trainable weights (sync_interval > 1)
        self._actor_synced_at = 0
        self._backprop_check = compat.BackpropCheck()
        compat.check_trl_hooks()
        compat.silence_known_warnings()
        super().__init__(*args, **kwargs)
        compat.refuse_loss_side_options(self)
        if (
            cfg.sync_interval > 1
            and self.is_deepspeed_enabled
            and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            raise ValueError("sync_interval > 1 keeps a full actor copy of the weights: not supported with ZeRO-3")
        if cfg.offload_reference and self.is_deepspeed_enabled:
            raise ValueError("offload_reference: use DeepSpeed's own offload_param_device for the reference instead")
        if cfg.offload_reference and self.ref_model is not None:
            self.ref_model.to("cpu")

    @property
    def _mode(self) -> str:
        """TRL's metrics bucket for the current pass: "train" or "eval"."""
        return "train" if self.model.training else "eval"

    def _log_mean_over_processes(self, values: dict[str, float]) -> None:
        """Append each value's mean over processes to its metric: one collective, every process calls it."""
        local = torch.tensor(list(values.values()), dtype=torch.float64, device=self.accelerator.device)
        means = self.accelerator.reduce(local, reduction="mean").tolist()
        for name, mean in zip(values, means, strict=True):
            self._metrics[self._mode][name].append(mean)

    # --- rewards: keep the gathered per-function rewards; log errors and per-task means
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).sum(dim=1)
        mode = self._mode
        local_counts = torch.tensor(
            [sum(func.errors for func in self.reward_funcs), rewards.grader_stats["timeouts"]],
            dtype=torch.float32,
            device=self.accelerator.device,
        )
        for func in self.reward_funcs:
            func.errors = 0
        rewards.grader_stats.clear()
        errors, timeouts = self.accelerator.reduce(local_counts, reduction="sum").tolist()
        self._metrics[mode]["reward_errors"].append(errors)
        self._metrics[mode]["reward_timeouts"].append(timeouts)
        task_names = [self.instances[i].name for i in gather_object([x["instance_id"] for x in inputs])]
        for task in sorted(set(task_names)):
            rows = torch.tensor([name == task for name in task_names], device=self._gathered_rewards.device)
            self._metrics[mode][f"task_{task}_reward_mean"].append(self._gathered_rewards[rows].mean().item())
        return rewards_per_func

    # --- actor / learner: the actor samples with weights re-copied from the learner every `sync_interval` steps
    def _trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _actor_weights(self):
        """Run the block with the actor's weights in the model (a storage swap, no copy); learner's restored after."""
        params = self._trainable_params()
        for param, actor in zip(params, self._actor_params, strict=True):
            param.data, actor.data = actor.data, param.data
        try:
            yield
        finally:
            for param, actor in zip(params, self._actor_params, strict=True):
                param.data, actor.data = actor.data, param.data

    @contextlib.contextmanager
    def _reference_on_device(self):
        """With `offload_reference`, the reference model lives on CPU and visits the device for its log-prob pass."""
        offload = self.cfg.offload_reference and self.ref_model is not None
        if offload:
            self.ref_model.to(self.accelerator.device)
        try:
            yield
        finally:
            if offload:
                self.ref_model.to("cpu")

    def _actor_staleness(self) -> int:
        """Re-copy the learner into the actor when due; return how many learner steps the actor is behind."""
        step = self.state.global_step
        if self.cfg.sync_interval > 1 and (not self._actor_params or step % self.cfg.sync_interval == 0):
            self._actor_params = [p.detach().clone() for p in self._trainable_params()]
            self._actor_synced_at = step
        return step - self._actor_synced_at if self._actor_params else 0

    def _rollout_logprobs(self, output: dict) -> torch.Tensor:
        """Log-probs of the sampled completions under the model's current weights (the actor's, inside the swap)."""
        with torch.no_grad():
            logprobs, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
                torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
                output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
        return logprobs

    # --- advantages: the loss's estimator over whole groups, before the batch is split across processes
    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        mode = self._mode
        staleness = self._actor_staleness() if mode == "train" else 0
        with (
            self._reference_on_device(),
            self._actor_weights() if staleness else contextlib.nullcontext(),
            self.accelerator.autocast(),  # bf16: sample in bf16 too (TRL generates outside autocast), weights stay fp32
        ):
            output = super()._generate_and_score_completions(inputs)
            if staleness:
                output["old_per_token_logps"] = self._rollout_logprobs(output)
        group_rewards = self._gathered_rewards.view(-1, self.num_generations)
        advantages = self.loss_fn.advantages(group_rewards).reshape(-1)
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        output["advantages"] = advantages[local]
        output["rewards"] = self._gathered_rewards[local]
        prompt_tokens = self.accelerator.gather(output["prompt_mask"].sum(dim=1)).float()
        self._metrics[mode]["prompt_len_mean"].append(prompt_tokens.mean().item())
        self._metrics[mode]["generation_time_s"].append(time.perf_counter() - start)
        self._metrics[mode]["actor_staleness"].append(float(staleness))
        return output

    # --- loss: a LearnerBatch from TRL's tensors, then the LossFn
    def _learner_batch(self, inputs: dict, policy_logprobs: torch.Tensor) -> base.LearnerBatch:
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # multi-turn tool calls: tool output tokens carry no loss
            mask = mask * inputs["tool_mask"]
        learner_logprobs = inputs.get("old_per_token_logps")
        rollout_logprobs = policy_logprobs.detach() if learner_logprobs is None else learner_logprobs
        if "sampling_per_token_logps" in inputs:  # vLLM's own; a token it could not score (NaN) keeps the learner's
            sampler_logprobs = inputs["sampling_per_token_logps"]
            rollout_logprobs = torch.where(sampler_logprobs.isnan(), rollout_logprobs, sampler_logprobs)
        return base.LearnerBatch(
            policy_logprobs=policy_logprobs,
            rollout_logprobs=rollout_logprobs,
            reference_logprobs=inputs.get("ref_per_token_logps"),
            advantages=inputs["advantages"].unsqueeze(1),
            rewards=inputs["rewards"],
            loss_mask=torch.cat([inputs["prompt_mask"][:, -1:], mask], dim=1).to(policy_logprobs.dtype),
        )

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        """TRL's fused LM head, in the tiles `cfg.vocab_chunk` sets and scoring only the completion positions on CPU
        too (see `fused_head_tiles`); with `chunked_logprobs=False`, the model's own full logits instead."""
        if not self.cfg.chunked_logprobs:
            return self._materialized_logprobs(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
            )
        with fused_head_tiles(self.cfg, input_ids.device):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
            )

    def _materialized_logprobs(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """The reference path: `micro_batch x (completion + 1) x vocab` logits from the model's own forward, then
        TRL's log-softmax and entropy over them (as TRL did before its fused head). Padding scores 0, as fused."""
        from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

        if extra := sorted(name for name, value in kwargs.items() if value is not None and value is not False):
            raise ValueError(f"chunked_logprobs=False supports text-only dense models; got {', '.join(extra)}")
        batch_size = batch_size or input_ids.size(0)
        logprobs, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                logits = model(
                    input_ids=input_ids[rows], attention_mask=attention_mask[rows], logits_to_keep=logits_to_keep + 1
                ).logits
            logits = logits[:, :-1].float().contiguous()  # a strided view would be copied by the entropy, again
            targets = input_ids[rows, -logits_to_keep:]
            mask = attention_mask[rows, -logits_to_keep:]
            if compute_entropy:
                row_logprobs, row_entropies = selective_log_softmax_and_entropy(
                    logits, targets, temperature=self.temperature, row_mask=mask
                )
                entropies.append(row_entropies)
            else:
                row_logprobs = selective_log_softmax(logits, targets, self.temperature, mask)
            logprobs.append(row_logprobs)
        return torch.cat(logprobs), torch.cat(entropies) if compute_entropy else None, None

    def _policy_logprobs(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy log-probs and entropies. If the loss names `backward_rows`, a no-grad pass decides them and only
        those rows run the grad-carrying forward; the others keep their (equal) no-grad values.

        With no row kept, one row still runs the grad-carrying forward, with weight 0: under DDP or DeepSpeed a
        process's gradient all-reduce is armed by a grad-carrying forward through the wrapped model, and a process
        that skipped it would leave the others waiting in theirs (a hang when only some processes skip every row)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)

        def forward(rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logprobs, entropies, _ = self._get_per_token_logps_and_entropies(
                model, input_ids[rows], attention_mask[rows], inputs["completion_ids"].size(1), compute_entropy=True
            )
            return logprobs, entropies

        if type(self.loss_fn).backward_rows is base.LossFn.backward_rows:
            return forward(slice(None))
        with torch.no_grad():
            detached, entropies = forward(slice(None))
        rows = self.loss_fn.backward_rows(self._learner_batch(inputs, detached))
        self._log_mean_over_processes({"backward_rows_frac": rows.float().mean().item()})
        kept = bool(rows.any())
        live = rows if kept else torch.arange(len(rows), device=rows.device) == 0
        with_grad, _ = forward(live)
        policy_logprobs = detached.clone()  # no-grad values, live grads (zero ones when no row is kept)
        policy_logprobs[live] = detached[live] + float(kept) * (with_grad - with_grad.detach())
        return policy_logprobs, entropies

    def _compute_loss(self, model, inputs):
        policy_logprobs, entropies = self._policy_logprobs(model, inputs)
        if "importance_sampling_ratio" in inputs and not self.loss_fn.corrects_sampler_mismatch:
            policy_logprobs = compat.sampler_corrected(policy_logprobs, inputs["importance_sampling_ratio"])
        batch = self._learner_batch(inputs, policy_logprobs)
        loss, metrics = self.loss_fn(batch)
        loss = self._checked_loss(loss, policy_logprobs)
        mask = batch.mask
        valid = mask.sum().clamp(min=1)
        gap = (policy_logprobs.detach() - batch.rollout_logprobs).abs()
        self._log_mean_over_processes(
            {f"loss_{name}": float(value) for name, value in metrics.items()}
            | {
                "entropy": ((entropies * mask).sum() / valid).item(),
                "rollout_logprob_gap": ((gap * mask).sum() / valid).item(),
            }
        )
        normalizer = self.current_gradient_accumulation_steps if self._mode == "train" else 1.0
        return self._backprop_check.watch(loss / normalizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._backprop_check.verify()  # once: the LossFn's loss was the one back-propagated
        return loss

    def _checked_loss(self, loss: Any, policy_logprobs: torch.Tensor) -> torch.Tensor:
        """The loss if it is a finite scalar tensor with grad; else a clear error (or a skipped step)."""
        name, step = type(self.loss_fn).__name__, self.state.global_step + 1
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"{name} must return a scalar loss tensor, got {shape} at step {step}")
        if not loss.requires_grad:
            raise ValueError(f"{name} returned a loss without grad at step {step}: build it from batch.policy_logprobs")
        if not torch.isfinite(loss):
            if not self.cfg.skip_nonfinite:
                raise FloatingPointError(
                    f"{name} returned a non-finite loss ({loss.item()}) at step {step}; "
                    "set skip_nonfinite=True to skip such steps"
                )
            self._metrics["train"]["nonfinite_skipped"].append(1.0)
            return policy_logprobs.sum() * 0.0
        return loss.reshape(())


@contextlib.contextmanager
def fused_head_tiles(cfg: TrainConfig, device: torch.device):
    """TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) on `device`, in tiles `cfg.vocab_chunk` vocabulary
    entries wide, scoring only the labelled positions on CPU too.

    Its tile width is a module constant (32768), sized for its Triton kernel; its torch fallback (CPU) holds ~8
    tile-sized fp32 temporaries in the backward, so there a narrower tile is what keeps the logits term small
    (benchmarks/logprob_memory.py). On CUDA/XPU it projects just the positions whose label is not -100 (the
    completion); on other devices it projects every position, prompt included, to keep tile shapes static for
    compilers (Neuron). Eager CPU needs no static shapes, and the prompt's LM-head GEMMs (forward, recompute and two
    gradient GEMMs) cost ~25% of the learning step for a 46-token chat prompt and 12 completion tokens. Log-probs
    and gradients are unchanged by either switch (tested).
    """
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    vocab_chunk = cfg.vocab_chunk(triton=chunked_logprob._use_triton(device))
    use_triton, width = trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)  # the fused forward's `compact`
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = vocab_chunk
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = use_triton, width


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles); elsewhere torch emulates it, slowly."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def with_supported_precision(cfg: TrainConfig) -> TrainConfig:
    """`cfg`, with bf16 turned off (and a warning saying so) on a CPU-only machine without native bf16."""
    if cfg.bf16 and not torch.cuda.is_available() and not cpu_has_native_bf16():
        warnings.warn("bf16=True, but this CPU has no native bf16 (AVX512-BF16 or AMX): running in fp32", stacklevel=3)
        return dataclasses.replace(cfg, bf16=False, bf16_weights=False)
    return cfg


def fill_from_config(loss_fn: base.LossFn, cfg: TrainConfig) -> base.LossFn:
    """Replace a dataclass loss's None fields by the same-named TrainConfig fields (kl_coef, max_new_tokens, ...)."""
    if not dataclasses.is_dataclass(loss_fn):
        return loss_fn
    fills = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(loss_fn)
        if getattr(loss_fn, f.name) is None and hasattr(cfg, f.name)
    }
    return dataclasses.replace(loss_fn, **fills) if fills else loss_fn


def build_dataset(instances: Sequence[base.TaskInstance]) -> Dataset:
    """Prompts plus an index into `instances`; TaskInstances (with their graders) cannot live in Arrow."""
    kinds = {type(instance.prompt) for instance in instances}
    if len(kinds) != 1 or not kinds <= {str, list}:
        raise TypeError(
            f"task prompts must all be str or all chat-message lists, got {sorted(k.__name__ for k in kinds)}"
        )
    return Dataset.from_dict({"prompt": [i.prompt for i in instances], "instance_id": list(range(len(instances)))})


def eval_subset(instances: Sequence[base.TaskInstance], size: int) -> list[base.TaskInstance]:
    """The first `size` instances of each task (held-out splits are already shuffled by their seed)."""
    taken: dict[str, int] = {}
    subset = []
    for instance in instances:
        if taken.get(instance.name, 0) < size:
            taken[instance.name] = taken.get(instance.name, 0) + 1
            subset.append(instance)
    return subset


def load_model_and_tokenizer(cfg: TrainConfig):
    path = resolve_model_path(cfg.model, cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cfg.bf16_weights else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_chat_template(tokenizer, instances: Sequence[base.TaskInstance], model: str) -> None:
    """Chat-message prompts need the tokenizer's chat template: fail before training, naming the model."""
    if tokenizer.chat_template is None and any(isinstance(i.prompt, list) for i in instances):
        raise ValueError(
            f"the tokenizer of {model!r} has no chat template, but the task prompts are chat messages: use a model "
            "with one (an instruct model), set `tokenizer.chat_template`, or give the tasks plain-text prompts"
        )


def lora_config(cfg: TrainConfig):
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


class Trainer:
    """`Trainer(cfg).run(loss_fn=Loss.DG.make(), tasks="gsm8k")`: one RL post-training run."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def run(
        self,
        loss_fn: base.LossFn | None = None,
        tasks: str | Sequence[str] | Sequence[base.TaskInstance] = "addition",
        reward_fn: Callable | None = None,
        eval_tasks: str | Sequence[str] | Sequence[base.TaskInstance] | None = None,
        resume: str | bool | None = None,
    ) -> RunSummary:
        """Train with `loss_fn` (default GRPO) on `tasks`, scored by `reward_fn` (default: each task's eval_fn).

        Held-out eval uses the tasks' test splits, or `eval_tasks` when given. `resume` = True (latest checkpoint of
        this run) or a checkpoint path.
        """
        cfg = self.cfg
        if not isinstance(loss_fn, base.LossFn | type(None)):
            raise TypeError(f"loss_fn must be a nanopost_trl.base.LossFn, got {type(loss_fn).__name__}")
        loss_fn = fill_from_config(loss_fn or GRPOLoss(), cfg)
        cfg = self.cfg = with_supported_precision(cfg)
        memory.warn_if_over_device(cfg, loss_fn.uses_reference)  # on a GPU: the planner's verdict before loading
        if cfg.run_name is None:
            cfg = self.cfg = dataclasses.replace(
                cfg,
                run_name=f"{type(loss_fn).__name__.removesuffix('Loss').lower()}-{tasks_label(tasks)}-s{cfg.seed}-"
                f"{time.strftime('%Y%m%d-%H%M%S')}",
            )
        set_seed(cfg.seed)
        train_instances = resolve_tasks(tasks, "train", cfg.data_dir)
        eval_instances = eval_subset(resolve_tasks(eval_tasks or tasks, "test", cfg.data_dir), cfg.eval_size)
        components = reward_components(reward_fn)
        model, tokenizer = load_model_and_tokenizer(cfg)
        check_chat_template(tokenizer, [*train_instances, *eval_instances], cfg.model)
        paths = output_paths(cfg)
        trainer = NanopostGRPOTrainer(
            model=model,
            reward_funcs=[RewardAdapter(fn, train_instances) for fn, _ in components],
            args=to_grpo_config(
                cfg,
                num_processes=PartialState(cpu=not torch.cuda.is_available()).num_processes,
                uses_reference=loss_fn.uses_reference,
                reward_weights=[weight for _, weight in components],
            ),
            train_dataset=build_dataset(train_instances),
            processing_class=tokenizer,
            peft_config=lora_config(cfg),
            loss_fn=loss_fn,
            instances=train_instances,
            cfg=cfg,
        )
        logger = RunLogger(trainer, paths["log"], eval_instances, resume=bool(resume))
        trainer.add_callback(logger)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(QuietProgressCallback)
        if trainer.accelerator.is_main_process:
            write_run_config(paths["config"], cfg, loss_fn, tasks, runtime_info(trainer))
        trainer.train(resume_from_checkpoint=latest_checkpoint(paths["checkpoints"]) if resume is True else resume)
        self.grpo_trainer = trainer  # kept for inspection after the run (model, ref_model, state)
        main = trainer.accelerator.is_main_process
        if cfg.wandb_log and main:
            import wandb

            wandb.finish()  # one W&B run per Trainer.run, flushed (offline mode: the run directory is complete)
        model_dir = paths["checkpoints"] / "final" if cfg.save_final_model or cfg.push_to_hub else None
        if model_dir is not None:
            save_final_model(trainer, cfg, model_dir)
        summary = logger.summary(model_dir)
        if model_dir is not None and main:
            hub.write_model_card(model_dir, paths["config"], summary)
            if cfg.push_to_hub:
                hub.push(model_dir, cfg.hub_model_id or cfg.run_name, private=cfg.hub_private)
        return summary


def save_final_model(trainer: NanopostGRPOTrainer, cfg: TrainConfig, model_dir: Path) -> None:
    """The model, or a LoRA run's adapter (gathered under ZeRO-3); with `merge_adapter_on_save`, the adapter merged
    into a fresh copy of the base model (the training is over: a plain copy, not a ZeRO-3-partitioned one)."""
    trainer.save_model(str(model_dir))
    if cfg.merge_adapter_on_save and cfg.lora_r and trainer.accelerator.is_main_process:
        from peft import PeftModel
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        merged = PeftModel.from_pretrained(load_model_and_tokenizer(cfg)[0], model_dir).merge_and_unload()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (model_dir / name).unlink()
        merged.save_pretrained(model_dir)


def latest_checkpoint(directory: Path) -> str:
    """The newest complete `checkpoint-N` in `directory` (one killed mid-save has no trainer_state.json yet)."""
    complete = [p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    if not complete:
        raise FileNotFoundError(f"no complete checkpoint to resume from in {directory}")
    return str(max(complete, key=lambda p: int(p.name.removeprefix("checkpoint-"))))


def reward_components(reward_fn: Callable | None) -> list[tuple[Callable, float]]:
    """A `rewards.Combined` splits into its weighted components (each logged by TRL); else one component."""
    if reward_fn is None:
        return [(rewards.Correctness(), 1.0)]
    if isinstance(reward_fn, rewards.Combined):
        return list(reward_fn.components)
    return [(reward_fn, 1.0)]
