"""Figures and tables from a sweep folder: finished, still running, or partly failed.

    python analyze_sweep.py --sweep logs/<sweep> [--out report/<sweep>] [--bootstrap 1000] [--seed 0]
    python analyze_sweep.py --sweep logs/<small> --sweep logs/<large> [...] --out report/<name>   # compare sweeps

Reads only what the sweep left on disk: the planned configs in <sweep>/configs/, each run's config.yaml, run.json
and metrics.jsonl, and the judge's verdict files and summaries in <sweep>/judgments/. Never imports torch or vLLM.
Writes <out>/README.md (the report), summary.csv, summary.md and figures/*.png + *.pdf, and says which runs are
missing or incomplete (it plots the rest).

With several --sweep (the small proxy first) it compares them instead: a β-stability map per model, win rate against
β per model on one figure, and per β whether the small model's verdicts held for the larger ones.

Statistics (stats.py, the module judge.py computes its summaries with): win rates with a percentile bootstrap over
pairs; a length-controlled win rate in the manner of AlpacaEval 2 (Dubois et al. 2024); a Bradley-Terry ranking of
SFT and every DPO run with bootstrap intervals, as Arena-Hard-Auto computes it (Li et al. 2024). Every fit is
statsmodels' GLM.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import yaml
from scipy.stats import binomtest

matplotlib.use("Agg")  # figures go to files: no display, and the backend is chosen before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402


import objectives
from config import UserInputError
from costs import job_costs, run_costs, stage_costs, unit
from jsonl import read_jsonl, summary_path
from stats import (SCORE, DEGENERATE_BELOW, STYLE_FEATURES, bootstrap_ci, bradley_terry, combine, debiased_preference,
                   first_position_rate as rate_of_position_a, is_degenerate, lc_win_rate,
                   order_consistency, placed_judgments, power_plan, soft_score, style_differences, unswap)

NOT_RUNS = {"configs", "code", "generations", "judgments", "submitit", "ref_cache", "replaced"}
# (metrics.jsonl key, axis label with unit); rewards are beta * log(pi/pi_ref) summed over the response, in nats
CURVES = [("loss", "loss (nats)"), ("rewards/margins", "reward margin (nats)"),
          ("rewards/accuracies", "reward accuracy"), ("rewards/chosen", "chosen reward (nats)"),
          ("rewards/rejected", "rejected reward (nats)"), ("kl", "KL estimate (nats/token)")]
FINITE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl",
               "grad_norm", "logps/chosen", "logps/rejected")
COLUMN_WIDTH_IN, TEXT_WIDTH_IN = 3.4, 7.0


class AnalysisError(UserInputError):
    pass


# ---------------------------------------------------------------- reading the sweep


@dataclass
class Run:
    name: str
    folder: Path
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    status: str = "missing"
    problems: list[str] = field(default_factory=list)     # files that could not be read, with why
    non_finite: list[str] = field(default_factory=list)   # "step 7 (train): loss=None" for every non-finite value
    flags: dict[str, str] = field(default_factory=dict)   # flag -> what was seen
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # the last eval's per-pair rows (eval_pairs.jsonl)

    @property
    def kind(self) -> str:
        return "sft" if self.config.get("loss", {}).get("name") == "sft" or self.name == "sft" else "dpo"

    @property
    def beta(self) -> float | None:
        """None for SFT, and for a run whose config could not be read (it is tabled, never plotted against beta)."""
        return self.config.get("loss", {}).get("beta") if self.kind == "dpo" else None

    @property
    def seed(self) -> int | None:
        return self.config.get("train", {}).get("seed")

    @property
    def loss_type(self) -> str:
        """The objective with its non-default options (objectives.describe): runs pool as seeds only within one."""
        if self.kind == "sft":
            return "sft"
        return objectives.describe(self.config["loss"]) if isinstance(self.config.get("loss"), dict) else "?"

    @property
    def max_steps(self) -> int | None:
        return self.info.get("max_steps") or self.config.get("train", {}).get("max_steps")

    def rows(self, split: str) -> pd.DataFrame:
        if self.metrics.empty:
            return self.metrics
        return self.metrics[self.metrics["split"] == split].sort_values("step")

    @property
    def last_step(self) -> int:
        train = self.rows("train")
        return int(train["step"].max()) if not train.empty else 0

    def final_eval(self) -> dict:
        """The last eval row: at the final step for a finished run, the latest so far for a running one."""
        ev = self.rows("eval")
        return {} if ev.empty else ev.iloc[-1].dropna().to_dict()


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AnalysisError(f"{path}: not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected a mapping of config sections, found {type(data).__name__}")
    return data


def read_run_config(path: Path) -> dict:
    """A run's resolved config.yaml, checked for what the analysis reads from it."""
    data = read_yaml(path)
    for section in ("model", "data", "tokenize", "loss", "train", "lora"):
        if not isinstance(data.setdefault(section, {}), dict):
            raise AnalysisError(f"{path}: '{section}' should be a mapping, found {data[section]!r}")
    for section, key in (("loss", "beta"), ("train", "seed"), ("train", "max_steps")):
        value = data[section].get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise AnalysisError(f"{path}: {section}.{key} should be a number, found {value!r}")
    return data


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AnalysisError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_lines(path: Path) -> list:
    """jsonl.read_jsonl with every failure named by file (and line, where JSON is at fault)."""
    try:
        return read_jsonl(path)
    except ValueError as e:  # UnicodeDecodeError included
        raise AnalysisError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    except OSError as e:
        raise AnalysisError(f"{path}: {e.strerror or e}") from None


def read_metrics(path: Path, run: Run) -> pd.DataFrame:
    """metrics.jsonl as a frame, one row per (split, step): a resumed run re-logs the steps after its checkpoint,
    and the later row wins. Non-finite values (written as null by jsonl.append_jsonl) are noted on the run."""
    rows, bad = [], {}
    for i, row in enumerate(read_lines(path), 1):
        if not isinstance(row, dict) or row.get("split") not in ("train", "eval") or not isinstance(row.get("step"), int):
            raise AnalysisError(f"{path}: line {i} is not a metrics row (needs an integer 'step' and 'split' "
                                f"train/eval): {json.dumps(row)[:120]}")
        bad[(row["split"], row["step"])] = [  # a resumed run re-logs a step: only its later row counts
            f"step {row['step']} ({row['split']}): {key}={row[key]}" for key in FINITE_KEYS
            if key in row and not (isinstance(row[key], (int, float)) and math.isfinite(row[key]))]
        rows.append(row)
    run.non_finite = [text for (_, _), texts in sorted(bad.items(), key=lambda kv: kv[0][1]) for text in texts]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    for key in frame.columns.drop("split"):
        frame[key] = pd.to_numeric(frame[key], errors="coerce")
    return frame.drop_duplicates(["split", "step"], keep="last").sort_values(["split", "step"]).reset_index(drop=True)


def load_runs(sweep: Path) -> list[Run]:
    """Every run the sweep planned (<sweep>/configs/<run>.yaml) or started (a folder with config.yaml, run.json or
    metrics.jsonl). A file that cannot be read is named on its run, which is reported, not dropped."""
    planned = {p.stem for p in (sweep / "configs").glob("*.yaml")
               if p.stem != "heldout" and not p.stem.startswith("reference-")}
    started = {d.name for d in sweep.iterdir() if d.is_dir() and d.name not in NOT_RUNS
               and any((d / f).is_file() for f in ("config.yaml", "run.json", "metrics.jsonl"))}
    runs = []
    for name in planned | started:
        run = Run(name, sweep / name)
        for path in (run.folder / "config.yaml", sweep / "configs" / f"{name}.yaml"):
            if path.is_file():
                try:
                    run.config = read_run_config(path)
                    break
                except AnalysisError as e:
                    run.problems.append(str(e))
        if not run.config and not run.problems:
            run.problems.append(f"{run.folder}: no config.yaml (and no {sweep / 'configs' / name}.yaml): "
                                f"β, seed and loss type unknown")
        if (run.folder / "run.json").is_file():
            try:
                run.info = read_json(run.folder / "run.json")
                run.status = str(run.info.get("status", "unknown"))
            except AnalysisError as e:
                run.problems.append(str(e))
                run.status = "unreadable"
        elif name in started:
            run.status = "not started"
        try:
            run.metrics = read_metrics(run.folder / "metrics.jsonl", run)
        except AnalysisError as e:
            run.problems.append(str(e))
            run.status = "unreadable" if run.status in ("missing", "not started") else run.status
        if run.status == "not started" and not run.metrics.empty:
            run.status = "running"
        run.pairs = read_eval_pairs(run.folder / "eval_pairs.jsonl", run)
        runs.append(run)
    return sorted(runs, key=lambda r: (r.kind != "sft", r.loss_type, r.beta or 0.0, r.seed or 0, r.name))


def read_eval_pairs(path: Path, run: Run) -> pd.DataFrame:
    """The last eval's rows of eval_pairs.jsonl (one per held-out pair; the last row wins for a repeated pair)."""
    if not path.is_file():
        return pd.DataFrame()
    try:
        rows = pd.DataFrame(read_lines(path))
    except AnalysisError as e:
        run.problems.append(str(e))
        return pd.DataFrame()
    if rows.empty or not {"step", "pair_id"} <= set(rows.columns):
        run.problems.append(f"{path}: no step/pair_id columns")
        return pd.DataFrame()
    last = rows[rows["step"] == rows["step"].max()]
    return last.drop_duplicates("pair_id", keep="last").set_index("pair_id")


# ---------------------------------------------------------------- significance


def significance(run: Run, seed: int, n_boot: int, alpha: float = 0.05) -> dict:
    """Is the final held-out effect distinguishable from chance? Reward accuracy against 0.5 by a two-sided exact
    binomial test (its Clopper-Pearson 95% CI excludes 0.5 exactly when p < 0.05; the accuracy-0.5 flag uses the
    same test), the reward margin by a percentile bootstrap over pairs (CI excluding 0).
    From eval_pairs.jsonl; without it (older runs) the accuracy test alone, from the mean and the pair count."""
    final = run.final_eval()
    if run.kind != "dpo" or "rewards/accuracies" not in final:
        return {}
    pairs = run.pairs if "correct" in run.pairs else pd.DataFrame()
    n = len(pairs) if not pairs.empty else eval_pairs(run)
    if not n:
        return {}
    correct = int(pairs["correct"].sum()) if not pairs.empty else round(final["rewards/accuracies"] * n)
    test = binomtest(correct, n, 0.5)
    ci = test.proportion_ci(0.95)
    out = {"eval_pairs": n, "eval_correct": correct, "eval_accuracy_p": float(test.pvalue),
           "eval_accuracy_ci_low": float(ci.low), "eval_accuracy_ci_high": float(ci.high)}
    if not pairs.empty:
        margin_ci = bootstrap_ci(pairs["margin"].dropna(), seed, n=n_boot) or [None, None]
        out.update(eval_margin_ci_low=margin_ci[0], eval_margin_ci_high=margin_ci[1])
    effects = (["accuracy"] if out["eval_accuracy_p"] < alpha else []) + (
        ["margin"] if out.get("eval_margin_ci_low") is not None and (out["eval_margin_ci_low"] > 0 or
                                                                     out["eval_margin_ci_high"] < 0) else [])
    out["significant"] = "+".join(effects) or "no"
    return out


def paired_differences(runs: list[Run], seed: int, n_boot: int) -> pd.DataFrame:
    """Between DPO runs of one loss type and seed (so: between β) evaluated on the same held-out pairs: the
    difference in reward accuracy and in the log-ratio margin (margin / β, comparable across β for the summed-log-prob
    losses), each with a paired bootstrap 95% CI over pairs (no correction for the number of comparisons)."""
    dpo = [r for r in runs if r.kind == "dpo" and "correct" in r.pairs and r.beta]
    rows = []
    for i, a in enumerate(dpo):
        for b in dpo[i + 1:]:
            if (a.loss_type, a.seed) != (b.loss_type, b.seed):
                continue
            common = a.pairs.dropna(subset=["margin"]).index.intersection(b.pairs.dropna(subset=["margin"]).index)
            if len(common) < 10:
                continue
            pa, pb = a.pairs.loc[common], b.pairs.loc[common]
            d_acc = pa["correct"].astype(float).values - pb["correct"].astype(float).values
            d_margin = (pa["margin"] / a.beta).values - (pb["margin"] / b.beta).values
            acc_ci, margin_ci = bootstrap_ci(d_acc, seed, n=n_boot), bootstrap_ci(d_margin, seed, n=n_boot)
            rows.append({"run_a": a.name, "run_b": b.name, "pairs": len(common),
                         "accuracy_diff": float(d_acc.mean()), "accuracy_diff_ci_low": acc_ci[0],
                         "accuracy_diff_ci_high": acc_ci[1], "logratio_margin_diff": float(d_margin.mean()),
                         "logratio_margin_diff_ci_low": margin_ci[0], "logratio_margin_diff_ci_high": margin_ci[1]})
    return pd.DataFrame(rows)


