"""Generation speed: generate.py's vLLM engine against its HF transformers engine, in bf16 and in fp32, same model,
prompts and settings, on this host (its CPU is printed: bf16 is native only with avx512_bf16/amx_bf16).

    python bench/bench_generate.py [--model models/smollm2-135m-instruct] [--prompts mt_bench] [--limit 32]
        [--max-new-tokens 128] [--dtypes bfloat16 float32] [--hf-batch-size 16]

Each (engine, dtype) runs as its own `generate.py` process (vLLM holds one model per process) into a fresh output
file, greedy, with every sampling parameter explicit; vLLM on CPU gets every core of the job
(VLLM_CPU_NUM_OF_RESERVED_CPU=0, host.vllm_cpu_env). Printed per run: engine start (model load; vLLM's includes its
profiling and KV-cache setup), answers, new tokens, generation seconds, tokens/s, and wall time of the whole
process; then the vLLM/HF ratios per dtype and the row for host.GENERATION_SPEED, the table `--engine auto` decides
from. Tokens/s counts only the generation calls, so start-up is reported separately.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import host  # the repo is installed into .venv (scripts/setup.sh)

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"wrote (\d+) answers.*engine start ([\d.]+) s, (\d+) tokens in ([\d.]+) s")


def run_engine(engine: str, dtype: str, args, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "generate.py"), "--model", args.model, "--prompts", *args.prompts,
           "--limit", str(args.limit), "--out", str(out), "--engine", engine, "--max-new-tokens",
           str(args.max_new_tokens), "--dtype", dtype]
    if engine == "hf":
        cmd += ["--batch-size", str(args.hf_batch_size)]
    started = time.time()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - started
    match = SUMMARY.search(result.stderr)
    if result.returncode != 0 or not match:
        sys.exit(f"{engine} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    answers, start_s, tokens, gen_s = int(match[1]), float(match[2]), int(match[3]), float(match[4])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {"engine": engine, "dtype": dtype, "start_s": start_s, "answers": answers, "new_tokens": tokens, "generate_s": gen_s,
            "tokens_per_s": tokens / gen_s, "wall_s": wall, "responses": {r["prompt_id"]: r["response"] for r in rows}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--prompts", nargs="+", default=["mt_bench"])
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--hf-batch-size", type=int, default=16)
    args = p.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            for engine in ("vllm", "hf"):
                results.append(run_engine(engine, dtype, args, Path(tmp) / f"{engine}-{dtype}.jsonl"))
    print(f"host: {host.describe()}")
    print(f"model {args.model}, prompts {' '.join(args.prompts)} (limit {args.limit}), greedy, "
          f"max_new_tokens {args.max_new_tokens}, HF batch {args.hf_batch_size}")
    print(f"{'engine':8}{'dtype':10}{'start s':>9}{'answers':>9}{'tokens':>8}{'gen s':>8}{'tok/s':>8}{'wall s':>8}")
    for r in results:
        print(f"{r['engine']:8}{r['dtype']:10}{r['start_s']:9.1f}{r['answers']:9d}{r['new_tokens']:8d}"
              f"{r['generate_s']:8.1f}{r['tokens_per_s']:8.0f}{r['wall_s']:8.1f}")
    kind = "bf16" if host.cpu_bf16_flag() else "avx2"
    for dtype in args.dtypes:
        vllm, hf = (next(r for r in results if r["engine"] == e and r["dtype"] == dtype) for e in ("vllm", "hf"))
        same = sum(vllm["responses"][k][:40] == hf["responses"].get(k, "")[:40] for k in vllm["responses"])
        print(f"{dtype}: vLLM / HF tokens/s {vllm['tokens_per_s'] / hf['tokens_per_s']:.2f}x, wall "
              f"{vllm['wall_s'] / hf['wall_s']:.2f}x; greedy answers with the same first 40 characters: "
              f"{same}/{len(vllm['responses'])}")
        print(f"  host.GENERATION_SPEED[({kind!r}, {dtype!r})] = ({vllm['start_s']:.1f}, {vllm['tokens_per_s']:.1f}, "
              f"{hf['start_s']:.1f}, {hf['tokens_per_s']:.1f})")
    best = min(results, key=lambda r: r["wall_s"])
    print(f"fastest here for this job: {best['engine']} in {best['dtype']} ({best['wall_s']:.0f} s wall)")


if __name__ == "__main__":
    main()
