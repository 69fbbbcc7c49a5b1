"""Parity with TRL 1.16 on the same model and tensors (TRL is a test dependency only).

Every loss type of TRL's DPOTrainer, alone and in weighted lists, under each f-divergence it allows, with WPO
weighting and LD-DPO: TRL's own `_compute_loss` is fed a batch with reference log-probs, ours computes the same
batch through train_dpo's path (add_logps_head, row_logps, pair_terms). SimPO and CPO go through TRL's CPOTrainer
loss, ORPO through its ORPOTrainer's, on TRL's own `get_batch_logps`. All agree to 1e-5 (relative; 1e-6 absolute).
TRL 1.16's sigmoid ignores label_smoothing (ours is cDPO there), so sigmoid is compared at ε = 0.
"""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

import train_dpo
from config import load_config
from dpo_loss import LOSSES, LossOptions, PairLogps
from models import build_tiny_model
from objectives import F_DIVERGENCES, SPECS, TRL_TYPES

TOLERANCE = dict(rel=1e-5, abs=1e-6)
SMOOTHED = {"robust": 0.1, "exo_pair": 0.1, "aot": 0.1, "aot_unpaired": 0.1}


@pytest.fixture(scope="module")
def models(tokenizer):
    """The same weights three times: ours (add_logps_head) and two for TRL (its fused head without and with WPO's
    extra output, which TRL adds only when use_weighting is on at construction)."""
    base = build_tiny_model("llama", tokenizer)
    base.eval()
    return {"ours": train_dpo.add_logps_head(copy.deepcopy(base)), "trl": copy.deepcopy(base),
            "trl_wpo": copy.deepcopy(base)}


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, tokenizer, models):
    dataset = Dataset.from_list([{"prompt": "hi", "chosen": "hello", "rejected": "go away"}] * 2)
    out = {}
    for name, wpo in (("trl", False), ("trl_wpo", True)):
        args = DPOConfig(output_dir=str(tmp_path_factory.mktemp(name)), precompute_ref_log_probs=True, report_to=[],
                         use_cpu=True, per_device_train_batch_size=2, use_weighting=wpo)
        out[name] = DPOTrainer(model=models[name], args=args, train_dataset=dataset, processing_class=tokenizer)
        out[name].model.eval()
    return out


def batch(tokenizer):
    """TRL's layout [chosen_0, chosen_1, rejected_0, rejected_1], collate's too; responses of different lengths."""
    torch.manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (4, 11))
    attention = torch.ones_like(ids)
    attention[0, -3:] = 0
    attention[3, -1:] = 0
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    completion[1, 4:6] = 0  # a longer prompt on the second chosen row
    completion *= attention
    labels = ids.masked_fill(completion == 0, -100)
    ours = {"input_ids": ids, "attention_mask": attention, "labels": labels,
            "response_tokens": (labels != -100).sum(-1)}
    return ids, attention, completion, ours


OFFSETS_CHOSEN, OFFSETS_REJECTED = torch.tensor([0.7, -0.4]), torch.tensor([-0.9, 0.3])


@pytest.fixture(scope="module")
def reference(tokenizer, models):
    """Reference log-probs a little off the policy's own (log-ratios of order 1, as in training), so that every
    f-divergence stays finite and the comparison means something."""
    with torch.no_grad():
        sums = models["ours"](**{k: v for k, v in batch(tokenizer)[3].items() if k in ("input_ids", "attention_mask")},
                              logps_labels=batch(tokenizer)[3]["labels"])
    chosen, rejected = sums.chunk(2)
    return chosen - OFFSETS_CHOSEN, rejected - OFFSETS_REJECTED


def trl_loss(trainer, ids, attention, completion, ref, types, weights, beta, eps, f_divergence, f_alpha, ld_alpha,
             tau):
    trainer.loss_types, trainer.loss_weights, trainer.beta = types, weights, beta
    trainer.label_smoothing, trainer.f_divergence_type, trainer.f_alpha_divergence_coef = eps, f_divergence, f_alpha
    trainer.ld_alpha, trainer.args.discopop_tau = ld_alpha, tau
    with torch.no_grad():
        return trainer._compute_loss(trainer.model, dict(
            input_ids=ids, attention_mask=attention, completion_mask=completion,
            ref_chosen_logps=ref[0], ref_rejected_logps=ref[1]), False).item()


def our_loss(model, collated, overrides, ref=(None, None)):
    cfg = load_config(None, overrides)
    with torch.no_grad():
        out = train_dpo.row_logps(cfg, model, collated)
        loss, _ = train_dpo.pair_terms(cfg, out.logps, collated["response_tokens"], ref[0], ref[1],
                                       raw=out.raw, wpo=out.wpo)
    return loss.item()


