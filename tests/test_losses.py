"""Built-in losses against their equations, written out independently here with explicit loops over tokens.

Each case builds a small LearnerBatch (B=4, T=5, padding, one fully masked row), runs the loss, and compares the loss
value and d loss / d policy_logprobs with the hand formula: loss = sum_it s_it f_it and grad_it = s_it f'_it, where
f_it is the per-token term and s_it the aggregation's weight on it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanopost_trl.base import LearnerBatch
from nanopost_trl.losses import (
    CISPOLoss,
    DAPOLoss,
    DGLoss,
    GRPOLoss,
    GSPOLoss,
    KondoLoss,
    Loss,
    LUSPOLoss,
    MaxRLLoss,
    PMPOLoss,
    SAPOLoss,
    TokenLoss,
    VESPOLoss,
)

LENGTHS = [5, 3, 2, 0]  # valid completion tokens per row; the last row is fully masked
LOGP = [
    [-0.3, -1.2, -0.05, -2.0, -0.7],
    [-1.5, -0.2, -0.9, -4.0, -4.0],
    [-0.6, -2.5, -4.0, -4.0, -4.0],
    [-0.5, -1.0, -4.0, -4.0, -4.0],
]
LOG_RATIO = [[0.1, -0.5, 0.3, 0.0, 0.05], [0.4, -0.3, 0.1, 0.0, 0.0], [-0.1, 0.25, 0.0, 0.0, 0.0], [0.0] * 5]
REF_MINUS_LOGP = [[0.2, -0.1, 0.5, -0.3, 0.0], [0.1, 0.4, -0.2, 0.0, 0.0], [-0.5, 0.3, 0.0, 0.0, 0.0], [0.0] * 5]
ADV = [1.2, -0.7, 0.4, 0.9]
# per-token entropies, distinct on the 10 valid tokens; padding is high, to show it never enters the quantile
ENTROPY = [[0.9, 0.1, 1.7, 0.4, 1.2], [0.3, 2.1, 0.6, 9.0, 9.0], [1.5, 0.05, 9.0, 9.0, 9.0], [9.0] * 5]
AGGREGATIONS = ["seq_mean", "token_mean", "constant", "step_token_mean", "seq_sum_mean"]
MAX_NEW_TOKENS = 8
NUM_ITEMS, MICRO_BATCHES = 16, 2  # the step's valid tokens and micro-batches: "step_token_mean" divides by 16 / 2


def make_batch(logp=LOGP, adv=ADV, lengths=LENGTHS, with_ref: bool = True, truncated=None) -> LearnerBatch:
    """A float64 batch; rollout = logp - LOG_RATIO, reference = logp + REF_MINUS_LOGP (None if not with_ref),
    entropies ENTROPY (with grad), NUM_ITEMS tokens over MICRO_BATCHES micro-batches in the step."""
    T = len(logp[0])
    old = [[lp - d for lp, d in zip(row, drow, strict=False)] for row, drow in zip(logp, LOG_RATIO, strict=False)]
    ref = [[lp + d for lp, d in zip(row, drow, strict=False)] for row, drow in zip(logp, REF_MINUS_LOGP, strict=False)]
    mask = [[1.0] + [1.0 if t < n else 0.0 for t in range(T)] for n in lengths]  # column 0: last prompt position
    f64 = torch.float64
    return LearnerBatch(
        policy_logprobs=torch.tensor(logp, dtype=f64, requires_grad=True),
        rollout_logprobs=torch.tensor(old, dtype=f64),
        reference_logprobs=torch.tensor(ref, dtype=f64) if with_ref else None,
        advantages=torch.tensor(adv, dtype=f64).unsqueeze(1),
        rewards=torch.zeros(len(adv), dtype=f64),
        loss_mask=torch.tensor(mask, dtype=f64),
        entropies=torch.tensor([row[:T] for row in ENTROPY[: len(logp)]], dtype=f64, requires_grad=True),
        num_items_in_batch=torch.tensor(float(NUM_ITEMS), dtype=f64),
        micro_batches_per_step=MICRO_BATCHES,
        truncated=None if truncated is None else torch.tensor(truncated),
    )


def run(loss_fn, batch: LearnerBatch):
    loss, metrics = loss_fn(batch)
    loss.backward()
    return loss.item(), metrics, batch.policy_logprobs.grad


def aggregation_weights(lengths, T: int, aggregation: str) -> list[list[float]]:
    """s_it: the weight of token (i, t) in the loss, 0 on padding."""
    B, total = len(lengths), sum(lengths)
    weights = []
    for n in lengths:
        if aggregation == "seq_mean":
            s = 1 / (B * n) if n else 0.0
        elif aggregation == "token_mean":
            s = 1 / total if total else 0.0
        elif aggregation == "step_token_mean":
            s = MICRO_BATCHES / NUM_ITEMS
        elif aggregation == "seq_sum_mean":
            s = 1 / B
        else:
            s = 1 / (B * MAX_NEW_TOKENS)
        weights.append([s if t < n else 0.0 for t in range(T)])
    return weights


def expected(term, aggregation: str, lengths=LENGTHS, T: int = 5):
    """Hand loss and gradient from `term(i, t) -> (f_it, d f_it / d logp_it)`."""
    weights = aggregation_weights(lengths, T, aggregation)
    loss, grad = 0.0, [[0.0] * T for _ in lengths]
    for i in range(len(lengths)):
        for t in range(lengths[i]):
            value, slope = term(i, t)
            loss += weights[i][t] * value
            grad[i][t] = weights[i][t] * slope
    return loss, torch.tensor(grad, dtype=torch.float64)


def k3(i: int, t: int) -> tuple[float, float]:
    """k3 KL term and its derivative in logp: exp(d) - d - 1 and 1 - exp(d), d = ref - logp."""
    d = REF_MINUS_LOGP[i][t]
    return math.exp(d) - d - 1, 1 - math.exp(d)


def check(loss_fn, batch, term, aggregation: str, lengths=LENGTHS):
    loss, metrics, grad = run(loss_fn, batch)
    want_loss, want_grad = expected(term, aggregation, lengths, batch.policy_logprobs.shape[1])
    assert loss == pytest.approx(want_loss, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, want_grad)
    assert all(math.isfinite(v) for v in metrics.values())
    return metrics


def valid_tokens(lengths=LENGTHS):
    return [(i, t) for i, n in enumerate(lengths) for t in range(n)]


# --- GRPO -------------------------------------------------------------------------------------------------------


def clip_active(rho: float, a: float, eps: float = 0.2) -> bool:
    """min(rho A, clip(rho) A) picks the clipped branch, whose derivative in logp is 0."""
    return rho * a > min(max(rho, 1 - eps), 1 + eps) * a


def grpo_term(adv, eps: float, kl_coef: float):
    def term(i, t):
        rho, a = math.exp(LOG_RATIO[i][t]), adv[i]
        clipped = min(max(rho, 1 - eps), 1 + eps)
        value, slope = (-clipped * a, 0.0) if clip_active(rho, a, eps) else (-rho * a, -rho * a)
        kl, dkl = k3(i, t)
        return value + kl_coef * kl, slope + kl_coef * dkl

    return term


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_grpo_matches_clipped_surrogate(aggregation, kl_coef):
    loss_fn = GRPOLoss(kl_coef=kl_coef, aggregation=aggregation, max_new_tokens=MAX_NEW_TOKENS)
    metrics = check(loss_fn, make_batch(with_ref=kl_coef > 0), grpo_term(ADV, 0.2, kl_coef), aggregation)
    clipped = [(i, t) for i, t in valid_tokens() if clip_active(math.exp(LOG_RATIO[i][t]), ADV[i])]
    assert len(clipped) == 3 and metrics["clipfrac"] == pytest.approx(len(clipped) / 10)
    assert ("kl_ref" in metrics) == (kl_coef > 0)


# --- DG ---------------------------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def dg_term(logp, adv, eta: float, kl_coef: float):
    def term(i, t):
        w = sigmoid(adv[i] * -logp[i][t] / eta)  # detached: no derivative through w
        kl, dkl = k3(i, t) if kl_coef else (0.0, 0.0)
        return -w * adv[i] * logp[i][t] + kl_coef * kl, -w * adv[i] + kl_coef * dkl

    return term


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize(("eta", "kl_coef"), [(1.0, 0.0), (0.3, 0.1)])
def test_dg_matches_gated_reinforce(aggregation, eta, kl_coef):
    loss_fn = DGLoss(eta=eta, kl_coef=kl_coef, aggregation=aggregation, max_new_tokens=MAX_NEW_TOKENS)
    metrics = check(loss_fn, make_batch(with_ref=kl_coef > 0), dg_term(LOGP, ADV, eta, kl_coef), aggregation)
    gates = [sigmoid(ADV[i] * -LOGP[i][t] / eta) for i, t in valid_tokens()]
    assert metrics["gate_mean"] == pytest.approx(sum(gates) / len(gates))
    assert metrics["delight_mean"] == pytest.approx(sum(ADV[i] * -LOGP[i][t] for i, t in valid_tokens()) / 10)
    assert ("kl_ref" in metrics) == (kl_coef > 0)


# --- Kondo ------------------------------------------------------------------------------------------------------


def kondo_kept(keep: int) -> set[tuple[int, int]]:
    """The `keep` valid tokens of highest delight A * -logp (no ties in this batch)."""
    return set(sorted(valid_tokens(), key=lambda it: ADV[it[0]] * -LOGP[it[0]][it[1]], reverse=True)[:keep])


# 10 valid tokens; delights: row 0 [.36, 1.44, .06, 2.4, .84], row 1 [-1.05, -.14, -.63], row 2 [.24, 1.0]
@pytest.mark.parametrize(("keep_frac", "keep", "skipped"), [(0.3, 3, 1 / 3), (0.5, 5, 1 / 3), (1.0, 10, 0.0)])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_kondo_matches_top_k_gated_pg(keep_frac, keep, skipped, kl_coef):
    kept = kondo_kept(keep)

    def term(i, t):
        kl, dkl = k3(i, t) if kl_coef else (0.0, 0.0)
        g = 1.0 if (i, t) in kept else 0.0
        return g * (-ADV[i] * LOGP[i][t] + kl_coef * kl), g * (-ADV[i] + kl_coef * dkl)

    loss_fn = KondoLoss(keep_frac=keep_frac, kl_coef=kl_coef)
    metrics = check(loss_fn, make_batch(with_ref=kl_coef > 0), term, "token_mean")
    assert metrics["kept_frac"] == pytest.approx(keep / 10)
    assert metrics["backward_skipped_frac"] == pytest.approx(skipped)
    gate = loss_fn.gate(make_batch())
    assert not gate.requires_grad
    assert {(i, t) for i, t in valid_tokens() if gate[i, t] == 1} == kept and gate.sum() == keep


def test_kondo_all_gated_off_is_zero_and_skips_every_row():
    loss, metrics, grad = run(KondoLoss(keep_frac=0.0, kl_coef=0.1), make_batch())
    assert loss == 0.0 and torch.all(grad == 0)
    assert metrics["kept_frac"] == 0.0 and metrics["backward_skipped_frac"] == 1.0


# sequence delights A_i * sum_t -logp_it: row 0 5.1, row 1 -1.82, row 2 1.24; row 3 has no valid token
@pytest.mark.parametrize(("keep_frac", "kept_rows"), [(0.0, set()), (0.34, {0}), (0.67, {0, 2}), (1.0, {0, 1, 2})])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_kondo_sequence_gate_keeps_whole_completions_by_their_delight(keep_frac, kept_rows, kl_coef):
    def term(i, t):
        kl, dkl = k3(i, t) if kl_coef else (0.0, 0.0)
        g = 1.0 if i in kept_rows else 0.0
        return g * (-ADV[i] * LOGP[i][t] + kl_coef * kl), g * (-ADV[i] + kl_coef * dkl)

    loss_fn = KondoLoss(keep_frac=keep_frac, kl_coef=kl_coef, unit="sequence")
    metrics = check(loss_fn, make_batch(with_ref=kl_coef > 0), term, "token_mean")
    assert metrics["kept_frac"] == pytest.approx(sum(LENGTHS[i] for i in kept_rows) / 10)
    assert metrics["backward_skipped_frac"] == pytest.approx(1 - len(kept_rows) / 3)
    assert set(loss_fn.backward_rows(make_batch()).nonzero().flatten().tolist()) == kept_rows


def test_kondo_rejects_an_unknown_unit():
    with pytest.raises(ValueError, match="unknown Kondo unit 'tokens'; valid: 'token', 'sequence'"):
        KondoLoss(unit="tokens")


# --- PMPO -------------------------------------------------------------------------------------------------------


def pmpo_term(labels, alpha: float, kl_coef: float):
    accepted_frac = sum(label > 0 for label in labels) / len(labels)
    rejected_frac = sum(label < 0 for label in labels) / len(labels)

    def term(i, t):
        if labels[i] > 0:
            weight = alpha / accepted_frac
        elif labels[i] < 0:
            weight = -(1 - alpha) / rejected_frac
        else:
            weight = 0.0
        kl, dkl = k3(i, t) if kl_coef else (0.0, 0.0)
        return -weight * LOGP[i][t] + kl_coef * kl, -weight + kl_coef * dkl

    return term


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize(("alpha", "kl_coef"), [(0.5, 0.0), (0.7, 0.1)])
def test_pmpo_matches_accept_reject_likelihood(aggregation, alpha, kl_coef):
    labels = [1.0, -1.0, 0.0, 1.0]
    loss_fn = PMPOLoss(alpha=alpha, kl_coef=kl_coef, aggregation=aggregation, max_new_tokens=MAX_NEW_TOKENS)
    batch = make_batch(adv=labels, with_ref=kl_coef > 0)
    metrics = check(loss_fn, batch, pmpo_term(labels, alpha, kl_coef), aggregation)
    assert metrics["accepted_frac"] == 0.5 and metrics["rejected_frac"] == 0.25


def test_pmpo_labels():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [0.2, 0.5, 0.9, 0.5]])
    assert PMPOLoss().advantages(rewards).tolist() == [[1, -1, -1, 1], [0, 0, 0, 0], [-1, -1, 1, -1]]
    absolute = PMPOLoss(threshold=1.0).advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    assert absolute.tolist() == [[1, -1, -1, 1], [-1, -1, -1, -1]]


# --- MaxRL ------------------------------------------------------------------------------------------------------


def test_maxrl_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    want = [[3.0, -1.0, -1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert MaxRLLoss().advantages(rewards).tolist() == want  # (r - mean) / mean; no success: 0
    partial = MaxRLLoss().advantages(torch.tensor([[0.5, 0.25, 0.0, 0.25]]))
    torch.testing.assert_close(partial, torch.tensor([[1.0, 0.0, -1.0, 0.0]]))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_maxrl_is_the_clipped_surrogate_on_its_advantages(aggregation):
    adv = MaxRLLoss().advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))[0].tolist()
    assert adv == [1.0, -1.0, -1.0, 1.0]
    loss_fn = MaxRLLoss(kl_coef=0.1, aggregation=aggregation, max_new_tokens=MAX_NEW_TOKENS)
    check(loss_fn, make_batch(adv=adv), grpo_term(adv, 0.2, 0.1), aggregation)


# --- TRL's loss family: asymmetric clips, DAPO, GSPO, LUSPO, CISPO, SAPO, VESPO ------------------------------------


def clipped_term(adv, eps_low: float, eps_high: float, delta: float | None = None):
    """-min(min(rho, delta) A, clip(rho, 1 - eps_low, 1 + eps_high) A): slope -rho A on the unclipped branch below
    delta, else 0 (the clipped branch and the delta cap are constants in logp)."""

    def term(i, t):
        rho, a = math.exp(LOG_RATIO[i][t]), adv[i]
        clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
        capped = rho if delta is None else min(rho, delta)
        if capped * a <= clipped * a:
            return -capped * a, (-rho * a if capped == rho else 0.0)
        return -clipped * a, 0.0

    return term


def clipped_tokens(eps_low: float, eps_high: float, adv=ADV) -> set[tuple[int, int]]:
    term = clipped_term(adv, eps_low, eps_high)
    return {(i, t) for i, t in valid_tokens() if term(i, t)[1] == 0.0}


# ratios: row 0 (A > 0) 1.105 .607 1.350 1 1.051; row 1 (A < 0) 1.492 .741 1.105; row 2 (A > 0) .905 1.284
ASYMMETRIC_CLIPS = [(0.2, 0.28, {(0, 2), (1, 1), (2, 1)}), (0.3, 0.4, set()), (0.3, 0.28, {(0, 2), (2, 1)})]


@pytest.mark.parametrize(("eps_low", "eps_high", "clipped"), ASYMMETRIC_CLIPS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_grpo_asymmetric_clip_uses_each_bound(aggregation, eps_low, eps_high, clipped):
    """eps_low bounds the ratio of A < 0 tokens from below, eps_high that of A > 0 tokens from above."""
    assert clipped_tokens(eps_low, eps_high) == clipped
    assert clipped_tokens(eps_low, eps_low) != clipped or clipped_tokens(eps_high, eps_high) != clipped
    loss_fn = GRPOLoss(eps_low=eps_low, eps_high=eps_high, kl_coef=0.0, aggregation=aggregation, max_new_tokens=8)
    metrics = check(loss_fn, make_batch(with_ref=False), clipped_term(ADV, eps_low, eps_high), aggregation)
    assert metrics["clipfrac"] == pytest.approx(len(clipped) / 10)


def test_grpo_two_sided_clip_caps_the_unclipped_ratio():
    """Row 1 token 0: A < 0, ratio 1.49 > delta = 1.3: the loss is -1.3 A there, with no gradient."""
    term = clipped_term(ADV, 0.2, 0.2, delta=1.3)
    assert term(1, 0) == (pytest.approx(1.3 * 0.7), 0.0)
    check(GRPOLoss(kl_coef=0.0, delta=1.3), make_batch(with_ref=False), term, "seq_mean")


def test_dapo_defaults_are_clip_higher_step_normalised_and_drop_flat_groups():
    loss_fn = DAPOLoss()
    assert (loss_fn.eps_low, loss_fn.eps_high, loss_fn.kl_coef, loss_fn.aggregation) == (
        0.2,
        0.28,
        0.0,
        "step_token_mean",
    )
    check(loss_fn, make_batch(with_ref=False), clipped_term(ADV, 0.2, 0.28), "step_token_mean")
    rewards = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    assert loss_fn.keep_groups(rewards).tolist() == [True, False, False, True]
    assert DAPOLoss(dynamic_sampling=False).keep_groups(rewards) is None


def test_step_token_mean_over_two_micro_batches_is_the_step_token_mean():
    """TRL's "dapo": each micro-batch divides its token sum by num_items_in_batch / micro-batches, the adapter
    divides by the 2 accumulated micro-batches, so the step's loss is (sum over its 10 tokens) / 10, whatever the
    split (rows 0-1 hold 8 tokens, rows 2-3 hold 2)."""
    full = make_batch(with_ref=False)
    halves = []
    for rows in (slice(0, 2), slice(2, 4)):
        half = make_batch(LOGP[rows], ADV[rows], LENGTHS[rows], with_ref=False)
        half.rollout_logprobs = full.rollout_logprobs[rows]
        half.num_items_in_batch, half.micro_batches_per_step = torch.tensor(10.0, dtype=torch.float64), 2
        halves.append(half)
    loss = sum(GRPOLoss(kl_coef=0.0, aggregation="step_token_mean")(half)[0] / 2 for half in halves)
    loss.backward()
    term = clipped_term(ADV, 0.2, 0.2)
    assert loss.item() == pytest.approx(sum(term(i, t)[0] for i, t in valid_tokens()) / 10, rel=1e-12)
    for rows, half in zip((range(0, 2), range(2, 4)), halves, strict=True):
        want = [[term(i, t)[1] / 10 if t < LENGTHS[i] else 0.0 for t in range(5)] for i in rows]
        torch.testing.assert_close(half.policy_logprobs.grad, torch.tensor(want, dtype=torch.float64))


def sequence_ratio(i: int) -> float:
    """GSPO's s_i: exp of the mean log-ratio over the row's valid tokens."""
    return math.exp(sum(LOG_RATIO[i][: LENGTHS[i]]) / LENGTHS[i]) if LENGTHS[i] else 1.0


def check_sequence_clip(loss_fn, eps_low: float, eps_high: float, row_weight) -> None:
    """loss = sum_i W_i f(s_i), f(s) = -min(s A, clip(s) A); d loss / d logp_it = W_i f'(s_i) s_i / n_i on valid
    tokens (s_i depends on each of them through the mean), W_i the aggregation's weight on row i's term."""
    want_loss, want_grad = 0.0, [[0.0] * 5 for _ in LENGTHS]
    for i, n in enumerate(LENGTHS):
        if not n:
            continue
        s_i, a = sequence_ratio(i), ADV[i]
        clipped = min(max(s_i, 1 - eps_low), 1 + eps_high)
        value, slope = (-s_i * a, -a) if s_i * a <= clipped * a else (-clipped * a, 0.0)
        want_loss += row_weight(n) * value
        for t in range(n):
            want_grad[i][t] = row_weight(n) * slope * s_i / n
    loss, _, grad = run(loss_fn, make_batch(with_ref=False))
    assert loss == pytest.approx(want_loss, rel=1e-9)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64))


# sequence ratios: row 0 (A > 0) 0.990, row 1 (A < 0) 1.069, row 2 (A > 0) 1.078: at the paper's 3e-4 / 4e-4 only
# row 2 is clipped; at 0.05 / 0.07 row 2 is clipped and row 1 is not
@pytest.mark.parametrize(("eps_low", "eps_high"), [(3e-4, 4e-4), (0.05, 0.07)])
def test_gspo_clips_the_sequence_ratio(eps_low, eps_high):
    check_sequence_clip(GSPOLoss(eps_low=eps_low, eps_high=eps_high), eps_low, eps_high, lambda n: 1 / 4)
    grpo = GRPOLoss(eps_low=eps_low, eps_high=eps_high, kl_coef=0.0, importance_sampling_level="sequence")
    check_sequence_clip(grpo, eps_low, eps_high, lambda n: 1 / 4)


def test_luspo_weights_each_sequence_by_its_length():
    assert (LUSPOLoss().eps_low, LUSPOLoss().eps_high) == (3e-4, 4e-4)
    check_sequence_clip(LUSPOLoss(), 3e-4, 4e-4, lambda n: n / 4)


@pytest.mark.parametrize("eps_high", [5.0, 1.3])
def test_cispo_clips_the_detached_weight(eps_high):
    def term(i, t):
        weight = min(math.exp(LOG_RATIO[i][t]), eps_high)
        return -weight * ADV[i] * LOGP[i][t], -weight * ADV[i]

    metrics = check(CISPOLoss(eps_high=eps_high), make_batch(with_ref=False), term, "step_token_mean")
    assert metrics["clipfrac"] == pytest.approx(0.1 if eps_high == 1.3 else 0.0)  # row 0 token 2 (A > 0, 1.35)


def test_sapo_soft_gate():
    def term(i, t):
        rho, a = math.exp(LOG_RATIO[i][t]), ADV[i]
        tau = 1.0 if a > 0 else 1.05
        gate = sigmoid(tau * (rho - 1))
        return -(4 / tau) * gate * a, -4 * gate * (1 - gate) * rho * a

    check(SAPOLoss(), make_batch(with_ref=False), term, "seq_mean")


def gamma_weight(i: int, k_lam_pos=(2.0, 3.0), k_lam_neg=(3.0, 2.0)) -> float:
    """VESPO's phi(w) = e^lambda w^k e^(-lambda w) of the (not length-normalised) sequence ratio w."""
    k, lam = k_lam_pos if ADV[i] >= 0 else k_lam_neg
    w = math.exp(sum(LOG_RATIO[i][: LENGTHS[i]]))
    return math.exp(lam) * w**k * math.exp(-lam * w)


