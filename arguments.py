"""The arguments of generate.py and judge.py as dataclasses: their command lines are built from these fields
(config.parse_cli: --max-new-tokens is max_new_tokens, help from the docstrings), their checks live in
__post_init__, and a sweep file's `generate:` and `judge:` sections fill the same dataclasses without any argv
(slurm/spec.py), so a bad value in either place gets the same message.

    args = GenerateArgs(model="logs/default/sft/final", prompts=["mt_bench"], out="answers.jsonl", limit=8)
    to_argv(args)      # ['--model', 'logs/default/sft/final', '--prompts', 'mt_bench', '--out', ..., '--limit', '8']

Light on purpose (no torch): the launcher and the planner read sweep files without loading an engine.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field

from config import ArgsError, check_choices

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
JUDGE_TEMPLATES = ("hh-v1", "mt-bench-v2")
"""judge.py's TEMPLATES, by name (tests/test_judge.py checks the two agree)."""


@dataclass(kw_only=True)
class EngineArgs:
    """The engine flags generate.py and judge.py share (0 = the engine's default)."""

    batch_size: int = 0
    """Prompts per engine call, the most a kill loses (0: the engine's default)."""
    dtype: str = field(default="auto", metadata={"choices": DTYPE_CHOICES})
    """Weights and compute dtype (auto: generation keeps the checkpoint's; the judge uses float32 on CPU, where bf16
    logits tie the verdict letters)."""
    max_model_len: int = 0
    """Prompt + output tokens (0: the model's context, at most 2048 for answers and 8192 for the judge); longer
    prompts lose their earliest turns (answers) or become error rows (verdicts)."""
    tensor_parallel_size: int = 0
    """vLLM: GPUs the weights are split over (0: every visible GPU that splits the attention heads evenly)."""
    gpu_memory_utilization: float = 0.0
    """vLLM: share of the device's memory it may take (0: 0.9 on GPU, 0.3 on CPU)."""

    def __post_init__(self):
        for name, ok, rule in (("batch_size", self.batch_size >= 0, ">= 1"),
                               ("max_model_len", self.max_model_len == 0 or self.max_model_len >= 2, ">= 2"),
                               ("tensor_parallel_size", self.tensor_parallel_size >= 0, ">= 1"),
                               ("gpu_memory_utilization", 0 <= self.gpu_memory_utilization <= 1, "in (0, 1]")):
            if not ok:
                raise ArgsError(f"--{name.replace('_', '-')} must be {rule}")
        check_choices(self)


