"""dpo_loss: hand-computed values, properties (hypothesis), sequence_logps against a naive loop."""
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from config import LOSS_TYPES
from dpo_loss import (LENGTH_AVERAGED, LOSSES, REFERENCE_FREE, SUMMED_REWARD, LossOptions, PairLogps, ld_token_weights,
                      objective_terms, preference_loss, sequence_logps, wpo_weights)
import dpo_loss
import objectives
from objectives import SPECS, SUM_REWARD, TRL_TYPES


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_sigmoid_hand_computed():
    """πc=-1, πr=-3, rc=-2, rr=-2: h = (−1+3) − 0 = 2; β=0.5: βh = 1; −log σ(1) = log(1+e⁻¹) = 0.31326."""
    losses, rc, rr = preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_cdpo_and_robust_hand_computed():
    """βh = 1, ε = 0.1: cDPO = 0.9·0.31326 + 0.1·1.31326 = 0.41326;
    rDPO = (0.9·0.31326 − 0.1·1.31326) / 0.8 = (0.281934 − 0.131326) / 0.8 = 0.188260."""
    a, b = math.log1p(math.exp(-1)), math.log1p(math.exp(1))
    cdpo, _, _ = preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    rdpo, _, _ = preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert cdpo.item() == pytest.approx(0.9 * a + 0.1 * b, abs=1e-6) == pytest.approx(0.41326, abs=1e-5)
    assert rdpo.item() == pytest.approx((0.9 * a - 0.1 * b) / 0.8, abs=1e-6) == pytest.approx(0.18826, abs=1e-5)


def test_hinge_ipo_simpo_hand_computed():
    """h = 2, β = 0.25: hinge max(0, 1 − 0.5) = 0.5; IPO (2 − 1/0.5)² = 0; with h = 4: (4 − 2)² = 4.
    SimPO πc=−1, πr=−2, β=2, γ=0.5: −log σ(2·1 − 0.5) = log(1 + e^−1.5) = 0.20141; rewards −2, −4."""
    hinge, _, _ = preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.25, loss_type="hinge")
    ipo0, _, _ = preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.25, loss_type="ipo")
    ipo4, _, _ = preference_loss(t(1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.25, loss_type="ipo")
    simpo, rc, rr = preference_loss(t(-1.0), t(-2.0), None, None, beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    assert hinge.item() == pytest.approx(0.5) and ipo0.item() == pytest.approx(0.0) and ipo4.item() == pytest.approx(4.0)
    assert simpo.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert (rc.item(), rr.item()) == (pytest.approx(-2.0), pytest.approx(-4.0))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        preference_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, loss_type="kto")


def test_reference_free_hand_computed():
    """One pair, πc = −2 over 2 tokens (mean −1), πr = −6 over 3 tokens (mean −2), β = 0.5; NLL = 2/2 = 1.
    ORPO: log odds(c) = −1 − log(1 − e⁻¹) = −0.541325, log odds(r) = −2 − log(1 − e⁻²) = −1.854587, difference
    1.313262, −log σ(1.313262) = 0.238183: 1 + 0.5·0.238183 = 1.119092.
    CPO: −log σ(0.5·(−2 + 6)) = log(1 + e⁻²) = 0.126928, + NLL 1 = 1.126928.
    SimPO (γ = 0.25): −log σ(0.5·(−1 + 2) − 0.25) = log(1 + e^−0.25) = 0.575498. sft alone: 1."""
    x = PairLogps(t(-2.0), t(-6.0), None, None, t(2.0), t(3.0))
    options = LossOptions(beta=0.5, simpo_gamma=0.25)
    assert LOSSES["orpo"](x, options).item() == pytest.approx(1.119092, abs=1e-5)
    assert LOSSES["cpo"](x, options).item() == pytest.approx(1.126928, abs=1e-5)
    assert LOSSES["simpo"](x, options).item() == pytest.approx(math.log1p(math.exp(-0.25)), abs=1e-6)
    assert LOSSES["sft"](x, options).item() == pytest.approx(1.0)
    out = objective_terms(x, ["orpo"], options=options)  # reference-free rewards: β × mean log-prob
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (pytest.approx(-0.5), pytest.approx(-1.0))
    assert objective_terms(x, ["cpo"], options=options).chosen_rewards.item() == pytest.approx(-1.0)  # β × sum


def test_weighted_sum_and_rpo_terms():
    """MPO = 0.8·sigmoid + 0.2·bco_pair + 1.0·sft, term by term; the NLL is per token over the whole batch:
    pairs with chosen sums −2 (2 tokens) and −10 (3 tokens) give (2 + 10)/5 = 2.4 for both."""
    x = PairLogps(t(-2.0, -10.0), t(-6.0, -9.0), t(-3.0, -9.0), t(-5.0, -8.0), t(2.0, 3.0), t(3.0, 4.0))
    options = LossOptions(beta=0.1)
    out = objective_terms(x, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], options)
    expected = 0.8 * LOSSES["sigmoid"](x, options) + 0.2 * LOSSES["bco_pair"](x, options) + 2.4
    assert torch.allclose(out.losses, expected) and set(out.terms) == {"sigmoid", "bco_pair", "sft"}
    assert torch.allclose(out.terms["sft"], t(2.4, 2.4))
    weighted = objective_terms(x, ["sigmoid", "sft"], options=options, pair_weights=t(0.5, 2.0))
    assert torch.allclose(weighted.losses, (LOSSES["sigmoid"](x, options) + 2.4) * t(0.5, 2.0))
    assert torch.allclose(weighted.terms["sft"], t(1.2, 4.8))  # WPO weights the NLL term too (TRL 1.16 raises)