def test_vespo_weights_reinforce_by_the_gamma_function_of_the_sequence_ratio():
    def term(i, t):
        phi = gamma_weight(i)
        return -phi * ADV[i] * LOGP[i][t], -phi * ADV[i]

    metrics = check(VESPOLoss(), make_batch(with_ref=False), term, "step_token_mean")
    assert metrics["phi_mean"] == pytest.approx(sum(gamma_weight(i) for i in range(4)) / 4)
    assert gamma_weight(3) == pytest.approx(1.0)  # phi(1) = 1


# --- the options every ratio loss shares ----------------------------------------------------------------------------


def cispo_term(adv, eps_high: float):
    def term(i, t):
        weight = min(math.exp(LOG_RATIO[i][t]), eps_high)
        return -weight * adv[i] * LOGP[i][t], -weight * adv[i]

    return term


# (loss, its aggregation, its hand term as a function of the advantages)
RATIO_LOSSES = [
    (GRPOLoss(kl_coef=0.0, eps_high=0.28), "seq_mean", lambda adv: clipped_term(adv, 0.2, 0.28)),
    (DAPOLoss(), "step_token_mean", lambda adv: clipped_term(adv, 0.2, 0.28)),
    (CISPOLoss(eps_high=1.3), "step_token_mean", lambda adv: cispo_term(adv, 1.3)),
]
RATIO_LOSS_IDS = ["grpo", "dapo", "cispo"]


