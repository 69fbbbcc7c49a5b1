"""Our trainer against TRL's, side by side: same model, pairs, batch, max length, precision, steps and objective.

    .venv/bin/python bench/bench_train.py [--model models/smollm2-135m-instruct] [--steps 8] [--pairs 64]
                                          [--betas 0.05,0.1,0.2,0.5] [--sweep-steps 4] [--mixed-precision no|bf16]
                                          [--loss-type ipo | --loss-type sigmoid,sft] [--loss KEY=VALUE ...]

--loss-type takes any objective (a comma list sums them) and --loss any other loss.* key (loss.wpo=true,
loss.f_divergence=js_divergence, loss.sync_ref_every=2): TRL's DPOTrainer runs every objective it has with the same
options, its CPOTrainer simpo and cpo, its ORPOTrainer orpo.

Each run is a separate process (peak RSS is that process's own). Prints, for one run of each: median seconds per
step, non-padding tokens per second, peak RSS, and our/TRL ratios; then the wall time of a 4-β sweep: ours computes
the reference log-probs once and reuses them, TRL (precompute_ref_log_probs=True) recomputes them in every run.
A benchmark, not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

TRL_RUNNER = r'''
import json, resource, sys, time
args = json.loads(sys.argv[1])
from datasets import Dataset
from transformers import TrainerCallback
from config import load_config
from objectives import TRL_TYPES
from models import load_model, load_tokenizer
from preference_data import load_pairs, split_pairs

cfg = load_config(args["config"], args["overrides"])
pairs, _ = load_pairs(cfg.data)
train, _ = split_pairs(pairs, cfg.data.eval_fraction, cfg.data.split_seed)
rows = [{"prompt": list(p.prompt), "chosen": [{"role": "assistant", "content": p.chosen}],
         "rejected": [{"role": "assistant", "content": p.rejected}]} for p in train]
tokenizer = load_tokenizer(cfg.model.path)
model = load_model(cfg.model.path, cfg.model.dtype)
stamps, tokens = [], []

class Clock(TrainerCallback):
    def on_step_begin(self, a, state, control, **kw):
        stamps.append(time.time())
    def on_log(self, a, state, control, logs=None, **kw):
        if logs and "num_tokens" in logs:
            tokens.append(logs["num_tokens"])

loss = cfg.loss
common = dict(output_dir=args["out"], per_device_train_batch_size=cfg.train.batch_size,
    gradient_accumulation_steps=cfg.train.grad_accum, learning_rate=cfg.train.lr, max_steps=cfg.train.max_steps,
    beta=loss.beta, max_length=cfg.tokenize.max_length, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
    save_strategy="no", report_to=[], use_cpu=True, seed=cfg.train.seed, bf16=cfg.train.mixed_precision == "bf16",
    dataloader_num_workers=0)
types = loss.types
if set(types) <= set(TRL_TYPES):  # TRL's DPOTrainer, every option it shares with ours
    from trl import DPOConfig as Config, DPOTrainer as Trainer
    sync = bool(loss.sync_ref_every)
    trl_args = Config(**common, loss_type=types, loss_weights=loss.term_weights, label_smoothing=loss.label_smoothing,
        f_divergence_type=loss.f_divergence, f_alpha_divergence_coef=loss.f_alpha, use_weighting=loss.wpo,
        ld_alpha=loss.ld_alpha, discopop_tau=loss.discopop_tau, sync_ref_model=sync,
        ref_model_sync_steps=loss.sync_ref_every or 512, ref_model_mixup_alpha=loss.sync_ref_alpha,
        precompute_ref_log_probs=args["precompute"] and not sync)
elif types in (["simpo"], ["cpo"]):  # TRL's CPOTrainer: SimPO is its loss_type simpo without the NLL
    from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    trl_args = Config(**common, loss_type="simpo" if types == ["simpo"] else "sigmoid", simpo_gamma=loss.simpo_gamma,
        cpo_alpha=0.0 if types == ["simpo"] else 1.0, label_smoothing=loss.label_smoothing)
elif types == ["orpo"]:
    from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    trl_args = Config(**common)
else:
    sys.exit(f"TRL has no trainer for loss.type {types}")
start = time.time()
trainer = Trainer(model=model, args=trl_args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
trainer.add_callback(Clock())
trainer.train()
stamps.append(time.time())
print("BENCH " + json.dumps({"step_s": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens[-1] if tokens else None,
    "wall_s": time.time() - start, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
'''

OURS_RUNNER = r'''
import json, resource, sys, time
args = json.loads(sys.argv[1])
import train_dpo
from config import load_config
from jsonl import read_jsonl
start = time.time()
cfg = load_config(args["config"], args["overrides"])
info = train_dpo.train(cfg, log=lambda *a: None)
rows = [r for r in read_jsonl(cfg.output_dir + "/metrics.jsonl") if r["split"] == "train"]
elapsed = [r["elapsed_s"] for r in rows]
print("BENCH " + json.dumps({"step_s": [b - a for a, b in zip([0.0] + elapsed, elapsed)], "tokens": rows[-1]["tokens"],
    "wall_s": time.time() - start, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
'''


def run(runner: str, payload: dict) -> dict:
    result = subprocess.run([PY, "-c", runner, json.dumps(payload)], cwd=REPO, capture_output=True,
                            text=True, env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                            "PATH": "/usr/bin:/bin"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    if result.returncode or not lines:
        sys.exit(f"benchmark run failed:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][6:])


def summary(name: str, r: dict) -> dict:
    steps = r["step_s"][1:] or r["step_s"]  # the first step pays for warm-up
    median = statistics.median(steps)
    total = sum(r["step_s"])
    return {"name": name, "s_per_step": median, "tokens_per_s": (r["tokens"] or 0) / total if total else 0,
            "peak_rss_gb": r["peak_rss_gb"], "wall_s": r["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=64, help="HH pairs used (TRL precomputes over all of them)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--betas", default="0.05,0.1,0.2,0.5")
    parser.add_argument("--sweep-steps", type=int, default=4)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--loss-type", default="sigmoid", help="objective(s), e.g. ipo or sigmoid,bco_pair,sft")
    parser.add_argument("--loss", action="append", default=[], metavar="KEY=VALUE",
                        help="another loss option, e.g. loss.wpo=true (repeatable)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    common = [f"model.path={args.model}", f"data.max_pairs={args.pairs}", "data.eval_fraction=0",
              f"train.batch_size={args.batch_size}", f"tokenize.max_length={args.max_length}",
              f"tokenize.max_prompt_length={args.max_length * 3 // 4}", "train.lr=5e-7", "loss.beta=0.1",
              f"train.mixed_precision={args.mixed_precision}", "model.dtype=float32",
              f"loss.ref_cache_dir={work / 'ref_cache'}", f"loss.type=[{args.loss_type}]", *args.loss]
    print(f"model {args.model}, {args.pairs} HH pairs, batch {args.batch_size}, max_length {args.max_length}, "
          f"precision {args.mixed_precision}, {args.steps} steps, objective {args.loss_type} {' '.join(args.loss)}, "
          f"CPU threads of this machine")

    ours = summary("ours", run(OURS_RUNNER, {"config": "configs/default.yaml", "overrides": common + [
        f"train.max_steps={args.steps}", f"output_dir={work / 'ours'}"]}))
    trl = summary("TRL", run(TRL_RUNNER, {"config": "configs/default.yaml", "overrides": common + [
        f"train.max_steps={args.steps}"], "out": str(work / "trl"), "precompute": False}))
    print(f"{'':8}{'s/step':>10}{'tokens/s':>10}{'peak RSS GB':>13}")
    for r in (ours, trl):
        print(f"{r['name']:8}{r['s_per_step']:>10.2f}{r['tokens_per_s']:>10.1f}{r['peak_rss_gb']:>13.2f}")
    tokens = (f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl["tokens_per_s"] else
              "n/a (this TRL trainer logs no token count)")
    print(f"ratio   speed per step {trl['s_per_step'] / ours['s_per_step']:.2f}x, tokens/s {tokens}, peak memory "
          f"{ours['peak_rss_gb'] / trl['peak_rss_gb']:.2f} of TRL's")

    if args.skip_sweep:
        return
    betas = [float(b) for b in args.betas.split(",")]
    start = time.time()
    for beta in betas:
        run(OURS_RUNNER, {"config": "configs/default.yaml", "overrides": common + [
            f"train.max_steps={args.sweep_steps}", f"loss.beta={beta}", f"loss.ref_cache_dir={work / 'sweep_cache'}",
            f"output_dir={work / f'ours_b{beta}'}"]})
    ours_sweep = time.time() - start
    start = time.time()
    for beta in betas:
        run(TRL_RUNNER, {"config": "configs/default.yaml", "overrides": common + [
            f"train.max_steps={args.sweep_steps}", f"loss.beta={beta}"], "out": str(work / f"trl_b{beta}"),
            "precompute": True})
    trl_sweep = time.time() - start
    print(f"{len(betas)}-beta sweep, {args.sweep_steps} steps each, end to end: ours {ours_sweep:.0f} s "
          f"(reference once, cached), TRL {trl_sweep:.0f} s (precompute per run): {trl_sweep / ours_sweep:.2f}x")


if __name__ == "__main__":
    main()