def effect_statements(table: pd.DataFrame, paired: pd.DataFrame) -> list[str]:
    """The "read this first" lines about training: which held-out effects are distinguishable from chance."""
    dpo = table[(table["loss"] != "sft") & table["eval_pairs"].notna()] if "eval_pairs" in table else table.iloc[0:0]
    if dpo.empty:
        return []
    out = []
    yes = dpo[dpo["significant"] != "no"]
    no = dpo[dpo["significant"] == "no"]
    def margin_text(r) -> str:
        if pd.isna(r.get("eval_margin_ci_low")):
            return ""
        return f", margin {r['eval_margin']:+.3f} [{r['eval_margin_ci_low']:+.3f}, {r['eval_margin_ci_high']:+.3f}]"
    for _, r in yes.iterrows():
        out.append(f"**{r['run']}: a real DPO effect on {int(r['eval_pairs'])} held-out pairs**: reward accuracy "
                   f"{r['eval_accuracy']:.3f} [{r['eval_accuracy_ci_low']:.3f}, {r['eval_accuracy_ci_high']:.3f}] "
                   f"(exact binomial p = {r['eval_accuracy_p']:.2g}){margin_text(r)}; significant at 95%: "
                   f"{r['significant'].replace('+', ' and ')}.")
    for _, r in no.iterrows():
        out.append(f"{r['run']}: not distinguishable from chance on {int(r['eval_pairs'])} held-out pairs (accuracy "
                   f"{r['eval_accuracy']:.3f}, p = {r['eval_accuracy_p']:.2g}{margin_text(r)}).")
    if not paired.empty:
        clear = paired[(paired["accuracy_diff_ci_low"] > 0) | (paired["accuracy_diff_ci_high"] < 0)]
        if clear.empty:
            out.append(f"Between β values (same loss type and seed) no accuracy difference is significant (paired "
                       f"bootstrap over the same "
                       f"{int(paired['pairs'].min())} pairs; differences {paired['accuracy_diff'].min():+.3f} to "
                       f"{paired['accuracy_diff'].max():+.3f}): the β effect on accuracy is smaller than this eval "
                       f"can see.")
        else:
            out += [f"{r['run_a']} vs {r['run_b']}: accuracy differs by {r['accuracy_diff']:+.3f} "
                    f"[{r['accuracy_diff_ci_low']:+.3f}, {r['accuracy_diff_ci_high']:+.3f}] (paired)."
                    for _, r in clear.iterrows()]
        moved = paired[(paired["logratio_margin_diff_ci_low"] > 0) | (paired["logratio_margin_diff_ci_high"] < 0)]
        out += [f"β moves the margin: {r['run_a']} vs {r['run_b']} differ in log-ratio margin (margin / β) by "
                f"{r['logratio_margin_diff']:+.3f} [{r['logratio_margin_diff_ci_low']:+.3f}, "
                f"{r['logratio_margin_diff_ci_high']:+.3f}] nats (paired)." for _, r in moved.iterrows()]
    wr = table[table["win_rate"].notna() & table["win_rate_ci_low"].notna()] if "win_rate" in table else table.iloc[0:0]
    if not wr.empty:
        sig = wr[(wr["win_rate_ci_low"] > 0.5) | (wr["win_rate_ci_high"] < 0.5)]
        out.append("Win rates against SFT: " + (", ".join(f"{r['run']} {100 * r['win_rate']:.1f}%" for _, r in
                                                          sig.iterrows()) + " differ from 50% at 95%; "
                                                 if not sig.empty else "none differs from 50% at 95%; ")
                   + f"{len(wr) - len(sig)} of {len(wr)} include 50% in their CI.")
    soft = table[table["debiased_ci_low"].notna()] if "debiased_ci_low" in table else table.iloc[0:0]
    if not soft.empty:
        apart = soft[(soft["debiased_ci_low"] > 0.5) | (soft["debiased_ci_high"] < 0.5)]
        out.append("Position-debiased win rates (the judge's probabilities, both orders averaged): " + (
            ", ".join(f"{r['run']} {100 * r['debiased_win_rate']:.1f}% [{100 * r['debiased_ci_low']:.1f}, "
                      f"{100 * r['debiased_ci_high']:.1f}]" for _, r in apart.iterrows())
            + " exclude 50%: with position taken out the judge leans "
            + ("toward" if (apart["debiased_win_rate"] > 0.5).all() else "away from" if
               (apart["debiased_win_rate"] < 0.5).all() else "one way or the other for") + " these runs' answers, "
            f"by {100 * (apart['debiased_win_rate'] - 0.5).abs().max():.1f} points of probability at most (a lean, "
            f"not a win rate; it means what the judge's agreement with humans says it means)." if not apart.empty else
            f"all {len(soft)} include 50%."))
    return out


# ---------------------------------------------------------------- stability flags