def entropy_quantile(q: float) -> float:
    """torch.quantile's linear interpolation at q over the valid tokens' entropies, written out."""
    values = sorted(ENTROPY[i][t] for i, t in valid_tokens())
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    return values[lo] + (pos - lo) * (values[min(lo + 1, len(values) - 1)] - values[lo])


def masked_term(term, kept):
    """term on the kept tokens, 0 elsewhere."""
    return lambda i, t: term(i, t) if kept(i, t) else (0.0, 0.0)


# valid entropies sorted: .05 .1 .3 .4 .6 .9 1.2 1.5 1.7 2.1
@pytest.mark.parametrize(("loss_fn", "aggregation", "make_term"), RATIO_LOSSES, ids=RATIO_LOSS_IDS)
@pytest.mark.parametrize(("top", "kept"), [(0.3, {(0, 2), (1, 1), (2, 0)}), (0.0, {(1, 1)}), (1 / 9, {(0, 2), (1, 1)})])
def test_high_entropy_mask_keeps_the_top_quantile_of_valid_tokens(loss_fn, aggregation, make_term, top, kept):
    """kept = valid tokens with H >= the (1 - top) quantile; padding (H = 9.0, above all) never counts."""
    assert kept == {(i, t) for i, t in valid_tokens() if ENTROPY[i][t] >= entropy_quantile(1 - top) - 1e-12}
    loss_fn = dataclasses.replace(loss_fn, top_entropy_quantile=top)
    term = masked_term(make_term(ADV), lambda i, t: (i, t) in kept)
    metrics = check(loss_fn, make_batch(with_ref=False), term, aggregation)
    assert metrics["high_entropy_frac"] == pytest.approx(len(kept) / 10)


