"""Built-in losses against their equations, written out independently here with explicit loops over tokens.

Each case builds a small LearnerBatch (B=4, T=5, padding, one fully masked row), runs the loss, and compares the loss
value and d loss / d policy_logprobs with the hand formula: loss = sum_it s_it f_it and grad_it = s_it f'_it, where
f_it is the per-token term and s_it the aggregation's weight on it.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanopost_trl.base import LearnerBatch
from nanopost_trl.losses import DGLoss, GRPOLoss, KondoLoss, Loss, MaxRLLoss, PMPOLoss

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
AGGREGATIONS = ["seq_mean", "token_mean", "constant"]
MAX_NEW_TOKENS = 8


def make_batch(logp=LOGP, adv=ADV, lengths=LENGTHS, with_ref: bool = True) -> LearnerBatch:
    """A float64 batch; rollout = logp - LOG_RATIO, reference = logp + REF_MINUS_LOGP (None if not with_ref)."""
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


# --- advantages and edge cases shared by every loss ----------------------------------------------------------------


def test_default_advantages_are_group_normalised():
    got = DGLoss().advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased: 0.5
    want = [[0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3, [0.0] * 4]
    torch.testing.assert_close(got, torch.tensor(want))


def all_losses(kl_coef: float):
    return [
        GRPOLoss(kl_coef=kl_coef),
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