def stability_flags(run: Run, collapse_margin: float, alpha: float = 0.05) -> dict[str, str]:
    """What went wrong in training, seen from the metrics alone:
    non-finite      a NaN/inf in the metrics, or training stopped on one (train_dpo.py exits 3);
    margin-collapse the reward margin ends below -collapse_margin (both rewards sinking, rejected faster: the policy
                    now prefers the rejected answers, as GPT-2 did at beta >= 0.1 in the seed runs);
    accuracy-0.5    no eval of the run tells its reward accuracy from a coin flip (binomial test, alpha 0.05);
    eval-loss-rising the eval loss rose from its minimum while the train loss kept falling (overfitting; SFT too).
    The first two and the last look at any run; margins and accuracies exist for DPO runs only."""
    flags = {}
    error = str(run.info.get("error", ""))
    if run.non_finite or (run.status == "failed" and ("nan" in error.lower() or "inf" in error.lower())):
        flags["non-finite"] = "; ".join(run.non_finite[:3]) or error
    if run.metrics.empty:
        return flags
    train, ev = run.rows("train"), run.rows("eval")
    window = max(1, len(train) // 10)
    ev_loss = ev["loss"].dropna() if "loss" in ev else pd.Series(dtype=float)
    if len(ev_loss) >= 2 and "loss" in train:
        at_min = int(ev_loss.values.argmin())
        rise = ev_loss.iloc[-1] - ev_loss.iloc[at_min]
        step_min = int(ev.loc[ev_loss.index[at_min], "step"])
        before = train[train["step"] <= step_min]["loss"].dropna().tail(window).mean()
        after = train["loss"].dropna().tail(window).mean()
        if rise > max(0.005, 0.01 * abs(ev_loss.iloc[at_min])) and after < before:
            flags["eval-loss-rising"] = (f"eval loss +{rise:.3g} since step {step_min} while train loss fell "
                                         f"{before - after:.3g}")
    if run.kind != "dpo":
        return flags
    margins = [("train", train["rewards/margins"].dropna().tail(window).mean())] if "rewards/margins" in train else []
    if "rewards/margins" in ev and ev["rewards/margins"].notna().any():
        margins.append(("eval", ev["rewards/margins"].dropna().iloc[-1]))
    low = [(split, m) for split, m in margins if m < -collapse_margin]
    if low:
        flags["margin-collapse"] = ", ".join(f"{split} margin {m:.3g}" for split, m in low) + \
            f" < -{collapse_margin:g} at step {run.last_step}"
    n_eval = eval_pairs(run)
    accuracies = ev["rewards/accuracies"].dropna() if "rewards/accuracies" in ev else pd.Series(dtype=float)
    if n_eval and not accuracies.empty:
        p_values = [binomtest(round(a * n_eval), n_eval, 0.5).pvalue for a in accuracies]
        if min(p_values) >= alpha:
            flags["accuracy-0.5"] = (f"eval accuracy {accuracies.iloc[-1]:.3f} on {n_eval} pairs "
                                     f"(binomial p={p_values[-1]:.2f}; no eval separated from chance)")
    return flags


def eval_pairs(run: Run) -> int:
    n = run.info.get("eval_pairs") or 0
    cap = run.config.get("train", {}).get("max_eval_pairs") or 0
    return min(n, cap) if cap else n


# ---------------------------------------------------------------- verdicts


@dataclass
class Comparison:
    """One DPO run's answers judged against the baseline's: one row per pair with its outcome."""
    run: str
    baseline: str
    pairs: pd.DataFrame         # pair_id, prompt_set, winner, score, candidate_chars, baseline_chars
    judgments: pd.DataFrame     # one row per judgment asked: candidate_position, verdict, winner
    summary: dict | None
    state: str                  # complete | partial (judging still running, or no summary)


VERDICTS = {"A", "B", "tie", "error"}


def read_verdicts(path: Path) -> list[dict]:
    """Every compare row of a judge.py verdict file, checked; a malformed row is an error naming its line."""
    rows = []
    for i, row in enumerate(read_lines(path), 1):
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            raise AnalysisError(f"{path}: line {i} is not a judge.py verdict row (no 'key')")
        if row.get("task", "compare") != "compare":
            continue
        if not isinstance(row.get("pair_id"), str) or row.get("verdict") not in VERDICTS \
                or row.get("candidate_position") not in ("A", "B"):
            raise AnalysisError(f"{path}: line {i} needs 'pair_id', 'verdict' (A/B/tie/error) and "
                                f"'candidate_position' (A/B): {json.dumps(row)[:160]}")
        rows.append(row)
    return rows


def load_comparison(path: Path) -> Comparison:
    """The comparison judge.py summarised: the verdict rows its summary's judged_pairs names (newest row per key),
    each verdict unswapped with the position the summary gives. Without a summary, or with one older than the
    verdict file (judging again, still running), or from a judge.py that did not list its pairs, every pair of the
    newest judge/template/answers in the file, from each row's own position: partial."""
    rows = read_verdicts(path)
    by_key = {r["key"]: r for r in rows}
    summary_file = summary_path(path)
    summary = read_json(summary_file) if summary_file.is_file() else None
    current = summary is not None and summary_file.stat().st_mtime >= path.stat().st_mtime
    placed = (summary or {}).get("judged_pairs")
    readable = isinstance(placed, dict) and all(  # [[position, key], ...] per pair; older judge.py wrote none
        isinstance(entries, list) and all(isinstance(e, list) and len(e) == 2 and e[0] in ("A", "B") for e in entries)
        for entries in placed.values())
    if current and readable:
        groups = {pid: placed_judgments(entries, by_key, summary.get("panel_combine"))
                  for pid, entries in placed.items()}
        state = "complete"
    else:
        ident = ("judge_fingerprint", "template_version", "mode", "candidate_sampling_hash", "baseline_sampling_hash")
        newest = max(rows, key=lambda r: str(r.get("timestamp") or ""), default={})
        latest = {(r["pair_id"], r["key"]): r for r in rows if all(r.get(k) == newest.get(k) for k in ident)}
        groups = {}
        for (pid, _), r in latest.items():
            groups.setdefault(pid, []).append({**r, "winner": unswap(r["verdict"], r["candidate_position"])})
        state = "partial"
    pairs, judgments = [], []
    for pid, placed_rows in groups.items():
        winner = combine([r["winner"] if r else "error" for r in placed_rows])
        first = next((r for r in placed_rows if r), {})
        candidate, baseline = _answers(first)
        pairs.append({"pair_id": pid, "prompt_set": pid.split("/")[0], "winner": winner, "score": SCORE.get(winner),
                      "weighted": soft_score(placed_rows[0], placed_rows[0]["candidate_position"])
                      if placed_rows and placed_rows[0] else None,
                      "debiased": debiased_preference({r["candidate_position"]: r for r in placed_rows if r})
                      if len(placed_rows) == 2 else None,
                      "candidate_chars": first.get("candidate_chars"), "baseline_chars": first.get("baseline_chars"),
                      **style_differences(candidate, baseline)})
        judgments += [{"pair_id": pid, "candidate_position": r["candidate_position"], "verdict": r["verdict"],
                       "winner": r["winner"], "asked": not r.get("identical_answers")} for r in placed_rows if r]
    baseline = ((summary or {}).get("baseline") or {}).get("model_name") or (rows[0].get("baseline_model") if rows
                                                                              else None) or "sft"
    return Comparison(path.stem, baseline,
                      pd.DataFrame(pairs, columns=["pair_id", "prompt_set", "winner", "score", "weighted", "debiased",
                                                   "candidate_chars", "baseline_chars", *STYLE_FEATURES]),
                      pd.DataFrame(judgments, columns=["pair_id", "candidate_position", "verdict", "winner", "asked"]),
                      summary, state)


def _answers(row: dict) -> tuple[str, str]:
    """(candidate's answer, baseline's answer) of a verdict row (a panel's judgment carries no text: ''); a
    judgment's answers stand in A and B by its candidate_position."""
    a, b = str(row.get("answer_a") or ""), str(row.get("answer_b") or "")
    return (a, b) if row.get("candidate_position", "A") == "A" else (b, a)


def load_comparisons(sweep: Path, problems: list[str]) -> dict[str, Comparison]:
    """Every judged run; a verdict or summary file that cannot be read is named in problems and left out."""
    folder = sweep / "judgments"
    found = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if path.stem == "calibration":
            continue
        try:
            found[path.stem] = load_comparison(path)
        except AnalysisError as e:
            problems.append(str(e))
    return found


def load_generations(sweep: Path, comparisons: dict[str, Comparison], problems: list[str]) -> dict[str, dict]:
    """Per model: how many answers, their mean length in new tokens and the share cut off at max_new_tokens, for the
    sampling settings its comparison judged (else the newest settings in the file)."""
    judged_hash = {}
    for c in comparisons.values():
        for side in ("candidate", "baseline"):
            info = (c.summary or {}).get(side) or {}
            if isinstance(info, dict) and info.get("model_name") and info.get("sampling_hash"):
                judged_hash[info["model_name"]] = info["sampling_hash"]
    found = {}
    for path in sorted((sweep / "generations").glob("*.jsonl")) if (sweep / "generations").is_dir() else []:
        try:
            rows = [r for r in read_lines(path) if isinstance(r, dict) and "sampling_hash" in r]
        except AnalysisError as e:
            problems.append(str(e))
            continue
        if not rows:
            continue
        wanted = judged_hash.get(path.stem) or max(rows, key=lambda r: str(r.get("timestamp") or ""))["sampling_hash"]
        rows = list({r.get("key"): r for r in rows if r["sampling_hash"] == wanted}.values())
        tokens = [r["new_tokens"] for r in rows if isinstance(r.get("new_tokens"), (int, float))]
        found[path.stem] = {"answers": len(rows), "mean_new_tokens": float(np.mean(tokens)) if tokens else None,
                            "hit_max_tokens": float(np.mean([r.get("finish_reason") == "length" for r in rows])),
                            "degenerate": float(np.mean([is_degenerate(str(r.get("response", ""))) for r in rows]))}
    return found


# ---------------------------------------------------------------- statistics


def first_position_rate(judgments: pd.DataFrame) -> float | None:
    """Share of the asked judgments (not identical answers tied without a call) that chose position A."""
    return rate_of_position_a(judgments.loc[judgments["asked"], "verdict"])


def consistency(judgments: pd.DataFrame) -> float | None:
    """Share of pairs judged in both orders (and asked both times) whose two verdicts name the same winner."""
    asked = judgments[judgments["asked"] & (judgments["winner"] != "error")]
    both = asked.groupby("pair_id").filter(lambda g: g["candidate_position"].nunique() == 2)
    return order_consistency([list(g) for _, g in both.groupby("pair_id")["winner"]])


# ---------------------------------------------------------------- the table


def summarise(runs: list[Run], comparisons: dict[str, Comparison], generations: dict[str, dict], seed: int,
              n_boot: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per run (the summary table) and the Bradley-Terry ranking over every judged comparison."""
    battles = pd.concat([pd.DataFrame({"model_a": c.run, "model_b": c.baseline, "score": c.pairs["score"],
                                       **{f: c.pairs[f] for f in STYLE_FEATURES}})
                         for c in comparisons.values() if not c.pairs.empty] or [pd.DataFrame()], ignore_index=True)
    battles = battles.dropna() if not battles.empty else battles
    anchor = next(iter(comparisons.values())).baseline if comparisons else "sft"
    ranking = pd.DataFrame()
    if not battles.empty:  # plain Bradley-Terry and, beside it, with style control (Arena-Hard-Auto's two boards)
        ranking = bradley_terry(battles, anchor, seed, n_boot)
        styled = bradley_terry(battles, anchor, seed, n_boot, style=STYLE_FEATURES)
        ranking = ranking.merge(styled[["model", "score", "ci_low", "ci_high"]].rename(
            columns={"score": "sc_score", "ci_low": "sc_ci_low", "ci_high": "sc_ci_high"}), on="model")
        ranking.attrs["style"] = styled.attrs["style"]
    bt = ranking.set_index("model") if not ranking.empty else pd.DataFrame()
    rows = []
    for run in runs:
        final = run.final_eval()
        row = {"run": run.name, "loss": run.loss_type, "beta": run.beta, "seed": run.seed, "status": run.status,
               "flags": ", ".join(run.flags) or "", "steps": run.last_step, "max_steps": run.max_steps,
               "eval_loss": final.get("loss"), "eval_accuracy": final.get("rewards/accuracies"),
               "eval_margin": final.get("rewards/margins"), "eval_kl": final.get("kl"), "eval_step": final.get("step")}
        row.update(significance(run, seed, n_boot))
        row.update(generations.get(run.name, {}))
        c = comparisons.get(run.name)
        if c is not None and not c.pairs.empty:
            scored = c.pairs.dropna(subset=["score"])
            ci = bootstrap_ci(scored["score"], seed) or [None, None]
            lc = lc_win_rate(scored["score"], scored["candidate_chars"], scored["baseline_chars"], seed, n_boot)
            soft = {}
            for column in ("weighted", "debiased"):
                values = c.pairs[column].dropna().astype(float)
                ci_soft = bootstrap_ci(values, seed) or [None, None]
                soft.update({f"{column}_win_rate": float(values.mean()) if len(values) else None,
                             f"{column}_ci_low": ci_soft[0], f"{column}_ci_high": ci_soft[1]})
            plan = power_plan(scored["score"])
            row.update(soft, power_sd=plan["sd"], power_sd_source=plan["sd_source"], detectable=plan["detectable"],
                       prompts_needed=plan["needed"])
            debiased = c.pairs["debiased"].dropna().astype(float)
            if len(debiased) > 1:
                soft_plan = power_plan(debiased)
                row.update(debiased_sd=soft_plan["sd"], debiased_detectable=soft_plan["detectable"])
            row.update(judged=len(c.pairs), judge_errors=int((c.pairs["winner"] == "error").sum()),
                       judging=c.state, win_rate=float(scored["score"].mean()) if len(scored) else None,
                       win_rate_ci_low=ci[0], win_rate_ci_high=ci[1], lc_win_rate=lc["lc_win_rate"],
                       lc_ci_low=(lc["lc_ci"] or [None])[0], lc_ci_high=(lc["lc_ci"] or [None, None])[1],
                       length_coef=lc["phi"], lc_note=lc["note"], first_position_rate=first_position_rate(c.judgments),
                       consistency=consistency(c.judgments),
                       mean_chars_candidate=float(c.pairs["candidate_chars"].mean()),
                       mean_chars_baseline=float(c.pairs["baseline_chars"].mean()))
        name = run.name if run.name in bt.index else None
        if name:
            row.update(bt_score=bt.loc[name, "score"], bt_ci_low=bt.loc[name, "ci_low"], bt_ci_high=bt.loc[name, "ci_high"],
                       bt_sc_score=bt.loc[name, "sc_score"], bt_sc_ci_low=bt.loc[name, "sc_ci_low"],
                       bt_sc_ci_high=bt.loc[name, "sc_ci_high"])
        rows.append(row)
    columns = ["run", "loss", "beta", "seed", "status", "flags", "steps", "max_steps", "eval_step", "eval_loss",
               "eval_accuracy", "eval_margin", "eval_kl", "judged", "judge_errors", "judging", "win_rate",
               "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate", "lc_ci_low", "lc_ci_high", "length_coef", "lc_note",
               "bt_score", "bt_ci_low", "bt_ci_high", "weighted_win_rate", "weighted_ci_low", "weighted_ci_high",
               "debiased_win_rate", "debiased_ci_low", "debiased_ci_high", "bt_sc_score", "bt_sc_ci_low",
               "bt_sc_ci_high", "detectable", "prompts_needed", "power_sd", "power_sd_source", "debiased_sd",
               "debiased_detectable",
               "first_position_rate", "consistency", "mean_chars_candidate",
               "mean_chars_baseline", "answers", "mean_new_tokens", "hit_max_tokens",
               "eval_pairs", "eval_correct", "eval_accuracy_p", "eval_accuracy_ci_low", "eval_accuracy_ci_high",
               "eval_margin_ci_low", "eval_margin_ci_high", "significant", "degenerate"]
    return pd.DataFrame(rows).reindex(columns=columns), ranking


SEED_METRICS = [("eval_accuracy", "eval reward accuracy", 3), ("eval_margin", "eval reward margin", 4),
                ("eval_kl", "eval KL", 4), ("win_rate", "win rate", 3), ("debiased_win_rate", "debiased win rate", 3)]


def beta_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (objective, β): how many seeds, and per metric the mean over them, their standard deviation and
    their range (min, max), from the per-run table."""
    dpo = table[(table["loss"] != "sft") & table["beta"].notna()]
    rows = []
    for (loss, beta), group in dpo.groupby(["loss", "beta"]):
        row = {"loss": loss, "beta": beta, "seeds": len(group)}
        for column, _, _ in SEED_METRICS:
            values = group[column].dropna().astype(float) if column in group else pd.Series(dtype=float)
            row.update({f"{column}_mean": values.mean() if len(values) else None,
                        f"{column}_sd": values.std(ddof=1) if len(values) > 1 else None,
                        f"{column}_min": values.min() if len(values) else None,
                        f"{column}_max": values.max() if len(values) else None})
        rows.append(row)
    return pd.DataFrame(rows)


def seed_statements(by_beta: pd.DataFrame) -> list[str]:
    """Per objective and metric: when the differences between β (the range of the β means) are smaller than the
    spread over seeds (the widest range among the β), this sweep cannot tell a β effect from seed noise."""
    out = []
    if by_beta.empty or by_beta["seeds"].max() < 2:
        return out
    for loss, group in by_beta.groupby("loss"):
        if len(group) < 2 or group["seeds"].max() < 2:
            continue
        for column, label, digits in SEED_METRICS:
            means = group[f"{column}_mean"].dropna()
            spread = (group[f"{column}_max"] - group[f"{column}_min"])[group["seeds"] > 1].dropna()
            if len(means) < 2 or spread.empty:
                continue
            effect, noise = float(means.max() - means.min()), float(spread.max())
            if effect < noise:
                out.append(f"{loss}: the β effect on the {label} (β means {means.min():.{digits}f}–"
                           f"{means.max():.{digits}f}, a range of {effect:.{digits}f}) is smaller than the spread over "
                           f"seeds ({noise:.{digits}f} within one β): seeds, not β, may explain it.")
    return out


def beta_markdown(by_beta: pd.DataFrame) -> list[str]:
    if by_beta.empty or by_beta["seeds"].max() < 2:
        return []
    head = ["objective", "β", "seeds"] + [label for _, label, _ in SEED_METRICS]
    lines = ["", "### Per β over seeds", "", "Mean ± standard deviation [min, max] over the seeds of each β:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in by_beta.itertuples():
        cells = [r.loss, f"{r.beta:g}", str(r.seeds)]
        for column, _, digits in SEED_METRICS:
            mean, sd = getattr(r, f"{column}_mean"), getattr(r, f"{column}_sd")
            if mean is None or pd.isna(mean):
                cells.append("–")
                continue
            text = f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None and pd.notna(sd) else "")
            lo, hi = getattr(r, f"{column}_min"), getattr(r, f"{column}_max")
            cells.append(text + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if r.seeds > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


BEST = [("eval_accuracy", "highest eval reward accuracy", max), ("eval_margin", "largest eval reward margin", max),
        ("eval_kl", "smallest KL from the reference", min), ("win_rate", "highest win rate vs SFT", max),
        ("debiased_win_rate", "highest position-debiased win rate", max),
        ("lc_win_rate", "highest length-controlled win rate", max), ("bt_score", "highest Bradley-Terry score", max),
        ("bt_sc_score", "highest style-controlled Bradley-Terry score", max)]


def power_between(comparisons: dict[str, Comparison]) -> pd.DataFrame:
    """How many prompts tell two runs apart: the paired design (the same prompts for every run), from the spread of
    the per-prompt differences of their scores against the same baseline (stats.power_plan)."""
    rows = []
    scored = {name: c.pairs.dropna(subset=["score"]).set_index("pair_id")["score"] for name, c in comparisons.items()
              if not c.pairs.empty}
    names = sorted(scored)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = scored[a].index.intersection(scored[b].index)
            plan = power_plan(scored[a][shared] - scored[b][shared], null=0.0, worst_sd=1.0)
            rows.append({"run_a": a, "run_b": b, "prompts": plan["n"], "difference": plan["effect"], "sd": plan["sd"],
                         "sd_source": plan["sd_source"], "detectable": plan["detectable"], "needed": plan["needed"]})
    return pd.DataFrame(rows, columns=["run_a", "run_b", "prompts", "difference", "sd", "sd_source", "detectable",
                                       "needed"])


def best_runs(table: pd.DataFrame) -> pd.DataFrame:
    """The best DPO run per criterion, among completed runs whose metrics are finite (other flags are shown beside
    it); every run level with the best (to 1e-9) is named."""
    dpo = table[(table["loss"] != "sft") & (table["status"] == "completed")
                & ~table["flags"].fillna("").str.contains("non-finite")]
    rows = []
    for column, criterion, pick in BEST:
        values = dpo.dropna(subset=[column])
        if values.empty:
            continue
        value = pick(values[column])
        top = values[np.isclose(values[column], value, rtol=1e-9, atol=1e-12)]  # a tie is not a winner
        rows.append({"criterion": criterion, "column": column, "run": ", ".join(top["run"]), "value": value,
                     "flags": "; ".join(sorted({f for f in top["flags"].fillna("") if f}))})
    return pd.DataFrame(rows, columns=["criterion", "column", "run", "value", "flags"])


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    def ci(row, point, lo, hi, pct=True):
        if pd.isna(row.get(point)):
            return "–"
        f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.0f}")
        return f"{f(row[point])} [{f(row[lo])}, {f(row[hi])}]" if pd.notna(row.get(lo)) else f(row[point])

    def with_ci(row, point, lo, hi, digits):
        if pd.isna(row.get(point)):
            return "–"
        return fmt(row[point], digits) + (f" [{fmt(row[lo], digits)}, {fmt(row[hi], digits)}]" if pd.notna(row.get(lo))
                                          else "")

    head = ["run", "loss", "β", "seed", "status", "flags", "steps", "eval loss", "eval acc [95% CI]", "p (acc = 0.5)",
            "eval margin [95% CI]", "eval KL",
            "win rate % [95% CI]", "debiased % [95% CI]", "weighted % [95% CI]", "LC win rate % [95% CI]",
            "BT score [95% CI]", "BT style-controlled [95% CI]", "judged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        steps = f"{r['steps']}/{int(r['max_steps'])}" if pd.notna(r["max_steps"]) else str(r["steps"])
        cells = [r["run"], r["loss"], fmt(r["beta"], 3) if pd.notna(r["beta"]) else "–",
                 str(int(r["seed"])) if pd.notna(r["seed"]) else "–", r["status"], r["flags"] or "–", steps,
                 fmt(r["eval_loss"], 4), with_ci(r, "eval_accuracy", "eval_accuracy_ci_low", "eval_accuracy_ci_high", 3),
                 f"{r['eval_accuracy_p']:.2g}" if pd.notna(r.get("eval_accuracy_p")) else "–",
                 with_ci(r, "eval_margin", "eval_margin_ci_low", "eval_margin_ci_high", 4), fmt(r["eval_kl"], 3),
                 ci(r, "win_rate", "win_rate_ci_low", "win_rate_ci_high"),
                 ci(r, "debiased_win_rate", "debiased_ci_low", "debiased_ci_high"),
                 ci(r, "weighted_win_rate", "weighted_ci_low", "weighted_ci_high"),
                 ci(r, "lc_win_rate", "lc_ci_low", "lc_ci_high"),
                 ci(r, "bt_score", "bt_ci_low", "bt_ci_high", pct=False),
                 ci(r, "bt_sc_score", "bt_sc_ci_low", "bt_sc_ci_high", pct=False),
                 (f"{int(r['judged'])}" + (f" ({int(r['judge_errors'])} errors)" if r["judge_errors"] else "")
                  + (" partial" if r["judging"] == "partial" else "")) if pd.notna(r["judged"]) else "–"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def best_markdown(best: pd.DataFrame) -> str:
    if best.empty:
        return "No DPO run has finite results yet."
    lines = ["| criterion | run | value | flags |", "|---|---|---|---|"]
    lines += [f"| {r.criterion} | {r.run} | {f'{r.value:.0f}' if r.column.startswith('bt_') else fmt(r.value, 4)} | "
              f"{r.flags or '–'} |" for r in best.itertuples()]
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


FIGURE_STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
                "ytick.labelsize": 7, "lines.linewidth": 1.2, "figure.dpi": 100, "savefig.bbox": "tight",
                "axes.spines.top": False, "axes.spines.right": False}


def beta_colours(runs: list[Run]) -> dict[float, tuple]:
    """One colour per beta, the same in every figure: viridis in beta order (small beta dark, large beta light)."""
    betas = sorted({r.beta for r in runs if r.beta is not None})
    cmap = matplotlib.colormaps["viridis"]
    return {b: cmap(0.8 * i / max(1, len(betas) - 1)) for i, b in enumerate(betas)}


LINESTYLES = ["-", "--", ":", "-."]


def save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def curves_figure(runs: list[Run], split: str, colours: dict, out: Path) -> list[Path]:
    """Per-step curves, one line per (loss type, beta): mean over seeds, band = min..max over seeds. Train rows are
    smoothed with a centred rolling mean (window in the title); eval rows are drawn as measured."""
    dpo = [r for r in runs if r.kind == "dpo" and r.beta is not None and not r.rows(split).empty]
    if not dpo:
        return []
    loss_types = sorted({r.loss_type for r in dpo})
    longest = max(len(r.rows(split)) for r in dpo)
    window = max(1, longest // 25) if split == "train" else 1
    fig, axes = plt.subplots(2, 3, figsize=(TEXT_WIDTH_IN, 4.2), sharex=True)
    for ax, (key, label) in zip(axes.flat, CURVES):
        for (loss, beta) in sorted({(r.loss_type, r.beta) for r in dpo}):
            group = [r for r in dpo if (r.loss_type, r.beta) == (loss, beta) and key in r.rows(split)]
            if not group:
                continue
            series = pd.concat([r.rows(split).set_index("step")[key].rolling(window, center=True, min_periods=1).mean()
                                .rename(r.name) for r in group], axis=1)
            flagged = any(r.flags for r in group)
            name = (f"{loss} " if len(loss_types) > 1 else "") + f"β={beta:g}" + (" (flagged)" if flagged else "")
            style = LINESTYLES[loss_types.index(loss) % len(LINESTYLES)]
            ax.plot(series.index, series.mean(axis=1), style, color=colours[beta], label=name,
                    marker="o" if split == "eval" else None, markersize=3)
            if series.shape[1] > 1:
                ax.fill_between(series.index, series.min(axis=1), series.max(axis=1), color=colours[beta], alpha=0.2,
                                linewidth=0)
            for r in group:
                if r.flags:  # where a flagged run stands at its last logged step
                    last = r.rows(split)[["step", key]].dropna().tail(1)
                    ax.plot(last["step"], last[key], "X", color=colours[beta], markersize=6, markeredgecolor="black",
                            markeredgewidth=0.5)
        if key == "rewards/accuracies":
            ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
        ax.set_ylabel(label)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    seeds = max(len([r for r in dpo if (r.loss_type, r.beta) == g]) for g in {(r.loss_type, r.beta) for r in dpo})
    fig.legend(handles, labels, loc="upper center", ncol=min(6, len(labels)), frameon=False, bbox_to_anchor=(0.5, 1.04))
    fig.suptitle(f"{split} metrics per step" + (f" (rolling mean over {window} steps)" if window > 1 else "")
                 + (f"; line = mean of up to {seeds} seeds, band = min–max" if seeds > 1 else "")
                 + "; X = flagged run", y=1.09)
    fig.tight_layout()
    return save(fig, out, f"curves_{split}")


def beta_axis(ax, betas) -> None:
    """A log beta axis labelled at the betas of the sweep, not at matplotlib's minor decades."""
    betas = sorted(set(betas))
    ax.set_xlim(betas[0] / 2, betas[0] * 2) if len(betas) == 1 else ax.set_xlim(betas[0] / 1.3, betas[-1] * 1.3)
    ax.set_xscale("log")  # after the limits: a panel with nothing drawn has none of its own to take a log of
    ax.set_xticks(betas, [f"{b:g}" for b in betas])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("β")


MARKERS = ["o", "^", "s", "D", "v", "P"]


def run_styles(dpo: pd.DataFrame) -> dict[str, tuple[str, float]]:
    """(marker, x factor) per run: one marker per loss type, and the runs of one beta (loss types, seeds) spread a
    little sideways on the log beta axis so no run hides behind another."""
    losses = sorted(dpo["loss"].unique())
    styles = {}
    for _, group in dpo.groupby("beta"):
        n = len(group)
        for i, (run, loss) in enumerate(group.sort_values(["loss", "seed"], na_position="last")[["run", "loss"]].values):
            styles[run] = (MARKERS[losses.index(loss) % len(MARKERS)], 1.0 if n == 1 else 0.88 + 0.24 * i / (n - 1))
    return styles


def _errors(point, low, high):
    """Error-bar lengths, never negative (a rounded interval can sit a hair inside its point)."""
    if pd.isna(low) or pd.isna(high):
        return None
    return [[max(0.0, point - low)], [max(0.0, high - point)]]


def _scatter(ax, x, y, colour, flagged, marker="o", yerr=None, label=None):
    kwargs = {"color": colour, "markersize": 5, "marker": marker, "linestyle": "none", "label": label,
              "markerfacecolor": "none" if flagged else colour, "markeredgecolor": colour}
    if yerr is not None:
        ax.errorbar([x], [y], yerr=yerr, capsize=2, elinewidth=0.8, **kwargs)
    else:
        ax.plot([x], [y], **kwargs)


def _points_vs_beta(ax, dpo: pd.DataFrame, column: str, styles: dict, colours: dict, low: str = "", high: str = "",
                    shift: float = 1.0, hollow: bool | None = None) -> None:
    """One point per run at its beta (offset per run_styles, times `shift`), with its CI when low/high columns are
    named; hollow where the run is flagged, unless `hollow` says."""
    for _, r in dpo.iterrows():
        if pd.notna(r[column]):
            marker, factor = styles[r["run"]]
            _scatter(ax, r["beta"] * factor * shift, r[column], colours[r["beta"]],
                     bool(r["flags"]) if hollow is None else hollow, marker,
                     _errors(r[column], r[low], r[high]) if low else None)


def _loss_legend(ax, dpo: pd.DataFrame, styles: dict) -> None:
    """Legend entries for the loss types' markers (when there are several), then the legend if it has any entry."""
    if dpo["loss"].nunique() > 1:
        for loss, group in dpo.groupby("loss"):
            ax.plot([], [], styles[group["run"].iloc[0]][0], color="black", markersize=4, linestyle="none", label=loss)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, loc="best")


def dpo_rows_of(table: pd.DataFrame, *required: str) -> pd.DataFrame:
    keep = (table["loss"] != "sft") & table["beta"].notna()
    for column in required:
        keep &= table[column].notna()
    return table[keep]


def _mean_lines(ax, dpo: pd.DataFrame, column: str) -> None:
    """A grey line through the mean over seeds at each β, one per objective (the points show each seed)."""
    for loss_i, (_, group) in enumerate(dpo.groupby("loss")):
        means = group.groupby("beta")[column].mean().dropna()
        ax.plot(means.index, means.values, LINESTYLES[loss_i % 4], color="grey", linewidth=0.8)


def final_vs_beta_figure(table: pd.DataFrame, colours: dict, out: Path) -> list[Path]:
    dpo = dpo_rows_of(table)
    if dpo.empty or dpo[["eval_accuracy", "eval_margin", "eval_kl"]].isna().all().all():
        return []
    styles = run_styles(dpo)
    fig, axes = plt.subplots(1, 3, figsize=(TEXT_WIDTH_IN, 2.2))
    panels = [("eval_accuracy", "final eval reward accuracy"), ("eval_margin", "final eval reward margin (nats)"),
              ("eval_kl", "final eval KL estimate (nats/token)")]
    for ax, (column, label) in zip(axes, panels):
        _mean_lines(ax, dpo, column)
        low, high = f"{column}_ci_low", f"{column}_ci_high"  # 95% CIs where eval_pairs.jsonl gave them
        if low in dpo and dpo[low].notna().any():
            _points_vs_beta(ax, dpo, column, styles, colours, low, high)
        else:
            _points_vs_beta(ax, dpo, column, styles, colours)
        if column == "eval_accuracy":
            ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
        beta_axis(ax, dpo["beta"])
        ax.set_ylabel(label)
    _loss_legend(axes[0], dpo, styles)
    fig.suptitle("final eval metrics vs β (one point per run, grey line = mean over seeds; hollow = flagged)", y=1.02)
    fig.tight_layout()
    return save(fig, out, "final_vs_beta")


def win_rate_figure(table: pd.DataFrame, colours: dict, out: Path) -> list[Path]:
    """Three panels side by side, each point with its CI: the win rate against SFT (hard verdicts), the soft win
    rates (probability-weighted, hollow; position-debiased, filled: choice mode only) and the length-controlled rate."""
    dpo = dpo_rows_of(table, "win_rate")
    if dpo.empty:
        return []
    styles = run_styles(dpo)
    fig, axes = plt.subplots(1, 3, figsize=(TEXT_WIDTH_IN, 2.4), sharey=True)
    _mean_lines(axes[0], dpo, "win_rate")
    _mean_lines(axes[1], dpo, "debiased_win_rate")
    _mean_lines(axes[2], dpo, "lc_win_rate")
    _points_vs_beta(axes[0], dpo, "win_rate", styles, colours, "win_rate_ci_low", "win_rate_ci_high")
    axes[0].set_title("win rate vs SFT (verdicts)")
    # weighted hollow (it still carries the judge's position bias), debiased filled, side by side
    _points_vs_beta(axes[1], dpo, "weighted_win_rate", styles, colours, "weighted_ci_low", "weighted_ci_high", 0.93,
                    hollow=True)
    _points_vs_beta(axes[1], dpo, "debiased_win_rate", styles, colours, "debiased_ci_low", "debiased_ci_high", 1.07,
                    hollow=False)
    axes[1].set_title("soft: weighted (hollow), debiased (filled)")
    if dpo["weighted_win_rate"].isna().all():
        axes[1].text(0.5, 0.5, "no probabilities\n(generate mode)", ha="center", transform=axes[1].transAxes)
    _points_vs_beta(axes[2], dpo, "lc_win_rate", styles, colours, "lc_ci_low", "lc_ci_high")
    axes[2].set_title("length-controlled win rate")
    for ax in axes:
        ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
        beta_axis(ax, dpo["beta"])
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("rate (ties = ½)")
    _loss_legend(axes[0], dpo, styles)
    fig.suptitle("DPO vs SFT with 95% bootstrap CIs (one point per run, grey line = mean over seeds; hollow in the "
                 "left and right panels = flagged)", y=1.02)
    fig.tight_layout()
    return save(fig, out, "win_rate_vs_beta")


def frontier_figure(table: pd.DataFrame, colours: dict, out: Path) -> list[Path]:
    dpo = dpo_rows_of(table, "win_rate", "eval_kl")
    if dpo.empty:
        return []
    styles = run_styles(dpo)
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.4))
    for _, r in dpo.iterrows():
        _scatter(ax, r["eval_kl"], r["win_rate"], colours[r["beta"]], bool(r["flags"]), styles[r["run"]][0],
                 _errors(r["win_rate"], r["win_rate_ci_low"], r["win_rate_ci_high"]))
    for beta in sorted(dpo["beta"].unique()):
        ax.plot([], [], "s", color=colours[beta], markersize=4, linestyle="none", label=f"β={beta:g}")
    _loss_legend(ax, dpo, styles)
    ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    ax.set_xlabel("final eval KL estimate (nats/token)")
    ax.set_ylabel("win rate vs SFT")
    ax.set_title("KL–win-rate frontier (one point per run; hollow = flagged)")
    fig.tight_layout()
    return save(fig, out, "kl_win_rate_frontier")


def set_label(name: str) -> str:
    """A calibration set's short name: heldout:<config> -> heldout, pairs:<path>[:mapping] -> pairs:<file name>."""
    if name.startswith("heldout"):
        return "heldout"
    if name.startswith("pairs:"):
        return "pairs:" + Path(name[len("pairs:"):].split(":")[0]).name
    return name


def judge_figure(table: pd.DataFrame, calibration: dict | None, out: Path) -> list[Path]:
    judged = table[table["win_rate"].notna()]
    if judged.empty and not calibration:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(TEXT_WIDTH_IN, 2.3))
    names = list(judged["run"])
    for ax, column, title in ((axes[0], "first_position_rate", "verdicts for position A"),
                              (axes[1], "consistency", "same winner in both orders")):
        values = judged[column].astype(float).fillna(0.0).to_numpy()
        ax.bar(range(len(names)), values, color="#4c72b0")
        for i, v in enumerate(judged[column]):
            if pd.isna(v):
                ax.text(i, 0.02, "n/a", ha="center", fontsize=6)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of judgments" if column == "first_position_rate" else "fraction of pairs")
        ax.set_title(title)
    axes[0].axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    ax = axes[2]
    sets = (calibration or {}).get("sets") or {}
    if sets:
        labels = [set_label(s) for s in sets]
        values = [v.get("agreement") or 0.0 for v in sets.values()]
        errs = [[v["agreement"] - v["agreement_ci"][0] for v in sets.values()],
                [v["agreement_ci"][1] - v["agreement"] for v in sets.values()]] \
            if all(v.get("agreement_ci") for v in sets.values()) else None
        ax.bar(range(len(labels)), values, yerr=errs, capsize=2, color="#dd8452")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("agreement with human labels")
    ax.set_title("judge calibration (95% CI)")
    fig.suptitle("judge diagnostics (dotted: chance)", y=1.02)
    fig.tight_layout()
    return save(fig, out, "judge_diagnostics")


