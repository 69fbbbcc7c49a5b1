"""Train the SFT baseline or a DPO-family run from one config.

    python train_dpo.py --config configs/default.yaml [key=value ...] [--dry-run | --precompute-ref]
    accelerate launch train_dpo.py --config configs/default.yaml loss.beta=0.05 output_dir=logs/b0.05
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no train_dpo.py --config ...          # two CPU processes (gloo)

loss.name=sft trains on the chosen responses (NLL); loss.name=dpo trains loss.type against a frozen reference whose
log-probs are computed once per (reference, data, tokenisation) and cached in loss.ref_cache_dir, so a β sweep pays
for the reference once. --precompute-ref fills that cache and exits. --dry-run validates config and data, prints
one tokenised example, and exits without training.

Writes to output_dir: metrics.jsonl (TRL's metric names, split train/eval), config.yaml, run.json, checkpoints/
(atomic, resumable with train.resume=auto) and final/ (Hugging Face format; with LoRA also final/adapter/).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from chat_format import IGNORE_INDEX, resolve_template, sequence_and_labels, tokenize_pairs
from config import Config, UserInputError, load_config, to_yaml
from jsonl import append_jsonl, read_jsonl, rewrite_jsonl
from models import load_model, load_tokenizer, model_fingerprint
from preference_data import load_pairs, split_pairs

REPO = Path(__file__).resolve().parent
CACHE_VERSION = 2


class NonFiniteError(RuntimeError):
    pass


class Interrupted(Exception):
    """SIGTERM/SIGUSR1/SIGUSR2 arrived: the run saved a checkpoint at a step boundary and stops."""


class DiskFullError(RuntimeError):
    """A checkpoint or the final model did not fit on the output filesystem; the partial write was removed."""


def launched_as_rank_zero() -> bool:
    """Rank 0 of the launch (or a single process), for output before a process group exists or after it is gone."""
    return int(os.environ.get("RANK", "0")) == 0


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding path (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) if Path(folder).is_dir() else 0


def disk_full_reason(error: BaseException, path: Path) -> str | None:
    """Why a write failed, when it failed for lack of space, however the writer reports it: an OSError (ENOSPC or
    EDQUOT), safetensors' SafetensorError ("os error 28"), or torch.save's RuntimeError from its stream writer, which
    names no cause. None for every other error."""
    text = str(error)
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(
            s in text for s in ("No space left on device", "os error 28")):
        return "no space left"
    if (isinstance(error, OSError) and error.errno == errno.EDQUOT) or any(
            s in text for s in ("Disk quota exceeded", "os error 122")):
        return "disk quota exceeded"
    if isinstance(error, RuntimeError) and any(s in text for s in ("PytorchStreamWriter", "inline_container")):
        free = free_bytes(path)
        return "no space left" if free is not None and free < 64 * 2**20 else "a write failed (full disk or quota?)"
    return None


def write_agreed(accelerator, tmp: Path, what: str, out_dir: Path, write, every_process: bool = True) -> None:
    """Runs write() (on every process, or on the main one only) and agrees on the outcome: when it failed for lack of
    space on any process, the main process removes the partial folder `tmp` and every process raises the same
    DiskFullError, saying what was being written, how much, what is free, and which checkpoint is kept, so that
    none waits at a barrier the others have left and a re-run resumes. Other errors propagate as they are.
    (DeepSpeed's own checkpoint writer has barriers inside: there a full disk on one rank can still hang the rest.)"""
    from accelerate.utils import broadcast_object_list, gather_object

    failure = None
    if every_process or accelerator.is_main_process:
        try:
            write()
        except Exception as e:
            reason = disk_full_reason(e, tmp)
            if reason is None:
                raise
            failure = f"{reason} on the device holding {out_dir} while writing {what} ({type(e).__name__}: " \
                      f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else e!r})"
    if accelerator.num_processes > 1:
        if every_process:
            failure = next((f for f in gather_object([failure]) if f), None)
        else:
            failure = broadcast_object_list([failure])[0]
    if failure is None:
        return
    message = None
    if accelerator.is_main_process:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        kept, free = find_checkpoint(out_dir), free_bytes(out_dir)
        message = (f"{failure}; {gib(written)} had been written, {gib(free or 0)} is free after removing it. "
                   + (f"The last complete checkpoint, {kept}, is kept: free space and run again to resume from it."
                      if kept else "No earlier checkpoint exists: free space and run again."))
    if accelerator.num_processes > 1:
        message = broadcast_object_list([message])[0]  # one message, the same on every process
    raise DiskFullError(message)


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


