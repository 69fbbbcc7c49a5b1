"""dpo_loss: hand-computed values, properties (hypothesis), sequence_logps against a naive loop."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_loss import LOSSES, preference_loss, sequence_logps


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


logp = st.floats(-1e4, 1e4, allow_nan=False, width=32)
beta = st.floats(0.01, 5.0)


@settings(max_examples=200, deadline=None)
@given(x=logp, beta=beta)
def test_sigmoid_is_log2_at_zero_margin(x, beta):
    losses, _, _ = preference_loss(t(x), t(x), t(x), t(x), beta)
    assert losses.item() == pytest.approx(math.log(2), abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(a=logp, b=logp, c=logp, d=logp, beta=beta, eps=st.floats(0.0, 0.45), loss_type=st.sampled_from(sorted(LOSSES)))
def test_finite_at_extreme_logps(a, b, c, d, beta, eps, loss_type):
    losses, rc, rr = preference_loss(t(a), t(b), t(c), t(d), beta, loss_type, label_smoothing=eps, simpo_gamma=0.5)
    assert torch.isfinite(losses).all() and torch.isfinite(rc).all() and torch.isfinite(rr).all()


@settings(max_examples=200, deadline=None)
@given(h1=st.floats(-50, 50), step=st.floats(0.01, 10), beta=beta,
       loss_type=st.sampled_from(["sigmoid", "robust", "hinge", "simpo"]))
def test_loss_non_increasing_in_margin(h1, step, beta, loss_type):
    low, _, _ = preference_loss(t(h1), t(0.0), t(0.0), t(0.0), beta, loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    high, _, _ = preference_loss(t(h1 + step), t(0.0), t(0.0), t(0.0), beta, loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    assert high.item() <= low.item() + 1e-6


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    chosen = t(-5.0).requires_grad_()
    rejected = t(-4.0).requires_grad_()
    losses, _, _ = preference_loss(chosen, rejected, t(-5.0), t(-5.0), 0.1, loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent moves chosen up, rejected down


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
