"""Preference objectives as pure functions of log-probabilities. Imports torch and nothing of the project.

    policy_logps = sequence_logps(logits, labels)                      # [batch]
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1)

    x = PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)
    out = objective_terms(x, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], LossOptions(beta=0.1))   # MPO
    out.losses, out.terms["sft"], out.chosen_rewards

Every objective TRL 1.16's DPOTrainer trains (`sigmoid` … `sigmoid_norm`, with its f-divergences, WPO weighting and
LD-DPO, the last two computed by the caller from per-token values: `wpo_weights`, `ld_token_weights`) plus the
reference-free `simpo`, `orpo` and `cpo`. `LOSSES` maps each config name to its function; objectives.py (torch-free,
for config checks, the launcher and the report) holds their papers, formulas and keys, the same names (tested).

Notation: πc, πr are the policy's summed log-probabilities of the chosen and rejected responses, rc, rr the
reference's, |yc|, |yr| their lengths in tokens; the log-ratios are ρc = πc − rc and ρr = πr − rr, and under an
f-divergence the scores are sc = f'(exp ρc), sr = f'(exp ρr) (under reverse KL: sc = ρc, sr = ρr); the margin is
h = sc − sr; β is the inverse temperature, ε the label-smoothing rate, σ the logistic function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F



def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] for a run of tokens: [T, V], [T] -> [T], in float32.

    logsumexp over the vocabulary row by row instead of a full log_softmax: with a 49k vocabulary the fp32
    log_softmax of a whole batch is the largest tensor of the step.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log Σ_v p_v² of each next-token distribution, [..., V] -> [...], float32, no gradient (WPO's weights)."""
    with torch.no_grad():
        logits = logits.float()
        return torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   average: bool = False) -> torch.Tensor:
    """Sum (or per-token mean) of the label log-probs of each sequence, masked positions ignored.

    logits: [B, T, V] from a causal LM; labels: [B, T] aligned with the inputs (position t predicts t+1, so logits
    are shifted against labels here, as in the reference implementation's `_get_batch_logps`).
    Returns [B] in float32. A sequence with no unmasked label gets 0.
    """
    per_token, mask = per_token_logps(logits, labels, ignore_index)
    total = per_token.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def per_token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """([B, T−1] label log-probs, zero where masked; [B, T−1] mask) from [B, T, V] logits and [B, T] labels."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    safe_labels = labels.masked_fill(~mask, 0)
    values = torch.stack([token_logps(row_logits, row_labels) for row_logits, row_labels in zip(logits, safe_labels)])
    return torch.where(mask, values, torch.zeros_like(values)), mask


def ld_token_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's token weights (Liu et al. 2024, "Length Desensitization in DPO", arXiv:2409.06411, the
    decomposed log-prob of §3): 1 on the first
    min(|yc|, |yr|) response tokens of each pair, α on the verbose tail beyond them.

    mask: [2B, T] response-token mask, rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1]. Returns [2B, T]
    float32 (0 off the response). α = 1 is plain DPO; α = 0 drops the tail.
    """
    position = mask.long().cumsum(-1)
    lengths = mask.sum(-1)
    half = lengths.shape[0] // 2
    shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2).unsqueeze(-1)
    weights = torch.where(position <= shared, torch.ones_like(position, dtype=torch.float32),
                          torch.full_like(position, alpha, dtype=torch.float32))
    return weights * mask


def wpo_factors(token_logps: torch.Tensor, token_log_sum_sq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's per-response factor (Zhou et al. 2024, "WPO", arXiv:2406.11827, Eq. 2 with TRL's aligned per-token
    probabilities): w(y) = exp(mean_t [log π(y_t) − log Σ_v π(v)²]), detached. Inputs [rows, T]; returns [rows]."""
    with torch.no_grad():
        aligned = ((token_logps - token_log_sum_sq) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return torch.exp(aligned.float())


def wpo_weights(token_logps: torch.Tensor, token_log_sum_sq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight w(yc)·w(yr) from [2B, T] inputs in the chosen-then-rejected row layout; returns [B]."""
    chosen, rejected = wpo_factors(token_logps, token_log_sum_sq, mask).chunk(2)
    return chosen * rejected