# ---------------------------------------------------------------- the report


def precision_of(run: Run) -> str:
    """The config's train.mixed_precision, and with auto what it became where the run ran (run.json)."""
    given = _get(run.config, "train.mixed_precision")
    used = run.info.get("mixed_precision")
    if given == "auto" and used:
        return f"auto → {'bf16 autocast' if used == 'bf16' else 'fp32'} on this host"
    return str(given)


def _get(d, dotted: str, default="?"):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return default if d is None or d == "" else d


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def setup_account(sweep: Path, runs: list[Run], comparisons: dict[str, Comparison], calibration: dict | None,
                  problems: list[str]) -> list[str]:
    """What a reader needs to reproduce the sweep, from the files it wrote (a value a file lacks shows as ?)."""
    lines = []
    sft = next((r for r in runs if r.kind == "sft" and r.config), None)
    dpo = [r for r in runs if r.kind == "dpo" and r.config and r.beta is not None]
    try:
        record = read_json(sweep / "sweep.json") if (sweep / "sweep.json").is_file() else {}
    except AnalysisError as e:
        problems.append(str(e))
        record = {}
    submissions = record.get("submissions") if isinstance(record.get("submissions"), list) else []
    configs = sorted({str(x["config"]) for x in submissions if isinstance(x, dict) and x.get("config")})
    if configs:
        lines.append(f"- **Sweep file**: {', '.join(f'`{c}`' for c in configs)} — `python slurm/sweep.py --config "
                     f"{configs[-1]}` (then `--generate`, `--judge`), then `python analyze_sweep.py --sweep {sweep}`.")
    if sft:
        c = sft.config
        lines.append(f"- **Base model**: `{_get(c, 'model.path')}` ({_get(c, 'model.dtype')}); SFT on the chosen "
                     f"responses: {sft.info.get('steps', sft.last_step)} steps, lr {_num(_get(c, 'train.lr'))}, batch "
                     f"{_get(c, 'train.batch_size')}×{_get(c, 'train.grad_accum')}, max_length "
                     f"{_get(c, 'tokenize.max_length')}.")
    ref = (dpo or [sft])[0] if (dpo or sft) else None
    if ref:
        c, i = ref.config, ref.info
        lines.append(f"- **Data**: `{_get(c, 'data.path')}` ({_get(c, 'data.format')}), "
                     f"{_get(c, 'data.max_pairs', 'all')} pairs, {i.get('train_pairs', '?')} train / "
                     f"{i.get('eval_pairs', '?')} held-out (eval_fraction {_get(c, 'data.eval_fraction')}, split seed "
                     f"{_get(c, 'data.split_seed')}); max_length {_get(c, 'tokenize.max_length')}, max_prompt_length "
                     f"{_get(c, 'tokenize.max_prompt_length')}.")
    if dpo:
        c = dpo[0].config
        betas = sorted({r.beta for r in dpo})
        seeds = sorted({r.seed for r in dpo if r.seed is not None})
        lines.append(f"- **DPO**: loss {', '.join(sorted({r.loss_type for r in dpo}))}; β ∈ "
                     f"{{{', '.join(_num(b) for b in betas)}}}; seeds {seeds}; {_get(c, 'train.max_steps')} steps, "
                     f"batch {_get(c, 'train.batch_size')}×{_get(c, 'train.grad_accum')} pairs, lr "
                     f"{_num(_get(c, 'train.lr'))} ({_get(c, 'train.scheduler')}, warmup {_get(c, 'train.warmup_steps')}), "
                     f"precision {precision_of(dpo[0])}, "
                     + (f"LoRA r={_get(c, 'lora.r')}" if _get(c, "lora.r", 0) else "full fine-tune")
                     + f"; policy and reference start from `{_get(c, 'model.path')}`.")
    infos = [r.info for r in runs if r.info]
    if infos:
        i = infos[0]
        versions = ", ".join(f"{k} {v}" for k, v in (i.get("versions") or {}).items()) \
            if isinstance(i.get("versions"), dict) else "?"
        hosts = sorted({str(x.get("host", "?")) for x in infos})
        lines.append(f"- **Where**: {', '.join(hosts)}; world size {i.get('world_size', 1)}; commit "
                     f"`{str(i.get('git_commit', '?'))[:12]}`; {versions}.")
    judged = [c for c in comparisons.values() if c.summary and c.state == "complete"]
    if judged:
        c, s = judged[0], judged[0].summary
        counts = c.pairs["prompt_set"].value_counts()
        lines.append(f"- **Generation**: {', '.join(f'{k} ({v} prompt-answer pairs)' for k, v in counts.items())} per "
                     f"model; temperature {_get(s, 'candidate.sampling.temperature')}, max_new_tokens "
                     f"{_get(s, 'candidate.sampling.max_new_tokens')}.")
        lines.append(f"- **Judge**: `{s.get('judge_model')}`, template `{s.get('template_version')}`, mode "
                     f"{s.get('mode')}, order {s.get('order')} (seed {s.get('seed')}); each DPO run against "
                     f"`{_get(s, 'baseline.model_name')}` on {s.get('n')} pairs.")
    if calibration:
        ci = calibration.get("agreement_ci") or [None, None]
        sets = calibration.get("sets") if isinstance(calibration.get("sets"), dict) else {}
        lines.append(f"- **Judge calibration**: agreement with human labels {fmt(calibration.get('agreement'))} "
                     f"[{fmt(ci[0])}, {fmt(ci[1])}] over {calibration.get('pairs')} pairs "
                     f"({', '.join(set_label(x) for x in sets)}); first-position "
                     f"rate {fmt(calibration.get('first_position_rate'))}.")
    return lines


