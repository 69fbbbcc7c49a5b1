"""What each preference objective is, without torch: the table config validation, the sweep launcher, the memory
planner and the report read. dpo_loss.LOSSES holds their functions under the same names (tested).

    from objectives import SPECS, needs_reference
    needs_reference(["sigmoid", "sft"])        # True: sigmoid compares log-ratios against the reference
    SPECS["orpo"].paper, SPECS["orpo"].reward  # "ORPO, Hong et al. 2024 (arXiv:2403.07691)", "β·πc/|yc|, ..."
"""
from __future__ import annotations

from dataclasses import dataclass

DPO_REWARD = "β(πc − rc), β(πr − rr): the DPO implicit reward, log-ratio against the reference"
MEAN_REWARD = "β·πc/|yc|, β·πr/|yr|: β times the per-token mean log-prob (no reference)"
SUM_REWARD = "β·πc, β·πr: β times the summed log-prob (no reference)"


@dataclass(frozen=True)
class ObjectiveSpec:
    paper: str
    formula: str
    """The per-pair loss in the notation of dpo_loss.py."""
    reference: bool = True
    """Needs the reference's log-probs (a cached reference pass, or a reference model with TR-DPO)."""
    f_divergence: bool = False
    """An f-divergence other than reverse KL applies (TRL's set: the losses of the margin sc − sr)."""
    sorts: bool = False
    """Sorts the batch (AOT), so per-pair weights (WPO) cannot apply."""
    length_averaged: bool = False
    """Computed on per-token mean log-probs or log-ratios."""
    reward: str = DPO_REWARD
    keys: tuple[str, ...] = ("loss.beta",)


