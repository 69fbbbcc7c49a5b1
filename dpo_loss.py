"""DPO-family losses as pure functions of log-probabilities. Imports torch and nothing of the project.

    policy_logps = sequence_logps(logits, labels)                      # [batch]
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1)

Notation: πc, πr are the policy's log-probabilities of the chosen and rejected responses, rc, rr the reference's,
h = (πc − πr) − (rc − rr) the log-ratio margin, β the inverse temperature, ε the label-smoothing rate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] for a run of tokens: [T, V], [T] -> [T], in float32.

    logsumexp over the vocabulary row by row instead of a full log_softmax: with a 49k vocabulary the fp32
    log_softmax of a whole batch is the largest tensor of the step.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   average: bool = False) -> torch.Tensor:
    """Sum (or per-token mean) of the label log-probs of each sequence, masked positions ignored.

    logits: [B, T, V] from a causal LM; labels: [B, T] aligned with the inputs (position t predicts t+1, so logits
    are shifted against labels here, as in the reference implementation's `_get_batch_logps`).
    Returns [B] in float32. A sequence with no unmasked label gets 0.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    safe_labels = labels.masked_fill(~mask, 0)
    per_token = torch.stack([token_logps(row_logits, row_labels) for row_logits, row_labels in zip(logits, safe_labels)])
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def _sigmoid(h, beta, eps, gamma):
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(βh); cDPO (Mitchell 2023): −(1−ε) log σ(βh) − ε log σ(−βh)."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _robust(h, beta, eps, gamma):
    """rDPO (Chowdhury et al. 2024, Eq. 8): (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε), unbiased under label noise ε."""
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _hinge(h, beta, eps, gamma):
    """SLiC (Zhao et al. 2023, Eq. 3 with δ = 1/β): max(0, 1 − βh)."""
    return torch.relu(1 - beta * h)


def _ipo(h, beta, eps, gamma):
    """IPO (Azar et al. 2023, Eq. 17, τ = β): (h − 1/(2β))², h from length-averaged log-probs."""
    return (h - 1 / (2 * beta)) ** 2


def _simpo(h, beta, eps, gamma):
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(β(πc − πr) − γ), πc, πr length-averaged, no reference."""
    return -F.logsigmoid(beta * h - gamma)


LOSSES = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo, "simpo": _simpo}
LENGTH_AVERAGED = {"ipo", "simpo"}
"""Loss types fed with per-token mean log-probs (sequence_logps(average=True)), as their authors and TRL do."""
REFERENCE_FREE = {"simpo"}


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.0):
    """Per-pair losses and implicit rewards, each [batch]; rewards are detached.

    h = (πc − πr) − (rc − rr); for simpo h = πc − πr and the reference arguments may be None.
    Rewards: β(πc − rc) and β(πr − rr); β·πc and β·πr for simpo.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSSES)}")
    if loss_type in REFERENCE_FREE:
        h = policy_chosen_logps - policy_rejected_logps
        chosen_rewards, rejected_rewards = beta * policy_chosen_logps, beta * policy_rejected_logps
    else:
        h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = LOSSES[loss_type](h, beta, label_smoothing, simpo_gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