def judge_warnings(table: pd.DataFrame, calibration: dict | None, comparisons: dict[str, Comparison]) -> list[str]:
    """Said from the numbers, whatever the judge's name."""
    out = []
    ci = (calibration or {}).get("agreement_ci")
    if ci and ci[0] <= 0.5:
        where = "lies below" if ci[1] < 0.5 else "includes"
        out.append(f"**The judge is not better than chance at agreeing with human labels** (95% CI {ci[0]:.3f}–"
                   f"{ci[1]:.3f} {where} 0.5): its win rates say nothing about quality.")
    elif not calibration:
        out.append("The judge's agreement with human labels was not measured (`judge: calibrate:` in the sweep).")
    out += calibration_statements(calibration)
    fpr = table["first_position_rate"].dropna()
    if len(fpr) and (abs(fpr - 0.5) > 0.2).any():
        both = any((c.summary or {}).get("order") == "both" for c in comparisons.values())
        out.append(f"Position bias: the judge picks position A in {100 * fpr.min():.0f}–{100 * fpr.max():.0f}% of "
                   f"its verdicts; " + ("with both orders judged, disagreeing orders count as ties." if both else
                                        "with one random order per pair, the win rate mostly measures the draw: "
                                        "judge both orders (`order: both`)."))
    return out


def _pct_ci(point, ci) -> str:
    if point is None:
        return "n/a"
    return f"{100 * point:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def calibration_statements(calibration: dict | None) -> list[str]:
    """What κ and the debiased verdicts say about the judge, in words."""
    if not calibration:
        return []
    out = []
    kappa, ci = calibration.get("kappa"), calibration.get("kappa_ci")
    if kappa is not None and ci and ci[0] <= 0 <= ci[1]:
        out.append(f"**Cohen's κ between the judge and the human labels is {kappa:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]: "
                   f"its 95% CI includes 0**, so the judge is not shown to agree with humans beyond what its own and the "
                   f"labels' label frequencies give by chance.")
    elif kappa is not None and ci and ci[1] < 0:
        out.append(f"**Cohen's κ between the judge and the human labels is {kappa:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], "
                   f"below 0**: the judge disagrees with humans more often than chance would.")
    elif kappa is None and calibration.get("pairs"):
        out.append("Cohen's κ is undefined: the judge gave one label to every judgment.")
    hard, debiased = calibration.get("agreement"), calibration.get("debiased_verdict_agreement")
    if hard is not None and debiased is not None:
        verb = "raises" if debiased > hard else "lowers" if debiased < hard else "leaves"
        out.append(f"Debiasing {verb} the judge's agreement with human labels: {_pct_ci(hard, calibration.get('agreement_ci'))} "
                   f"with its verdicts, {_pct_ci(debiased, calibration.get('debiased_verdict_agreement_ci'))} with the "
                   f"most likely verdict of its two orders' mean probabilities (soft: "
                   f"{_pct_ci(calibration.get('weighted_agreement'), None)} in one order, "
                   f"{_pct_ci(calibration.get('debiased_agreement'), None)} debiased).")
    return out


def power_statements(table: pd.DataFrame, between: pd.DataFrame) -> list[str]:
    """'With N prompts this sweep can detect ±X points': from the judged runs' per-prompt spread (stats.power_plan)."""
    judged = table[table["detectable"].notna()] if "detectable" in table else table.iloc[0:0]
    if judged.empty:
        return []
    worst = judged.loc[judged["detectable"].idxmax()]
    text = (f"With {int(worst['judged'])} prompts this sweep can detect a win-rate difference of "
            f"±{100 * worst['detectable']:.1f} points against SFT (80% power, α = 0.05; per-prompt sd "
            f"{worst['power_sd']:.3f}, {worst['power_sd_source']})")
    if not between.empty:
        b = between.loc[between["detectable"].idxmax()]
        text += f" and ±{100 * b['detectable']:.1f} points between two runs (paired, sd {b['sd']:.3f}, {b['sd_source']})"
    needed = judged["prompts_needed"].dropna()
    text += "; " + (f"telling the runs' observed win rates from 50% would need {int(needed.min())}–{int(needed.max())} "
                    f"prompts." if len(needed) else "no run's win rate differs from 50% at all.")
    soft = judged[judged["debiased_sd"].notna()] if "debiased_sd" in judged else judged.iloc[0:0]
    if not soft.empty:
        widest = soft.loc[soft["debiased_detectable"].idxmax()]
        text += (f" On the position-debiased win rate (per-prompt sd {widest['debiased_sd']:.3f}) the same prompts "
                 f"detect ±{100 * widest['debiased_detectable']:.1f} points of probability.")
    return [text]