def collate(pairs, pad_token_id: int, with_rejected: bool = True) -> dict:
    """Chosen (and rejected) of every pair in one batch: rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1],
    right-padded to the longest row; labels mask the prompts and the padding."""
    import torch

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
    heads that transform logits (soft-capping, scaling) take the full-logits path.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from dpo_loss import sequence_logps, token_logps

    original_forward = model.forward
    backbone = getattr(model, model.base_model_prefix)
    lm_head = model.get_output_embeddings()
    plain_head = not (getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None))

    def chunk_logps(hidden, targets):
        return token_logps(lm_head(hidden), targets)

    def forward(*args, logps_labels=None, **kwargs):
        if logps_labels is None:
            return original_forward(*args, **kwargs)
        if not plain_head:
            return sequence_logps(original_forward(*args, **kwargs).logits, logps_labels)
        hidden = backbone(*args, **kwargs).last_hidden_state
        labels = logps_labels[:, 1:]
        mask = labels != IGNORE_INDEX
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
        states, targets = hidden[:, :-1][mask], labels[mask]
        pieces = [checkpoint(chunk_logps, states[i:i + chunk_tokens], targets[i:i + chunk_tokens], use_reentrant=False)
                  for i in range(0, states.shape[0], chunk_tokens)]
        token_values = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
        return torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_values)

    model.forward = forward
    return model