@dataclass
class PairLogps:
    """What every objective is computed from, each [B] float32.

    chosen/rejected: the policy's summed response log-probs (under LD-DPO the weighted sums); ref_*: the reference's
    (None when no objective needs them); *_tokens: response lengths, None when the log-probs given are already
    per-token means (the legacy `preference_loss` convention for ipo and simpo); chosen_nll_sum: the unweighted
    summed log-prob of the chosen responses for the NLL terms (sft, orpo, cpo), None = `chosen`.
    """
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None
    chosen_nll_sum: torch.Tensor | None = None

    def lengths(self):
        if self.chosen_tokens is None:
            one = torch.ones_like(self.chosen)
            return one, one
        return self.chosen_tokens.clamp(min=1), self.rejected_tokens.clamp(min=1)

    def averaged(self):
        """Per-token mean log-probs (πc/|yc|, πr/|yr|)."""
        n_chosen, n_rejected = self.lengths()
        return self.chosen / n_chosen, self.rejected / n_rejected

    def logratios(self):
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this objective needs reference log-probs; got None")
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def nll(self) -> torch.Tensor:
        """NLL per token of the chosen responses over the whole batch (TRL's `sft` term and ORPO/CPO's NLL), as [B]."""
        total = self.chosen if self.chosen_nll_sum is None else self.chosen_nll_sum
        if self.chosen_tokens is None:
            return (-total.mean()).expand_as(total)
        return (-total.sum() / self.chosen_tokens.sum().clamp(min=1)).expand_as(total)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class LossOptions:
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.0
    f_divergence: str = "reverse_kl"
    """f in f-DPO (Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240, Table 1): the log-ratio ρ becomes the
    score f'(exp ρ)."""
    f_alpha: float = 0.5
    """α of the alpha-divergence."""
    discopop_tau: float = 0.05


def scores(x: PairLogps, o: LossOptions):
    """(sc, sr): f'(exp ρ) of the chosen and rejected log-ratios (Wang et al. 2023, Table 1; TRL's clamps):
    reverse KL ρ; forward KL 1 − e^{−ρ}; Jensen-Shannon log 2 + log σ(ρ); α-divergence (e^{(α−1)ρ} − 1)/(α − 1),
    the exponent clamped at 80 (reverse KL at α = 1)."""
    rho_c, rho_r = x.logratios()
    if o.f_divergence == "reverse_kl":
        return rho_c, rho_r
    if o.f_divergence == "forward_kl":
        return 1 - torch.exp(-rho_c), 1 - torch.exp(-rho_r)
    if o.f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(rho_c), math.log(2) + F.logsigmoid(rho_r)
    if o.f_divergence == "alpha_divergence":
        if abs(o.f_alpha - 1.0) < 1e-6:
            return rho_c, rho_r
        a = o.f_alpha - 1.0
        return ((torch.exp(torch.clamp(a * rho_c, max=80.0)) - 1) / a,
                (torch.exp(torch.clamp(a * rho_r, max=80.0)) - 1) / a)
    raise ValueError(f"unknown f_divergence {o.f_divergence!r}; choose one of {', '.join(F_DIVERGENCES)}")


def _margin(x, o):
    chosen, rejected = scores(x, o)
    return chosen - rejected


# ---------------------------------------------------------------- the objectives


def sigmoid(x, o):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7): −log σ(βh); with ε > 0 conservative DPO (Mitchell 2023,
    cDPO):
    −(1−ε) log σ(βh) − ε log σ(−βh). (TRL 1.16's sigmoid ignores ε.)"""
    h = _margin(x, o)
    return -(1 - o.label_smoothing) * F.logsigmoid(o.beta * h) - o.label_smoothing * F.logsigmoid(-o.beta * h)


def robust(x, o):
    """rDPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409, Eq. 8): (−(1−ε) log σ(βh) + ε log
    σ(−βh)) / (1 − 2ε),
    unbiased under label-flip rate ε."""
    h = _margin(x, o)
    eps = o.label_smoothing
    return (-(1 - eps) * F.logsigmoid(o.beta * h) + eps * F.logsigmoid(-o.beta * h)) / (1 - 2 * eps)


def hinge(x, o):
    """SLiC-HF (Zhao et al. 2023, arXiv:2305.10425, Eq. 3 with δ = 1/β): max(0, 1 − βh)."""
    return torch.relu(1 - o.beta * _margin(x, o))


def ipo(x, o):
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17, τ = β): (sc/|yc| − sr/|yr| − 1/(2β))²;
    the per-token normalisation is TRL's, confirmed with the authors."""
    sc, sr = scores(x, o)
    n_chosen, n_rejected = x.lengths()
    return (sc / n_chosen - sr / n_rejected - 1 / (2 * o.beta)) ** 2


def sigmoid_norm(x, o):
    """Length-normalised DPO (TRL's sigmoid_norm; LN-DPO in Meng et al. 2024, arXiv:2405.14734, Table 3: DPO
    with SimPO's length-averaged Eq. 4 reward):
    −log σ(β(sc/|yc| − sr/|yr|))."""
    sc, sr = scores(x, o)
    n_chosen, n_rejected = x.lengths()
    return -F.logsigmoid(o.beta * (sc / n_chosen - sr / n_rejected))