def test_ld_token_weights_and_wpo_weights():
    """Chosen 2 tokens, rejected 4: the shared length is 2, so rejected tokens 3 and 4 get α. WPO: a row whose
    tokens each have log-prob −1 against log Σp² = −2 has factor e^{−1+2} = e, the pair e · e^{(−3+1)} = e^{−1}."""
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert ld_token_weights(mask, 0.25).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 0.25, 0.25]]
    logps = torch.tensor([[0, -1, -1, 0, 0], [0, -3, -3, -3, -3]], dtype=torch.float32)
    squares = torch.tensor([[0, -2, -2, 0, 0], [0, -1, -1, -1, -1]], dtype=torch.float32)
    assert wpo_weights(logps, squares, mask).item() == pytest.approx(math.exp(-1), rel=1e-6)


def test_unknown_loss_type_in_a_list():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        objective_terms(PairLogps(t(0.0), t(0.0), t(0.0), t(0.0)), ["sigmoid", "kto"])


logp = st.floats(-1e4, 1e4, allow_nan=False, width=32)
beta = st.floats(0.01, 5.0)
length = st.integers(1, 2048)


@settings(max_examples=200, deadline=None)
@given(x=logp, beta=beta)
def test_sigmoid_is_log2_at_zero_margin(x, beta):
    losses, _, _ = preference_loss(t(x), t(x), t(x), t(x), beta)
    assert losses.item() == pytest.approx(math.log(2), abs=1e-6)


def pairs(a, b, c, d, n, m):
    return PairLogps(t(min(a, -1e-3)), t(min(b, -1e-3)), t(min(c, -1e-3)), t(min(d, -1e-3)), t(float(n)), t(float(m)))


@settings(max_examples=300, deadline=None)
@given(a=logp, b=logp, c=logp, d=logp, n=length, m=length, beta=beta, eps=st.floats(1e-3, 0.45),
       loss_type=st.sampled_from(sorted(LOSSES)))
def test_every_objective_finite_at_extreme_logps(a, b, c, d, n, m, beta, eps, loss_type):
    """Log-probs anywhere in [−1e4, 0) (the inputs a model can give), any lengths: loss and rewards are finite."""
    out = objective_terms(pairs(a, b, c, d, n, m), [loss_type], options=LossOptions(beta, eps, simpo_gamma=0.5))
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.chosen_rewards).all()
    assert torch.isfinite(out.rejected_rewards).all()


@settings(max_examples=200, deadline=None)
@given(a=logp, b=logp, n=length, m=length, beta=beta, eps=st.floats(0.0, 0.45),
       loss_type=st.sampled_from(["simpo", "orpo", "cpo"]))
def test_reference_free_gradients_finite_at_extremes(a, b, n, m, beta, eps, loss_type):
    """Finite gradients everywhere; without label smoothing (which has an optimum at a finite margin) descent never
    lowers chosen or raises rejected."""
    for smoothing in (eps, 0.0):
        chosen, rejected = t(min(a, -1e-3)).requires_grad_(), t(min(b, -1e-3)).requires_grad_()
        x = PairLogps(chosen, rejected, None, None, t(float(n)), t(float(m)))
        LOSSES[loss_type](x, LossOptions(beta, smoothing)).sum().backward()
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert chosen.grad.item() <= 0 <= rejected.grad.item()


@settings(max_examples=200, deadline=None)
@given(h1=st.floats(-50, 50), step=st.floats(0.01, 10), beta=beta,
       loss_type=st.sampled_from(["sigmoid", "robust", "hinge", "simpo", "cpo", "sigmoid_norm"]))