def forward_logps(model, batch):
    """Summed response log-probs [rows] for a collated batch; the model carries add_logps_head."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                 logps_labels=batch["labels"])


def to_device(batch, device):
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def pair_terms(cfg: Config, logps, n_tokens, ref_chosen, ref_rejected):
    """Loss per pair and the per-pair values behind the logged metrics, from summed log-probs."""
    import torch

    from dpo_loss import LENGTH_AVERAGED, preference_loss

    half = logps.shape[0] // 2
    chosen, rejected = logps[:half], logps[half:]
    n_chosen, n_rejected = n_tokens[:half].clamp(min=1), n_tokens[half:].clamp(min=1)
    if cfg.loss.type in LENGTH_AVERAGED:
        pc, pr = chosen / n_chosen, rejected / n_rejected
        rc = ref_chosen / n_chosen if ref_chosen is not None else None
        rr = ref_rejected / n_rejected if ref_rejected is not None else None
    else:
        pc, pr, rc, rr = chosen, rejected, ref_chosen, ref_rejected
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pc, pr, rc, rr, cfg.loss.beta, cfg.loss.type, cfg.loss.label_smoothing, cfg.loss.simpo_gamma)
    nll = -chosen / n_chosen
    if cfg.loss.rpo_alpha:
        losses = losses + cfg.loss.rpo_alpha * nll
    terms = {"loss": losses.detach(), "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
             "rewards/margins": chosen_rewards - rejected_rewards,
             "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
             "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
             "nll/chosen": nll.detach(), "n/chosen": n_chosen.float()}
    if ref_chosen is not None:
        log_ratio = (chosen.detach() - ref_chosen) / n_chosen  # per token, on chosen responses
        terms["logratio/chosen"] = log_ratio
        terms["kl"] = torch.exp(-log_ratio) - 1 + log_ratio  # k3 estimator, >= 0
    return losses.mean(), terms


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


def reference_key(cfg: Config, pairs) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"v": CACHE_VERSION, "reference": model_fingerprint(cfg.loss.reference_path or cfg.model.path),
                              "dtype": cfg.model.dtype, "mixed_precision": cfg.train.mixed_precision}).encode())
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


def compute_logps(model, pairs, accelerator, batch_size: int, pad_token_id: int, progress: str = "") -> dict:
    """{pair id: (chosen sum, rejected sum, chosen tokens, rejected tokens)} over all pairs, in eval mode and without
    gradients, the work split across processes."""
    import torch
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    results = {}
    was_training = model.training
    model.eval()
    shards = padded_shards(pairs, batch_size, accelerator.process_index, accelerator.num_processes)
    with torch.no_grad():
        for batch_pairs, n_real in tqdm(shards, desc=progress, disable=not progress or not accelerator.is_main_process,
                                        leave=False):
            batch = to_device(collate(batch_pairs, pad_token_id), accelerator.device)
            logps = forward_logps(model, batch).float().cpu()
            n_tokens = batch["response_tokens"].float().cpu()
            half = len(batch_pairs)
            for i, p in enumerate(batch_pairs[:n_real]):
                results[p.id] = (float(logps[i]), float(logps[half + i]), float(n_tokens[i]), float(n_tokens[half + i]))
    model.train(was_training)
    merged = {}
    for part in gather_object([results]):
        merged.update(part)
    return merged


def reference_logps(cfg: Config, accelerator, get_reference, pairs, pad_token_id, log) -> tuple[dict, dict]:
    """Reference log-probs for these pairs from the cache, or computed once with get_reference() and cached."""
    import torch

    key = reference_key(cfg, pairs)
    path = Path(cfg.loss.ref_cache_dir) / f"{key}.pt"
    info = {"key": key, "path": str(path), "forward_passes": 0, "cache": "hit"}
    if path.is_file():
        log(f"reference log-probs: loaded from cache {path}")
        return torch.load(path, weights_only=True)["logps"], info
    info["cache"] = "miss"
    start = time.time()
    logps = compute_logps(get_reference(), pairs, accelerator, cfg.train.eval_batch_size, pad_token_id,
                          progress="reference log-probs")
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
    import torch

    if ref is None:
        return None, None
    values = torch.tensor([ref[p.id] for p in pairs], dtype=torch.float32, device=device)
    return values[:, 0], values[:, 1]


# ---------------------------------------------------------------- evaluation


def evaluate(cfg: Config, model, pairs, ref, accelerator, pad_token_id) -> dict:
    """Held-out metrics: loss, rewards/*, logps/*, perplexity of chosen responses, KL estimate; all processes."""
    import torch

    if cfg.train.max_eval_pairs:
        pairs = pairs[:cfg.train.max_eval_pairs]
    values = compute_logps(model, pairs, accelerator, cfg.train.eval_batch_size, pad_token_id)
    chosen, rejected, n_chosen, n_rejected = torch.tensor([values[p.id] for p in pairs]).unbind(1)
    if cfg.loss.name == "sft":
        _, terms = sft_terms(chosen, n_chosen)
        terms["logps/rejected"] = rejected
    else:
        ref_chosen, ref_rejected = ref_tensors(ref, pairs, "cpu")
        _, terms = pair_terms(cfg, torch.cat([chosen, rejected]), torch.cat([n_chosen, n_rejected]),
                              ref_chosen, ref_rejected)
    return summarise(terms)


# ---------------------------------------------------------------- run bookkeeping


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "peft", "deepspeed", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_run_json(out_dir: Path, info: dict) -> None:
    tmp = out_dir / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out_dir / "run.json")


def find_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint: a step-N folder with trainer_state.json (written last, before the rename)."""
    folders = sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in folders if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def full_numel(p) -> int:
    """A parameter's full size: under ZeRO-3 it holds only this process's shard and ds_numel is the whole."""
    return getattr(p, "ds_numel", p.numel())


def warn_if_disk_short(model, trainable, keep: int, out_dir: Path, say) -> None:
    """Say at the start, not hours later, when this run's files will not fit in what is free plus what its earlier
    files hold. Its peak: keep + 1 checkpoints (weights and AdamW's two moments) while the newest is written, or keep
    of them and final/ at the end. An estimate (DeepSpeed adds fp32 master weights under bf16)."""
    def size(p):
        return full_numel(p) * p.element_size()
    weights = sum(size(p) for p in model.parameters())
    per_checkpoint = weights + 2 * sum(size(p) for p in trainable)
    need = max((keep + 1) * per_checkpoint, keep * per_checkpoint + weights)
    free = free_bytes(out_dir)
    if free is not None and need > free + folder_bytes(out_dir / "checkpoints") + folder_bytes(out_dir / "final"):
        say(f"warning: this run's files need about {gib(need)} at their peak ({keep + 1} checkpoint(s) of "
            f"{gib(per_checkpoint)} while the newest is written; final/ {gib(weights)}) but {gib(free)} is free on "
            f"the filesystem holding {out_dir}: the run will stop with an error when it fills")


def save_checkpoint(accelerator, out_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Atomic: everything goes to a temporary folder, then one rename makes it visible."""
    final = out_dir / "checkpoints" / f"step-{step:06d}"
    tmp = out_dir / "checkpoints" / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    def write():
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    # every rank writes its own RNG file: write_agreed's collective is also the barrier before the rename
    write_agreed(accelerator, tmp, f"the step-{step} checkpoint", out_dir, write)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        older = sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]
        for old in older:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(cfg: Config, accelerator, model, tokenizer, out_dir: Path) -> None:
    """final/ in Hugging Face format, in model.dtype (bf16 rounding would erase DPO-sized updates). With LoRA:
    final/adapter/ holds the adapter and final/ the merged model, which vLLM loads directly. Under DeepSpeed the
    weights are those the engine computes with (bf16 with train.mixed_precision=bf16; the fp32 master weights stay in
    checkpoints/, which DeepSpeed's zero_to_fp32.py there turns into a state dict)."""
    final, tmp = out_dir / "final", out_dir / ".tmp-final"
    state_dict = accelerator.get_state_dict(model)  # every process: under ZeRO-3 this gathers the shards to rank 0

    def write():  # the main process only
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped, weights = accelerator.unwrap_model(model), state_dict
        if cfg.lora.r:
            unwrapped.save_pretrained(tmp / "adapter", state_dict=weights)
            unwrapped, weights = merge_lora(cfg, accelerator, unwrapped, tmp / "adapter"), None
        unwrapped.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    write_agreed(accelerator, tmp, "the final model", out_dir, write, every_process=False)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


def merge_lora(cfg: Config, accelerator, model, adapter_dir: Path):
    """The base model with the adapter merged in. Under ZeRO-3 this process holds only a shard of every base weight,
    so the base is loaded again, whole, on this process alone, and the adapter just saved is merged into it."""
    if not zero3(accelerator):
        return model.merge_and_unload()
    from peft import PeftModel
    from transformers.integrations import unset_hf_deepspeed_config

    # While accelerate's DeepSpeed config is registered, from_pretrained shards the weights at load (zero.Init), a
    # collective that would wait forever for the other processes. (accelerate 1.15's zero3_init_context_manager
    # registers the config again whatever its argument.)
    unset_hf_deepspeed_config()
    try:
        base = load_model(cfg.model.path, cfg.model.dtype)
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def parameter_checksum(model) -> float:
    """Sum of every parameter in float64. Under ZeRO-3 each process holds shards: every parameter is gathered in turn
    (a collective, so every process calls this), and the sums agree across processes as they do under DDP."""
    total = 0.0
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([p])
        else:
            gathered = contextlib.nullcontext()
        with gathered:
            total += float(p.detach().double().sum())
    return total


# ---------------------------------------------------------------- model setup


def disable_dropout(model) -> None:
    """Dropout makes policy and reference log-probs disagree at step 0; TRL disables it too."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def freeze_first_layers(model, n_layers: int) -> None:
    """Freeze the input embeddings and the first n transformer blocks (the smolLM notebook's memory trick)."""
    import torch

    n_total = model.config.num_hidden_layers
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_total), None)
    if blocks is None:
        raise UserInputError(f"train.freeze_layers: cannot find the {n_total} transformer blocks of this model")
    if n_layers > n_total:
        raise UserInputError(f"train.freeze_layers={n_layers}: the model has only {n_total} layers")
    model.get_input_embeddings().requires_grad_(False)
    for block in blocks[:n_layers]:
        block.requires_grad_(False)


def build_policy(cfg: Config):
    model = add_logps_head(load_model(cfg.model.path, cfg.model.dtype))  # before PEFT wraps it
    disable_dropout(model)
    if cfg.train.freeze_layers:
        freeze_first_layers(model, cfg.train.freeze_layers)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.r:
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


# ---------------------------------------------------------------- the run


def make_accelerator(cfg: Config):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # On CPU, launched processes need gloo; without it DeepSpeed ranks each believe they are rank 0.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum,
                              mixed_precision=cfg.train.mixed_precision, kwargs_handlers=handlers)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # we pass no dataloader, so DeepSpeed learns the batch size and clipping from the config
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            plugin.deepspeed_config["gradient_clipping"] = cfg.train.max_grad_norm
    return accelerator


def zero3(accelerator) -> bool:
    """DeepSpeed ZeRO-3: parameters are sharded across processes from the moment they are loaded (zero.Init)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


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
    import deepspeed

    ds = plugin.deepspeed_config
    zero = {k: v for k, v in ds["zero_optimization"].items() if v != "auto"} if zero3(accelerator) else {"stage": 0}
    config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"], "zero_optimization": zero,
              "bf16": {"enabled": accelerator.mixed_precision == "bf16"}}
    return deepspeed.initialize(model=model, config=config)[0]


def check_output_dir(cfg: Config, out_dir: Path) -> str | None:
    """'completed' if this exact config already finished here; refuses a folder used by another config."""
    run_json, saved = out_dir / "run.json", out_dir / "config.yaml"
    if not run_json.is_file():
        return None
    info = json.loads(run_json.read_text())
    if cfg.train.resume == "never":
        raise UserInputError(f"{out_dir} holds a previous run (run.json); use train.resume=auto or a new output_dir")
    if saved.is_file() and saved.read_text() != to_yaml(cfg):
        raise UserInputError(f"{out_dir}/config.yaml differs from this run's config; resuming would mix two runs. "
                             f"Use a new output_dir or the same config")
    return info.get("status")


def train(cfg: Config, log=print) -> dict:
    import torch
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    if check_output_dir(cfg, out_dir) == "completed":  # before any process group exists: every rank just returns
        if launched_as_rank_zero():
            log(f"{out_dir}: already completed with this config; nothing to do")
        return json.loads((out_dir / "run.json").read_text())
    accelerator = make_accelerator(cfg)
    main_process = accelerator.is_main_process
    say = log if main_process else (lambda *_: None)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    train_pairs, eval_pairs = prepare_data(cfg, tokenizer, log=say)
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    checkpoint = find_checkpoint(out_dir) if cfg.train.resume == "auto" else None
    previous = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").is_file() else {}
    run_info = {
        "status": "running", "config_hash": config_hash(cfg), "git_commit": git_commit(), "versions": versions(),
        "host": socket.gethostname(), "seed": cfg.train.seed, "loss": cfg.loss.name,
        "slurm": {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                                             "SLURM_RESTART_COUNT") if k in os.environ},
        "world_size": accelerator.num_processes, "started": previous.get("started", now()), "attempt_started": now(),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "max_steps": cfg.train.max_steps,
    }
    if main_process:
        write_run_json(out_dir, run_info)

    model = build_policy(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    run_info["parameters"] = {"total": sum(full_numel(p) for p in model.parameters()),
                              "trainable": sum(full_numel(p) for p in trainable)}
    if main_process:
        warn_if_disk_short(model, trainable, cfg.train.keep_checkpoints, out_dir, say)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                  weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped here once per optimizer step, not by accelerate

    ref = None
    if cfg.loss.name == "dpo" and cfg.loss.type != "simpo":
        def get_reference():  # runs before load_state, so the policy still holds its starting weights
            if not cfg.loss.reference_path:
                return model  # the policy is the reference (with LoRA: B starts at zero, adapters are a no-op)
            return prepare_frozen(accelerator, add_logps_head(load_model(cfg.loss.reference_path, cfg.model.dtype)))
        ref, run_info["reference"] = reference_logps(cfg, accelerator, get_reference, train_pairs + eval_pairs,
                                                     tokenizer.pad_token_id, say)
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if checkpoint:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        if main_process:  # drop lines logged after the checkpoint: the resumed run logs those steps again
            rewrite_jsonl(out_dir / "metrics.jsonl", [r for r in read_jsonl(out_dir / "metrics.jsonl") if r["step"] <= step])
        say(f"resumed from {checkpoint} at step {step}")
    if main_process:
        write_run_json(out_dir, run_info)

    stop_signal = []
    previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                         for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}

    world, micro_bs, accum = accelerator.num_processes, cfg.train.batch_size, cfg.train.grad_accum
    global_batch = micro_bs * world
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in train_pairs]
    if len(train_pairs) < global_batch:
        raise UserInputError(f"{len(train_pairs)} training pairs cannot fill one batch of "
                             f"train.batch_size={micro_bs} x {world} processes")
    epochs: dict[int, list] = {}
    batches_per_epoch = len(epoch_batches(len(train_pairs), lengths, global_batch, cfg.train.seed, 0))

    def micro_batch(index: int):
        epoch, within = divmod(index, batches_per_epoch)
        if epoch not in epochs:
            epochs.clear()
            epochs[epoch] = epoch_batches(len(train_pairs), lengths, global_batch, cfg.train.seed, epoch)
        chosen = epochs[epoch][within][accelerator.process_index * micro_bs:(accelerator.process_index + 1) * micro_bs]
        return [train_pairs[i] for i in chosen], epoch + within / batches_per_epoch

    def log_row(row: dict) -> None:
        if main_process:
            append_jsonl(out_dir / "metrics.jsonl", row)

    def log_eval() -> dict:
        metrics = evaluate(cfg, model, eval_pairs, ref, accelerator, tokenizer.pad_token_id)
        log_row({"step": step, "epoch": round(epoch, 4), "split": "eval", **metrics, "tokens": tokens_seen,
                 "elapsed_s": elapsed_before + time.time() - start})
        return metrics

    def state_now() -> dict:
        return {"step": step, "tokens": tokens_seen, "elapsed_s": elapsed_before + time.time() - start}

    start, epoch = time.time(), step * accum / batches_per_epoch
    model.train()
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not main_process, desc=f"{cfg.loss.name} train",
               dynamic_ncols=True)
    try:
        while step < cfg.train.max_steps:
            step_start, step_terms, step_tokens = time.time(), [], 0
            learning_rate = scheduler.get_last_lr()[0]
            for micro in range(accum):
                pairs, epoch = micro_batch(step * accum + micro)
                batch = to_device(collate(pairs, tokenizer.pad_token_id, with_rejected=cfg.loss.name == "dpo"),
                                  accelerator.device)
                with accelerator.accumulate(model):
                    logps = forward_logps(model, batch)
                    if cfg.loss.name == "sft":
                        loss, terms = sft_terms(logps, batch["response_tokens"])
                    else:
                        ref_chosen, ref_rejected = ref_tensors(ref, pairs, accelerator.device)
                        loss, terms = pair_terms(cfg, logps, batch["response_tokens"], ref_chosen, ref_rejected)
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"step {step + 1}: the loss is {loss.item()} (micro-batch {micro}, "
                                             f"pairs {[p.id for p in pairs]})")
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm or float("inf"))
                        if grad_norm is not None and not math.isfinite(float(grad_norm)):
                            raise NonFiniteError(f"step {step + 1}: the gradient norm is {float(grad_norm)}; "
                                                 f"nothing was applied")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_terms.append(terms)
                step_tokens += batch["tokens"]
            scheduler.step()
            step += 1
            gathered = {k: accelerator.gather(torch.cat([t[k] for t in step_terms]).float()) for k in step_terms[0]}
            # Slurm may signal only some ranks (or at different moments): every rank stops at the same step if any saw it.
            counts = accelerator.gather(torch.tensor([[step_tokens, len(stop_signal)]], device=accelerator.device))
            step_tokens = int(counts[:, 0].sum())
            stop_now = bool(counts[:, 1].sum() > 0)
            tokens_seen += step_tokens
            row = summarise(gathered)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}",
                            tok_s=f"{step_tokens / (time.time() - step_start):.0f}")
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                log_row({"step": step, "epoch": round(epoch, 4), "split": "train", **row,
                         "grad_norm": float(grad_norm) if grad_norm is not None else None,
                         "learning_rate": learning_rate, "tokens": tokens_seen,
                         "tokens_per_s": step_tokens / (time.time() - step_start),
                         "elapsed_s": elapsed_before + time.time() - start})
            if step == cfg.train.max_steps:
                break
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and eval_pairs:
                log_eval()
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or stop_now:
                save_checkpoint(accelerator, out_dir, step, state_now(), cfg.train.keep_checkpoints)
                if stop_now:
                    raise Interrupted(f"signal {(stop_signal or ['on another rank'])[0]} at step {step}: checkpoint saved")
        bar.close()
        if eval_pairs:
            run_info["final_eval"] = log_eval()
        save_checkpoint(accelerator, out_dir, step, state_now(), cfg.train.keep_checkpoints)
        save_final(cfg, accelerator, model, tokenizer, out_dir)
        checksum = parameter_checksum(accelerator.unwrap_model(model))
        run_info["parameter_checksums"] = gather_object([checksum])  # one per process: equal under DDP and ZeRO
        run_info.update(status="completed", ended=now(), steps=step, tokens=tokens_seen,
                        elapsed_s=round(elapsed_before + time.time() - start, 2))
        say(f"done: {step} steps, {tokens_seen} tokens, final model in {out_dir / 'final'}")
    except (NonFiniteError, Interrupted, DiskFullError, OSError) as e:
        if isinstance(e, OSError) and disk_full_reason(e, out_dir) is None:
            raise  # not ours to describe (metrics.jsonl and the reference cache on a full disk are)
        bar.close()
        run_info.update(status="interrupted" if isinstance(e, Interrupted) else "failed", ended=now(), steps=step,
                        error=str(e) if not isinstance(e, OSError) else f"{e.filename}: {e.strerror}",
                        last_checkpoint=str(find_checkpoint(out_dir) or ""))
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if main_process:
            try:
                write_run_json(out_dir, run_info)
            except OSError as e:  # a disk still full: the error being raised says more than this one would
                (out_dir / "run.json.tmp").unlink(missing_ok=True)
                say(f"warning: could not update {out_dir / 'run.json'} ({e.strerror})")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a clean teardown keeps gloo from aborting at exit
    return run_info


def precompute_reference(cfg: Config, log=print) -> dict:
    """Fill the reference log-prob cache for this config's data and exit (the sweep runs this once)."""
    import torch

    accelerator = make_accelerator(cfg)
    say = log if accelerator.is_main_process else (lambda *_: None)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    train_pairs, eval_pairs = prepare_data(cfg, tokenizer, log=say)

    def get_reference():
        reference = add_logps_head(load_model(cfg.loss.reference_path or cfg.model.path, cfg.model.dtype))
        if accelerator.state.deepspeed_plugin is not None:  # no optimizer here, which accelerate's DeepSpeed needs
            return prepare_frozen(accelerator, reference)
        return accelerator.prepare(reference)
    _, info = reference_logps(cfg, accelerator, get_reference, train_pairs + eval_pairs, tokenizer.pad_token_id, say)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean teardown keeps gloo from aborting at exit
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
    print(f"model: {cfg.model.path} (dtype {cfg.model.dtype}); loss: {cfg.loss.name}"
          + (f" {cfg.loss.type} beta={cfg.loss.beta}" if cfg.loss.name == "dpo" else ""))
    train_pairs, _ = prepare_data(cfg, tokenizer)
    print(show_example(tokenizer, train_pairs[0]))
    print("dry run: config and data are valid; nothing was trained")


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
            from slurm.plan import plan_lines

            print("\n".join(plan_lines(cfg, args.gpu, args.gpus, config_file=" ".join([args.config, *args.overrides]))))
        elif args.dry_run:
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
