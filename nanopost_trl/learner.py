"""The adapter's features, each a small object or function with its own state, testable without a trainer.

- `ActorCopy`: actor/learner staleness; the actor samples with a copy of the weights re-taken every `sync_interval`.
- `ReferenceOffload`: the reference model lives on CPU and visits the device for its log-prob pass.
- `gated_policy_logprobs`: the grad-carrying forward on the rows a loss's `backward_rows` keeps.
- `materialized_logprobs`: the reference log-prob path through the model's full logits (`chunked_logprobs=False`);
  `shared_prompt_pass`: each prompt through the model once (`shared_prompt=True`).
- `loss_advantages`, `kept_rows`, `truncated`, `sampler_corrected`: the tensors the adapter adds to TRL's.
- `AdaptiveEntropy`: TRL's adaptive entropy coefficient (`use_adaptive_entropy`), on the loss's `entropy_coef`.
- `CompletionsLog`: a few of each step's completions, with their rewards and advantages, in a JSONL file.
- `check_vllm_server`: vLLM's server answers at its address, before TRL's long health-check loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from nanopost_trl import base, trl_bridge
from nanopost_trl.launch import check_sharding
from nanopost_trl.memory import launch_uses_fsdp
from nanopost_trl.run_log import append_row, truncate_after
from nanopost_trl.shared_prompt import shared_prompt_logprobs, shared_prompt_unsupported
from nanopost_trl.utils import text_of

# rows -> (log-probs, entropies, MoE router loss or None) of those rows
LogprobForward = Callable[[slice | torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


class ActorCopy:
    """With `sync_interval > 1`, the actor samples with its own copy of the trainable weights, re-copied from the
    learner every `sync_interval` steps (on resume: at the first step, as checkpoints hold the learner only)."""

    def __init__(self, sync_interval: int) -> None:
        self.sync_interval = sync_interval
        self.params: list[torch.Tensor] = []
        self.synced_at = 0

    def staleness(self, step: int, learner_params: Sequence[torch.Tensor]) -> int:
        """Re-copy the learner when due; return how many learner steps the actor is behind (0 when on-policy)."""
        if self.sync_interval > 1 and (not self.params or step % self.sync_interval == 0):
            self.params = [p.detach().clone() for p in learner_params]
            self.synced_at = step
        return step - self.synced_at if self.params else 0

    @contextlib.contextmanager
    def weights(self, learner_params: Sequence[torch.Tensor]) -> Iterator[None]:
        """The block runs with the actor's weights in the model (a storage swap, no copy); the learner's after."""
        self._swap(learner_params)
        try:
            yield
        finally:
            self._swap(learner_params)

    def _swap(self, learner_params: Sequence[torch.Tensor]) -> None:
        for param, actor in zip(learner_params, self.params, strict=True):
            param.data, actor.data = actor.data, param.data


class ReferenceOffload:
    """With `enabled`, the reference model is kept on CPU and moved to the device only for its log-prob pass."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextlib.contextmanager
    def on_device(self, model: torch.nn.Module | None, device: torch.device) -> Iterator[None]:
        moved = self.enabled and model is not None
        if moved:
            model.to(device)
        try:
            yield
        finally:
            if moved:
                model.to("cpu")