def calibration_table(calibration: dict) -> list[str]:
    """One row per calibration set and one for all: AlpacaEval's evaluator columns and the soft/debiased ones."""
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"

    def cell(point, ci, scale=100.0, digits=1, sign=""):
        if point is None:
            return "–"
        f = lambda v: f"{scale * v:{sign}.{digits}f}"  # noqa: E731
        return f(point) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")

    head = ["set", "pairs", "agreement % [95% CI]", "κ [95% CI]", "non-tie %", "judge ties %", "first position %",
            "consistency %", "prefers longer %: judge / labels", "weighted %", "debiased %",
            "debiased verdicts % [95% CI]", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sets = calibration.get("sets") if isinstance(calibration.get("sets"), dict) else {}
    for name, c in list(sets.items()) + [("all", calibration)]:
        if not isinstance(c, dict):
            continue
        label = set_label(name)
        lines.append("| " + " | ".join(str(x) for x in [
            f"**{label}**" if name == "all" else label, c.get("pairs", "–"),
            cell(c.get("agreement"), c.get("agreement_ci")),
            cell(c.get("kappa"), c.get("kappa_ci"), 1.0, 3, "+"),
            pct(c.get("nontie_agreement")), pct(c.get("tie_rate")), pct(c.get("first_position_rate")),
            pct(c.get("consistency")), f"{pct(c.get('prefers_longer'))} / {pct(c.get('labels_prefer_longer'))}",
            pct(c.get("weighted_agreement")), pct(c.get("debiased_agreement")),
            cell(c.get("debiased_verdict_agreement"), c.get("debiased_verdict_agreement_ci")),
            c.get("errors", "–")]) + " |")
    return lines


def panel_lines(calibration: dict | None, comparisons: dict[str, Comparison]) -> list[str]:
    """A judge panel's members (their agreement with humans, their win rates) and their agreement with each other."""
    panel = (calibration or {}).get("panel") or next(
        ((c.summary or {}).get("panel") for c in comparisons.values() if (c.summary or {}).get("panel")), None)
    if not isinstance(panel, dict):
        return []
    lines = ["", "### Judge panel", "", f"The verdicts above are the panel's ({panel.get('combine', 'mean')} of its "
             f"judges). Each judge alone:", "", "| judge | agreement with humans % [95% CI] | κ [95% CI] |",
             "|---|---|---|"]
    for m in panel.get("members") or []:
        c = m.get("calibration") or {}
        kappa = "–" if c.get("kappa") is None else f"{c['kappa']:+.3f}" + (
            f" [{c['kappa_ci'][0]:+.3f}, {c['kappa_ci'][1]:+.3f}]" if c.get("kappa_ci") else "")
        lines.append(f"| {m.get('name')} | {_pct_ci(c.get('agreement'), c.get('agreement_ci'))} | {kappa} |")
    for pair in panel.get("inter_judge") or []:
        ci = pair.get("kappa_ci")
        kappa = "n/a" if pair.get("kappa") is None else f"{pair['kappa']:+.3f}" + (
            f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
        lines += ["", f"Between {pair['judges'][0]} and {pair['judges'][1]}: κ {kappa}, agreement "
                      f"{_pct_ci(pair.get('agreement'), None)} over {pair.get('judgments')} judgments."]
    return lines


def injection_lines(comparisons: dict[str, Comparison]) -> list[str]:
    """The prompt-injection probe (judge.py --probe-injection) of each comparison that ran it."""
    probed = {name: c.summary["injection"] for name, c in comparisons.items()
              if isinstance((c.summary or {}).get("injection"), dict)}
    if not probed:
        return []
    kinds = sorted({k for inj in probed.values() for k in inj.get("kinds", {})})
    lines = ["", "### Prompt injection", "", "Share of verdicts that changed when the DPO answer carried the "
             "injection (same pairs, same positions; choice mode: the judge's own decision, measured):", "",
             "| run | pairs | " + " | ".join(kinds) + " | all |", "|---|---|" + "---|" * (len(kinds) + 1)]
    for name, inj in probed.items():
        cells = [f"{100 * inj['kinds'][k]['flip_rate']:.0f}%" if inj["kinds"].get(k, {}).get("flip_rate") is not None
                 else "–" for k in kinds]
        total = "–" if inj.get("flip_rate") is None else f"{100 * inj['flip_rate']:.0f}%"
        lines.append(f"| {name} | {inj.get('pairs')} | " + " | ".join(cells) + f" | {total} |")
    return lines


def cost_lines(sweep: Path, table: pd.DataFrame) -> list[str]:
    """What the sweep's jobs used (costs.py: Slurm's accounting where the launcher stored it, else each job's own
    record), per stage and per run, and per point of win rate over SFT."""
    jobs = job_costs(sweep)
    if not jobs:
        return []
    what = unit(jobs.values())
    lines = ["", "### Cost", "", f"Allocated {what} (cores or GPUs × wall time), per stage, from "
             f"{' and '.join(sorted({c.source for c in jobs.values()}))} records (`costs/`, `sweep.json`):", "",
             f"| stage | jobs | wall h | {what} | CPU h used | peak RSS GB | requeues |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {'**total**' if r['what'] == 'total' else r['what']} | {r['jobs']} | {r['wall_h']:.3f} | "
              f"{r['hours']:.3f} | {r['cpu_h_used']:.3f} | {r['max_rss_gb']:.2f} | {r['requeues']} |"
              for r in stage_costs(jobs)]
    runs = run_costs(jobs)
    rates = table.set_index("run")["win_rate"].to_dict() if "win_rate" in table else {}
    rows = []
    for run, r in sorted(runs.items()):
        if run == "sft":
            continue
        rate = rates.get(run)
        points = None if rate is None or pd.isna(rate) else 100 * (rate - 0.5)
        per_point = f"{r['hours'] / points:.3f}" if points and points > 0 else "– (no gain over SFT)"
        rows.append(f"| {run} | {r['jobs']} | {r['hours']:.3f} | {'–' if points is None else f'{points:+.1f}'} | "
                    f"{per_point} |")
    if rows:
        lines += ["", f"Per DPO run (its training, answers and judging; SFT, the reference and calibration are shared, "
                      f"{sum(r['hours'] for n, r in runs.items() if n == 'sft'):.3f} {what} for SFT):", "",
                  f"| run | jobs | {what} | win-rate points over SFT | {what} per point |", "|---|---|---|---|---|"] + rows
    return lines


def power_lines(table: pd.DataFrame, between: pd.DataFrame) -> list[str]:
    judged = table[table["detectable"].notna()] if "detectable" in table else table.iloc[0:0]
    if judged.empty:
        return []
    lines = ["", "### How many prompts", "", "Paired design (every run answers the same prompts), 80% power, α = 0.05 "
             "(two-sided z-test), from the measured per-prompt spread of the verdict scores:", "",
             "| comparison | prompts | sd | detectable ± points | observed points | prompts to detect it |",
             "|---|---|---|---|---|---|"]
    for _, r in judged.iterrows():
        needed = "–" if pd.isna(r["prompts_needed"]) else f"{int(r['prompts_needed'])}"
        lines.append(f"| {r['run']} vs SFT | {int(r['judged'])} | {r['power_sd']:.3f}"
                     + (" (worst case)" if r["power_sd_source"] != "measured" else "")
                     + f" | {100 * r['detectable']:.1f} | {100 * (r['win_rate'] - 0.5):+.1f} | {needed} |")
    for _, b in between.iterrows():
        if pd.isna(b["detectable"]):
            continue
        needed = "–" if pd.isna(b["needed"]) else f"{int(b['needed'])}"
        lines.append(f"| {b['run_a']} vs {b['run_b']} | {int(b['prompts'])} | {b['sd']:.3f}"
                     + (" (worst case)" if b["sd_source"] != "measured" else "")
                     + f" | {100 * b['detectable']:.1f} | {100 * b['difference']:+.1f} | {needed} |")
    lines += ["", "`python judge.py --plan-prompts logs/<sweep>/judgments/*.jsonl` prints the same from the verdict "
                  "files, judging nothing."]
    return lines


CAPTIONS = {
    "curves_train": "Train metrics per optimizer step, one line per β (mean over seeds, band min–max).",
    "curves_eval": "Held-out eval metrics at each evaluation, one line per β.",
    "final_vs_beta": "Final held-out reward accuracy (Clopper-Pearson 95% CI; dotted line: chance), reward margin "
                     "(bootstrap 95% CI) and KL estimate against β; one point per run.",
    "win_rate_vs_beta": "Win rate of each DPO run against SFT from the judge's verdicts (left), from its "
                        "probabilities (middle: weighted, as AlpacaEval 2, hollow; position-debiased, the mean of both "
                        "orders, filled) and length-controlled (right), with 95% bootstrap CIs; marker shape = loss "
                        "type, seeds side by side.",
    "kl_win_rate_frontier": "KL from the reference against win rate: each run a point; up and to the left is better.",
    "judge_diagnostics": "Judge diagnostics: share of verdicts for position A, share of pairs whose two orders agree, "
                         "and agreement with human labels on the calibration sets.",
}


def write_report(out: Path, sweep: Path, runs, comparisons, generations, table, ranking, best, calibration, figures,
                 problems: list[str], argv, paired: pd.DataFrame | None = None,
                 between: pd.DataFrame | None = None) -> Path:
    paired = pd.DataFrame() if paired is None else paired
    between = power_between({}) if between is None else between
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Generated by `python analyze_sweep.py {' '.join(argv)}` on "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{sweep}`. Everything below is computed from the "
             "files the sweep wrote; re-running the command rewrites this folder.", "", "## Setup", ""]
    lines += setup_account(sweep, runs, comparisons, calibration, problems) or ["- (no run has written its config yet)"]
    not_done = [r for r in runs if r.status != "completed"]
    lines += ["", "## State", ""]
    lines += [f"- **{r.name}**: {describe_state(r)}" for r in not_done] or ["Every planned run completed."]
    lines += [f"- judging of **{name}** is {c.state} ({len(c.pairs)} pairs so far)" for name, c in comparisons.items()
              if c.state != "complete"]
    lines += [f"- unreadable: {p}" for r in runs for p in r.problems] + [f"- unreadable: {p}" for p in problems]
    if generations:
        lines += [f"- no answers yet from **{r.name}** (`generations/{r.name}.jsonl`)" for r in runs
                  if r.name not in generations and r.status == "completed"]
    by_beta = beta_table(table)
    warned = effect_statements(table, paired) + seed_statements(by_beta) + \
        judge_warnings(table, calibration, comparisons) + power_statements(table, between)
    if warned:
        lines += ["", "## Read this first", ""] + [f"- {w}" for w in warned]
    lines += ["", "## Results", "", markdown_table(table), "", "Win rates count ties as ½; judge errors are counted "
              "in *judged* and left out of the rate. CIs: percentile bootstrap over pairs."]
    lines += [f"LC win rate of {r['run']}: {r['lc_note']}." for _, r in table.iterrows()
              if isinstance(r.get("lc_note"), str) and r["lc_note"] and "not identifiable" in r["lc_note"]]
    lines += ["", "Eval acc: held-out reward accuracy [Clopper-Pearson 95% CI] and the two-sided exact binomial p "
              "against 0.5; eval margin [percentile bootstrap 95% CI over the held-out pairs of eval_pairs.jsonl]."]
    if not paired.empty:
        lines += ["", "### Paired differences between runs (same held-out pairs)", "",
                  "| run A | run B | pairs | accuracy A − B [95% CI] | log-ratio margin A − B [95% CI] |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r.run_a} | {r.run_b} | {r.pairs} | {r.accuracy_diff:+.3f} [{r.accuracy_diff_ci_low:+.3f}, "
                  f"{r.accuracy_diff_ci_high:+.3f}] | {r.logratio_margin_diff:+.3f} [{r.logratio_margin_diff_ci_low:+.3f}, "
                  f"{r.logratio_margin_diff_ci_high:+.3f}] |" for r in paired.itertuples()]
        lines += ["", "Log-ratio margin = reward margin / β (nats): comparable across β. CIs: paired bootstrap over pairs."]
    lines += beta_markdown(by_beta)
    lines += ["",
              "### Best run per criterion", "", best_markdown(best)]
    if not ranking.empty:
        lines += ["", "### Bradley-Terry ranking", "",
                  "| model | score [95% CI] | style-controlled [95% CI] | battles |", "|---|---|---|---|"]
        lines += [f"| {r.model} | {r.score:.0f} [{r.ci_low:.0f}, {r.ci_high:.0f}] | {r.sc_score:.0f} "
                  f"[{r.sc_ci_low:.0f}, {r.sc_ci_high:.0f}] | {r.battles} |" for r in ranking.itertuples()]
        style = ranking.attrs.get("style") or {}
        lines += ["", "Style coefficients (per standard deviation of each normalised difference, logit scale): "
                  + (", ".join(f"{k} {v:+.3f}" for k, v in style.items()) if style else
                     "none: the answers' style does not vary") + "."]
    if calibration:
        lines += ["", "### Judge calibration", ""] + calibration_table(calibration)
        lines += ["", "Agreement: per judgment, both orders, ties ½ (LLMBar's protocol); κ: Cohen's, verdicts against "
                      "labels in position terms (A, B, tie); weighted: the judge's expected agreement under its "
                      "probabilities in one order; debiased: with each answer's probability averaged over both orders "
                      "(expected agreement, and that of its most likely verdict). CIs: bootstrap over pairs."]
    lines += panel_lines(calibration, comparisons)
    lines += power_lines(table, between)
    lines += injection_lines(comparisons)
    lines += cost_lines(sweep, table)
    by_set = pd.concat([c.pairs.assign(run=name) for name, c in comparisons.items() if not c.pairs.empty] or [pd.DataFrame()])
    if not by_set.empty and by_set["prompt_set"].nunique() > 1:
        pivot = by_set.dropna(subset=["score"]).pivot_table(index="run", columns="prompt_set", values="score",
                                                            aggfunc="mean")
        lines += ["", "### Win rate by prompt set", "", "| run | " + " | ".join(pivot.columns) + " |",
                  "|---|" + "---|" * len(pivot.columns)]
        lines += [f"| {run} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |" for run, row in pivot.iterrows()]
    if generations:
        lines += ["", "### Answers", "", "| model | answers | mean new tokens | cut at max_new_tokens | degenerate |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {g['answers']} | {fmt(g['mean_new_tokens'], 1)} | {100 * g['hit_max_tokens']:.0f}% | "
                  f"{100 * g.get('degenerate', float('nan')):.0f}% |"
                  for name, g in sorted(generations.items(), key=lambda kv: (kv[0] != "base", kv[0] != "sft", kv[0]))]
        lines += ["", f"*degenerate*: the answer repeats itself (fewer than {DEGENERATE_BELOW:.0%} of its word 3-grams "
                  f"distinct). *base*: the model SFT started from, answering the same prompts (not judged)."
                  if "base" in generations else f"*degenerate*: the answer repeats itself (fewer than "
                  f"{DEGENERATE_BELOW:.0%} of its word 3-grams distinct)."]
    flagged = [r for r in runs if r.flags]
    if flagged:
        lines += ["", "### Stability flags", ""]
        lines += [f"- **{r.name}** {flag}: {detail}" for r in flagged for flag, detail in r.flags.items()]
    lines += ["", "## Figures", ""]
    for path in figures:
        if path.suffix == ".png":
            lines += [f"![{path.stem}](figures/{path.name})", "", f"*{CAPTIONS.get(path.stem, '')}* "
                      f"([PDF](figures/{path.stem}.pdf))", ""]
    missing = [name for name in CAPTIONS if not any(p.stem == name for p in figures)]
    if missing:
        lines += [f"Not drawn yet (no data): {', '.join(missing)}.", ""]
    lines += ["## Definitions", "",
              "- *reward* = β·log(π/π_ref) summed over the response (TRL's `rewards/*`); *margin* = chosen − rejected; "
              "*accuracy* = share of pairs with chosen reward > rejected reward. Reference-free objectives define "
              "it without π_ref (below).",
              *objective_definitions(runs),
              "- *KL estimate*: per-token k3 estimator exp(−r) − 1 + r of r = log π − log π_ref on the chosen responses.",
              "- *LC win rate*: AlpacaEval 2's GLM, logit P(win) = θ + φ·tanh(Δlen/sd(Δlen)) with Δlen the answer "
              "length difference in characters; reported as σ(θ), the win rate at equal lengths.",
              "- *BT score*: Bradley-Terry fit over all pairwise outcomes (Arena-Hard-Auto), Elo scale, SFT = 1000; "
              "intervals from a bootstrap over pairs. *Style-controlled*: the same fit with style covariates "
              "(Arena-Hard-Auto's `--style-control`): for answer length and markdown headers, list items and bold "
              "spans, (a − b)/(a + b) of the two answers, scaled by its standard deviation (not centred: every battle "
              "has the DPO run on the same side); the scores are then the strengths at equal style.",
              "- *Weighted win rate*: the judge's probability for the DPO answer, P(its position) + P(tie)/2, in the "
              "order the seeded draw chose (AlpacaEval 2's weighted annotator); *debiased*: the mean of that "
              "probability over both orders, which removes a preference for a position that does not depend on the "
              "answers (choice mode, `order: both`).",
              "- *κ*: Cohen's kappa, (p_o − p_e)/(1 − p_e): agreement beyond what the two label frequencies give by "
              "chance. *Detectable difference*: (z₀.₉₇₅ + z₀.₈)·sd/√n, the smallest true difference a paired "
              "two-sided test on n prompts finds 80% of the time at α = 0.05.",
              "- *Flags*: " + " ".join(line.strip() for line in stability_flags.__doc__.split("\n")[1:])]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def objective_definitions(runs) -> list[str]:
    """One line per objective the sweep trained: its paper, loss, reward and keys (objectives.SPECS)."""
    used = []
    for run in runs:
        loss = run.config.get("loss") if run.kind == "dpo" and isinstance(run.config.get("loss"), dict) else None
        if loss is not None:
            names = objectives.as_list(loss.get("type", "sigmoid")) + (["sft"] if loss.get("rpo_alpha") else [])
            used += [n for n in names if n in objectives.SPECS and n not in used]
    lines = []
    for name in used:
        spec = objectives.SPECS[name]
        lines.append(f"- `{name}` ({spec.paper}): loss {spec.formula}; reward {spec.reward}"
                     + (f"; keys {', '.join(spec.keys)}" if spec.keys else "") + ".")
    if len(used) > 1 or any(r.loss_type not in objectives.SPECS for r in runs if r.kind == "dpo"):
        lines.append("- *objective names*: `a+b` sums objectives (`0.8·a` weighted, loss.weights); `[...]` lists "
                     "non-default options (ε label smoothing, f-divergence, wpo, ld α, tr-dpo every/α).")
    if lines:
        lines.append("- Notation: π, r the policy's and reference's summed response log-probs, ρ = π − r, |y| the "
                     "response length, h = ρc − ρr (f-divergence scores under loss.f_divergence).")
    return lines


def describe_state(run: Run) -> str:
    if run.status == "missing":
        return "missing — planned, never started (no run folder)"
    progress = f"step {run.last_step}/{run.max_steps}" if run.max_steps else f"step {run.last_step}"
    pruned = run.info.get("pruned") if isinstance(run.info.get("pruned"), dict) else None
    if run.status == "pruned" and pruned:
        return f"pruned at step {pruned.get('step', run.last_step)}/{run.max_steps or '?'}: {pruned.get('reason')}"
    why = f": {run.info['error']}" if run.info.get("error") else ""
    return f"{run.status} at {progress}{why}"


# ---------------------------------------------------------------- comparing sweeps (small proxy to large model)


COLLAPSE_FLAGS = ("margin-collapse", "non-finite")


def beta_verdicts(a: Analysed) -> pd.DataFrame:
    """One row per (objective, β) of a sweep: its seeds, whether training held (stable) or collapsed (a run flagged
    margin-collapse or non-finite, pruned or failed), the final eval metrics' mean and range over seeds, and the
    verdict against SFT: better or worse where every seed's win-rate CI lies above or below 50%, else no difference."""
    dpo = [r for r in a.runs if r.kind == "dpo" and r.beta is not None]
    table = a.table.set_index("run")
    rows = []
    for (loss, beta) in sorted({(r.loss_type, r.beta) for r in dpo}):
        group = [r for r in dpo if (r.loss_type, r.beta) == (loss, beta)]
        broken = [f"{r.name}: " + (", ".join(f for f in r.flags if f in COLLAPSE_FLAGS) or r.status) for r in group
                  if any(f in r.flags for f in COLLAPSE_FLAGS) or r.status in ("pruned", "failed")]
        row = {"sweep": a.sweep.name, "model": a.label, "loss": loss, "beta": beta, "seeds": len(group),
               "stability": "collapsed" if broken else "stable", "why": "; ".join(broken)}
        for column in ("eval_accuracy", "eval_margin", "eval_kl", "win_rate"):
            values = table.loc[[r.name for r in group], column].dropna().astype(float)
            row.update({column: values.mean() if len(values) else None,
                        f"{column}_min": values.min() if len(values) else None,
                        f"{column}_max": values.max() if len(values) else None})
        lows = table.loc[[r.name for r in group], "win_rate_ci_low"].astype(float)
        highs = table.loc[[r.name for r in group], "win_rate_ci_high"].astype(float)
        row["vs_sft"] = ("not judged" if lows.isna().all() else "better" if (lows > 0.5).all() else
                         "worse" if (highs < 0.5).all() else "no difference")
        rows.append(row)
    return pd.DataFrame(rows)


def transfer_rows(verdicts: list[pd.DataFrame]) -> pd.DataFrame:
    """Per (objective, β) the first (small) sweep shares with each later one: did its verdicts hold?"""
    small, rows = verdicts[0], []
    for large in verdicts[1:]:
        for _, s in small.iterrows():
            match = large[(large["loss"] == s["loss"]) & np.isclose(large["beta"], s["beta"])]
            if match.empty:
                continue
            l_row = match.iloc[0]
            judged = "not judged" not in (s["vs_sft"], l_row["vs_sft"])
            rows.append({"loss": s["loss"], "beta": s["beta"], "small": s["model"], "large": l_row["model"],
                         "small_stability": s["stability"], "large_stability": l_row["stability"],
                         "stability_held": s["stability"] == l_row["stability"],
                         "small_vs_sft": s["vs_sft"], "large_vs_sft": l_row["vs_sft"],
                         "vs_sft_held": (s["vs_sft"] == l_row["vs_sft"]) if judged else None})
    return pd.DataFrame(rows, columns=["loss", "beta", "small", "large", "small_stability", "large_stability",
                                       "stability_held", "small_vs_sft", "large_vs_sft", "vs_sft_held"])


def _cell(r) -> str:
    if r is None:
        return "–"
    text = f"**{r['stability']}**" if r["stability"] == "collapsed" else r["stability"]
    parts = []
    for column, name, spec in (("eval_accuracy", "acc", ".3f"), ("eval_margin", "margin", "+.3f"), ("eval_kl", "KL", ".4f")):
        if r[column] is not None and pd.notna(r[column]):
            spread = (f" [{r[f'{column}_min']:{spec}}, {r[f'{column}_max']:{spec}}]" if r["seeds"] > 1 else "")
            parts.append(f"{name} {r[column]:{spec}}{spread}")
    if r["win_rate"] is not None and pd.notna(r["win_rate"]):
        parts.append(f"win {100 * r['win_rate']:.1f}% ({r['vs_sft']})")
    return text + (": " + ", ".join(parts) if parts else "") + (f" ({r['why']})" if r["why"] else "")


def compare_figures(verdicts: list[pd.DataFrame], out: Path) -> list[Path]:
    """compare_stability_vs_beta: final eval margin, accuracy and KL against β, one line per model (collapsed β
    drawn as ×); compare_win_rate_vs_beta: every model's win rate against its own SFT on one axis."""
    colours = plt.get_cmap("tab10")
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(TEXT_WIDTH_IN, 2.4))
    for ax, (column, label) in zip(axes, [("eval_margin", "final eval reward margin (nats)"),
                                          ("eval_accuracy", "final eval reward accuracy"),
                                          ("eval_kl", "final eval KL (nats/token)")]):
        for i, v in enumerate(verdicts):
            for loss, group in v.groupby("loss"):
                group = group.dropna(subset=[column]).sort_values("beta")
                if group.empty:
                    continue
                ax.plot(group["beta"], group[column], "-", color=colours(i), linewidth=1.0,
                        label=f"{group['model'].iloc[0]}" + (f" {loss}" if v["loss"].nunique() > 1 else ""))
                for _, r in group.iterrows():
                    ax.plot([r["beta"]], [r[column]], "x" if r["stability"] == "collapsed" else "o", color=colours(i),
                            markersize=5 if r["stability"] == "collapsed" else 3.5)
                    if r["seeds"] > 1:
                        ax.plot([r["beta"]] * 2, [r[f"{column}_min"], r[f"{column}_max"]], "-", color=colours(i),
                                linewidth=0.6)
        beta_axis(ax, pd.concat([v["beta"] for v in verdicts]))
        ax.set_ylabel(label)
        if column == "eval_accuracy":
            ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    fig.suptitle("β stability per model (× = collapsed; bars = range over seeds)", y=1.02)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)), frameon=False)
    paths += save(fig, out, "compare_stability_vs_beta")
    judged = [v.dropna(subset=["win_rate"]) for v in verdicts if v["win_rate"].notna().any()]
    if judged:
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.4))
        for i, v in enumerate(verdicts):
            group = v.dropna(subset=["win_rate"]).sort_values("beta")
            if group.empty:
                continue
            ax.plot(group["beta"], group["win_rate"], "-o", color=colours(i), markersize=3.5, linewidth=1.0,
                    label=group["model"].iloc[0])
            for _, r in group.iterrows():
                ax.plot([r["beta"]] * 2, [r["win_rate_min"], r["win_rate_max"]], "-", color=colours(i), linewidth=0.6)
        ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
        beta_axis(ax, pd.concat([v["beta"] for v in judged]))
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("win rate vs its own SFT")
        ax.legend(frameon=False, fontsize=6)
        ax.set_title("win rate vs β, per model")
        fig.tight_layout()
        paths += save(fig, out, "compare_win_rate_vs_beta")
    return paths