def test_loss_non_increasing_in_margin(h1, step, beta, loss_type):
    """(DiscoPOP is left out: its discovered loss is not monotone near a zero margin, as its paper shows.)"""
    eps = 0.1 if loss_type == "robust" else 0.0
    low, _, _ = preference_loss(t(h1), t(0.0), t(0.0), t(0.0), beta, loss_type, label_smoothing=eps)
    high, _, _ = preference_loss(t(h1 + step), t(0.0), t(0.0), t(0.0), beta, loss_type, label_smoothing=eps)
    assert high.item() <= low.item() + 1e-6


@pytest.mark.parametrize("loss_type", sorted(set(LOSSES) - {"apo_down", "sft", "discopop"}))
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    """At policy = reference (and for the reference-free ones at these log-probs) descent raises chosen and lowers
    rejected; apo_down lowers both by design, sft moves chosen only (checked below), DiscoPOP's slope at a zero
    margin is positive (its non-convex region)."""
    chosen, rejected = t(-5.0).requires_grad_(), t(-4.0).requires_grad_()
    x = PairLogps(chosen, rejected, t(-5.0), t(-4.0), t(5.0), t(4.0))
    eps = 1e-3 if loss_type == "exo_pair" else 0.0
    LOSSES[loss_type](x, LossOptions(0.1, eps)).sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_apo_down_and_sft_gradients():
    """APO-down at ρc = 0, ρr = −2: ∂/∂πc = β(σ'(0) − σ'(0.2)) > 0 and ∂/∂πr = βσ'(0.2) > 0: both go down."""
    chosen, rejected = t(-5.0).requires_grad_(), t(-4.0).requires_grad_()
    x = PairLogps(chosen, rejected, t(-5.0), t(-2.0), t(5.0), t(4.0))
    LOSSES["apo_down"](x, LossOptions(0.1)).sum().backward()
    assert chosen.grad.item() > 0 and rejected.grad.item() > 0
    chosen.grad = rejected.grad = None
    LOSSES["sft"](x, LossOptions(0.1)).sum().backward()
    assert chosen.grad.item() < 0 and rejected.grad is None


def test_registry_is_trl_plus_reference_free_and_matches_the_table():
    """dpo_loss (torch) and objectives (the torch-free table config and the launcher read) name the same
    objectives in the same order and agree on which need a reference, which are length-averaged, the divergences."""
    assert set(LOSSES) == set(TRL_TYPES) | {"simpo", "orpo", "cpo"} and LOSS_TYPES == tuple(LOSSES) == tuple(SPECS)
    assert REFERENCE_FREE == {n for n, spec in SPECS.items() if not spec.reference} == {"sft", "simpo", "orpo", "cpo"}
    assert LENGTH_AVERAGED == {n for n, spec in SPECS.items() if spec.length_averaged}
    assert SUMMED_REWARD == {n for n, spec in SPECS.items() if spec.reward == SUM_REWARD}
    assert dpo_loss.F_DIVERGENCES == objectives.F_DIVERGENCES
    for name, fn in LOSSES.items():
        assert "arXiv:" in fn.__doc__ and "arXiv:" in SPECS[name].paper, name


def naive_logps(logits, labels, average=False):
    out = []
    for b in range(logits.shape[0]):
        total, n = 0.0, 0
        for pos in range(1, logits.shape[1]):
            if labels[b, pos] != -100:
                total += torch.log_softmax(logits[b, pos - 1].double(), -1)[labels[b, pos]].item()
                n += 1
        out.append(total / max(n, 1) if average else total)
    return torch.tensor(out)


def test_sequence_logps_equals_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    labels[1, 5:] = -100
    labels[2, :] = -100
    for average in (False, True):
        assert torch.allclose(sequence_logps(logits, labels, average=average), naive_logps(logits, labels, average).float(), atol=1e-5)
    assert sequence_logps(logits, labels)[2].item() == 0.0


def test_masked_positions_change_nothing():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    labels[:, :2] = -100
    base = sequence_logps(logits, labels)
    noisy = logits.clone()
    noisy[:, 0] = 1e4  # predicts position 1, which is masked
    other_labels = labels.clone()
    other_labels[:, 0] = 3  # position 0 is never predicted
    assert torch.equal(sequence_logps(noisy, labels), base)
    assert torch.equal(sequence_logps(logits, other_labels), base)


def test_sequence_logps_bf16_logits_computed_in_fp32():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 50)
    labels = torch.randint(0, 50, (2, 5))
    out = sequence_logps(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    assert torch.allclose(out, sequence_logps(logits.bfloat16().float(), labels))


def test_the_training_page_lists_every_objective_with_paper_and_reference():
    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    for name, spec in SPECS.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        assert spec.paper in row and ("| yes |" if spec.reference else "| **no** |") in row
