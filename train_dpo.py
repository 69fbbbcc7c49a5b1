"""Train the SFT baseline or a DPO-family run from one config.

    python train_dpo.py --config configs/default.yaml [key=value ...] [--dry-run | --precompute-ref | --plan]
    accelerate launch train_dpo.py --config configs/default.yaml loss.beta=0.05 output_dir=logs/b0.05
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no train_dpo.py --config ...          # two CPU processes (gloo)

loss.name=sft trains on the chosen responses (NLL); loss.name=dpo trains loss.type against a frozen reference whose
log-probs are computed once per (reference, data, tokenisation) and cached in loss.ref_cache_dir, so a β sweep pays
for the reference once. --precompute-ref fills that cache and exits. --dry-run validates config and data, prints
one tokenised example, and exits without training. --plan hands the config to the memory planner (slurm/plan.py).

The recipe: setup() (data, policy, optimizer, reference log-probs, resume) -> train() (the loop; train_step() is
one optimizer step) -> finish() (final eval, final/) -> teardown(). Writes to output_dir (bookkeeping.py):
metrics.jsonl (TRL's metric names, split train/eval), eval_pairs.jsonl (every eval's per-pair log-probs and rewards),
config.yaml, run.json, checkpoints/ (atomic, resumable with train.resume=auto; a completed run writes none unless
train.save_final_state) and final/ (Hugging Face format; with LoRA also final/adapter/).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object
from torch.utils.checkpoint import checkpoint

from bookkeeping import (DiskFullError, check_output_dir, disk_full_reason, find_checkpoint, full_numel,
                         launched_as_rank_zero, now, parameter_checksum, run_record, save_checkpoint, save_final,
                         warn_if_disk_short, write_run_json, zero3)
from chat_format import IGNORE_INDEX, resolve_template, sequence_and_labels, tokenize_pairs
from config import Config, UserInputError, load_config, to_yaml
from dpo_loss import (LossOptions, PairLogps, ld_token_weights, log_sum_sq_probs, objective_terms, per_token_logps,
                      token_logps, wpo_factors)
from objectives import describe, needs_reference
from host import resolve_mixed_precision
from jsonl import append_jsonl, read_jsonl, rewrite_jsonl
from models import load_model, load_tokenizer, model_fingerprint
from preference_data import load_pairs, split_pairs
from progress import Progress

CACHE_VERSION = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # checkpoint, then stop


class NonFiniteError(RuntimeError):
    pass


class Interrupted(Exception):
    """SIGTERM/SIGUSR1/SIGUSR2 arrived: the run saved a checkpoint at a step boundary and stops."""


class Pruned(Exception):
    """A prune rule (cfg.prune) says the run has failed: it saved a checkpoint at a step boundary and stops."""


# ---------------------------------------------------------------- data


def prepare_data(cfg: Config, tokenizer, log=print):
    """Load, split and tokenise the preference pairs; returns (train, eval) TokenizedPair lists."""
    pairs, report = load_pairs(cfg.data)
    for line in report.lines():
        log(f"data: {line}")
    train_pairs, eval_pairs = split_pairs(pairs, cfg.data.eval_fraction, cfg.data.split_seed)
    log(f"split (data.split_seed={cfg.data.split_seed}, data.eval_fraction={cfg.data.eval_fraction}): "
        f"train {len(train_pairs)}, eval {len(eval_pairs)}")
    t = cfg.tokenize
    train, train_counts = tokenize_pairs(tokenizer, train_pairs, t.max_length, t.max_prompt_length, t.chat_template)
    held_out, eval_counts = tokenize_pairs(tokenizer, eval_pairs, t.max_length, t.max_prompt_length, t.chat_template)
    counts = {k: train_counts[k] + eval_counts[k] for k in train_counts}
    log(f"tokenise (max_length {t.max_length}, max_prompt_length {t.max_prompt_length}, template "
        f"{resolve_template(tokenizer, t.chat_template)}): dropped empty_response_after_truncation "
        f"{counts['empty_response_after_truncation']}; prompts cut from the left {counts['prompt_truncated']}; "
        f"responses cut from the right {counts['response_truncated']}; kept train {len(train)}, eval {len(held_out)}")
    if not train:
        raise UserInputError("no training pairs left after tokenisation; raise tokenize.max_length")
    return train, held_out


def epoch_batches(n_pairs: int, lengths: list[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's global batches: a seeded shuffle, then length-sorted within windows of 16 batches (less padding),
    then the batches shuffled again. A pure function of (seed, epoch), so a resumed run sees the same batches."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(n_pairs))
    rng.shuffle(order)
    window = global_batch * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + global_batch] for i in range(0, len(chunk) - global_batch + 1, global_batch)]
    rng.shuffle(batches)
    return batches


class Batches:
    """The training batches as one sequence over epochs: micro-batch `index` is this process's share of a global
    batch of epoch_batches, and the fractional epoch it falls in."""

    def __init__(self, pairs: list, global_batch: int, micro_bs: int, rank: int, seed: int):
        self.pairs, self.global_batch, self.micro_bs, self.rank, self.seed = pairs, global_batch, micro_bs, rank, seed
        self.lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
        self.per_epoch = len(epoch_batches(len(pairs), self.lengths, global_batch, seed, 0))
        self.epoch, self.batches = -1, []

    def __getitem__(self, index: int) -> tuple[list, float]:
        epoch, within = divmod(index, self.per_epoch)
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, epoch_batches(len(self.pairs), self.lengths, self.global_batch,
                                                            self.seed, epoch)
        chosen = self.batches[within][self.rank * self.micro_bs:(self.rank + 1) * self.micro_bs]
        return [self.pairs[i] for i in chosen], epoch + within / self.per_epoch


def collate(pairs, pad_token_id: int, with_rejected: bool = True) -> dict:
    """Chosen (and rejected) of every pair in one batch: rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1],
    right-padded to the longest row; labels mask the prompts and the padding."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    if with_rejected:
        rows += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (prompt, response) in enumerate(rows):
        ids, row_labels = sequence_and_labels(prompt, response)
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.tensor(row_labels)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "response_tokens": (labels != IGNORE_INDEX).sum(-1), "tokens": int(attention.sum())}


