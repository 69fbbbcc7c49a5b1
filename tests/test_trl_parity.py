"""Parity with TRL 1.16's DPOTrainer on the same model and tensors (TRL is a test dependency only).

TRL's `_compute_loss` is fed a batch with precomputed reference log-probs; ours computes the policy log-probs with
sequence_logps and the loss with preference_loss. Every loss type both share must agree to float tolerance.
TRL 1.16's sigmoid ignores label_smoothing (no cDPO) and it has no simpo in DPOTrainer, so those are not compared.
"""
import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from dpo_loss import LENGTH_AVERAGED, preference_loss, sequence_logps
from models import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build_tiny_model("llama", tokenizer)


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_same_loss_as_trl(tmp_path, tokenizer, tiny, loss_type, eps):
    beta = 0.3
    args = DPOConfig(output_dir=str(tmp_path), loss_type=[loss_type], beta=beta, label_smoothing=eps,
                     precompute_ref_log_probs=True, report_to=[], use_cpu=True, per_device_train_batch_size=2)
    dataset = Dataset.from_list([{"prompt": "hi", "chosen": "hello", "rejected": "go away"}] * 2)
    trainer = DPOTrainer(model=tiny, args=args, train_dataset=dataset, processing_class=tokenizer)
    torch.manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (4, 9))  # TRL's layout: [chosen_0, chosen_1, rejected_0, rejected_1]
    attention = torch.ones_like(ids)
    attention[0, -2:] = 0
    attention[3, -1:] = 0
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    completion *= attention
    ref_chosen, ref_rejected = torch.tensor([-20.0, -25.0]), torch.tensor([-22.0, -21.0])
    tiny.eval()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, dict(
            input_ids=ids, attention_mask=attention, completion_mask=completion,
            ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected), False)
        labels = ids.masked_fill(completion == 0, -100)
        logps = sequence_logps(tiny(input_ids=ids, attention_mask=attention).logits, labels)
        if loss_type in LENGTH_AVERAGED:  # TRL divides IPO's summed log-ratios by the completion length
            lengths = (labels[:, 1:] != -100).sum(-1).float()
            logps, ref = logps / lengths, torch.cat([ref_chosen, ref_rejected]) / lengths
            ref_chosen, ref_rejected = ref.chunk(2)
        chosen, rejected = logps.chunk(2)
        ours, _, _ = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing=eps)
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
