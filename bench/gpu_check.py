"""The prepared GPU check: one command, no downloads, a few minutes on one H100/H200, and what it measured as JSON and a
markdown table.

    python bench/gpu_check.py --out bench/results/gpu-check              # on the GPU machine (≤ 8 minutes)
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu-check   # anywhere, in under a minute (a test runs it)

It builds randomly initialised Llama-architecture models from config on the device — ~0.5B and ~1.5B parameters, and
four layers of Mistral-7B's shape (per-layer memory) — and for each, through the project's own training path
(`train_dpo.build_policy`: the fused log-prob head, LoRA, gradient checkpointing):
- DPO steps (sigmoid loss against fixed reference log-probs, AdamW) in bf16 autocast over fp32 master weights and
  in pure bf16, with and without LoRA and gradient checkpointing: step time, tokens/s, MFU against the device's
  dense bf16 peak (measured first with large matmuls, and reported beside the datasheet's), peak allocated memory;
- the memory planner's peak for the same settings (slurm/memory.py, the GPU named from the device) beside the
  measured one, as a ratio;
- the chunked LM head against full logits: the loss and the gradients agree within bf16 tolerance on the device;
- a reference log-prob pass (tokens/s) and HF generation throughput (greedy, tokens/s).
MFU counts the model's FLOPs (6 per parameter per token for full fine-tuning, 4 with LoRA, plus attention),
never a recomputation by gradient checkpointing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from config import load_config
from slurm import memory
from train_dpo import add_logps_head, build_policy

# name -> LlamaConfig fields (vocab 32000: Llama-2's and Mistral's)
MODELS = {
    "llama-0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=8),
    "llama-1.5b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=30, num_attention_heads=32,
                       num_key_value_heads=8),
    "mistral-7b-4layers": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                               num_key_value_heads=8),
}
TINY = {"tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2)}
# (precision, LoRA rank, gradient checkpointing)
SETTINGS = [("autocast-bf16", 0, False), ("autocast-bf16", 0, True), ("autocast-bf16", 16, False),
            ("autocast-bf16", 16, True), ("pure-bf16", 0, False), ("pure-bf16", 0, True), ("pure-bf16", 16, False),
            ("pure-bf16", 16, True)]
DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_peak_tflops(device: str, size: int, repeats: int) -> float:
    """Dense bf16 matmul throughput: the best of `repeats` timed products of two size x size matrices."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size ** 3 / best / 1e12