def exo_pair(x, o):
    """EXO (Ji et al. 2024, arXiv:2402.00856, Eq. 16, K = 2): KL(q ‖ p) with
    q = (σ(βh), σ(−βh)) and target p = (1 − ε, ε): σ(βh)(log σ(βh) − log(1−ε)) + σ(−βh)(log σ(−βh) − log ε).
    Needs ε > 0 (the paper uses 1e-3)."""
    z = o.beta * _margin(x, o)
    eps = torch.tensor(o.label_smoothing, device=z.device)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps)))


def nca_pair(x, o):
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment", arXiv:2402.05369, the pairwise NCA loss, K = 2), on
    rewards rc = βρc, rr = βρr:
    −log σ(rc) − ½ log σ(−rc) − ½ log σ(−rr)."""
    rho_c, rho_r = x.logratios()
    rc, rr = o.beta * rho_c, o.beta * rho_r
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def bco_pair(x, o):
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization", arXiv:2404.04656, its BCE loss on
    paired data without the reward shift δ):
    −log σ(βρc) − log σ(−βρr)."""
    rho_c, rho_r = x.logratios()
    return -F.logsigmoid(o.beta * rho_c) - F.logsigmoid(-o.beta * rho_r)


def sppo_hard(x, o):
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 of Algorithm 1 with
    P(yc ≻ yr) = 1): (ρc − 1/(2β))² + (ρr + 1/(2β))²."""
    rho_c, rho_r = x.logratios()
    return (rho_c - 0.5 / o.beta) ** 2 + (rho_r + 0.5 / o.beta) ** 2


def _smoothed(z, eps):
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def aot(x, o):
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport",
    arXiv:2406.05882, the paired AOT objective): DPO's
    logistic loss on the sorted batch: d = sort(πc − πr) − sort(rc − rr), −(1−ε) log σ(βd) − ε log σ(−βd).
    Per-pair values are per rank in the batch, not per pair."""
    delta = (torch.sort(x.chosen - x.rejected, dim=0).values
             - torch.sort(x.ref_chosen - x.ref_rejected, dim=0).values)
    return _smoothed(o.beta * delta, o.label_smoothing)


def aot_unpaired(x, o):
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882, the unpaired AOT objective): d = sort(ρc) − sort(ρr),
    −(1−ε) log σ(βd) − ε log σ(−βd)."""
    rho_c, rho_r = x.logratios()
    delta = torch.sort(rho_c, dim=0).values - torch.sort(rho_r, dim=0).values
    return _smoothed(o.beta * delta, o.label_smoothing)


def apo_zero(x, o):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv:2408.06266, Eq. 7): raise
    chosen, lower rejected
    against the reference: (1 − σ(βρc)) + σ(βρr). For chosen answers better than the model's own."""
    rho_c, rho_r = x.logratios()
    return 1 - torch.sigmoid(o.beta * rho_c) + torch.sigmoid(o.beta * rho_r)


def apo_down(x, o):
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8): lower both, rejected more: σ(βρc) + (1 −
    σ(β(ρc − ρr))). For
    chosen answers worse than the model's own."""
    rho_c, rho_r = x.logratios()
    return torch.sigmoid(o.beta * rho_c) + 1 - torch.sigmoid(o.beta * (rho_c - rho_r))


def discopop(x, o):
    """DiscoPOP (Lu et al. 2024, "Discovering Preference Optimization Algorithms", arXiv:2406.08414, Eq. 5): a
    log-ratio modulated blend of the logistic and exponential losses, z = βh, m = σ(z/τ): (1 − m)(−log σ(z)) + m·e^{−z},
    the second product as exp(−z + log σ(z/τ)) so that it stays finite where e^{−z} overflows (TRL's gives NaN)."""
    z = o.beta * _margin(x, o)
    return -F.logsigmoid(z) * torch.sigmoid(-z / o.discopop_tau) + torch.exp(-z + F.logsigmoid(z / o.discopop_tau))


def sft(x, o):
    """NLL of the chosen responses per token over the batch, −Σ log π(yc) / Σ|yc| (TRL's `sft` term; RPO, Pang et
    al. 2024, arXiv:2404.19733, when added to sigmoid; MPO, Wang et al. 2024, arXiv:2411.10442, its third term). The
    same value for every pair of the batch."""
    return x.nll()


def simpo(x, o):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): −log σ(β(πc/|yc| − πr/|yr|) − γ), no reference (γ:
    loss.simpo_gamma)."""
    pc, pr = x.averaged()
    return -F.logsigmoid(o.beta * (pc - pr) - o.simpo_gamma)


def _log1mexp(v):
    """log(1 − e^v) for v < 0, stable on both sides of −log 2 (Mächler 2012); v clamped just below 0."""
    v = torch.clamp(v, max=-1e-7)
    return torch.where(v > -math.log(2), torch.log(-torch.expm1(v)), torch.log1p(-torch.exp(v)))


def orpo(x, o):
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4–7), λ = β:
    NLL(yc) − λ log σ(log odds(yc) − log odds(yr)), odds(y) = P/(1 − P) with P = exp(π/|y|) the per-token mean
    probability, so log odds = π/|y| − log(1 − e^{π/|y|})."""
    pc, pr = x.averaged()
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    return x.nll() - o.beta * F.logsigmoid(log_odds)


