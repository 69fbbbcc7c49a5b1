"""Generation speed: generate.py's vLLM engine against its HF transformers engine, same model, prompts and settings.

    python bench/bench_generate.py [--model models/smollm2-135m-instruct] [--prompts mt_bench] [--limit 32]
        [--max-new-tokens 128] [--dtype bfloat16] [--hf-batch-size 16]

Each engine runs as its own `generate.py` process (vLLM holds one model per process) into a fresh output file, greedy,
with every sampling parameter explicit. Printed per engine: engine start (model load; vLLM's includes its
profiling and KV-cache setup), answers, new tokens, generation seconds, tokens/s, and wall time of the whole process;
then the vLLM/HF ratios. Tokens/s counts only the generation calls, so start-up is reported separately.
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

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"wrote (\d+) answers.*engine start ([\d.]+) s, (\d+) tokens in ([\d.]+) s")


def run_engine(engine: str, args, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "generate.py"), "--model", args.model, "--prompts", *args.prompts,
           "--limit", str(args.limit), "--out", str(out), "--engine", engine, "--max-new-tokens",
           str(args.max_new_tokens), "--dtype", args.dtype]
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
    return {"engine": engine, "start_s": start_s, "answers": answers, "new_tokens": tokens, "generate_s": gen_s,
            "tokens_per_s": tokens / gen_s, "wall_s": wall, "responses": {r["prompt_id"]: r["response"] for r in rows}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--prompts", nargs="+", default=["mt_bench"])
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hf-batch-size", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_engine(engine, args, Path(tmp) / f"{engine}.jsonl") for engine in ("vllm", "hf")]
    vllm, hf = results
    print(f"model {args.model}, prompts {' '.join(args.prompts)} (limit {args.limit}), greedy, "
          f"max_new_tokens {args.max_new_tokens}, {args.dtype}, HF batch {args.hf_batch_size}")
    print(f"{'engine':8}{'start s':>9}{'answers':>9}{'tokens':>8}{'gen s':>8}{'tok/s':>8}{'wall s':>8}")
    for r in results:
        print(f"{r['engine']:8}{r['start_s']:9.1f}{r['answers']:9d}{r['new_tokens']:8d}{r['generate_s']:8.1f}"
              f"{r['tokens_per_s']:8.0f}{r['wall_s']:8.1f}")
    same = sum(vllm["responses"][k][:40] == hf["responses"].get(k, "")[:40] for k in vllm["responses"])
    print(f"vLLM / HF: tokens/s {vllm['tokens_per_s'] / hf['tokens_per_s']:.2f}x, "
          f"wall {vllm['wall_s'] / hf['wall_s']:.2f}x; greedy answers with the same first 40 characters: "
          f"{same}/{len(vllm['responses'])}")


if __name__ == "__main__":
    main()