def compare(args, argv: list[str]) -> int:
    """The comparison of several sweeps (the small proxy first): a β-stability map, win rate against β per model,
    and whether each of the small model's verdicts held for the larger ones."""
    sweeps = [Path(s) for s in args.sweep]
    out = Path(args.out) if args.out else Path("report") / ("compare_" + "_".join(s.name for s in sweeps))
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out}: exists and is not a folder")
    analysed = [load_analysis(s, args) for s in sweeps]
    verdicts = [beta_verdicts(a) for a in analysed]
    if any(v.empty for v in verdicts):
        empty = next(a.sweep for a, v in zip(analysed, verdicts) if v.empty)
        raise AnalysisError(f"--sweep {empty}: no DPO run with a β to compare")
    transfer = transfer_rows(verdicts)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    pd.concat(verdicts, ignore_index=True).to_csv(out / "per_beta.csv", index=False)
    transfer.to_csv(out / "transfer.csv", index=False)
    plt.rcParams.update(FIGURE_STYLE)
    figures = compare_figures(verdicts, out / "figures")
    models = [a.label for a in analysed]
    lines = [f"# Comparing {len(sweeps)} sweeps: {' → '.join(models)}", "",
             f"Generated by `python analyze_sweep.py {' '.join(argv)}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} "
             f"UTC from the sweeps' own files. The first sweep is the small proxy; each later one is checked against "
             f"it.", "", "## Sweeps", ""]
    for a in analysed:
        dpo = [r for r in a.runs if r.kind == "dpo"]
        lines.append(f"- **{a.label}**: `{a.sweep}`, {len(dpo)} DPO run(s), β ∈ "
                     f"{{{', '.join(_num(b) for b in sorted({r.beta for r in dpo if r.beta is not None}))}}}, "
                     f"{len(a.comparisons)} judged; its own report: `python analyze_sweep.py --sweep {a.sweep}`.")
    read_first = []
    if not transfer.empty:
        held = transfer["stability_held"].sum()
        read_first.append(f"Stability transferred at {held} of {len(transfer)} shared β: " + (
            "the small model's collapsed/stable verdict held everywhere." if held == len(transfer) else
            "; ".join(f"β {r['beta']:g}: {r['small_stability']} for the small model, {r['large_stability']} for "
                      f"{r['large']}" for _, r in transfer[~transfer["stability_held"]].iterrows()) + "."))
        judged = transfer.dropna(subset=["vs_sft_held"])
        if not judged.empty:
            read_first.append(f"The verdict against SFT (better / worse / no difference at 95%) held at "
                              f"{int(judged['vs_sft_held'].sum())} of {len(judged)} shared β.")
    collapsed = [f"{v['model'].iloc[0]}: β {', '.join(_num(b) for b in v.loc[v['stability'] == 'collapsed', 'beta'])}"
                 for v in verdicts if (v["stability"] == "collapsed").any()]
    read_first.append("Collapsed: " + ("; ".join(collapsed) if collapsed else "no β in any sweep") + ".")
    lines += ["", "## Read this first", ""] + [f"- {x}" for x in read_first]
    betas = sorted({(r["loss"], r["beta"]) for v in verdicts for _, r in v.iterrows()})
    lines += ["", "## β-stability map", "", "| objective | β | " + " | ".join(models) + " |",
              "|---|---|" + "---|" * len(models)]
    for loss, beta in betas:
        cells = []
        for v in verdicts:
            match = v[(v["loss"] == loss) & np.isclose(v["beta"], beta)]
            cells.append(_cell(match.iloc[0]) if not match.empty else "–")
        lines.append(f"| {loss} | {beta:g} | " + " | ".join(cells) + " |")
    lines += ["", "Final held-out eval metrics, mean over seeds [range]; win rate against the model's own SFT and its "
                  "verdict at 95%. *Collapsed*: a run flagged margin-collapse or non-finite, pruned or failed."]
    if not transfer.empty:
        lines += ["", "## Did the small model's verdict hold?", "",
                  "| objective | β | large model | stability: small → large | held | vs SFT: small → large | held |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['loss']} | {r['beta']:g} | {r['large']} | {r['small_stability']} → {r['large_stability']} | "
                  f"{'yes' if r['stability_held'] else '**no**'} | {r['small_vs_sft']} → {r['large_vs_sft']} | "
                  f"{'–' if r['vs_sft_held'] is None else 'yes' if r['vs_sft_held'] else '**no**'} |"
                  for _, r in transfer.iterrows()]
    lines += ["", "## Figures", ""]
    captions = {"compare_stability_vs_beta": "Final eval margin, accuracy and KL against β, one line per model; "
                                             "× = collapsed, bars = range over seeds.",
                "compare_win_rate_vs_beta": "Win rate against each model's own SFT, against β, one line per model; "
                                            "bars = range over seeds."}
    for path in figures:
        if path.suffix == ".png":
            lines += [f"![{path.stem}](figures/{path.name})", "", f"*{captions[path.stem]}* ([PDF](figures/"
                      f"{path.stem}.pdf))", ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"[analyze] compared {', '.join(models)}; " + " ".join(x.replace("**", "") for x in read_first), flush=True)
    print(f"[analyze] wrote {out}/README.md, per_beta.csv, transfer.csv and {len(figures)} figure files", flush=True)
    return 0


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, action="append",
                        help="the sweep folder, e.g. logs/default; several (repeat --sweep, the small proxy first): "
                             "the comparison of their β sweeps, model by model")
    parser.add_argument("--out", help="report folder (default: report/<sweep folder name>, or for a comparison "
                                      "report/compare_<names>)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for LC and BT intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of every bootstrap")
    parser.add_argument("--strict", action="store_true",
                        help="an input file that cannot be read (metrics, verdicts, summaries) is an error: exit 2 "
                             "naming it, nothing written. Default: it is named in the report and left out, so a "
                             "running sweep can be reported")
    parser.add_argument("--collapse-margin", type=float, default=1.0,
                        help="flag margin-collapse when a run's reward margin ends below minus this (nats)")
    args = parser.parse_args(argv)
    if args.bootstrap < 10:
        parser.error(f"--bootstrap {args.bootstrap}: need at least 10 resamples")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return analyse(args, argv) if len(args.sweep) == 1 else compare(args, argv)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:  # an unwritable --out, a file vanishing under a running sweep
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
    return 2