def gated_policy_logprobs(
    forward: LogprobForward, backward_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """Policy log-probs and entropies, with the grad-carrying forward only on the rows `backward_rows` keeps.

    `forward(rows)` returns the rows' (log-probs, entropies, router loss); `backward_rows(detached_logprobs,
    detached_entropies)` returns (B,) bool from a no-grad pass, or None for all rows (then a grad-carrying pass runs
    on all). The others keep their (equal) no-grad values, without gradient. Returns the router loss of the
    grad-carrying pass and the kept fraction too (None when all rows ran).

    With no row kept, one row still runs the grad-carrying forward, with weight 0: under DDP or DeepSpeed a
    process's gradient all-reduce is armed by a grad-carrying forward through the wrapped model, and a process that
    skipped it would leave the others waiting in theirs (a hang when only some processes skip every row).
    """
    with torch.no_grad():
        detached_logprobs, detached_entropies, _ = forward(slice(None))
    rows = backward_rows(detached_logprobs, detached_entropies)
    if rows is None:
        return *forward(slice(None)), None
    kept = bool(rows.any())
    live = rows if kept else torch.arange(len(rows), device=rows.device) == 0
    live_logprobs, live_entropies, router_loss = forward(live)
    gated = []
    for detached, live_values in ((detached_logprobs, live_logprobs), (detached_entropies, live_entropies)):
        values = detached.clone()  # no-grad values, live grads (zero ones when no row is kept)
        values[live] = detached[live] + float(kept) * (live_values - live_values.detach())
        gated.append(values)
    router_loss = None if router_loss is None else float(kept) * router_loss
    return gated[0], gated[1], router_loss, rows.float().mean().item()


def declares_backward_rows(loss_fn: base.LossFn) -> bool:
    """Whether the loss overrides `backward_rows` (then a no-grad pass decides the grad-carrying rows)."""
    return type(loss_fn).backward_rows is not base.LossFn.backward_rows


def in_chunks(
    score: Callable[[slice], tuple[torch.Tensor, torch.Tensor | None]], rows: int, batch_size: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """TRL's `(log-probs, entropies or None, router loss)` from `score(rows)`, `batch_size` rows at a time."""
    parts = [score(slice(start, start + (batch_size or rows))) for start in range(0, rows, batch_size or rows)]
    entropies = [part[1] for part in parts]
    return torch.cat([part[0] for part in parts]), None if entropies[0] is None else torch.cat(entropies), None


def materialized_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    batch_size: int | None,
    compute_entropy: bool,
    temperature: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """The reference path: `micro_batch x (completion + 1) x vocab` logits from the model's own forward, then TRL's
    log-softmax and entropy over them (as TRL did before its fused head). Padding scores 0, as fused."""
    if extra := sorted(name for name, value in kwargs.items() if value is not None and value is not False):
        raise ValueError(f"chunked_logprobs=False supports text-only dense models; got {', '.join(extra)}")

    def score(rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast():
            logits = model(
                input_ids=input_ids[rows], attention_mask=attention_mask[rows], logits_to_keep=logits_to_keep + 1
            ).logits
        logits = logits[:, :-1].float().contiguous()  # a strided view would be copied by the entropy, again
        completion = slice(-logits_to_keep, None)
        return trl_bridge.full_logits_logprobs(
            logits, input_ids[rows, completion], attention_mask[rows, completion], temperature, compute_entropy
        )

    return in_chunks(score, input_ids.size(0), batch_size)


def shared_prompt_pass(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    batch_size: int | None,
    compute_entropy: bool,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """TRL's `_get_per_token_logps_and_entropies` through the shared-prompt path (`nanopost_trl.shared_prompt`),
    `batch_size` rows at a time: the prompt (`input_ids[:, :-logits_to_keep]`, left-padded) once per distinct prompt
    of a chunk, then each completion."""
    prompt, completion = slice(None, -logits_to_keep), slice(-logits_to_keep, None)

    def score(rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast():
            return shared_prompt_logprobs(
                model,
                input_ids[rows, prompt],
                attention_mask[rows, prompt],
                input_ids[rows, completion],
                attention_mask[rows, completion],
                compute_entropy,
            )

    return in_chunks(score, input_ids.size(0), batch_size)


def sampler_corrected(logprobs: torch.Tensor, importance_sampling_ratio: torch.Tensor) -> torch.Tensor:
    """`logprobs` with the same values, each token's gradient multiplied by TRL's vLLM importance-sampling ratio
    ((B, T) per token, or (B, 1) per sequence; detached): TRL's `per_token_loss * importance_sampling_ratio` for a
    loss built from per-token log-probs, whatever its formula."""
    detached = logprobs.detach()
    return detached + (logprobs - detached) * importance_sampling_ratio


def loss_advantages(
    loss_fn: base.LossFn, rewards: torch.Tensor, components: torch.Tensor, names: Sequence[str], group_size: int
) -> torch.Tensor:
    """(N,) advantages from the loss's own estimator over whole groups, from the step's (N,) rewards and (N, C)
    unweighted reward components (passed by name to an `advantages` that declares `components`)."""
    grouped = rewards.view(-1, group_size)
    if "components" in inspect.signature(loss_fn.advantages).parameters:
        by_name = {name: components[:, i].view(-1, group_size) for i, name in enumerate(names)}
        return loss_fn.advantages(grouped, components=by_name).reshape(-1)
    return loss_fn.advantages(grouped).reshape(-1)


def kept_rows(loss_fn: base.LossFn, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool from the step's (N,) rewards: True where the row's group is one the loss keeps (`keep_groups`)."""
    keep = loss_fn.keep_groups(rewards.view(-1, group_size))
    keep = torch.ones(len(rewards) // group_size, dtype=torch.bool, device=rewards.device) if keep is None else keep
    return keep.bool().repeat_interleave(group_size)


@dataclasses.dataclass
class AdaptiveEntropy:
    """TRL's adaptive entropy coefficient (GRPOConfig `use_adaptive_entropy`) on a loss's `entropy_coef` field.

    A step applies the coefficient if the previous step's entropy was at or below `target` (else 0); at the step's
    end the coefficient moves by `delta` within [`minimum`, `maximum`]: up when the step's token-mean entropy over
    all processes is at or below the target, down otherwise. The coefficient and the last entropy are TRL's trainer
    attributes (`trl_bridge.entropy_state`), so TRL's checkpoints save and restore them.
    """

    minimum: float
    maximum: float
    delta: float
    target: float
    window: torch.Tensor | None = None  # (entropy sum, tokens) of the step's micro-batches so far

    @classmethod
    def from_grpo_config(cls, args) -> AdaptiveEntropy | None:
        if not args.use_adaptive_entropy:
            return None
        return cls(args.entropy_coef_min, args.entropy_coef_max, args.entropy_coef_delta, args.entropy_target)

    def applied(self, coef: float, last_entropy: float) -> float:
        """The coefficient this step's micro-batches apply."""
        return coef if last_entropy <= self.target else 0.0

    def observe(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a micro-batch's entropies over its loss mask to the step's window."""
        stats = torch.stack([(entropies.detach() * mask).sum(), mask.sum()]).double()
        self.window = stats if self.window is None else self.window + stats

    def step_end(self, coef: float, reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
        """(the next coefficient, the step's entropy) from the window summed over processes (`reduce`)."""
        total, tokens = reduce(self.window).tolist()
        self.window = None
        entropy = total / max(tokens, 1.0)
        moved = coef + self.delta if entropy <= self.target else coef - self.delta
        return min(max(moved, self.minimum), self.maximum), entropy


def truncated(completion_ids: torch.Tensor, max_new_tokens: int, end_ids: Sequence[int]) -> torch.Tensor:
    """(B,) bool: completions cut at `max_new_tokens`, by TRL's rule (`mask_truncated_completions`): full length and
    the last token no end of sequence or padding. Read from the ids alone, so it holds after TRL masked them."""
    if completion_ids.size(1) < max_new_tokens:
        return torch.zeros(completion_ids.size(0), dtype=torch.bool, device=completion_ids.device)
    last = completion_ids[:, max_new_tokens - 1]
    return ~torch.isin(last, torch.tensor(list(end_ids), device=last.device))


def checked_loss(
    loss: object, policy_logprobs: torch.Tensor, loss_name: str, step: int, skip_nonfinite: bool, needs_grad: bool
) -> tuple[torch.Tensor, bool]:
    """(the loss as a 0-dim tensor, False) if it is a finite scalar tensor, with grad where `needs_grad` (training);
    a clear error otherwise, or, with `skip_nonfinite`, (a zero loss on the same graph, True) for a NaN/inf loss."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{loss_name} must return a scalar loss tensor, got {shape} at step {step}")
    if needs_grad and not loss.requires_grad:
        raise ValueError(
            f"{loss_name} returned a loss without grad at step {step}: build it from batch.policy_logprobs"
        )
    if torch.isfinite(loss):
        return loss.reshape(()), False
    if not skip_nonfinite:
        raise FloatingPointError(
            f"{loss_name} returned a non-finite loss ({loss.item()}) at step {step}; "
            "set skip_nonfinite=True to skip such steps"
        )
    return policy_logprobs.sum() * 0.0, True


def batch_stats(batch: base.LearnerBatch) -> dict[str, float]:
    """What every run logs of a micro-batch: the policy's mean entropy and the mean |policy - rollout| log-prob gap
    (0 on-policy) over its valid tokens."""
    mask = batch.mask
    valid = mask.sum().clamp(min=1)
    gap = (batch.policy_logprobs.detach() - batch.rollout_logprobs).abs()
    stats = {"rollout_logprob_gap": ((gap * mask).sum() / valid).item()}
    if batch.entropies is not None:
        stats["entropy"] = ((batch.entropies.detach() * mask).sum() / valid).item()
    return stats


class GroupRefill:
    """DAPO's dynamic sampling: when the loss drops prompt groups (`keep_groups`), sample whole extra groups, up to
    `TrainConfig.refill_rounds` more generation batches, so each process still trains on its share of groups.

    Every decision is taken from the keeps gathered over processes, so every process generates alike; each process
    then keeps its own kept groups first, in order, and fills the rest of its share with dropped (masked) ones.
    """

    def __init__(self, group_size: int, rows_per_process: int, num_processes: int) -> None:
        self.group_size, self.num_processes = group_size, num_processes
        self.groups_per_process = rows_per_process // group_size

    def local(self, keep: torch.Tensor, rank: int) -> torch.Tensor:
        """Process `rank`'s rows of a gathered (all processes') keep."""
        return keep.view(self.num_processes, -1)[rank]

    def short(self, keeps: Iterator[torch.Tensor]) -> bool:
        """Whether some process holds fewer kept groups than its share over the rounds so far."""
        kept_groups = sum(keep.view(self.num_processes, -1).sum(dim=1) for keep in keeps) / self.group_size
        return bool((kept_groups < self.groups_per_process).any())

    def rows(self, dataset: Sequence[dict], seed: int) -> list[dict]:
        """A generation batch's worth of dataset rows for one process: random prompts, each `group_size` times."""
        generator = torch.Generator().manual_seed(seed % 2**63)
        prompts = torch.randint(len(dataset), (self.groups_per_process,), generator=generator).tolist()
        return [dataset[i] for i in prompts for _ in range(self.group_size)]

    def select(self, local_keeps: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows of the concatenated rounds to train on, which of them are kept) for this process; None = all."""
        keep = torch.cat(local_keeps)
        if len(local_keeps) == 1:
            return None, None if keep.all() else keep
        kept_groups = keep.view(-1, self.group_size)[:, 0]
        order = torch.cat([kept_groups.nonzero()[:, 0], (~kept_groups).nonzero()[:, 0]])[: self.groups_per_process]
        rows = (order[:, None] * self.group_size + torch.arange(self.group_size, device=order.device)).reshape(-1)
        return rows, keep[rows]


@dataclasses.dataclass(frozen=True)
class SharedPromptSetting:
    """Whether the log-prob passes share each prompt (`applies`), and whether TRL's micro-batches can hold whole
    prompt groups (`whole_groups`: then its shuffle permutes groups, so each prompt is computed once per step)."""

    applies: bool
    whole_groups: bool


def shared_prompt_setting(cfg, model: torch.nn.Module, args) -> SharedPromptSetting:
    """`cfg.shared_prompt` where it is exact for `model` (else off, saying why once) and with TRL's batching `args`."""
    if not cfg.shared_prompt or not cfg.chunked_logprobs:
        return SharedPromptSetting(False, False)
    if reason := shared_prompt_unsupported(model):
        warnings.warn(f"shared_prompt: off for this model ({reason}); each row carries its own prompt", stacklevel=3)
        return SharedPromptSetting(False, False)
    per_process = args.per_device_train_batch_size * args.steps_per_generation
    group = args.num_generations
    return SharedPromptSetting(True, args.per_device_train_batch_size % group == 0 and per_process % group == 0)


class CompletionsLog:
    """`path` (out/{run_name}-completions.jsonl): `per_step` of each step's completions, evenly spaced over its rows
    so that they span its groups, one JSON line each: step, task, prompt, completion, reward, advantage. Append-only;
    its first step's `record` drops the rows of that step and later ones (a resumed run logs them again; a fresh run
    of the same name starts at step 1, so the old file empties)."""

    def __init__(self, path: Path | None, per_step: int) -> None:
        """`path` None (a trainer built outside `Trainer.run`, with no run name): nothing is written."""
        self.path, self.per_step = path, per_step if path is not None else 0
        self.started = False

    def record(
        self,
        step: int,
        tasks: Sequence[str],
        prompts: Sequence[Any],
        completions: Sequence[Any],
        rewards: torch.Tensor,
        advantages: torch.Tensor,
    ) -> None:
        """Write the sampled rows of `step`; of chat prompts and completions, the last message's text, and of a
        multi-turn episode (tool calls) also its messages, calls and results included, under "episode"."""
        if not self.per_step:
            return
        if not self.started:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_after(self.path, step - 1)
            self.started = True
        for row in range(0, len(completions), math.ceil(len(completions) / self.per_step)):
            append_row(
                self.path,
                {
                    "step": step,
                    "task": tasks[row],
                    "prompt": text_of(prompts[row]),
                    "completion": text_of(completions[row], role="assistant"),
                    "reward": rewards[row].item(),
                    "advantage": advantages[row].item(),
                }
                | (
                    {"episode": completions[row]}
                    if isinstance(completions[row], list) and len(completions[row]) > 1
                    else {}
                ),  # fmt: skip
            )


VLLM_CONNECT_TIMEOUT_S = 5.0  # a server that is up accepts at once; TRL's own loop then waits for its health check


def check_vllm_server(host: str, port: int, base_url: str | None = None) -> None:
    """Raise a one-line ConnectionError unless a TCP connection to the vLLM server opens within
    `VLLM_CONNECT_TIMEOUT_S` (TRL's client retries for `vllm_server_timeout`, and its health check has no connect
    timeout of its own: an unroutable host would hang there for minutes)."""
    if base_url is not None:
        url = urlparse(base_url if "://" in base_url else f"http://{base_url}")
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=VLLM_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(
            f"vllm_mode='server': no vLLM server at {host}:{port} ({error.strerror or error}); start it first "
            f"(`trl vllm-serve --model ... --port {port}`) or set vllm_server_host / vllm_server_port"
        ) from None


def check_launch(trainer, cfg) -> None:
    """Refuse what this launch's sharding cannot run (`launch.check_sharding`), and an FSDP config that accelerate
    did not turn into FSDP (it does so on GPUs only: CPU processes would silently run plain DDP)."""
    if launch_uses_fsdp() and not trainer.is_fsdp_enabled:
        raise ValueError(
            "an FSDP accelerate config, but accelerate enables FSDP on GPUs only (on CPU processes it would run "
            "plain DDP): launch CPU processes with --multi_gpu instead"
        )
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else 0
    check_sharding(cfg, zero_stage=zero_stage, fsdp=trainer.is_fsdp_enabled)