# ---------------------------------------------------------------- model passes


def add_logps_head(model, chunk_tokens: int = 1024):
    """Patch `model.forward` so that `model(..., logps_labels=labels)` returns the summed label log-probs per row.

    Only positions with a label go through the LM head, in chunks of `chunk_tokens` recomputed in the backward pass
    (activation checkpointing), so the [rows, length, vocab] logits never exist: with a 49k vocabulary they are the
    largest tensors of a DPO step. Patching the inner module keeps DDP, DeepSpeed and PEFT wrappers in the path.
    Equals dpo_loss.sequence_logps on the full logits (tested). Calls without logps_labels run the original forward;
    heads that transform logits (soft-capping, scaling) take the full-logits path. `per_token=True` returns the
    [rows, length − 1] label log-probs instead (0 off the labels; LD-DPO weights them), and `with_sq=True` adds
    log Σ p² of each position's distribution, without gradient (WPO's weights): (values, log_sum_sq).
    """
    original_forward = model.forward
    backbone = getattr(model, model.base_model_prefix)
    lm_head = model.get_output_embeddings()
    plain_head = not (getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None))

    def chunk_logps(hidden, targets):
        return token_logps(lm_head(hidden), targets)

    def chunk_logps_sq(hidden, targets):
        logits = lm_head(hidden)
        return token_logps(logits, targets), log_sum_sq_probs(logits)

    def forward(*args, logps_labels=None, per_token=False, with_sq=False, **kwargs):
        if logps_labels is None:
            return original_forward(*args, **kwargs)
        labels = logps_labels[:, 1:]
        mask = labels != IGNORE_INDEX
        if not plain_head:
            logits = original_forward(*args, **kwargs).logits
            values, _ = per_token_logps(logits, logps_labels)
            squares = log_sum_sq_probs(logits[:, :-1]) * mask if with_sq else None
        else:
            hidden = backbone(*args, **kwargs).last_hidden_state
            states, targets = hidden[:, :-1][mask], labels[mask]
            head = chunk_logps_sq if with_sq else chunk_logps
            pieces = [checkpoint(head, states[i:i + chunk_tokens], targets[i:i + chunk_tokens], use_reentrant=False)
                      for i in range(0, states.shape[0], chunk_tokens)]
            if with_sq:
                pieces, sq_pieces = [p[0] for p in pieces], [p[1] for p in pieces]
            flat = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
            if not (per_token or with_sq):
                rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
                return torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, flat)
            values = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device).masked_scatter(mask, flat)
            squares = None
            if with_sq:
                flat_sq = torch.cat(sq_pieces) if sq_pieces else flat.detach()
                squares = torch.zeros_like(values).masked_scatter(mask, flat_sq.detach())
        if with_sq:
            return values, squares
        return values if per_token else values.sum(-1)

    model.forward = forward
    return model


def forward_logps(model, batch):
    """Summed response log-probs [rows] for a collated batch; the model carries add_logps_head."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                 logps_labels=batch["labels"])


@dataclass
class RowLogps:
    """A collated batch's log-probs, row by row: `logps` is what the objectives see (LD-DPO's weighted sum), `raw`
    the plain sum (NLL, perplexity), `wpo` each row's WPO factor exp(mean aligned log-prob) or None."""
    logps: torch.Tensor
    raw: torch.Tensor
    wpo: torch.Tensor | None = None


def row_logps(cfg: Config, model, batch, wpo: bool | None = None) -> RowLogps:
    """Response log-probs per row of a collated batch under loss.ld_alpha (and, for the policy, loss.wpo)."""
    wpo = cfg.loss.wpo if wpo is None else wpo
    if cfg.loss.ld_alpha is None and not wpo:
        logps = forward_logps(model, batch)
        return RowLogps(logps, logps)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                logps_labels=batch["labels"], per_token=True, with_sq=wpo)
    values, squares = out if wpo else (out, None)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    raw = values.sum(-1)
    logps = raw if cfg.loss.ld_alpha is None else (values * ld_token_weights(mask, cfg.loss.ld_alpha)).sum(-1)
    return RowLogps(logps, raw, wpo_factors(values, squares, mask) if wpo else None)


def to_device(batch, device):
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def loss_options(cfg: Config) -> LossOptions:
    loss = cfg.loss
    return LossOptions(beta=loss.beta, label_smoothing=loss.label_smoothing, simpo_gamma=loss.simpo_gamma,
                       f_divergence=loss.f_divergence, f_alpha=loss.f_alpha, discopop_tau=loss.discopop_tau)


def pair_terms(cfg: Config, logps, n_tokens, ref_chosen, ref_rejected, raw=None, wpo=None):
    """Loss per pair and the per-pair values behind the logged metrics, from summed log-probs: logps, n_tokens,
    raw (unweighted sums, default logps) and wpo (per-row WPO factors) in the collated [chosen..., rejected...]
    layout; loss/<type> is each objective's term as it enters the weighted sum."""
    half = logps.shape[0] // 2
    chosen, rejected = logps[:half], logps[half:]
    raw = logps if raw is None else raw
    n_chosen, n_rejected = n_tokens[:half].clamp(min=1), n_tokens[half:].clamp(min=1)
    x = PairLogps(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, chosen_nll_sum=raw[:half])
    pair_weights = wpo[:half] * wpo[half:] if wpo is not None else None
    out = objective_terms(x, cfg.loss.types, cfg.loss.term_weights, loss_options(cfg), pair_weights)
    nll = -raw[:half] / n_chosen
    terms = {"loss": out.losses.detach(), **{f"loss/{k}": v.detach() for k, v in out.terms.items()},
             "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
             "rewards/margins": out.chosen_rewards - out.rejected_rewards,
             "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
             "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
             "nll/chosen": nll.detach(), "n/chosen": n_chosen.float()}
    if pair_weights is not None:
        terms["wpo/weight"] = pair_weights.detach()
    if ref_chosen is not None:
        log_ratio = (chosen.detach() - ref_chosen) / n_chosen  # per token, on chosen responses
        terms["logratio/chosen"] = log_ratio
        terms["kl"] = torch.exp(-log_ratio) - 1 + log_ratio  # k3 estimator, >= 0
    return out.losses.mean(), terms