def cpo(x, o):
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", arXiv:2401.08417, L_prefer + L_NLL of §3):
    −(1−ε) log σ(β(πc − πr)) − ε log σ(−β(πc − πr)) + NLL(yc), on summed log-probs, no reference."""
    return _smoothed(o.beta * (x.chosen - x.rejected), o.label_smoothing) + x.nll()


LOSSES = {name: fn for name, fn in [
    ("sigmoid", sigmoid), ("hinge", hinge), ("ipo", ipo), ("exo_pair", exo_pair), ("nca_pair", nca_pair),
    ("robust", robust), ("bco_pair", bco_pair), ("sppo_hard", sppo_hard), ("aot", aot), ("aot_unpaired", aot_unpaired),
    ("apo_zero", apo_zero), ("apo_down", apo_down), ("discopop", discopop), ("sft", sft),
    ("sigmoid_norm", sigmoid_norm), ("simpo", simpo), ("orpo", orpo), ("cpo", cpo)]}
"""Every objective by its config name (loss.type): fn(PairLogps, LossOptions) -> per-pair losses [B]."""
REFERENCE_FREE = {"sft", "simpo", "orpo", "cpo"}
LENGTH_AVERAGED = {"ipo", "simpo", "sigmoid_norm", "orpo"}
"""Objectives computed on per-token mean log-probs (or log-ratios), as their authors and TRL do. objective_terms
divides by the lengths itself; the legacy preference_loss is handed them already averaged for ipo and simpo."""
SUMMED_REWARD = {"cpo"}
"""Reference-free objectives whose implicit reward is β times the summed (not the mean) log-prob."""


@dataclass
class ObjectiveOutput:
    losses: torch.Tensor                 # [B]: Σ weight · term (× the WPO pair weight)
    terms: dict[str, torch.Tensor]       # each term's per-pair value, as it enters the sum (before its weight)
    chosen_rewards: torch.Tensor         # detached
    rejected_rewards: torch.Tensor


def objective_terms(x: PairLogps, types, weights=None, options: LossOptions = LossOptions(),
                    pair_weights: torch.Tensor | None = None) -> ObjectiveOutput:
    """A weighted sum of objectives (TRL's `loss_type` list with `loss_weights`), each a [B] tensor.

    pair_weights (WPO) multiply every term, as in TRL. Rewards are β(π − r) when any term uses the reference, else
    the first term's reference-free reward (β times the mean or summed log-prob).
    """
    types = [types] if isinstance(types, str) else list(types)
    weights = [1.0] * len(types) if weights is None else list(weights)
    if len(weights) != len(types):
        raise ValueError(f"{len(weights)} weights for {len(types)} loss types")
    for name in types:
        if name not in LOSSES:
            raise ValueError(f"unknown loss_type {name!r}; choose one of {', '.join(LOSSES)}")
    terms = {}
    losses = torch.zeros_like(x.chosen)
    for name, weight in zip(types, weights):
        value = LOSSES[name](x, options)
        if pair_weights is not None:
            value = value * pair_weights
        terms[name] = value
        losses = losses + weight * value
    beta = options.beta
    if any(t not in REFERENCE_FREE for t in types):
        rho_c, rho_r = x.logratios()
        chosen_rewards, rejected_rewards = beta * rho_c, beta * rho_r
    elif types[0] in SUMMED_REWARD:
        chosen_rewards, rejected_rewards = beta * x.chosen, beta * x.rejected
    else:
        pc, pr = x.averaged()
        chosen_rewards, rejected_rewards = beta * pc, beta * pr
    return ObjectiveOutput(losses, terms, chosen_rewards.detach(), rejected_rewards.detach())


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.0):
    """Per-pair losses and implicit rewards of one objective, each [batch]; rewards are detached.

    The log-probs are used as given: for ipo and simpo (LENGTH_AVERAGED) pass per-token means, as before; for
    objectives that need lengths or batch-level NLL use objective_terms. Rewards: β(πc − rc) and β(πr − rr);
    β·πc and β·πr for the reference-free ones.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSSES)}")
    x = PairLogps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    out = objective_terms(x, [loss_type], [1.0], LossOptions(beta, label_smoothing, simpo_gamma))
    return out.losses, out.chosen_rewards, out.rejected_rewards
