"""vLLM's sampler/learner mismatch through TRL's own code path, in both of TRL's vLLM modes, with stand-ins for what
needs a GPU: `rollout_logprobs` are the sampler's, and a loss that does not correct for the mismatch itself gets TRL's
importance-sampling correction, with gradients equal to TRL's own GRPO loss under the same correction.

- colocate: a stand-in replaces TRL's `VLLMGeneration` (the engine in the training process).
- server: TRL's own `VLLMGeneration` runs its server path (weight sync, one request for the unique prompts with
  `n` completions each, the broadcast and the per-process slice); a stand-in replaces its `VLLMClient` (HTTP to
  `trl vllm-serve` and NCCL for the weights), and a real listening socket answers the adapter's reachability check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import socket
import time

import pytest
import torch
import trl.generation.vllm_generation as trl_vllm
from helpers import free_port
from trl import GRPOTrainer

from nanopost_trl import base, launch
from nanopost_trl.losses import GRPOLoss

COMPLETIONS = ["12", "345", "6", "7890"]  # one group's 4 completions: different lengths, so non-zero advantages
MODES = ["colocate", "server"]


class Sampler:
    """What vLLM answers: fixed completions whose per-token log-probs are the learner's plus known offsets (vLLM's
    numerics differ from the learner's), one unscored (None, as vLLM returns for NaN), in vLLM's per-token top-k list
    layout. `returned` keeps each row's log-probs."""

    def __init__(self, trainer, tokenizer) -> None:
        self.trainer = trainer
        self.completion_ids = [tokenizer.encode(text) + [tokenizer.eos_token_id] for text in COMPLETIONS]
        self.offsets = 0.4 * torch.randn(len(COMPLETIONS), 8, generator=torch.Generator().manual_seed(0))
        self.returned: list[list[float | None]] = []

    def sample(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[list[float | None]]]]:
        """One completion per row of `prompts`: (completion ids, per-token [log-prob] lists)."""
        completions = [self.completion_ids[i % len(COMPLETIONS)] for i in range(len(prompts))]
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                learner_logprobs, _, _ = self.trainer._get_per_token_logps_and_entropies(
                    self.trainer.model, ids, torch.ones_like(ids), len(completion)
                )
            offsets = self.offsets[row % len(COMPLETIONS), : len(completion)]
            self.returned.append((learner_logprobs[0] + offsets).tolist())
        self.returned[1][0] = None
        return completions, [[[logprob] for logprob in row] for row in self.returned]


class StandInVLLM:
    """Colocate mode: replaces TRL's `VLLMGeneration`, one completion per prompt row."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def sync_weights(self) -> None:
        pass

    def generate(self, prompts, images, num_generations, profiler):
        completions, logprobs = self.sampler.sample(prompts)
        return None, completions, logprobs, None


class StandInVLLMClient:
    """Server mode: replaces TRL's `VLLMClient`. Records how TRL built it and the weights TRL streams to it, and answers
    `generate` as `trl vllm-serve` does: `n` completions per (unique) prompt, prompt-major."""

    def __init__(self, base_url: str, group_port: int, connection_timeout: float) -> None:
        self.built_with = {"base_url": base_url, "group_port": group_port, "connection_timeout": connection_timeout}
        self.sampler: Sampler | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def init_communicator(self, device) -> None:
        self.device = device

    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}  # what TRL's correction needs

    def update_named_params(self, metadata, named_params) -> None:
        self.weights = {name: param.detach().clone() for name, param in named_params}
        assert [name for name, _, _ in metadata] == list(self.weights)

    def reset_prefix_cache(self) -> None:
        pass

    def generate(self, prompts, features=None, n=1, **sampling_params) -> dict:
        assert features is None and sampling_params["logprobs"] == 0  # TRL asks for the sampled token's log-prob
        completions, logprobs = self.sampler.sample([prompt for prompt in prompts for _ in range(n)])
        return {"prompt_ids": prompts, "completion_ids": completions, "logprobs": logprobs, "logprob_token_ids": None}


@pytest.fixture
def vllm_trainer(tiny_trainer, monkeypatch):
    """`vllm_trainer(mode, **tiny_trainer_options)`: a tiny trainer generating with vLLM in `mode`."""

    def make(mode: str, **options):
        if mode == "colocate":
            return tiny_trainer(**options)
        monkeypatch.setattr(trl_vllm, "is_vllm_available", lambda *args, **kwargs: True)
        monkeypatch.setattr(trl_vllm, "VLLMClient", StandInVLLMClient)
        with socket.create_server(("127.0.0.1", 0)) as server:  # the kernel completes the handshake: reachable
            cfg = dict(use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1")
            cfg |= dict(vllm_server_port=server.getsockname()[1], vllm_group_port=51300, vllm_server_timeout=7.0)
            return tiny_trainer(cfg_overrides=cfg, **options)

    return make


def vllm_inputs(trainer, tokenizer, mode: str) -> tuple[dict, Sampler]:
    """One generation batch through TRL's `_generate_and_score_completions` with vLLM on (in `mode`)."""
    sampler = Sampler(trainer, tokenizer)
    if mode == "colocate":
        trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, StandInVLLM(sampler), -1
    else:
        trainer.vllm_generation.vllm_client.sampler = sampler
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(len(COMPLETIONS))]
    return trainer._generate_and_score_completions(rows), sampler