@pytest.mark.parametrize(("loss_fn", "aggregation", "make_term"), RATIO_LOSSES, ids=RATIO_LOSS_IDS)
@pytest.mark.parametrize(("threshold", "dropped"), [(0.005, {0}), (-0.07, {0, 1}), (0.5, set())])
def test_off_policy_mask_drops_negative_sequences_far_from_the_rollout(
    loss_fn, aggregation, make_term, threshold, dropped
):
    """Mean of log pi_rollout - log pi_theta (= -LOG_RATIO) over valid tokens: row 0 -0.01... see below; rows with
    A < 0 whose mean exceeds the threshold are dropped. Means: row 0 -0.01, row 1 -0.0667, row 2 -0.075."""
    adv = [-1.2, -0.7, 0.4, 0.9]
    means = [-sum(LOG_RATIO[i][: LENGTHS[i]]) / max(LENGTHS[i], 1) for i in range(4)]
    assert {i for i in range(4) if adv[i] < 0 and means[i] > threshold} == dropped
    loss_fn = dataclasses.replace(loss_fn, off_policy_mask_threshold=threshold)
    term = masked_term(make_term(adv), lambda i, t: i not in dropped)
    metrics = check(loss_fn, make_batch(adv=adv, with_ref=False), term, aggregation)
    assert metrics["off_policy_masked_frac"] == pytest.approx(len(dropped) / 4)


