"""Measured peak memory of real training steps against the planner's estimate (slurm/plan.py), setting by setting.

    .venv/bin/python bench/bench_memory.py [--steps 2] [--only smollm2-fp32,tiny-llama]

Every setting runs train_dpo.train(cfg) in a fresh process for --steps optimizer steps on the local HH data
(../shared/data/hh-rlhf/harmless-base/test.jsonl.gz, the first 24 pairs). Its reference log-probs are computed
beforehand by `train_dpo.precompute_reference` in another process, as a sweep's reference job does, so the measured
process holds the policy and nothing else; that job's own peak is a row of the table too. The run stops after the
last measured step (no final evaluation, no checkpoint).

What is compared, on CPU:
  measured  peak RSS (VmHWM, reset when the model starts loading) when the last measured step ends, minus the RSS just
            before the model is loaded (interpreter, libraries, tokenizer and data are left out). RSS also counts
            file-backed pages: library code run for the first time and the mapped checkpoint; the `anon` column leaves
            out the file-backed pages added since that baseline, and the error is against it. glibc's malloc
            raises its mmap threshold to up to 32 MiB after the first large free and then keeps freed blocks below
            it in its heap, where RSS still counts them (the CPU analogue of the CUDA caching allocator's reserved
            memory): the processes run with MALLOC_MMAP_THRESHOLD_=131072, so RSS follows the live tensors;
            --glibc-default measures with the defaults instead.
  estimate  slurm/plan.py's peak for the same config with gpu=cpu (no CUDA context), for each micro-batch at its own
            padded width and response tokens; the first step holds no optimizer state until its optimizer step.
On a machine with CUDA the processes train on the GPU and the table compares torch.cuda.max_memory_allocated with
the estimate for an 80 GB H100 less the CUDA context, which that counter does not see.
A benchmark, not a test: numbers depend on the machine; the error column is (estimate - measured) / measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from config import load_config
from slurm import memory

REPO = Path(__file__).resolve().parents[1]

DATA = ["data.path=../shared/data/hh-rlhf/harmless-base/test.jsonl.gz", "data.max_pairs=24",
        "data.eval_fraction=0.125", "train.eval_batch_size=8", "train.eval_every=0", "train.save_every=0"]
SMOLLM2 = ("configs/default.yaml", DATA)
SETTINGS = {  # name -> (config, overrides)
    "smollm2-fp32": (SMOLLM2[0], SMOLLM2[1] + ["train.batch_size=4", "tokenize.max_length=256"]),
    "smollm2-checkpointing": (SMOLLM2[0], SMOLLM2[1] + ["train.batch_size=4", "tokenize.max_length=256",
                                                       "train.gradient_checkpointing=true"]),
    "smollm2-lora16": (SMOLLM2[0], SMOLLM2[1] + ["train.batch_size=4", "tokenize.max_length=256", "lora.r=16",
                                                "train.lr=1e-4"]),
    "smollm2-b2-len512": (SMOLLM2[0], SMOLLM2[1] + ["train.batch_size=2", "tokenize.max_length=512",
                                                   "tokenize.max_prompt_length=384"]),
    "smollm2-bf16-autocast": (SMOLLM2[0], SMOLLM2[1] + ["train.batch_size=4", "tokenize.max_length=256",
                                                       "train.mixed_precision=bf16"]),
    "tiny-llama": ("configs/tiny.yaml", DATA),
}

RUNNER = r'''
import json, sys
args = json.loads(sys.argv[1])
import torch
import train_dpo
from config import load_config

cuda = torch.cuda.is_available()
marks, batches = {"steps": []}, []


class Measured(Exception):
    """The measured steps are done: stop before the final evaluation and the checkpoint writes."""


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


def start_measuring():
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak from here on
    marks["before_model"] = status("VmRSS")
    marks["before_model_file"] = status("RssFile") + status("RssShmem")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        marks["cuda_before_model"] = torch.cuda.memory_allocated()


build_policy, collate, summarise, load_model = (train_dpo.build_policy, train_dpo.collate, train_dpo.summarise,
                                                train_dpo.load_model)


def measured_build_policy(cfg):
    start_measuring()
    model = build_policy(cfg)
    marks["after_model"] = status("VmRSS")
    marks["after_model_file"] = status("RssFile") + status("RssShmem")
    if cuda:  # train() moves the model to the GPU in accelerator.prepare; count what it holds there
        marks["cuda_weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return model


def measured_collate(pairs, pad_token_id, with_rejected=True):
    batch = collate(pairs, pad_token_id, with_rejected)
    if len(marks["steps"]) < args["steps"]:  # training micro-batches only (evaluation comes after the last step)
        batches.append([int(batch["input_ids"].shape[0]), int(batch["input_ids"].shape[1]),
                        int((batch["labels"][:, 1:] != -100).sum()), len(marks["steps"])])
    return batch


def measured_summarise(terms):
    if len(marks["steps"]) < args["steps"]:  # called once per optimizer step, after it
        marks["steps"].append(status("VmHWM"))
        marks.setdefault("file", []).append(status("RssFile") + status("RssShmem"))
        if cuda:
            marks.setdefault("cuda_steps", []).append(torch.cuda.max_memory_allocated())
    if len(marks["steps"]) == args["steps"]:
        raise Measured
    return summarise(terms)


def measured_load_model(path, dtype="float32"):
    start_measuring()
    return load_model(path, dtype)


cfg = load_config(args["config"], args["overrides"])
if args["mode"] == "reference":
    train_dpo.load_model, train_dpo.collate = measured_load_model, measured_collate
    train_dpo.precompute_reference(cfg, log=lambda *a: None)
    marks["steps"].append(status("VmHWM"))
    marks["file"] = [status("RssFile") + status("RssShmem")]
    if cuda:
        marks["cuda_steps"] = [torch.cuda.max_memory_allocated()]
else:
    train_dpo.build_policy, train_dpo.collate, train_dpo.summarise = (measured_build_policy, measured_collate,
                                                                      measured_summarise)
    try:
        train_dpo.train(cfg, log=lambda *a: None)
    except Measured:
        pass
print("BENCH " + json.dumps({"marks": marks, "batches": batches, "cuda": cuda}))
'''


def run(mode: str, config: str, overrides: list[str], steps: int, glibc_default: bool) -> dict:
    payload = json.dumps({"mode": mode, "config": config, "overrides": overrides, "steps": steps})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not glibc_default:  # a fixed threshold: every block over 128 KiB is its own mapping, unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    result = subprocess.run([sys.executable, "-c", RUNNER, payload], cwd=REPO, capture_output=True, text=True,
                            env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    if result.returncode or not lines:
        sys.exit(f"{mode} run of {config} {' '.join(overrides)} failed:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][6:])


def planned(config: str, overrides: list[str], r: dict, mode: str) -> tuple[float, float]:
    """(estimated peak GiB, estimated weights GiB) of what the process ran, micro-batch by micro-batch at its own width
    and response tokens: for a reference job the largest of its no-grad batches; for training the largest step,
    where the first holds no optimizer state until its optimizer step creates it (evaluation is not measured)."""
    cfg = load_config(config, overrides)
    gpu = "h100-80gb" if r["cuda"] else "cpu"
    weights = memory.model_shape(cfg.model.path).parameters() * memory.precision(cfg, None).weight / memory.GIB
    peaks = []
    for rows, width, labels, step in r["batches"]:
        if mode == "reference":
            peaks.append(memory.reference_job(cfg, 1, gpu, seq_len=width, label_tokens=labels))
            continue
        est = memory.estimate(cfg, 1, gpu=gpu, seq_len=width, label_tokens=labels)
        c, phases, weights = est.components, est.phases, est.components["weights"]
        resident = est.total_gib - max(phases.values()) - (c["optimizer state"] if step == 0 else 0)
        step_phase = phases["optimizer step"] + (c["optimizer state"] if step == 0 else 0)
        peaks.append(resident + max(phases["training pass"], step_phase))
    total = max(peaks)
    if r["cuda"]:  # torch.cuda.max_memory_allocated does not see the CUDA context
        total -= memory.CUDA_CONTEXT_GIB
    return total, weights


def measured(r: dict) -> tuple[float, float, float]:
    """(weights, peak, peak of anonymous memory) in GiB. Anonymous leaves out file-backed pages that appeared since
    the baseline: library code run for the first time (kernels) and the mapped checkpoint."""
    m, gib = r["marks"], 2 ** 30
    if r["cuda"]:
        peak = (max(m["cuda_steps"]) - m["cuda_before_model"]) / gib
        return m.get("cuda_weights", 0) / gib, peak, peak
    i = max(range(len(m["steps"])), key=lambda k: m["steps"][k])
    peak = (m["steps"][i] - m["before_model"]) / gib
    anonymous = peak - (m["file"][i] - m["before_model_file"]) / gib
    weights = 0.0
    if m.get("after_model"):
        weights = (m["after_model"] - m["before_model"] - (m["after_model_file"] - m["before_model_file"])) / gib
    return weights, peak, anonymous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps measured per setting")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(SETTINGS)}")
    parser.add_argument("--glibc-default", action="store_true",
                        help="measure with glibc's default malloc, whose heap keeps freed blocks (see above)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    rows, references = [], set()
    start = time.time()
    for name in names:
        config, overrides = SETTINGS[name]
        overrides = overrides + [f"loss.ref_cache_dir={work / 'ref_cache'}", f"output_dir={work / name}",
                                 f"train.max_steps={args.steps}"]
        # one reference job per distinct (model, data, tokenisation, precision), as the sweep does
        cfg = load_config(config, overrides)
        key = (cfg.model.path, cfg.model.dtype, cfg.train.mixed_precision, cfg.tokenize.max_length)
        if key not in references:
            references.add(key)
            rows.append((f"{name}: reference job", config, overrides, run("reference", config, overrides, args.steps,
                                                                                   args.glibc_default),
                         "reference"))
            print(f"[{time.time() - start:.0f} s] measured the reference job of {name}", file=sys.stderr, flush=True)
        rows.append((name, config, overrides, run("train", config, overrides, args.steps, args.glibc_default),
                     "train"))
        print(f"[{time.time() - start:.0f} s] measured {name}", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    cuda = rows[0][3]["cuda"]
    print(f"{args.steps} training step(s) per setting on 24 HH pairs. measured: "
          + ("torch.cuda.max_memory_allocated; estimate: h100-80gb less the CUDA context" if cuda else
             "peak RSS - RSS before the model loads (anon: without file-backed pages), glibc malloc "
             + ("defaults" if args.glibc_default else "mmap threshold 128 KiB") + "; estimate: gpu=cpu")
          + ", each micro-batch at its own width and response tokens (the columns show the widest)")
    print(f"{'setting':32}{'rows x width':>13}{'labels':>7}{'weights est':>12}{'meas':>6}{'peak est':>10}"
          f"{'RSS':>7}{'anon':>7}{'error':>7}")
    for name, config, overrides, r, mode in rows:
        weights, peak, anonymous = measured(r)
        est_peak, est_weights = planned(config, overrides, r, mode)
        shape = f"{max(b[0] for b in r['batches'])} x {max(b[1] for b in r['batches'])}"
        labels = max(b[2] for b in r["batches"])
        weights_text = f"{weights:6.2f}" if mode == "train" else f"{'-':>6}"
        print(f"{name:32}{shape:>13}{labels:7d}{est_weights:12.2f}{weights_text}{est_peak:10.2f}{peak:7.2f}"
              f"{anonymous:7.2f}{100 * (est_peak - anonymous) / anonymous:+6.0f}%")


if __name__ == "__main__":
    main()