def cases():
    """(id, loss types, weights, options): every TRL type; every f-divergence on every type TRL allows it for;
    WPO and LD-DPO on losses of each kind; MPO, RPO (and rpo_alpha, its alias), and everything at once."""
    out = [(t, [t], None, {}) for t in TRL_TYPES]
    for divergence in F_DIVERGENCES[1:]:
        out += [(f"{t}-{divergence}", [t], None, {"f_divergence": divergence, "f_alpha": 0.3})
                for t in TRL_TYPES if SPECS[t].f_divergence]
    # TRL 1.16 cannot weight its sft term (an in-place multiply of an expanded tensor raises): ours can, and
    # test_dpo_loss checks that weighting by hand
    out += [(f"{t}-wpo", [t], None, {"wpo": True}) for t in ("sigmoid", "ipo", "nca_pair", "apo_zero")]
    out += [(f"{t}-ld", [t], None, {"ld_alpha": 0.5}) for t in ("sigmoid", "ipo", "bco_pair", "sppo_hard", "sft")]
    out += [("discopop-tau", ["discopop"], None, {"discopop_tau": 0.2}),
            ("mpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),
            ("rpo", ["sigmoid", "sft"], [1.0, 0.5], {}),
            ("rpo_alpha", ["sigmoid", "sft"], [1.0, 0.5], {"rpo_alpha": 0.5}),
            ("all-options", ["robust", "hinge"], [1.0, 0.3], {"f_divergence": "js_divergence", "wpo": True,
                                                             "ld_alpha": 0.7})]
    return out


@pytest.mark.parametrize("types, weights, options", [c[1:] for c in cases()], ids=[c[0] for c in cases()])
def test_same_loss_as_trl(tokenizer, models, trainers, reference, types, weights, options):
    beta = 0.3
    eps = max((SMOOTHED.get(t, 0.0) for t in types), default=0.0)
    wpo = options.get("wpo", False)
    f_divergence, f_alpha = options.get("f_divergence", "reverse_kl"), options.get("f_alpha", 0.5)
    ld_alpha, tau = options.get("ld_alpha"), options.get("discopop_tau", 0.05)
    ids, attention, completion, collated = batch(tokenizer)
    theirs = trl_loss(trainers["trl_wpo" if wpo else "trl"], ids, attention, completion, reference, types,
                      weights or [1.0] * len(types), beta, eps, f_divergence, f_alpha, ld_alpha, tau)
    ours_types = types[:1] if "rpo_alpha" in options else types
    overrides = [f"loss.type=[{','.join(ours_types)}]", f"loss.beta={beta}", f"loss.label_smoothing={eps}",
                 f"loss.f_divergence={f_divergence}", f"loss.f_alpha={f_alpha}", f"loss.wpo={str(wpo).lower()}",
                 f"loss.discopop_tau={tau}"]
    if ld_alpha is not None:
        overrides.append(f"loss.ld_alpha={ld_alpha}")
    if "rpo_alpha" in options:
        overrides.append(f"loss.rpo_alpha={options['rpo_alpha']}")
    elif weights:
        overrides.append(f"loss.weights=[{','.join(map(str, weights))}]")
    assert math.isfinite(theirs) and abs(theirs) > 1e-4
    assert our_loss(models["ours"], collated, overrides, reference) == pytest.approx(theirs, **TOLERANCE)


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo"])
def test_reference_free_same_as_trl_cpo_and_orpo(tokenizer, models, loss_type):
    """TRL's CPOTrainer.cpo_loss (loss_type simpo; sigmoid for CPO, plus cpo_alpha = 1 times the NLL) and
    ORPOTrainer.odds_ratio_loss (loss = NLL − mean of it), on TRL's get_batch_logps of our model's logits."""
    ids, attention, completion, collated = batch(tokenizer)
    beta, eps, gamma = 0.4, 0.1 if loss_type == "cpo" else 0.0, 0.3
    model = models["ours"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
        labels = collated["labels"]
        sums = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
        means = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        mask = labels[:, 1:] != -100
        nll = -(sums[:2].sum() / mask[:2].sum())
        me = SimpleNamespace(beta=beta, label_smoothing=eps, simpo_gamma=gamma, alpha=0.0,
                             loss_type="simpo" if loss_type == "simpo" else "sigmoid",
                             accelerator=SimpleNamespace(device="cpu"))
        if loss_type == "orpo":
            ratio = ORPOTrainer.odds_ratio_loss(me, means[:2], means[2:])[0]
            theirs = (nll - ratio.mean()).item()
        else:
            inputs = (means if loss_type == "simpo" else sums)
            losses = CPOTrainer.cpo_loss(me, inputs[:2], inputs[2:])[0]
            theirs = (losses.mean() + (nll if loss_type == "cpo" else 0.0)).item()
        ours = our_loss(model, collated, [f"loss.type={loss_type}", f"loss.beta={beta}",
                                          f"loss.label_smoothing={eps}", f"loss.simpo_gamma={gamma}"])
        direct = LOSSES[loss_type](PairLogps(sums[:2], sums[2:], None, None, mask[:2].sum(-1), mask[2:].sum(-1)),
                                   LossOptions(beta, eps, gamma)).mean().item()
    assert ours == pytest.approx(theirs, **TOLERANCE) and direct == pytest.approx(theirs, **TOLERANCE)
