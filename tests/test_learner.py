"""The adapter's features on their own, without a trainer: actor copy, the gated forward, truncation flags."""

from __future__ import annotations

import torch

from nanopost_trl import learner, model_copies
from nanopost_trl.logprobs import gated_policy_logprobs


def test_actor_copy_recopies_every_sync_interval_and_swaps_storage_not_values():
    params = [torch.nn.Parameter(torch.zeros(3))]
    actor = model_copies.ActorCopy(sync_interval=3)
    assert [actor.staleness(step, params) for step in range(3)] == [0, 1, 2]
    params[0].data += 1.0  # the learner moves on
    with actor.weights(params):
        assert torch.equal(params[0].data, torch.zeros(3))  # the actor's copy, taken at step 0
    assert torch.equal(params[0].data, torch.ones(3))
    assert actor.staleness(3, params) == 0 and torch.equal(actor.params[0], torch.ones(3))
    assert model_copies.ActorCopy(sync_interval=1).staleness(5, params) == 0  # on-policy: no copy at all


def test_gated_forward_carries_grad_on_kept_rows_only_with_equal_values():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    calls = []

    def forward(rows):
        calls.append((torch.is_grad_enabled(), weight[rows].numel()))
        values = (weight[rows] * 2).unsqueeze(1)
        return values, values * 0 + 1, None

    logprobs, entropies, router_loss, kept = gated_policy_logprobs(
        forward, lambda lp, ent: torch.tensor([True, False, True, False])
    )
    assert calls == [(False, 4), (True, 2)] and kept == 0.5 and router_loss is None
    torch.testing.assert_close(logprobs, (weight * 2).detach().unsqueeze(1))
    logprobs.sum().backward()
    assert weight.grad.tolist() == [2.0, 0.0, 2.0, 0.0]


def test_gated_forward_with_no_row_kept_still_runs_one_zero_weighted_row():
    weight = torch.nn.Parameter(torch.ones(3))
    logprobs, _, _, kept = gated_policy_logprobs(
        lambda rows: ((weight[rows] * 3).unsqueeze(1),) * 2 + (None,), lambda lp, ent: torch.zeros(3, dtype=torch.bool)
    )
    assert kept == 0.0 and logprobs.requires_grad  # a grad-carrying forward arms DDP's all-reduce
    logprobs.sum().backward()
    assert weight.grad.tolist() == [0.0, 0.0, 0.0]


def test_truncated_is_full_length_without_an_end_token():
    ids = torch.tensor([[5, 6, 7], [5, 2, 0], [5, 6, 2], [0, 0, 0]])  # 2 = EOS, 0 = pad
    assert learner.truncated(ids, 3, [2, 0]).tolist() == [True, False, False, False]
    assert learner.truncated(ids, 4, [2, 0]).tolist() == [False] * 4  # shorter than the cap: nothing was cut