@dataclass
class Analysed:
    """One sweep read and tabled: what the report and a comparison of sweeps are made from."""
    sweep: Path
    runs: list[Run]
    comparisons: dict[str, Comparison]
    calibration: dict | None
    generations: dict[str, dict]
    table: pd.DataFrame
    ranking: pd.DataFrame
    problems: list[str]

    @property
    def label(self) -> str:
        """The sweep and its model: `gpt2 (sweep_gpt2, 124.4M parameters)`."""
        sft = next((r for r in self.runs if r.kind == "sft" and r.config), None) or \
            next((r for r in self.runs if r.config), None)
        model = Path(str(_get(sft.config, "model.path", "?"))).name if sft else "?"
        total = next((r.info.get("parameters", {}).get("total") for r in self.runs
                      if isinstance(r.info.get("parameters"), dict) and r.info["parameters"].get("total")), None)
        return f"{model} ({self.sweep.name}" + (f", {total / 1e6:.1f}M parameters)" if total else ")")


def load_analysis(sweep: Path, args) -> Analysed:
    if not sweep.is_dir():
        raise AnalysisError(f"--sweep {sweep}: no such folder (a sweep's folder is <root>/<name>, e.g. logs/default)")
    runs = load_runs(sweep)
    if not runs:
        raise AnalysisError(f"--sweep {sweep}: no runs here (no configs/*.yaml, no folder with run.json or "
                            f"metrics.jsonl): is this a sweep folder?")
    for run in runs:
        run.flags = stability_flags(run, args.collapse_margin)
    problems: list[str] = []  # files outside the runs that could not be read: named in the report, then skipped
    comparisons = load_comparisons(sweep, problems)
    calibration = None
    cal_file = sweep / "judgments" / "calibration.summary.json"
    try:
        calibration = read_json(cal_file).get("calibration") if cal_file.is_file() else None
    except AnalysisError as e:
        problems.append(str(e))
    if calibration is None:
        calibration = next((c.summary.get("calibration") for c in comparisons.values()
                            if c.summary and c.summary.get("calibration")), None)
    if calibration is not None and not isinstance(calibration, dict):
        problems.append(f"{cal_file}: 'calibration' should be an object, found {calibration!r:.60}")
        calibration = None
    generations = load_generations(sweep, comparisons, problems)
    table, ranking = summarise(runs, comparisons, generations, args.seed, args.bootstrap)
    return Analysed(sweep, runs, comparisons, calibration, generations, table, ranking, problems)


def analyse(args, argv: list[str]) -> int:
    sweep = Path(args.sweep[0])
    out = Path(args.out) if args.out else Path("report") / sweep.name
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out}: exists and is not a folder")
    a = load_analysis(sweep, args)
    runs, comparisons, calibration, generations, table, ranking, problems = (
        a.runs, a.comparisons, a.calibration, a.generations, a.table, a.ranking, a.problems)
    unreadable = [p for r in runs for p in r.problems] + problems
    if args.strict and unreadable:
        raise AnalysisError(unreadable[0] + (f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""))
    between = power_between(comparisons)
    paired = paired_differences(runs, args.seed, args.bootstrap)
    best = best_runs(table)

    def say(message: str) -> None:
        print(f"[analyze] {message}", flush=True)

    dpo = [r for r in runs if r.kind == "dpo"]
    say(f"{sweep}: {len(runs)} run(s) ({len(dpo)} DPO), {len(comparisons)} judged against SFT")
    for run in runs:
        if run.status != "completed":
            say(f"  {run.name}: {describe_state(run)}")
        for problem in run.problems:
            say(f"  {run.name}: unreadable: {problem}")
        for flag, detail in run.flags.items():
            say(f"  {run.name}: {flag}: {detail}")
    for problem in problems:
        say(f"  unreadable, left out: {problem}")
    for name, c in comparisons.items():
        if c.state != "complete":
            say(f"  judging of {name} is {c.state}: {len(c.pairs)} pairs so far")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False)
    if not ranking.empty:
        ranking.to_csv(out / "bradley_terry.csv", index=False)
    if not paired.empty:
        paired.to_csv(out / "paired_differences.csv", index=False)
    if not between.empty:
        between.to_csv(out / "power_between_runs.csv", index=False)
    by_beta = beta_table(table)
    if not by_beta.empty:
        by_beta.to_csv(out / "per_beta.csv", index=False)
    (out / "summary.md").write_text(markdown_table(table) + "\n\n## Best run per criterion\n\n" + best_markdown(best) + "\n")
    colours = beta_colours(runs)
    plt.rcParams.update(FIGURE_STYLE)
    figures = []
    for split in ("train", "eval"):
        figures += curves_figure(runs, split, colours, out / "figures")
    figures += final_vs_beta_figure(table, colours, out / "figures")
    figures += win_rate_figure(table, colours, out / "figures")
    figures += frontier_figure(table, colours, out / "figures")
    figures += judge_figure(table, calibration, out / "figures")
    report = write_report(out, sweep, runs, comparisons, generations, table, ranking, best, calibration, figures,
                          problems, argv, paired, between)
    for line in effect_statements(table, paired):
        say("  " + line.replace("**", ""))
    for _, r in table.iterrows():
        if pd.notna(r["win_rate"]):
            lc = f"{100 * r['lc_win_rate']:.1f}%" if pd.notna(r["lc_win_rate"]) else "n/a"
            debiased = "n/a" if pd.isna(r["debiased_win_rate"]) else f"{100 * r['debiased_win_rate']:.1f}%"
            say(f"  {r['run']}: win rate {100 * r['win_rate']:.1f}% [{100 * r['win_rate_ci_low']:.1f}, "
                f"{100 * r['win_rate_ci_high']:.1f}], debiased {debiased}, LC {lc}, BT {fmt(r.get('bt_score'), 4)}, "
                f"style-controlled BT {fmt(r.get('bt_sc_score'), 4)}")
    for line in power_statements(table, between) + calibration_statements(calibration):
        say("  " + line.replace("**", ""))
    say(f"wrote {out}/summary.csv, summary.md, {len(figures)} figure files and the report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