@dataclasses.dataclass
class LearnerRatioGRPO(base.LossFn):
    """TRL's GRPO surrogate: ratio against the learner's own log-probs, so it leaves the sampler mismatch to TRL."""

    seen: list = dataclasses.field(default_factory=list)

    def __call__(self, batch):
        self.seen.append(batch.rollout_logprobs.clone())
        learner_batch = dataclasses.replace(batch, rollout_logprobs=batch.policy_logprobs.detach())
        return GRPOLoss(kl_coef=0.0)(learner_batch)


def grads(trainer, inputs, compute_loss) -> dict[str, torch.Tensor]:
    trainer.model.zero_grad()
    compute_loss(trainer, trainer.model, inputs).backward()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("vllm_mode", MODES)
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask", "token_mask"])
def test_a_loss_that_leaves_the_mismatch_to_trl_gets_trls_correction_and_the_samplers_logprobs(
    vllm_trainer, tokenizer, mode, vllm_mode
):
    loss_fn = LearnerRatioGRPO()
    trainer = vllm_trainer(
        vllm_mode, loss_fn=loss_fn, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5
    )
    trainer.loss_type = "grpo"  # what TRL's own `_compute_loss`, called on this trainer below, reads
    inputs, stand_in = vllm_inputs(trainer, tokenizer, vllm_mode)
    ratio = inputs["importance_sampling_ratio"]
    assert ratio.std() > 0.05  # TRL's own ratios, not all equal: the correction matters

    ours = grads(trainer, inputs, type(trainer)._compute_loss)
    trl_grpo = grads(trainer, inputs, GRPOTrainer._compute_loss)  # TRL's loss, multiplied by the same ratio
    without = dict(inputs, importance_sampling_ratio=torch.ones_like(ratio))
    uncorrected = grads(trainer, without, GRPOTrainer._compute_loss)
    for name in trl_grpo:
        torch.testing.assert_close(ours[name], trl_grpo[name], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(trl_grpo[name], uncorrected[name]) for name in trl_grpo)

    rollout, mask = loss_fn.seen[0], inputs["completion_mask"].bool()
    for row in range(len(rollout)):  # the sampler's known log-probs; the unscored token keeps the learner's
        known = stand_in.returned[row]
        for t, logprob in enumerate(known):
            expected = inputs["old_per_token_logps"][row, t].item() if logprob is None else logprob
            assert rollout[row, t].item() == pytest.approx(expected, abs=1e-6)
        assert mask[row].sum() == len(known)
    assert not any(math.isnan(x) for x in rollout[mask].tolist())


@pytest.mark.parametrize("vllm_mode", MODES)
def test_a_loss_that_corrects_the_mismatch_itself_is_not_reweighted(vllm_trainer, tokenizer, vllm_mode):
    trainer = vllm_trainer(vllm_mode, loss_fn=GRPOLoss(kl_coef=0.0), vllm_importance_sampling_mode="token_truncate")
    assert GRPOLoss.corrects_sampler_mismatch  # its ratio is against the sampler's log-probs: the clip bounds it
    inputs, _ = vllm_inputs(trainer, tokenizer, vllm_mode)
    assert inputs["importance_sampling_ratio"].std() > 0.05
    with_ratio = grads(trainer, inputs, type(trainer)._compute_loss)
    without_ratio = grads(
        trainer, {k: v for k, v in inputs.items() if k != "importance_sampling_ratio"}, type(trainer)._compute_loss
    )
    for name in with_ratio:
        torch.testing.assert_close(with_ratio[name], without_ratio[name])


def test_server_mode_passes_the_servers_address_and_streams_the_learners_weights(vllm_trainer, tokenizer):
    trainer = vllm_trainer("server")
    client = trainer.vllm_generation.vllm_client
    port = trainer.cfg.vllm_server_port
    assert client.built_with == {"base_url": f"http://127.0.0.1:{port}", "group_port": 51300, "connection_timeout": 7.0}
    vllm_inputs(trainer, tokenizer, "server")
    parameters = dict(trainer.model.named_parameters())
    assert client.weights.keys() == parameters.keys()  # every weight once (the tied LM head under its own name)
    for name, weight in client.weights.items():
        assert torch.equal(weight, parameters[name]), name


@pytest.mark.parametrize("address", ["port", "base_url"])
def test_server_mode_without_a_server_fails_at_start_naming_its_address(tiny_trainer, address):
    port = free_port()  # nothing listens there
    where = {"vllm_server_port": port} if address == "port" else {"vllm_server_base_url": f"http://127.0.0.1:{port}"}
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no vLLM server at 127.0.0.1:{port} "):
        tiny_trainer(cfg_overrides=dict(use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", **where))
    assert time.monotonic() - start < launch.VLLM_CONNECT_TIMEOUT_S  # refused at once, before TRL's retry loop


def test_a_port_that_does_not_answer_fails_within_the_connect_timeout(monkeypatch):
    """A listening socket whose accept queue is full drops new connection requests unanswered, as an unroutable host
    does: the check gives up after its connect timeout (TRL's health check has none)."""
    monkeypatch.setattr(launch, "VLLM_CONNECT_TIMEOUT_S", 0.5)
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server, contextlib.ExitStack() as clients:
        port = server.getsockname()[1]
        for _ in range(3):  # fill the queue, never accepted
            client = clients.enter_context(socket.socket())
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=f"no vLLM server at 127.0.0.1:{port} \\(timed out\\)"):
            launch.check_vllm_server("127.0.0.1", port)
        assert time.monotonic() - start < 2.0