@dataclass(kw_only=True)
class GenerateArgs(EngineArgs):
    """generate.py's arguments: its flags are these fields (--max-new-tokens is max_new_tokens)."""

    model: str
    """Checkpoint folder, LoRA adapter folder or hub id."""
    prompts: list[str] = field(metadata={"metavar": "SET"})
    """One or more of: heldout[:config|run] | mt_bench | alpaca_eval | FILE.jsonl."""
    out: str
    """JSONL file the answers are appended to."""
    engine: str = field(default="auto", metadata={"choices": ("auto", "vllm", "hf")})
    """auto: vLLM where it imports, else HF transformers."""
    n: int = 1
    """Answers per prompt (needs --temperature > 0 when above 1)."""
    temperature: float = 0.0
    """0 = greedy, the evaluation default."""
    top_p: float = 1.0
    """Nucleus sampling mass (with --temperature > 0)."""
    repetition_penalty: float = 1.0
    """Divide the logits of tokens already in the prompt or answer by this (CTRL; HF and vLLM both); 1 = off."""
    max_new_tokens: int = 256
    """Answer length limit in tokens."""
    seed: int = 0
    """Sampling seed; each answer's own seed derives from it."""
    limit: int = 0
    """Answer only a seeded subset of this many prompts of each set (0 = all)."""
    subset_seed: int = 0
    """Seed of the --limit subset."""
    turns: str = field(default="first", metadata={"choices": ("first", "both")})
    """MT-Bench: the first turn, or both (the follow-up after the model's own first answer)."""
    chat_template: str = field(default="", metadata={"choices": ("", "auto", "model", "hh")})
    """Default: the training run's tokenize.chat_template, else auto."""
    name: str = ""
    """Model name in the rows (default: the run folder's name)."""
    base_model: str = ""
    """Base model of a LoRA adapter (default: its adapter_config.json)."""

    def __post_init__(self):
        super().__post_init__()
        for name, ok, rule in (("n", self.n >= 1, ">= 1"), ("temperature", self.temperature >= 0, ">= 0"),
                               ("top-p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("repetition-penalty", self.repetition_penalty > 0, "> 0"),
                               ("max-new-tokens", self.max_new_tokens >= 1, ">= 1"), ("limit", self.limit >= 0, ">= 0")):
            if not ok:
                raise ArgsError(f"--{name} must be {rule}")
        if not self.prompts:
            raise ArgsError("--prompts: name at least one prompt set")
        if 0 < self.temperature < 1e-3:
            raise ArgsError("--temperature below 1e-3 is greedy in vLLM but sampling in HF; use 0 for greedy")
        if self.n > 1 and self.temperature == 0:
            raise ArgsError("--n > 1 with --temperature 0 gives n identical greedy answers; set --temperature")


@dataclass(kw_only=True)
class JudgeArgs(EngineArgs):
    """judge.py's arguments: its flags are these fields (--judge-model is judge_model)."""

    candidate: str = ""
    """generate.py answers of the model judged (a DPO run)."""
    baseline: str = ""
    """generate.py answers it is compared with (the SFT model)."""
    judge_model: list[str] = field(default_factory=list, metadata={"metavar": "MODEL"})
    """Judge checkpoint folder or hub id (its tokenizer is used with every engine); several: a panel, each judge
    judged and cached on its own and combined by --panel-combine."""
    out: str = ""
    """JSONL file the verdicts are appended to; the summary goes beside it."""
    engine: str = field(default="auto", metadata={"choices": ("auto", "vllm", "hf", "openai")})
    """auto: openai with --base-url, else vLLM where it imports, else hf."""
    base_url: str = ""
    """OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."""
    api_key: str = ""
    """Default $OPENAI_API_KEY, else EMPTY."""
    served_model_name: str = ""
    """The judge's name on the server (default: its only model)."""
    concurrency: int = 16
    """openai: requests in flight."""
    request_retries: int = 4
    """openai: retries of a failed request (backoff 1, 2, 4 s...)."""
    request_timeout: float = 600.0
    """openai: seconds per request."""
    order: str = field(default="random", metadata={"choices": ("random", "both")})
    """random: one seeded position draw per pair; both: each pair in both orders, disagreement a tie."""
    seed: int = 0
    """Position draws, --limit subsets, retry sampling, bootstrap."""
    template: list[str] = field(default_factory=lambda: ["hh-v1"], metadata={"metavar": "TEMPLATE"})
    """The judge's prompt: hh-v1 (helpful and harmless) or mt-bench-v2 (FastChat's pairwise prompt); with a panel,
    one per judge, or one for all (the same model twice under two templates is a panel of two)."""
    panel_combine: str = field(default="mean", metadata={"choices": ("mean", "majority")})
    """A panel's verdict: mean (of the judges' probabilities; a vote in generate mode) or majority (of verdicts)."""
    mode: str = field(default="choice", metadata={"choices": ("choice", "generate")})
    """choice: the judge's probabilities of [[A]]/[[B]]/[[C]]; generate: an explanation, then the last [[X]]."""
    max_new_tokens: int = 1024
    """generate mode: the judge's explanation and verdict."""
    retries: int = 2
    """generate mode: re-asks of an unparseable verdict."""
    retry_temperature: float = 0.7
    """generate mode: sampling for the re-asks."""
    retry_errors: bool = False
    """Judge error rows again (request failures always are)."""
    limit: int = 0
    """Judge a seeded subset of this many pairs (0 = all)."""
    candidate_sampling: str = ""
    """sampling_hash to take from --candidate (default: the newest)."""
    baseline_sampling: str = ""
    """sampling_hash to take from --baseline (default: the newest)."""
    calibrate: list[str] | None = field(default=None, metadata={"nargs": "*", "metavar": "SET"})
    """Also judge human-labelled pairs: llmbar:Natural, llmbar:Adversarial, heldout[:<config>], or a file of your
    own, pairs:FILE[:prompt=COL,chosen=COL,...] (none named: the first three)."""
    calibration_limit: int = 0
    """A seeded subset of this many pairs per calibration set (0 = all)."""
    calibration: str = ""
    """A --calibrate run's summary.json to report beside the win rate."""
    probe_injection: bool = False
    """Also judge --injection-limit of the pairs with each prompt injection of judge.INJECTIONS appended to the
    candidate's answer, and report the share of verdicts that flipped."""
    injection_limit: int = 16
    """Pairs (a seeded subset) --probe-injection injects into."""
    plan_prompts: list[str] | None = field(default=None, metadata={"nargs": "*", "metavar": "VERDICTS"})
    """Judge nothing: print how many prompts tell each run from its baseline and runs from each other (80% power,
    α = 0.05), from the per-prompt spread of these verdict files (none named: --out's)."""

    LAUNCHER_SETS_OUT: typing.ClassVar[bool] = False
    """A sweep's judge: section (slurm/spec.py) has no --out of its own: the launcher sets one per job."""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.judge_model, str):  # a sweep file's `judge_model: X`
            self.judge_model = [self.judge_model]
        if isinstance(self.template, str):
            self.template = [self.template]
        for name in self.template:
            if name not in JUDGE_TEMPLATES:
                raise ArgsError(f"argument --template: invalid choice: {name!r} (choose from "
                                f"{', '.join(map(repr, JUDGE_TEMPLATES))})")
        if self.plan_prompts is not None:
            if not self.plan_prompts and not self.out:
                raise ArgsError("--plan-prompts: name verdict files, or --out")
            return
        if not self.judge_model:
            raise ArgsError("the following arguments are required: --judge-model")
        if not self.out and not self.LAUNCHER_SETS_OUT:
            raise ArgsError("the following arguments are required: --out")
        if len(self.template) > 1 and len(self.judge_model) > 1 and len(self.template) != len(self.judge_model):
            raise ArgsError(f"--template: {len(self.template)} templates for {len(self.judge_model)} judges; give one "
                            f"per judge, or one for all")
        members = panel_members(self.judge_model, self.template)
        if len(set(members)) != len(members):
            raise ArgsError(f"--judge-model/--template: the panel names a judge twice: {members}")
        if bool(self.candidate) != bool(self.baseline):
            raise ArgsError("--candidate and --baseline go together")
        if not self.candidate and self.calibrate is None:
            raise ArgsError("nothing to judge: give --candidate and --baseline, or --calibrate")
        if self.probe_injection and not self.candidate:
            raise ArgsError("--probe-injection injects into the candidate's answers: give --candidate and --baseline")
        for name, ok, rule in (("concurrency", self.concurrency >= 1, ">= 1"),
                               ("request-retries", self.request_retries >= 0, ">= 0"),
                               ("request-timeout", self.request_timeout > 0, "> 0"),
                               ("max-new-tokens", self.max_new_tokens >= 1, ">= 1"), ("retries", self.retries >= 0, ">= 0"),
                               ("retry-temperature", self.retry_temperature > 0, "> 0"), ("limit", self.limit >= 0, ">= 0"),
                               ("calibration-limit", self.calibration_limit >= 0, ">= 0"),
                               ("injection-limit", self.injection_limit >= 1, ">= 1")):
            if not ok:
                raise ArgsError(f"--{name} must be {rule}")
        if self.base_url and self.engine not in ("auto", "openai"):
            raise ArgsError(f"--base-url goes with --engine openai, not {self.engine}")


def panel_members(models: list[str], templates: list[str]) -> list[tuple[str, str]]:
    """(judge model, template) of each judge: one template for all, or one each."""
    if len(templates) == 1:
        return [(m, templates[0]) for m in models]
    if len(models) == 1:
        return [(models[0], t) for t in templates]
    return list(zip(models, templates))


def pairs_file(spec: str) -> tuple[str, str]:
    """(file, column mapping text) of a `pairs:FILE[:prompt=COL,chosen=COL,...]` calibration set."""
    path, sep, mapping = spec[len("pairs:"):].rpartition(":")
    if not sep or "=" not in mapping or "/" in mapping:
        return spec[len("pairs:"):], ""
    return path, mapping