@pytest.mark.parametrize(("loss_fn", "aggregation", "make_term"), RATIO_LOSSES, ids=RATIO_LOSS_IDS)
def test_mask_truncated_removes_truncated_completions_from_every_normaliser(loss_fn, aggregation, make_term):
    """Row 1 truncated: its tokens leave the mask, so "seq_mean" still averages 4 rows (one now empty) and
    "token_mean" divides by the 7 remaining tokens; "step_token_mean" keeps the step's count (the adapter's)."""
    lengths = [5, 0, 2, 0]
    loss_fn = dataclasses.replace(loss_fn, mask_truncated=True)
    term = make_term(ADV)
    loss, _, grad = run(loss_fn, make_batch(with_ref=False, truncated=[False, True, False, False]))
    want_loss, want_grad = expected(term, aggregation, lengths)
    assert loss == pytest.approx(want_loss, rel=1e-9)
    torch.testing.assert_close(grad, want_grad)
    token_mean = dataclasses.replace(loss_fn, aggregation="token_mean")
    loss, _, _ = run(token_mean, make_batch(with_ref=False, truncated=[False, True, False, False]))
    assert loss == pytest.approx(expected(term, "token_mean", lengths)[0], rel=1e-9)


@pytest.mark.parametrize("top", [1.0, 0.3])
@pytest.mark.parametrize(("loss_fn", "aggregation", "make_term"), RATIO_LOSSES, ids=RATIO_LOSS_IDS)
def test_entropy_bonus_is_the_masked_mean_entropy(loss_fn, aggregation, make_term, top):
    """loss = policy loss - coef * mean entropy over the valid (and, with the entropy mask, high-entropy) tokens,
    whatever the aggregation: d loss / d H_it = -coef / n_kept on kept tokens; d loss / d logp unchanged."""
    coef, threshold = 0.05, entropy_quantile(1 - top)
    kept = {(i, t) for i, t in valid_tokens() if ENTROPY[i][t] >= threshold}
    loss_fn = dataclasses.replace(loss_fn, entropy_coef=coef, top_entropy_quantile=top)
    batch = make_batch(with_ref=False)
    loss, metrics = loss_fn(batch)
    loss.backward()
    policy_loss, want_grad = expected(masked_term(make_term(ADV), lambda i, t: (i, t) in kept), aggregation)
    mean_entropy = sum(ENTROPY[i][t] for i, t in kept) / len(kept)
    assert loss.item() == pytest.approx(policy_loss - coef * mean_entropy, rel=1e-9)
    assert metrics["policy_loss"] == pytest.approx(policy_loss, rel=1e-9)
    torch.testing.assert_close(batch.policy_logprobs.grad, want_grad)
    want = [[-coef / len(kept) if (i, t) in kept else 0.0 for t in range(5)] for i in range(4)]
    torch.testing.assert_close(batch.entropies.grad, torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize(
    ("loss_fn", "field", "setting"),
    [
        (GRPOLoss(kl_coef=0.0, top_entropy_quantile=0.2), "entropies", r"GRPOLoss\(top_entropy_quantile=0.2\)"),
        (SAPOLoss(entropy_coef=0.01), "entropies", r"SAPOLoss\(entropy_coef=0.01\)"),
        (DAPOLoss(), "num_items_in_batch", 'aggregation="step_token_mean"'),
        (CISPOLoss(mask_truncated=True), "truncated", r"CISPOLoss\(mask_truncated=True\)"),
        (VESPOLoss(kl_coef=0.1), "reference_logprobs", r"VESPOLoss\(kl_coef=0.1\)"),
    ],
)
def test_a_missing_batch_field_names_the_field_and_the_setting(loss_fn, field, setting):
    batch = make_batch(with_ref=False)
    if field != "reference_logprobs":
        setattr(batch, field, None)
    with pytest.raises(ValueError, match=f"^{setting} needs batch.{field}, which this run did not provide$"):
        loss_fn(batch)


def test_unknown_options_fail_at_construction():
    with pytest.raises(ValueError, match="unknown importance_sampling_level 'seq'; valid: 'token', 'sequence'"):
        GRPOLoss(importance_sampling_level="seq")
    with pytest.raises(ValueError, match=r"top_entropy_quantile must be in \[0, 1\], got 1.5"):
        DAPOLoss(top_entropy_quantile=1.5)


# --- advantages and edge cases shared by every loss ----------------------------------------------------------------


def test_default_advantages_are_group_normalised():
    got = DGLoss().advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased: 0.5
    want = [[0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3, [0.0] * 4]
    torch.testing.assert_close(got, torch.tensor(want))


def all_losses(kl_coef: float):
    return [
        GRPOLoss(kl_coef=kl_coef),
        DAPOLoss(kl_coef=kl_coef),
        GSPOLoss(kl_coef=kl_coef),
        LUSPOLoss(kl_coef=kl_coef),
        CISPOLoss(kl_coef=kl_coef),
        SAPOLoss(kl_coef=kl_coef),
        VESPOLoss(kl_coef=kl_coef),
        DGLoss(kl_coef=kl_coef),
        KondoLoss(keep_frac=0.5, kl_coef=kl_coef),
        PMPOLoss(kl_coef=kl_coef, max_new_tokens=MAX_NEW_TOKENS),
        MaxRLLoss(kl_coef=kl_coef),
    ]


@pytest.mark.parametrize("loss_fn", all_losses(0.0), ids=lambda fn: type(fn).__name__)
def test_equal_rewards_give_zero_advantages_and_zero_loss(loss_fn):
    advantages = loss_fn.advantages(torch.full((2, 4), 0.3)).flatten().tolist()
    assert advantages == pytest.approx([0.0] * 8, abs=1e-6)
    loss, metrics, grad = run(loss_fn, make_batch(adv=[0.0] * 4, with_ref=False))  # kl_coef 0: no reference
    assert loss == 0.0 and torch.all(grad == 0) and "kl_ref" not in metrics


@pytest.mark.parametrize("loss_fn", all_losses(0.1), ids=lambda fn: type(fn).__name__)
def test_masked_rows_are_finite_and_get_no_gradient(loss_fn):
    loss, metrics, grad = run(loss_fn, make_batch())
    assert math.isfinite(loss) and torch.isfinite(grad).all() and all(math.isfinite(v) for v in metrics.values())
    assert torch.all(grad[3] == 0) and torch.all(grad[1, 3:] == 0)
    loss, metrics, grad = run(loss_fn, make_batch(lengths=[0, 0, 0, 0]))
    assert loss == 0.0 and torch.all(grad == 0) and all(math.isfinite(v) for v in metrics.values())


# --- properties -------------------------------------------------------------------------------------------------


@st.composite
def batches(draw):
    """(logp, adv, lengths) for B in 1..4 rows of T in 1..4 tokens."""
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    logp = [draw(st.lists(st.floats(-5.0, -0.01), min_size=T, max_size=T)) for _ in range(B)]
    adv = draw(st.lists(st.floats(-3.0, 3.0), min_size=B, max_size=B))
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    return logp, adv, lengths


def random_batch(logp, adv, lengths) -> LearnerBatch:
    mask = [[1.0] + [1.0 if t < n else 0.0 for t in range(len(logp[0]))] for n in lengths]
    logp_t = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    return LearnerBatch(
        logp_t,
        logp_t.detach(),
        None,
        torch.tensor(adv, dtype=torch.float64).unsqueeze(1),
        torch.zeros(len(adv), dtype=torch.float64),
        torch.tensor(mask, dtype=torch.float64),
        num_items_in_batch=torch.tensor(float(NUM_ITEMS), dtype=torch.float64),
        micro_batches_per_step=MICRO_BATCHES,
    )


def reinforce(logp, adv, lengths, aggregation: str) -> tuple[float, torch.Tensor]:
    """-A logp, aggregated: plain advantage-weighted policy gradient and its gradient."""
    weights = aggregation_weights(lengths, len(logp[0]), aggregation)
    loss = sum(-weights[i][t] * adv[i] * logp[i][t] for i in range(len(adv)) for t in range(lengths[i]))
    grad = [[-weights[i][t] * adv[i] for t in range(len(logp[0]))] for i in range(len(adv))]
    return loss, torch.tensor(grad, dtype=torch.float64)


@settings(max_examples=50, deadline=None)
@given(batches(), st.floats(0.5, 5.0))
def test_dg_gate_in_open_unit_interval_and_monotone_in_delight(data, eta):
    logp, adv, lengths = data
    gate = DGLoss(eta=eta).gate(random_batch(logp, adv, lengths)).flatten().tolist()
    delight = [a * -lp for a, row in zip(adv, logp, strict=True) for lp in row]
    assert all(0.0 < g < 1.0 for g in gate)
    for d1, g1 in zip(delight, gate, strict=True):
        for d2, g2 in zip(delight, gate, strict=True):
            assert d1 >= d2 or g1 <= g2


@settings(max_examples=50, deadline=None)
@given(batches(), st.sampled_from(AGGREGATIONS))
def test_dg_with_infinite_temperature_is_half_reinforce(data, aggregation):
    logp, adv, lengths = data
    dg = DGLoss(eta=1e12, kl_coef=0.0, aggregation=aggregation, max_new_tokens=MAX_NEW_TOKENS)
    loss, _, grad = run(dg, random_batch(logp, adv, lengths))
    want_loss, want_grad = reinforce(logp, adv, lengths, aggregation)
    assert loss == pytest.approx(0.5 * want_loss, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(grad, 0.5 * want_grad)


@settings(max_examples=50, deadline=None)
@given(batches(), st.sampled_from(AGGREGATIONS))
def test_kondo_keeping_everything_is_plain_pg(data, aggregation):
    logp, adv, lengths = data
    kondo = KondoLoss(keep_frac=1.0, kl_coef=0.0, aggregation=aggregation, max_new_tokens=MAX_NEW_TOKENS)
    loss, metrics, grad = run(kondo, random_batch(logp, adv, lengths))
    want_loss, want_grad = reinforce(logp, adv, lengths, aggregation)
    assert loss == pytest.approx(want_loss, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, want_grad)
    assert metrics["backward_skipped_frac"] == 0.0


@settings(max_examples=50, deadline=None)
@given(batches(), st.sampled_from(AGGREGATIONS))
def test_pmpo_with_alpha_one_ignores_rejected(data, aggregation):
    logp, adv, lengths = data
    pmpo = PMPOLoss(alpha=1.0, kl_coef=0.0, aggregation=aggregation, max_new_tokens=MAX_NEW_TOKENS)
    _, _, grad = run(pmpo, random_batch(logp, adv, lengths))
    for i, a in enumerate(adv):
        assert a < 0 and torch.all(grad[i] == 0) or a >= 0


# --- registry and the README example --------------------------------------------------------------------------------


@pytest.mark.parametrize("member", list(Loss), ids=lambda m: m.name)
def test_make_rejects_unknown_fields_naming_valid_ones(member):
    assert isinstance(member.make(), member.value)
    with pytest.raises(TypeError) as err:
        member.make(bad_field=1)
    assert "bad_field" in str(err.value) and "kl_coef" in str(err.value)


def test_make_overrides_and_from_name():
    assert Loss.DG.make(eta=0.5).eta == 0.5 and Loss.from_name("kondo") is Loss.KONDO
    with pytest.raises(ValueError, match="grpo, dg, kondo, pmpo, maxrl"):
        Loss.from_name("nope")


def test_simple_pg_example_computes_the_hand_formula():
    path = Path(__file__).parents[1] / "examples" / "simple_pg.py"
    spec = importlib.util.spec_from_file_location("simple_pg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lengths = LENGTHS[:3]  # SimplePG divides by each row's length: no fully masked row
    batch = make_batch(logp=LOGP[:3], adv=ADV[:3], lengths=lengths)

    def term(i, t):
        kl, dkl = k3(i, t)
        return -ADV[i] * LOGP[i][t] + 0.04 * kl, -ADV[i] + 0.04 * dkl

    weights = [[1 / (3 * n) if t < n else 0.0 for t in range(5)] for n in lengths]  # seq_mean over B=3 rows
    loss, metrics, grad = run(module.SimplePG(), batch)
    assert loss == pytest.approx(sum(weights[i][t] * term(i, t)[0] for i, t in valid_tokens(lengths)))
    want_grad = [[weights[i][t] * term(i, t)[1] if t < lengths[i] else 0.0 for t in range(5)] for i in range(3)]
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64))
    assert metrics["kl"] == pytest.approx(sum(k3(i, t)[0] for i, t in valid_tokens(lengths)) / 10)


@pytest.mark.parametrize("loss_fn", all_losses(0.1), ids=lambda fn: type(fn).__name__)
def test_every_builtin_shares_the_per_token_frame_options(loss_fn):
    """Truncation, the entropy mask and the entropy bonus apply to every built-in (`frame.TokenLoss`): a truncated
    row gets no gradient, and the bonus lowers the loss by exactly entropy_coef x the masked mean entropy."""
    assert isinstance(loss_fn, TokenLoss)
    base_loss, _, _ = run(loss_fn, make_batch(truncated=[False] * 4))
    masked = dataclasses.replace(loss_fn, mask_truncated=True)
    _, _, grad = run(masked, make_batch(truncated=[True, False, False, False]))
    assert torch.all(grad[0] == 0) and torch.any(grad[1:] != 0)
    batch = make_batch(truncated=[False] * 4)
    bonus_loss, metrics, _ = run(dataclasses.replace(loss_fn, entropy_coef=0.5), batch)
    mask = batch.mask
    entropy = ((batch.entropies * mask).sum() / mask.sum()).item()
    assert bonus_loss == pytest.approx(base_loss - 0.5 * entropy) and metrics["policy_loss"] == pytest.approx(base_loss)