def build(fields: dict, device: str, dtype: torch.dtype, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model, config


def training_config(folder: Path, pairs: int, seq: int, precision: str, lora: int, ckpt: bool):
    """The Config train_dpo.py would run these settings with (for build_policy and the planner)."""
    return load_config("configs/tiny.yaml", [
        f"model.path={folder}", f"model.dtype={'float32' if precision == 'autocast-bf16' else 'bfloat16'}",
        f"train.mixed_precision={'bf16' if precision == 'autocast-bf16' else 'no'}", f"train.batch_size={pairs}",
        f"tokenize.max_length={seq}", f"tokenize.max_prompt_length={seq // 2}", f"lora.r={lora}",
        f"train.gradient_checkpointing={'true' if ckpt else 'false'}", "train.lr=1e-5"])


def batch(pairs: int, seq: int, vocab: int, device: str):
    """`pairs` chosen and `pairs` rejected rows of `seq` random tokens, the second half of each labelled."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2 * pairs, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return ids, torch.ones_like(ids), labels


def model_flops(params: int, trainable: int, cfg_fields: dict, tokens: int, seq: int, lora: bool) -> float:
    """Forward 2N + backward (activations 2N, weights 2N: only the trained ones) per token, plus attention
    (PaLM's 12·L·H·Q·T per token for forward and backward)."""
    per_token = (4 if lora else 6) * params + (6 * trainable if lora else 0)
    layers, hidden = cfg_fields["num_hidden_layers"], cfg_fields["hidden_size"]
    return tokens * (per_token + 12 * layers * hidden * seq)


_RSS_BASE = [0]


def _vm(field: str) -> int:
    """A VmHWM/VmRSS line of /proc/self/status in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(device: str) -> None:
    """From here, the peak counts what the next setting allocates: CUDA's allocated-memory peak, or on CPU the
    growth of the resident set over what it is now (VmHWM reset through /proc/self/clear_refs)."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    _RSS_BASE[0] = _vm("VmRSS")


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return max(0, _vm("VmHWM") - _RSS_BASE[0]) / 2 ** 30


def dpo_steps(name: str, fields: dict, setting: tuple, args, device: str, planner_gpu: str, peak_tflops: float,
              folder: Path) -> dict:
    precision, lora, ckpt = setting
    reset_peak(device)
    dtype = torch.float32 if precision == "autocast-bf16" else torch.bfloat16
    model, config = build(fields, device, dtype, args.vocab)
    params = sum(p.numel() for p in model.parameters())
    config.save_pretrained(folder)  # the planner reads the shape from config.json
    cfg = training_config(folder, args.pairs, args.seq, precision, lora, ckpt)
    policy = build_policy(cfg, model)
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")
    ids, mask, labels = batch(args.pairs, args.seq, args.vocab, device)
    ref = torch.zeros(2 * args.pairs, device=device)  # fixed reference log-probs: the cached-reference step
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "autocast-bf16")
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        with autocast:
            logps = policy(input_ids=ids, attention_mask=mask, logps_labels=labels)
        logps = logps.float()
        margin = (logps[: args.pairs] - ref[: args.pairs]) - (logps[args.pairs:] - ref[args.pairs:])
        loss = -F.logsigmoid(0.1 * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step_s = sorted(times)[len(times) // 2]
    tokens = ids.numel()
    flops = model_flops(params, sum(p.numel() for p in trainable), fields, tokens, args.seq, bool(lora))
    measured = peak_memory_gib(device)
    planned = memory.estimate(cfg, gpu=planner_gpu, seq_len=args.seq, label_tokens=args.seq // 2).total_gib
    del policy, model, optimizer
    return {"model": name, "parameters": params, "precision": precision, "lora": lora, "checkpointing": ckpt,
            "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
            "mfu": round(flops / step_s / (peak_tflops * 1e12), 4),
            "mfu_datasheet": round(flops / step_s / (args.datasheet * 1e12), 4) if args.datasheet else None,
            "peak_gib": round(measured, 3),
            "planned_gib": round(planned, 3), "planned_over_measured": round(planned / measured, 3) if measured else None,
            "finite": all(math.isfinite(x) for x in losses)}


def head_parity(fields: dict, args, device: str) -> dict:
    """The chunked LM head (add_logps_head) against full logits, in bf16 autocast on the device: the summed label
    log-probs and every gradient."""
    from dpo_loss import sequence_logps

    model, _ = build(fields, device, torch.float32, args.vocab)
    fused = add_logps_head(model, chunk_tokens=max(8, args.seq // 4))
    ids, mask, labels = batch(args.pairs, args.seq, args.vocab, device)
    results = {}
    for kind in ("full", "chunked"):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            if kind == "full":
                logps = sequence_logps(model(input_ids=ids, attention_mask=mask).logits.float(), labels)
            else:
                logps = fused(input_ids=ids, attention_mask=mask, logps_labels=labels).float()
        logps.sum().backward()
        results[kind] = (logps.detach(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()})
    (a, ga), (b, gb) = results["full"], results["chunked"]
    rel = lambda x, y: ((x - y).norm() / y.norm().clamp_min(1e-12)).item()  # noqa: E731
    worst = max(rel(gb[n], ga[n]) for n in ga)
    logps_rel = rel(b, a)
    return {"logps_rel_error": round(logps_rel, 5), "grad_rel_error_max": round(worst, 5),
            "within_bf16_tolerance": logps_rel < 2e-2 and worst < 5e-2}


def inference(fields: dict, args, device: str) -> dict:
    """A reference log-prob pass (no gradient) and greedy HF generation, in bf16."""
    model, _ = build(fields, device, torch.bfloat16, args.vocab)
    model.eval()
    head = add_logps_head(model)
    ids, mask, labels = batch(args.pairs, args.seq, args.vocab, device)
    with torch.no_grad():
        head(input_ids=ids, attention_mask=mask, logps_labels=labels)
        sync(device)
        start = time.perf_counter()
        head(input_ids=ids, attention_mask=mask, logps_labels=labels)
        sync(device)
        ref_s = time.perf_counter() - start
        prompt = ids[:, : args.seq // 2]
        start = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        sync(device)
        gen_s = time.perf_counter() - start
    new = (out.shape[1] - prompt.shape[1]) * out.shape[0]
    return {"reference_tokens_per_s": round(ids.numel() / ref_s, 1), "generate_tokens_per_s": round(new / gen_s, 1),
            "generate_batch": int(out.shape[0]), "new_tokens": args.new_tokens}


def device_info(device: str) -> tuple[str, str, float | None]:
    """(description, the planner's GPU name, datasheet dense bf16 TFLOP/s or None)."""
    if device != "cuda":
        return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores", "cpu", None
    name = torch.cuda.get_device_name()
    sheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)
    planner = "h200" if "H200" in name else "a100-80gb" if "A100" in name else "h100-80gb"
    return f"{name}, {torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB", planner, sheet


def markdown(result: dict) -> str:
    lines = [f"# GPU check: {result['device']}", "",
             f"`{result['command']}` on {result['date']}; torch {result['torch']}. Dense bf16 peak measured "
             f"{result['peak_tflops_measured']:.3g} TFLOP/s" + (f" (datasheet {result['peak_tflops_datasheet']:.0f})"
                                                               if result["peak_tflops_datasheet"] else "") + ".", "",
             "| model | parameters | precision | LoRA | ckpt | step s | tokens/s | MFU | peak GiB | planned GiB | "
             "planned/measured |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    peak_what = "peak allocated (torch.cuda)" if result["planner_gpu"] != "cpu" else "resident-set growth (CPU)"
    for r in result["training"]:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.3g}M | {r['precision']} | {r['lora'] or '-'} | "
                     f"{'yes' if r['checkpointing'] else 'no'} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} | {r['planned_gib']:.2f} | "
                     f"{r['planned_over_measured']} |")
    lines += ["", "MFU: the model's FLOPs (no recomputation) over the measured peak"
              + (", datasheet MFU in gpu_check.json" if result["peak_tflops_datasheet"] else "")
              + f"; peak GiB: {peak_what}; planned: slurm/memory.py for gpu={result['planner_gpu']}.",
              "", "| model | chunked head: log-prob rel. error | worst gradient rel. error | within bf16 tolerance | "
                  "reference tokens/s | generate tokens/s |", "|---|---|---|---|---|---|"]
    for name, r in result["models"].items():
        h, i = r["head_parity"], r["inference"]
        lines.append(f"| {name} | {h['logps_rel_error']} | {h['grad_rel_error_max']} | {h['within_bf16_tolerance']} "
                     f"| {i['reference_tokens_per_s']:.0f} | {i['generate_tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, short sequences: checks the script runs")
    parser.add_argument("--only", nargs="*", help="these models only")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny)")
    tiny = args.tiny
    args.vocab, args.pairs, args.seq = (512, 2, 64) if tiny else (32000, 4, 1024)
    args.steps, args.warmup, args.new_tokens = (2, 1, 8) if tiny else (5, 2, 128)
    models = TINY if tiny else MODELS
    if args.only:
        unknown = sorted(set(args.only) - set(models))
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: not one of {', '.join(models)}")
        models = {k: v for k, v in models.items() if k in args.only}
    device = args.device
    started = time.time()
    description, planner_gpu, sheet = device_info(device)
    args.datasheet = sheet
    peak = measure_peak_tflops(device, 512 if device == "cpu" else 8192, 3 if device == "cpu" else 10)
    result = {"device": description, "planner_gpu": planner_gpu, "peak_tflops_measured": round(peak, 2),
              "peak_tflops_datasheet": sheet, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "pairs": args.pairs, "seq": args.seq, "training": [], "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fields in models.items():
            settings = SETTINGS if name != "mistral-7b-4layers" else [s for s in SETTINGS if s[0] == "pure-bf16"]
            for setting in settings:
                row = dpo_steps(name, fields, setting, args, device, planner_gpu, peak, Path(tmp))
                result["training"].append(row)
                print(json.dumps(row), flush=True)
            result["models"][name] = {"head_parity": head_parity(fields if tiny or name != "mistral-7b-4layers"
                                                                 else {**fields, "num_hidden_layers": 1}, args, device),
                                      "inference": inference(fields, args, device)}
            print(json.dumps({name: result["models"][name]}), flush=True)
    result["elapsed_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out}/gpu_check.json and gpu_check.md in {result['elapsed_s']} s")
    return 0 if all(r["finite"] for r in result["training"]) and all(
        m["head_parity"]["within_bf16_tolerance"] for m in result["models"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