def sft_terms(logps, n_tokens):
    nll = -logps / n_tokens.clamp(min=1)
    terms = {"loss": nll.detach(), "logps/chosen": logps.detach(), "nll/chosen": nll.detach(), "n/chosen": n_tokens.float()}
    return -logps.sum() / n_tokens.sum().clamp(min=1), terms


def summarise(terms: dict) -> dict:
    """Mean of every per-pair term; perplexity of the chosen responses from the token-weighted NLL."""
    out = {k: float(v.float().mean()) for k, v in terms.items() if not k.startswith(("n/", "nll/"))}
    if "nll/chosen" in terms:
        nll = float((terms["nll/chosen"] * terms["n/chosen"]).sum() / terms["n/chosen"].sum())
        out["perplexity"] = math.exp(min(nll, 50.0))
    return out


# ---------------------------------------------------------------- reference log-probs, cached on disk


def reference_key(cfg: Config, pairs, precision: str) -> str:
    """precision: the resolved train.mixed_precision (accelerator.mixed_precision), never "auto"."""
    digest = hashlib.sha256()
    key = {"v": CACHE_VERSION, "reference": model_fingerprint(cfg.loss.reference_path or cfg.model.path),
           "dtype": cfg.model.dtype, "mixed_precision": precision}
    if cfg.loss.ld_alpha is not None:  # LD-DPO weights the reference's tokens too
        key["ld_alpha"] = cfg.loss.ld_alpha
    digest.update(json.dumps(key).encode())
    for p in sorted(pairs, key=lambda p: p.id):
        digest.update(json.dumps([p.id, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return digest.hexdigest()[:20]


def padded_shards(items: list, batch_size: int, rank: int, world: int) -> list[tuple[list, int]]:
    """This rank's batches, as many on every rank (ZeRO-3 needs every rank in every forward); the count of real
    items in each batch, the rest being repeats to discard."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    per_rank = math.ceil(len(batches) / world) if batches else 0
    mine = []
    for j in range(per_rank):
        index = j * world + rank
        mine.append((batches[index], len(batches[index])) if index < len(batches) else (batches[-1], 0))
    return mine


def compute_logps(model, pairs, accelerator, batch_size: int, pad_token_id: int, progress: str = "",
                  cfg: Config | None = None, wpo: bool = False) -> dict:
    """{pair id: (chosen, rejected, chosen tokens, rejected tokens, raw chosen, raw rejected, WPO factor chosen,
    WPO factor rejected)} over all pairs, in eval mode and without gradients, the work split across processes; the
    log-probs under cfg's loss.ld_alpha (raw: plain sums), WPO factors 1 unless `wpo`; batches of similar length
    (less padding), a progress line when `progress` names the pass."""
    results = {}
    was_training = model.training
    model.eval()
    by_length = sorted(pairs, key=lambda p: len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)))
    shards = padded_shards(by_length, batch_size, accelerator.process_index, accelerator.num_processes)
    bar = Progress(progress, len(pairs), "pairs", enabled=bool(progress) and accelerator.is_main_process)
    with torch.no_grad(), bar:
        for batch_pairs, n_real in shards:
            batch = to_device(collate(batch_pairs, pad_token_id), accelerator.device)
            if cfg is None:
                logps = forward_logps(model, batch).float()
                out = RowLogps(logps, logps)
            else:
                out = row_logps(cfg, model, batch, wpo=wpo)
            columns = [out.logps, out.raw, out.wpo if out.wpo is not None else torch.ones_like(out.logps)]
            logps, raw, factor = (c.float().cpu() for c in columns)
            n_tokens = batch["response_tokens"].float().cpu()
            half = len(batch_pairs)
            for i, p in enumerate(batch_pairs[:n_real]):
                j = half + i
                results[p.id] = (float(logps[i]), float(logps[j]), float(n_tokens[i]), float(n_tokens[j]),
                                 float(raw[i]), float(raw[j]), float(factor[i]), float(factor[j]))
            bar.update(n_real * accelerator.num_processes, tokens=int(batch["tokens"]) * accelerator.num_processes)
    model.train(was_training)
    merged = {}
    for part in gather_object([results]):
        merged.update(part)
    return merged


def reference_logps(cfg: Config, accelerator, get_reference, pairs, pad_token_id, log) -> tuple[dict, dict]:
    """Reference log-probs for these pairs from the cache, or computed once with get_reference() and cached."""
    key = reference_key(cfg, pairs, accelerator.mixed_precision)
    path = Path(cfg.loss.ref_cache_dir) / f"{key}.pt"
    info = {"key": key, "path": str(path), "forward_passes": 0, "cache": "hit"}
    if path.is_file():
        log(f"reference log-probs: loaded from cache {path}")
        return torch.load(path, weights_only=True)["logps"], info
    info["cache"] = "miss"
    start = time.time()
    logps = compute_logps(get_reference(), pairs, accelerator, cfg.train.eval_batch_size, pad_token_id,
                          progress="reference log-probs", cfg=cfg)
    info["forward_passes"] = math.ceil(len(pairs) / cfg.train.eval_batch_size)
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save({"logps": logps, "reference": cfg.loss.reference_path or cfg.model.path, "pairs": len(pairs)}, tmp)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    log(f"reference log-probs: computed for {len(pairs)} pairs in {time.time() - start:.1f} s, cached at {path}")
    return logps, info


def ref_tensors(ref: dict | None, pairs, device):
    if ref is None:
        return None, None
    values = torch.tensor([ref[p.id] for p in pairs], dtype=torch.float32, device=device)
    return values[:, 0], values[:, 1]


# ---------------------------------------------------------------- evaluation


def evaluate(cfg: Config, model, pairs, ref, accelerator, pad_token_id) -> tuple[dict, list[dict]]:
    """Held-out metrics (loss, rewards/*, logps/*, perplexity of chosen responses, KL estimate) and one row per pair
    (its log-probs and rewards, for eval_pairs.jsonl: paired statistics between runs); all processes."""
    if cfg.train.max_eval_pairs:
        pairs = pairs[:cfg.train.max_eval_pairs]
    values = compute_logps(model, pairs, accelerator, cfg.train.eval_batch_size, pad_token_id,
                           progress=f"eval {Path(cfg.output_dir).name}", cfg=cfg, wpo=cfg.loss.wpo)
    chosen, rejected, n_chosen, n_rejected, raw_chosen, raw_rejected, wpo_chosen, wpo_rejected = torch.tensor(
        [values[p.id] for p in pairs]).unbind(1)
    rows = [{"pair_id": p.id, "policy_chosen": float(chosen[i]), "policy_rejected": float(rejected[i]),
             "chosen_tokens": int(n_chosen[i]), "rejected_tokens": int(n_rejected[i])} for i, p in enumerate(pairs)]
    if cfg.loss.name == "sft":
        _, terms = sft_terms(chosen, n_chosen)
        terms["logps/rejected"] = rejected
    else:
        ref_chosen, ref_rejected = ref_tensors(ref, pairs, "cpu")
        _, terms = pair_terms(cfg, torch.cat([chosen, rejected]), torch.cat([n_chosen, n_rejected]),
                              ref_chosen, ref_rejected, raw=torch.cat([raw_chosen, raw_rejected]),
                              wpo=torch.cat([wpo_chosen, wpo_rejected]) if cfg.loss.wpo else None)
        for i, row in enumerate(rows):
            row.update({"ref_chosen": float(ref_chosen[i]) if ref_chosen is not None else None,
                        "ref_rejected": float(ref_rejected[i]) if ref_rejected is not None else None,
                        "reward_chosen": float(terms["rewards/chosen"][i]),
                        "reward_rejected": float(terms["rewards/rejected"][i]),
                        "margin": float(terms["rewards/margins"][i]),
                        "correct": bool(terms["rewards/accuracies"][i] > 0), "loss": float(terms["loss"][i])})
    return summarise(terms), rows


# ---------------------------------------------------------------- model setup


def disable_dropout(model) -> None:
    """Dropout makes policy and reference log-probs disagree at step 0; TRL disables it too."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def freeze_first_layers(model, n_layers: int) -> None:
    """Freeze the input embeddings and the first n transformer blocks (the smolLM notebook's memory trick)."""
    n_total = model.config.num_hidden_layers
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_total), None)
    if blocks is None:
        raise UserInputError(f"train.freeze_layers: cannot find the {n_total} transformer blocks of this model")
    if n_layers > n_total:
        raise UserInputError(f"train.freeze_layers={n_layers}: the model has only {n_total} layers")
    model.get_input_embeddings().requires_grad_(False)
    for block in blocks[:n_layers]:
        block.requires_grad_(False)


def build_policy(cfg: Config, model=None):
    """The policy as training uses it: `model` (default: loaded from model.path) with the fused log-prob head,
    dropout off, frozen layers, gradient checkpointing and LoRA as the config says (bench/gpu_check.py passes a
    randomly initialised model built on the GPU)."""
    model = add_logps_head(model if model is not None else load_model(cfg.model.path, cfg.model.dtype))
    disable_dropout(model)
    if cfg.train.freeze_layers:
        freeze_first_layers(model, cfg.train.freeze_layers)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.r:
        # peft takes ~7 s to import (it loads transformers' model registry): a run without LoRA does not pay it
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        targets = cfg.lora.target_modules
        model = get_peft_model(model, PeftLoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM",
            target_modules="all-linear" if targets == ["all-linear"] else targets))
        if cfg.train.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def lr_lambda(cfg: Config):
    warmup, total, kind = cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return factor


def make_accelerator(cfg: Config):
    """The Accelerator, in train.mixed_precision; auto is resolved here, on the machine that runs (host.py):
    config.yaml keeps "auto", the reference cache key and run.json the precision used (accelerator.mixed_precision),
    and a resumed run keeps what its run.json says auto became, on whatever node it resumes."""
    previous = Path(cfg.output_dir) / "run.json"
    try:
        pinned = json.loads(previous.read_text()).get("mixed_precision") if previous.is_file() else None
    except (OSError, ValueError):
        pinned = None
    precision, why = resolve_mixed_precision(cfg.train.mixed_precision, pinned)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # On CPU, launched processes need gloo; without it DeepSpeed ranks each believe they are rank 0.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum,
                              mixed_precision=precision, kwargs_handlers=handlers)
    accelerator.precision_line = (f"precision: weights {cfg.model.dtype}, " + (
        "bf16 autocast" if accelerator.mixed_precision == "bf16" else f"compute in {cfg.model.dtype}") + f" ({why})")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # we pass no dataloader, so DeepSpeed learns the batch size and clipping from the config
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            plugin.deepspeed_config["gradient_clipping"] = cfg.train.max_grad_norm
    return accelerator


def prepare_frozen(accelerator, model):
    """A frozen model for forward passes only (the reference), beside or without the prepared policy. Under DeepSpeed
    it runs in an engine of its own, as TRL's reference does: one without an optimizer, at stage 3 when the policy is
    sharded (the reference was loaded sharded too, and the engine gathers each layer's weights when it runs), else at
    stage 0 (ZeRO-1/2 refuse to start without an optimizer); either way in the policy engine's precision. accelerate
    prepares one model per DeepSpeed plugin, and that one is the policy."""
    model.requires_grad_(False)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return model.to(accelerator.device)
    import deepspeed  # only under DeepSpeed: it is slow to import and patches torch

    ds = plugin.deepspeed_config
    zero = {k: v for k, v in ds["zero_optimization"].items() if v != "auto"} if zero3(accelerator) else {"stage": 0}
    config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"], "zero_optimization": zero,
              "bf16": {"enabled": accelerator.mixed_precision == "bf16"}}
    return deepspeed.initialize(model=model, config=config)[0]


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    """What one training run holds while it runs."""
    cfg: Config
    accelerator: Accelerator
    tokenizer: object
    train_pairs: list
    eval_pairs: list
    info: dict                        # run.json
    out_dir: Path
    say: object
    model: object = None
    trainable: list = field(default_factory=list)
    optimizer: object = None
    scheduler: object = None
    ref: dict | None = None           # reference log-probs per pair id (None: SFT, reference-free objectives)
    ref_model: object = None          # TR-DPO's moving reference (loss.sync_ref_every), else None
    ref_synced: bool = False          # the moving reference has left its start: `ref` is stale, compute on the fly
    batches: Batches | None = None
    history: list = field(default_factory=list)  # the train and eval rows logged so far (read back on resume)
    step: int = 0
    tokens: int = 0
    epoch: float = 0.0
    elapsed_before: float = 0.0       # seconds trained before this attempt (resumed runs)
    started: float = field(default_factory=time.time)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_before + time.time() - self.started}

    def log(self, row: dict) -> None:
        self.history.append(row)  # every rank: the rows are gathered values, the same everywhere (prune rules)
        if self.main:
            append_jsonl(self.out_dir / "metrics.jsonl", row)


def reference_model(cfg: Config, accelerator, policy):
    """The frozen reference, asked for only when its log-probs are not cached: the policy itself before any update
    (with LoRA the adapters start at zero, a no-op) or loss.reference_path."""
    if not cfg.loss.reference_path:
        return policy
    return prepare_frozen(accelerator, add_logps_head(load_model(cfg.loss.reference_path, cfg.model.dtype)))


def moving_reference(cfg: Config, accelerator, policy):
    """TR-DPO's reference (loss.sync_ref_every): a copy of the starting weights (or loss.reference_path) that
    sync_reference moves toward the policy; prepared for forward passes in the policy's precision."""
    if zero3(accelerator):
        raise UserInputError("loss.sync_ref_every: TR-DPO needs whole parameters on every process to mix them, and "
                             "the DeepSpeed config shards them (ZeRO-3): use ZeRO-1/2 or loss.sync_ref_every=0")
    model = add_logps_head(load_model(cfg.loss.reference_path or cfg.model.path, cfg.model.dtype))
    disable_dropout(model)
    mine = {name: p.shape for name, p in model.named_parameters()}
    theirs = {name: p.shape for name, p in accelerator.unwrap_model(policy).named_parameters()}
    if mine != theirs:
        raise UserInputError(f"loss.sync_ref_every: loss.reference_path {cfg.loss.reference_path} does not have the "
                             f"parameters of model.path {cfg.model.path}, so the policy cannot be mixed into it")
    model.requires_grad_(False)
    if accelerator.state.deepspeed_plugin is not None:
        model = prepare_frozen(accelerator, model)
    else:
        model = accelerator.prepare_model(model, evaluation_mode=True)
    model.eval()
    return model


def sync_reference(run: Run) -> None:
    """TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656):
    reference ← α·policy + (1 − α)·reference, α = loss.sync_ref_alpha (1: a hard copy). From the first sync the
    cached reference log-probs describe a reference that no longer exists: every later step and eval computes them
    with the moving reference."""
    alpha = run.cfg.loss.sync_ref_alpha
    policy = dict(run.accelerator.unwrap_model(run.model).named_parameters())
    with torch.no_grad():
        for name, param in run.accelerator.unwrap_model(run.ref_model).named_parameters():
            param.mul_(1 - alpha).add_(policy[name].detach().to(param.dtype), alpha=alpha)
    info = run.info["reference"]
    info["syncs"] = info.get("syncs", 0) + 1
    if not run.ref_synced:
        info["first_sync_step"] = run.step
        run.say(f"step {run.step}: reference synced toward the policy (alpha {alpha}); from here on reference "
                f"log-probs are computed on the fly (the cache holds the step-0 reference)")
    run.ref_synced = True


def live_reference(run: Run, batch) -> tuple:
    """The moving reference's log-probs of a collated batch (chosen, rejected), without gradients."""
    with torch.no_grad():
        logps = row_logps(run.cfg, run.ref_model, batch, wpo=False).logps.float()
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def setup(cfg: Config, log=print) -> Run:
    """Data, policy, optimizer and reference log-probs; resumed from the newest checkpoint when there is one."""
    out_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    say = log if accelerator.is_main_process else (lambda *_: None)
    say(accelerator.precision_line)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    train_pairs, eval_pairs = prepare_data(cfg, tokenizer, log=say)
    global_batch = cfg.train.batch_size * accelerator.num_processes
    if len(train_pairs) < global_batch:
        raise UserInputError(f"{len(train_pairs)} training pairs cannot fill one batch of "
                             f"train.batch_size={cfg.train.batch_size} x {accelerator.num_processes} processes")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    resume_from = find_checkpoint(out_dir) if cfg.train.resume == "auto" else None
    run = Run(cfg, accelerator, tokenizer, train_pairs, eval_pairs,
              run_record(cfg, out_dir, accelerator.num_processes, resume_from, len(train_pairs), len(eval_pairs)),
              out_dir, say)
    run.info["mixed_precision"] = accelerator.mixed_precision  # what train.mixed_precision resolved to here
    if run.main:
        write_run_json(out_dir, run.info)

    model = build_policy(cfg)
    run.trainable = [p for p in model.parameters() if p.requires_grad]
    run.info["parameters"] = {"total": sum(full_numel(p) for p in model.parameters()),
                              "trainable": sum(full_numel(p) for p in run.trainable)}
    if run.main:
        warn_if_disk_short(model, run.trainable, cfg.train.keep_checkpoints, out_dir, say)
    optimizer = torch.optim.AdamW(run.trainable, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                  weight_decay=cfg.train.weight_decay)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(run.scheduler)  # stepped here once per optimizer step, not by accelerate
    if cfg.loss.name == "dpo" and needs_reference(cfg.loss.types):  # before load_state: the policy is at its start
        if cfg.loss.sync_ref_every:
            run.ref_model = moving_reference(cfg, accelerator, run.model)
            accelerator.register_for_checkpointing(accelerator.unwrap_model(run.ref_model))  # it moves: checkpointed
        get_reference = (lambda: run.ref_model) if run.ref_model is not None else (
            lambda: reference_model(cfg, accelerator, run.model))
        run.ref, run.info["reference"] = reference_logps(
            cfg, accelerator, get_reference, train_pairs + eval_pairs, tokenizer.pad_token_id, say)
        if cfg.loss.sync_ref_every:
            run.info["reference"].update(sync_every=cfg.loss.sync_ref_every, sync_alpha=cfg.loss.sync_ref_alpha)
    if resume_from:
        accelerator.load_state(str(resume_from))
        state = json.loads((resume_from / "trainer_state.json").read_text())
        run.step, run.tokens, run.elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        run.ref_synced = bool(cfg.loss.sync_ref_every) and run.step >= cfg.loss.sync_ref_every  # restored weights
        run.history = [r for r in read_jsonl(out_dir / "metrics.jsonl") if r["step"] <= run.step]
        accelerator.wait_for_everyone()  # every rank has read the rows before the main one trims the file
        if run.main:  # drop lines logged after the checkpoint: the resumed run logs those steps again
            for name in ("metrics.jsonl", "eval_pairs.jsonl"):  # rows past the checkpoint are redone
                if (out_dir / name).exists():
                    rewrite_jsonl(out_dir / name, [r for r in read_jsonl(out_dir / name) if r["step"] <= run.step])
        say(f"resumed from {resume_from} at step {run.step}")
    if run.main:
        write_run_json(out_dir, run.info)
    run.batches = Batches(train_pairs, global_batch, cfg.train.batch_size, accelerator.process_index, cfg.train.seed)
    run.epoch = run.step * cfg.train.grad_accum / run.batches.per_epoch
    run.started = time.time()
    return run


def train(cfg: Config, log=print) -> dict:
    """The run from where it stands to train.max_steps; returns run.json's content."""
    out_dir = Path(cfg.output_dir)
    if check_output_dir(cfg, out_dir) == "completed":  # before any process group exists: every rank just returns
        if launched_as_rank_zero():
            log(f"{out_dir}: already completed with this config; nothing to do")
        return json.loads((out_dir / "run.json").read_text())
    run = setup(cfg, log)
    stop_signals: list[int] = []
    handlers = {sig: signal.signal(sig, stop_handler(stop_signals)) for sig in STOP_SIGNALS}
    bar = Progress(f"{cfg.loss.name} train {out_dir.name}", cfg.train.max_steps, "steps", done=run.step,
                   enabled=run.main)
    run.model.train()
    try:
        while run.step < cfg.train.max_steps:
            stop_now = train_step(run, stop_signals, bar)
            if run.step == cfg.train.max_steps:
                break
            if cfg.train.eval_every and run.step % cfg.train.eval_every == 0 and run.eval_pairs:
                log_eval(run)
            pruned = prune_reason(cfg, run.history, run.step)
            if (cfg.train.save_every and run.step % cfg.train.save_every == 0) or stop_now or pruned:
                save_checkpoint(run.accelerator, out_dir, run.step, run.state(), cfg.train.keep_checkpoints)
                if pruned:
                    raise Pruned(pruned)
                if stop_now:
                    raise Interrupted(f"signal {(stop_signals or ['on another rank'])[0]} at step {run.step}: "
                                      f"checkpoint saved")
        bar.close()
        finish(run)
    except (Pruned, NonFiniteError) as e:
        if isinstance(e, NonFiniteError) and not cfg.prune.non_finite:
            fail(run, e, out_dir, bar)
            raise
        bar.close()
        reason = str(e) if isinstance(e, Pruned) else f"non-finite values: {e}"
        run.info.update(status="pruned", pruned={"reason": reason, "step": run.step}, ended=now(), steps=run.step,
                        tokens=run.tokens, elapsed_s=round(run.state()["elapsed_s"], 2),
                        last_checkpoint=str(find_checkpoint(out_dir) or ""))
        run.say(f"pruned at step {run.step}: {reason}; the checkpoint is kept (a sweep re-run with --retry-pruned "
                f"resumes it)")
    except (Interrupted, DiskFullError, OSError) as e:
        if isinstance(e, OSError) and disk_full_reason(e, out_dir) is None:
            raise  # not ours to describe (metrics.jsonl and the reference cache on a full disk are)
        fail(run, e, out_dir, bar)
        raise
    finally:
        bar.close(print_final=False)  # whatever ended the loop, the heartbeat stops here
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        teardown(run)
    return run.info


def stop_handler(stop_signals: list):
    """Stop signals ask for a checkpoint at the next step boundary; a second Ctrl-C stops at once (the last
    checkpoint stays)."""
    def handler(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in stop_signals:
            raise KeyboardInterrupt
        stop_signals.append(signum)
    return handler


def fail(run: Run, e: Exception, out_dir: Path, bar) -> None:
    """run.json for a run that stops on an error or a signal (teardown writes it)."""
    bar.close()
    run.info.update(status="interrupted" if isinstance(e, Interrupted) else "failed", ended=now(), steps=run.step,
                    error=str(e) if not isinstance(e, OSError) else f"{e.filename}: {e.strerror}",
                    last_checkpoint=str(find_checkpoint(out_dir) or ""))


def prune_reason(cfg: Config, history: list[dict], step: int) -> str | None:
    """Which prune rule (cfg.prune) the logged rows meet at this step, in words; None while none does (or for SFT).
    margin_below: the last `patience` train rows' rewards/margins all below it; chosen_logps_slope: the least-squares
    slope of logps/chosen over the last `patience` + 1 train rows steeper than minus it (nats per step);
    eval_loss_rising: the eval loss up at each of the last N evals."""
    rules = cfg.prune
    if cfg.loss.name != "dpo" or not rules.active or step < rules.min_steps:
        return None
    train = [r for r in history if r.get("split") == "train"]
    recent = train[-rules.patience:]
    margins = [r.get("rewards/margins") for r in recent]
    if rules.margin_below is not None and len(recent) == rules.patience and all(
            isinstance(m, (int, float)) and m < rules.margin_below for m in margins):
        return (f"margin collapse: rewards/margins below {rules.margin_below:g} for {rules.patience} train logs in a "
                f"row ({', '.join(f'{m:+.3f}' for m in margins)} at steps {recent[0]['step']}-{recent[-1]['step']})")
    window = [(r["step"], r["logps/chosen"]) for r in train[-(rules.patience + 1):]
              if isinstance(r.get("logps/chosen"), (int, float))]
    if rules.chosen_logps_slope is not None and len(window) == rules.patience + 1:
        steps, logps = zip(*window)
        mean_step, mean_logp = sum(steps) / len(steps), sum(logps) / len(logps)
        spread = sum((x - mean_step) ** 2 for x in steps)
        slope = sum((x - mean_step) * (y - mean_logp) for x, y in window) / spread if spread else 0.0
        if slope < -rules.chosen_logps_slope:
            return (f"chosen log-probs falling {-slope:.3f} nats/step over steps {steps[0]}-{steps[-1]} (more than "
                    f"{rules.chosen_logps_slope:g})")
    losses = [r.get("loss") for r in history if r.get("split") == "eval"]
    rising = rules.eval_loss_rising
    if rising and len(losses) > rising and all(isinstance(x, (int, float)) for x in losses[-(rising + 1):]) and all(
            b > a for a, b in zip(losses[-(rising + 1):-1], losses[-rising:])):
        return (f"eval loss rising at {rising} evals in a row "
                f"({' -> '.join(f'{x:.4f}' for x in losses[-(rising + 1):])})")
    return None


def train_step(run: Run, stop_signals: list, bar) -> bool:
    """One optimizer step over train.grad_accum micro-batches, logged; True when a stop signal reached any rank."""
    cfg, accelerator = run.cfg, run.accelerator
    step_start, step_terms, step_tokens, grad_norm = time.time(), [], 0, None
    learning_rate = run.scheduler.get_last_lr()[0]
    for micro in range(cfg.train.grad_accum):
        pairs, run.epoch = run.batches[run.step * cfg.train.grad_accum + micro]
        batch = to_device(collate(pairs, run.tokenizer.pad_token_id, with_rejected=cfg.loss.name == "dpo"),
                          accelerator.device)
        with accelerator.accumulate(run.model):
            if cfg.loss.name == "sft":
                loss, terms = sft_terms(forward_logps(run.model, batch), batch["response_tokens"])
            else:  # the moving reference's forward first: its activations are gone before the policy's graph
                ref_chosen, ref_rejected = (live_reference(run, batch) if run.ref_synced else
                                            ref_tensors(run.ref, pairs, accelerator.device))
                out = row_logps(cfg, run.model, batch)
                loss, terms = pair_terms(cfg, out.logps, batch["response_tokens"], ref_chosen, ref_rejected,
                                         raw=out.raw, wpo=out.wpo)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"step {run.step + 1}: the loss is {loss.item()} (micro-batch {micro}, "
                                     f"pairs {[p.id for p in pairs]})")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(run.trainable, cfg.train.max_grad_norm or float("inf"))
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    raise NonFiniteError(f"step {run.step + 1}: the gradient norm is {float(grad_norm)}; "
                                         f"nothing was applied")
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_terms.append(terms)
        step_tokens += batch["tokens"]
    run.scheduler.step()
    run.step += 1
    if run.ref_model is not None and run.step % cfg.loss.sync_ref_every == 0:
        sync_reference(run)
    gathered = {k: accelerator.gather(torch.cat([t[k] for t in step_terms]).float()) for k in step_terms[0]}
    # Slurm may signal only some ranks (or at different moments): every rank stops at the same step if any saw it.
    counts = accelerator.gather(torch.tensor([[step_tokens, len(stop_signals)]], device=accelerator.device))
    step_tokens = int(counts[:, 0].sum())
    run.tokens += step_tokens
    row = summarise(gathered)
    bar.update(1, tokens=step_tokens, note=f"loss {row['loss']:.4f}" + (
        f", batch accuracy {row['rewards/accuracies']:.2f}" if "rewards/accuracies" in row else ""))
    if run.step % cfg.train.log_every == 0 or run.step == cfg.train.max_steps:
        run.log({"step": run.step, "epoch": round(run.epoch, 4), "split": "train", **row,
                 "grad_norm": float(grad_norm) if grad_norm is not None else None, "learning_rate": learning_rate,
                 "tokens": run.tokens, "tokens_per_s": step_tokens / (time.time() - step_start),
                 "elapsed_s": run.state()["elapsed_s"]})
    return bool(counts[:, 1].sum() > 0)


def log_eval(run: Run) -> dict:
    """One eval: its means to metrics.jsonl, its per-pair values to eval_pairs.jsonl (rows keyed by step, pair_id)."""
    cfg = run.cfg
    pairs = run.eval_pairs[:cfg.train.max_eval_pairs] if cfg.train.max_eval_pairs else run.eval_pairs
    ref = run.ref
    if run.ref_synced:  # the cache holds the step-0 reference
        ref = compute_logps(run.ref_model, pairs, run.accelerator, cfg.train.eval_batch_size,
                            run.tokenizer.pad_token_id, progress=f"reference for eval {run.out_dir.name}", cfg=cfg)
    metrics, rows = evaluate(cfg, run.model, pairs, ref, run.accelerator, run.tokenizer.pad_token_id)
    if run.main:
        append_jsonl(run.out_dir / "eval_pairs.jsonl", [{"step": run.step, **row} for row in rows])
    run.log({"step": run.step, "epoch": round(run.epoch, 4), "split": "eval", **metrics, "tokens": run.tokens,
             "elapsed_s": run.state()["elapsed_s"]})
    return metrics


def finish(run: Run) -> None:
    """The final eval, final/ (and the last checkpoint with train.save_final_state) and the parameter checksum;
    run.json says completed."""
    if run.eval_pairs:
        run.info["final_eval"] = log_eval(run)
    every = run.cfg.train.save_every
    if run.cfg.train.save_final_state or (every and run.step % every == 0):  # the last step of save_every's too
        save_checkpoint(run.accelerator, run.out_dir, run.step, run.state(), run.cfg.train.keep_checkpoints)
    save_final(run.cfg, run.accelerator, run.model, run.tokenizer, run.out_dir)
    checksum = parameter_checksum(run.accelerator.unwrap_model(run.model))
    run.info["parameter_checksums"] = gather_object([checksum])  # one per process: equal under DDP and ZeRO
    run.info.update(status="completed", ended=now(), steps=run.step, tokens=run.tokens,
                    elapsed_s=round(run.state()["elapsed_s"], 2))
    run.say(f"done: {run.step} steps, {run.tokens} tokens, final model in {run.out_dir / 'final'}")


def teardown(run: Run) -> None:
    """run.json as the run ended, then every process leaves the group together."""
    if run.main:
        try:
            write_run_json(run.out_dir, run.info)
        except OSError as e:  # a disk still full: the error being raised says more than this one would
            (run.out_dir / "run.json.tmp").unlink(missing_ok=True)
            run.say(f"warning: could not update {run.out_dir / 'run.json'} ({e.strerror})")
    end_processes(run.accelerator)


def end_processes(accelerator) -> None:
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean teardown keeps gloo from aborting at exit


def precompute_reference(cfg: Config, log=print) -> dict:
    """Fill the reference log-prob cache for this config's data and exit (the sweep runs this once)."""
    accelerator = make_accelerator(cfg)
    say = log if accelerator.is_main_process else (lambda *_: None)
    say(accelerator.precision_line)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    train_pairs, eval_pairs = prepare_data(cfg, tokenizer, log=say)

    def load_reference():
        reference = add_logps_head(load_model(cfg.loss.reference_path or cfg.model.path, cfg.model.dtype))
        if accelerator.state.deepspeed_plugin is not None:  # no optimizer here, which accelerate's DeepSpeed needs
            return prepare_frozen(accelerator, reference)
        return accelerator.prepare(reference)
    _, info = reference_logps(cfg, accelerator, load_reference, train_pairs + eval_pairs, tokenizer.pad_token_id, say)
    end_processes(accelerator)
    return info


def show_example(tokenizer, tok) -> str:
    input_ids, labels = sequence_and_labels(tok.prompt_ids, tok.chosen_ids)
    masked = [i for i, label in zip(input_ids, labels) if label == IGNORE_INDEX]
    trained = [i for i, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    return "\n".join([
        f"example {tok.id}",
        f"--- prompt: {len(masked)} tokens, masked from the loss (labels = {IGNORE_INDEX}) ---",
        tokenizer.decode(masked),
        f"--- chosen response: {len(trained)} tokens, trained ---",
        tokenizer.decode(trained),
        f"--- rejected response: {len(tok.rejected_ids)} tokens, trained ---",
        tokenizer.decode(tok.rejected_ids),
    ])


def dry_run(cfg: Config) -> None:
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    objective = ""
    if cfg.loss.name == "dpo":
        reference = ("a moving reference (TR-DPO)" if cfg.loss.sync_ref_every else "cached reference log-probs") \
            if needs_reference(cfg.loss.types) else "no reference"
        objective = f" {describe(dataclasses.asdict(cfg.loss))} beta={cfg.loss.beta} ({reference})"
    print(f"model: {cfg.model.path} (dtype {cfg.model.dtype}); loss: {cfg.loss.name}{objective}")
    train_pairs, _ = prepare_data(cfg, tokenizer)
    print(show_example(tokenizer, train_pairs[0]))
    print("dry run: config and data are valid; nothing was trained")


def plan(args) -> int:
    """--plan is the memory planner's own command line (slurm/plan.py) on this config; training never needs it."""
    from slurm import plan as planner  # the planner is a separate tool, loaded only for this flag

    return planner.main(["--config", args.config, "--gpu", args.gpu, "--gpus", str(args.gpus), *args.overrides])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.05 train.max_steps=10")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="validate config and data, show an example, train nothing")
    mode.add_argument("--precompute-ref", action="store_true", help="fill the reference log-prob cache and exit")
    mode.add_argument("--plan", action="store_true", help="print the per-GPU memory plan (slurm/plan.py) and exit; "
                      "loads no data and no model")
    parser.add_argument("--gpu", default="h100-80gb", help="with --plan: the GPU, e.g. h100-80gb, h200, a100-40gb, cpu")
    parser.add_argument("--gpus", type=int, default=1, help="with --plan: data-parallel GPUs (DDP; slurm/plan.py "
                        "--zero N for DeepSpeed)")
    args = parser.parse_args(argv)
    # A sweep job starts the launcher with SIGTERM/USR2 ignored so that it outlives them; we inherit that. Until the
    # training loop installs its checkpoint-and-stop handlers, these signals should end this process as usual.
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.plan:
            return plan(args)
        if args.dry_run:
            dry_run(cfg)
        elif args.precompute_ref:
            precompute_reference(cfg)
        else:
            train(cfg)
        return 0
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: training stopped, non-finite values: {e}. The last good checkpoint is kept.", file=sys.stderr)
        return 3
    except Interrupted as e:
        print(f"interrupted: {e}; run again to resume", file=sys.stderr)
        return 143
    except DiskFullError as e:
        if launched_as_rank_zero():  # every rank raised the same error: one line says it
            print(f"error: {e}", file=sys.stderr)
        return 4
    except OSError as e:  # metrics.jsonl, run.json or the reference cache on a full disk
        reason = disk_full_reason(e, Path(e.filename or "."))
        if reason is None:
            raise
        print(f"error: {reason} while writing {e.filename or 'a file'} ({e.strerror}); finished checkpoints are "
              f"kept: free space and run again to resume", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