SPECS: dict[str, ObjectiveSpec] = {
    "sigmoid": ObjectiveSpec("DPO, Rafailov et al. 2023 (arXiv:2305.18290); cDPO with ε", "−log σ(βh)",
                             f_divergence=True, keys=("loss.beta", "loss.label_smoothing")),
    "hinge": ObjectiveSpec("SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425)", "max(0, 1 − βh)", f_divergence=True),
    "ipo": ObjectiveSpec("IPO, Azar et al. 2023 (arXiv:2310.12036)", "(sc/|yc| − sr/|yr| − 1/(2β))²",
                         f_divergence=True, length_averaged=True),
    "exo_pair": ObjectiveSpec("EXO, Ji et al. 2024 (arXiv:2402.00856)", "KL((σ(βh), σ(−βh)) ‖ (1−ε, ε))",
                              f_divergence=True, keys=("loss.beta", "loss.label_smoothing > 0")),
    "nca_pair": ObjectiveSpec("NCA, Chen et al. 2024 (arXiv:2402.05369)",
                              "−log σ(βρc) − ½ log σ(−βρc) − ½ log σ(−βρr)"),
    "robust": ObjectiveSpec("rDPO, Chowdhury et al. 2024 (arXiv:2403.00409)",
                            "(−(1−ε) log σ(βh) + ε log σ(−βh)) / (1−2ε)", f_divergence=True,
                            keys=("loss.beta", "loss.label_smoothing")),
    "bco_pair": ObjectiveSpec("BCO, Jung et al. 2024 (arXiv:2404.04656)", "−log σ(βρc) − log σ(−βρr)"),
    "sppo_hard": ObjectiveSpec("SPPO, Wu et al. 2024 (arXiv:2405.00675)", "(ρc − 1/(2β))² + (ρr + 1/(2β))²"),
    "aot": ObjectiveSpec("AOT, Melnyk et al. 2024 (arXiv:2406.05882)", "−log σ(β(sort(πc−πr) − sort(rc−rr)))",
                         sorts=True, keys=("loss.beta", "loss.label_smoothing")),
    "aot_unpaired": ObjectiveSpec("AOT, Melnyk et al. 2024 (arXiv:2406.05882)", "−log σ(β(sort ρc − sort ρr))",
                                  sorts=True, keys=("loss.beta", "loss.label_smoothing")),
    "apo_zero": ObjectiveSpec("APO, D'Oosterlinck et al. 2024 (arXiv:2408.06266)", "1 − σ(βρc) + σ(βρr)"),
    "apo_down": ObjectiveSpec("APO, D'Oosterlinck et al. 2024 (arXiv:2408.06266)", "σ(βρc) + 1 − σ(β(ρc − ρr))"),
    "discopop": ObjectiveSpec("DiscoPOP, Lu et al. 2024 (arXiv:2406.08414)",
                              "(1 − σ(βh/τ))(−log σ(βh)) + σ(βh/τ)·e^{−βh}", f_divergence=True,
                              keys=("loss.beta", "loss.discopop_tau")),
    "sft": ObjectiveSpec("NLL; RPO, Pang et al. 2024 (arXiv:2404.19733) as [sigmoid, sft]", "−Σ πc / Σ |yc|",
                         reference=False, f_divergence=True,
                         reward="none of its own; with a reference term that term's, else β·πc/|yc|", keys=()),
    "sigmoid_norm": ObjectiveSpec("LN-DPO (TRL's sigmoid_norm; Meng et al. 2024, arXiv:2405.14734)",
                                  "−log σ(β(sc/|yc| − sr/|yr|))", f_divergence=True, length_averaged=True),
    "simpo": ObjectiveSpec("SimPO, Meng et al. 2024 (arXiv:2405.14734)", "−log σ(β(πc/|yc| − πr/|yr|) − γ)",
                           reference=False, length_averaged=True, reward=MEAN_REWARD,
                           keys=("loss.beta", "loss.simpo_gamma")),
    "orpo": ObjectiveSpec("ORPO, Hong et al. 2024 (arXiv:2403.07691)", "NLL − β log σ(log odds(yc) − log odds(yr))",
                          reference=False, length_averaged=True, reward=MEAN_REWARD, keys=("loss.beta (λ)",)),
    "cpo": ObjectiveSpec("CPO, Xu et al. 2024 (arXiv:2401.08417)", "−log σ(β(πc − πr)) + NLL", reference=False,
                         reward=SUM_REWARD, keys=("loss.beta", "loss.label_smoothing")),
}
TRL_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""The loss types TRL 1.16's DPOTrainer trains (the parity tests run each through TRL's own code)."""
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
MPO = (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
"""Mixed Preference Optimization (Wang et al. 2024, arXiv:2411.10442) as TRL writes it."""


def as_list(types) -> list[str]:
    return [types] if isinstance(types, str) else list(types)


def needs_reference(types) -> bool:
    return any(SPECS[t].reference for t in as_list(types))


def describe(loss: dict) -> str:
    """A run's objective from its config's loss section (config.yaml), every non-default option named, so runs
    that differ in objective never pool as seeds: sigmoid, sigmoid+sft, 0.8·sigmoid+0.2·bco_pair+sft,
    sigmoid[js_divergence], ipo[wpo, ld 0.5, tr-dpo 32/0.6], sigmoid[ε 0.1]."""
    types = as_list(loss.get("type", "sigmoid"))
    weights = list(loss.get("weights") or [1.0] * len(types))
    if loss.get("rpo_alpha"):
        types, weights = types + ["sft"], weights + [loss["rpo_alpha"]]
    name = "+".join(t if w == 1 else f"{w:g}·{t}" for t, w in zip(types, weights))
    options = []
    if loss.get("label_smoothing"):
        options.append(f"ε {loss['label_smoothing']:g}")
    divergence = loss.get("f_divergence", "reverse_kl")
    if divergence != "reverse_kl":
        options.append(divergence + (f" {loss.get('f_alpha', 0.5):g}" if divergence == "alpha_divergence" else ""))
    if loss.get("wpo"):
        options.append("wpo")
    if loss.get("ld_alpha") is not None:
        options.append(f"ld {loss['ld_alpha']:g}")
    if loss.get("sync_ref_every"):
        options.append(f"tr-dpo {loss['sync_ref_every']}/{loss.get('sync_ref_alpha', 0.6):g}")
    return name + (f"[{', '.join(options)}]" if options else "")
