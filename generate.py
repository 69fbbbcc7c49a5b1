"""Answer held-out prompts with a checkpoint, through vLLM or HF transformers, resumably.

    python generate.py --model logs/default/beta0.1_seed0/final --prompts heldout --out answers.jsonl
        [--engine auto|vllm|hf] [--n 1] [--temperature 0] [--top-p 1] [--max-new-tokens 256] [--seed 0]
        [--batch-size N] [--limit N] [--subset-seed 0] [--turns first|both] [--chat-template auto|model|hh]
        [--dtype auto|bfloat16|float32] [--max-model-len 0] [--tensor-parallel-size 0] [--name NAME]

--model: a checkpoint folder (a run's final/, the merged copy of a LoRA run), a LoRA adapter folder (final/adapter:
served through vLLM's LoRARequest or peft on the base named in adapter_config.json), or a hub id.
--prompts (one or more): heldout (the held-out pairs of the run that made --model) | heldout:<training config or run
folder> | mt_bench | alpaca_eval (from ../shared/data) | any .jsonl of prompts (`prompt` text, or `messages`/`prompt`
as chat messages; an `id` field, else the line number, is the prompt id). Ids are `<set>/<id>`: one file can hold
several sets.

Every prompt is formatted by chat_format.fit_prompt, the function training uses, and handed to the engine as token
ids, so the template is applied once and no BOS is doubled. Sampling parameters are always explicit: vLLM runs with
generation_config="vllm" and HF with a blank GenerationConfig, because both otherwise fill unset values from the
checkpoint's generation_config.json (Llama-3-8B-Instruct's asks for temperature 0.6, top_p 0.9). Greedy by default.

Rows are appended per batch, keyed by (model fingerprint, prompt id, sample index, sampling hash, formatted-prompt
hash): a re-run skips what is written, a kill loses at most the batch in flight, and a torn last line is cut before
appending. Sampling (temperature > 0) is seeded per answer in vLLM and per batch in HF (transformers has no per-row
generator), so HF samples reproduce only with the same batches.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from chat_format import FormattingError, fit_prompt
from config import UserInputError, load_config
from jsonl import append_jsonl, read_jsonl, repair_tail

REPO = Path(__file__).resolve().parent
NAMED_SETS = {"mt_bench": "mt_bench/question.jsonl", "alpaca_eval": "alpaca_eval/eval_instructions.jsonl"}
ROLES = ("system", "user", "assistant")
DEFAULT_BATCH = {"hf": 16, "vllm": 256}
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class GenerationError(UserInputError):
    pass


@dataclass(frozen=True)
class Prompt:
    id: str
    """Stable across runs and models: `<set>/<record id>` (`mt_bench/81`, `heldout/test.jsonl.gz#17`)."""
    messages: tuple
    """Chat history handed to the template, ending with a user turn."""
    given: object
    """The prompt as the source gave it (text or messages)."""
    meta: dict = field(default_factory=dict)
    """dataset, category, turn: carried into every row for the judge and the analysis."""
    next_turns: tuple = ()
    """MT-Bench follow-up questions, asked after the model's own answer with --turns both."""


# ---------------------------------------------------------------- prompt sets


def _messages(value, where: str) -> tuple:
    if isinstance(value, str):
        if not value.strip():
            raise GenerationError(f"{where}: the prompt is empty")
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise GenerationError(f"{where}: a prompt must be text or a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise GenerationError(f"{where}: message {i} must be {{role: system|user|assistant, content: text}}; got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise GenerationError(f"{where}: the last message must be a user turn (the model answers it); got {out[-1]['role']}")
    return tuple(out)


def _read_lines(path: Path):
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except UnicodeDecodeError as e:
        raise GenerationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerationError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise GenerationError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _prompt_from_record(record: dict, set_name: str, number: int, where: str, turns: str) -> Prompt:
    if "turns" in record and "question_id" in record:  # MT-Bench
        asked = record["turns"]
        if not isinstance(asked, list) or not asked or not all(isinstance(t, str) and t.strip() for t in asked):
            raise GenerationError(f"{where}: 'turns' must be a non-empty list of questions")
        return Prompt(f"mt_bench/{record['question_id']}", _messages(asked[0], where), asked[0],
                      {"dataset": "mt_bench", "category": record.get("category"), "turn": 1},
                      tuple(asked[1:]) if turns == "both" else ())
    if "instruction" in record:  # AlpacaEval
        record_id = record.get("index", number - 1)
        meta = {"dataset": "alpaca_eval", "source": record.get("dataset"), "turn": 1}
        text = record["instruction"]
        if isinstance(text, str) and isinstance(record.get("input"), str) and record["input"].strip():
            text = f"{text}\n\n{record['input']}"  # Alpaca-style records keep their input after the instruction
        return Prompt(f"alpaca_eval/{record_id}", _messages(text, where), text, meta)
    value = record.get("messages", record.get("prompt"))
    if value is None:
        raise GenerationError(f"{where}: needs 'prompt' (text or chat messages), 'messages', 'instruction' (AlpacaEval) "
                              f"or 'question_id' + 'turns' (MT-Bench); has {sorted(record)}")
    record_id = record.get("id", record.get("prompt_id", number))
    return Prompt(f"{set_name}/{record_id}", _messages(value, where), value, {"dataset": set_name, "turn": 1})


def run_config_of(model: str) -> Path | None:
    """The training config.yaml of the run that wrote this checkpoint (run/final or run/final/adapter), if any."""
    folder = Path(model).expanduser()
    for parent in (folder, folder.parent, folder.parent.parent):
        if (parent / "config.yaml").is_file() and (parent / "run.json").is_file():
            return parent / "config.yaml"
    return None


def heldout_pairs(source: str, model: str, flag: str = "--prompts", error=None) -> tuple:
    """(training config, the pairs it held out): same data config, same data.split_seed, same split. `source` names
    the config or run folder; empty, the run that wrote `model`. judge.py calibrates on these pairs too."""
    from preference_data import load_pairs, split_pairs

    error = error or GenerationError
    if source:
        path = Path(source)
        path = path / "config.yaml" if path.is_dir() else path
        if not path.is_file():
            raise error(f"{flag} heldout:{source}: no training config there (a config YAML or a run folder)")
    else:
        path = run_config_of(model)
        if path is None:
            raise error(f"{flag} heldout: {model} is not the output of a training run (no config.yaml and run.json "
                        f"beside it); name the data with {flag} heldout:<config YAML or run folder>")
    cfg = load_config(path)
    pairs, _ = load_pairs(cfg.data)
    _, held_out = split_pairs(pairs, cfg.data.eval_fraction, cfg.data.split_seed)
    if not held_out:
        raise error(f"{path}: data.eval_fraction={cfg.data.eval_fraction} holds out no pairs")
    return cfg, held_out


def heldout_prompts(source: str, model: str) -> list[Prompt]:
    """The prompt part of the pairs training held out."""
    cfg, held_out = heldout_pairs(source, model)
    return [Prompt(f"heldout/{p.id}", p.prompt, list(p.prompt), {"dataset": Path(cfg.data.path).name, "turn": 1})
            for p in held_out]


def shared_data() -> Path:
    """$DPO_SHARED_DATA, else ../shared/data from the working directory (where training configs point), else beside
    this file's folder (a sweep's jobs run a code snapshot from the directory the sweep was launched in)."""
    candidates = [Path(os.environ["DPO_SHARED_DATA"])] if os.environ.get("DPO_SHARED_DATA") else []
    candidates += [Path("../shared/data"), REPO.parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def load_prompt_set(spec: str, model: str, turns: str = "first", limit: int = 0, subset_seed: int = 0) -> list[Prompt]:
    """Prompts of a named set, a held-out split or a jsonl file; with limit, a seeded subset kept in source order."""
    if spec == "heldout" or spec.startswith("heldout:"):
        prompts = heldout_prompts(spec.partition(":")[2], model)
    else:
        path = shared_data() / NAMED_SETS[spec] if spec in NAMED_SETS else Path(spec)
        if not path.is_file():
            raise GenerationError(f"--prompts {spec}: no such file: {path} (named sets: heldout, {', '.join(NAMED_SETS)}"
                                  f", read from ../shared/data or $DPO_SHARED_DATA)")
        set_name = spec if spec in NAMED_SETS else path.name.split(".")[0]
        prompts, first_line = [], {}
        for number, record in _read_lines(path):
            prompt = _prompt_from_record(record, set_name, number, f"{path} line {number}", turns)
            if prompt.id in first_line:
                raise GenerationError(f"{path} line {number}: prompt id {prompt.id!r} repeats line {first_line[prompt.id]}")
            first_line[prompt.id] = number
            prompts.append(prompt)
        if not prompts:
            raise GenerationError(f"{path}: no prompts")
    return subset(prompts, limit, subset_seed)


def subset(items: list, limit: int, seed: int) -> list:
    """A seeded subset kept in source order: the same prompts (or judged pairs) for every model with the same seed."""
    if not limit or limit >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [x for i, x in enumerate(items) if i in keep]


def load_prompts(specs: list[str], model: str, turns: str = "first", limit: int = 0, subset_seed: int = 0) -> list[Prompt]:
    """Every set in turn (--limit applies to each); ids must not collide across sets."""
    prompts, seen = [], {}
    for spec in specs:
        for prompt in load_prompt_set(spec, model, turns, limit, subset_seed):
            if prompt.id in seen:
                raise GenerationError(f"--prompts {spec}: prompt id {prompt.id!r} is also in --prompts {seen[prompt.id]}")
            seen[prompt.id] = spec
            prompts.append(prompt)
    return prompts


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSpec:
    path: str
    """--model as given."""
    weights: str
    """Folder or hub id of the full weights (the base model for an adapter)."""
    adapter: str | None
    """LoRA adapter folder, or None."""
    tokenizer: str
    fingerprint: str
    name: str
    run_config: Path | None


def resolve_model(path: str, name: str = "", base_model: str = "") -> ModelSpec:
    from models import model_fingerprint

    folder = Path(path).expanduser()
    run_config = run_config_of(path)
    label = name or (run_config.parent.name if run_config else folder.name or path)
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        return ModelSpec(path, path, None, path, model_fingerprint(path), label, run_config)
    try:
        base = base_model or json.loads(adapter_config.read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError) as e:
        raise GenerationError(f"{adapter_config}: no base_model_name_or_path ({e}); pass --base-model") from None
    if not base_model and not Path(base).expanduser().exists() and (REPO / base).exists():
        base = str(REPO / base)  # saved relative to the repo root by train_dpo.py
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return ModelSpec(path, base, path, path if has_tokenizer else base,
                     f"{model_fingerprint(base)}+lora:{model_fingerprint(path)}", label, run_config)


def model_config(weights: str) -> dict:
    """The checkpoint's config.json, or {} for a hub id."""
    config = Path(weights).expanduser() / "config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def context_length(config: dict) -> int | None:
    """The model's context (max_position_embeddings, GPT-2's n_positions), or None when the config does not say."""
    return config.get("max_position_embeddings") or config.get("n_positions")


def stop_token_ids(tokenizer, weights: str) -> list[int]:
    """The tokenizer's EOS plus the end-of-turn ids the checkpoint declares (Llama-3's <|eot_id|>): where an answer
    ends is a property of the model, not a sampling default, so it is read from generation_config.json and recorded."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_config = Path(weights).expanduser() / "generation_config.json"
    if gen_config.is_file():
        declared = json.loads(gen_config.read_text()).get("eos_token_id")
        ids.update(declared if isinstance(declared, list) else [declared] if declared is not None else [])
    return sorted(ids)


# ---------------------------------------------------------------- engines


@dataclass
class Request:
    prompt: Prompt
    sample_index: int
    prompt_ids: list
    prompt_truncated: bool
    messages: tuple
    sample_seed: int
    key: str


@dataclass
class Answer:
    text: str
    new_tokens: int
    finish_reason: str
    prompt_tokens: int
    """As the engine saw the prompt: a BOS added on top of the template's would show here."""


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def tensor_parallel_default(config: dict) -> int:
    """The most visible GPUs that split the model's attention heads evenly (SmolLM2's 9 heads: 1 or 3)."""
    import torch

    heads = [config.get(k) for k in ("num_attention_heads", "num_key_value_heads", "n_head") if config.get(k)]
    gpus = max(1, torch.cuda.device_count())
    return next(n for n in range(gpus, 0, -1) if all(h % n == 0 for h in heads))


def start_vllm(weights: str, tokenizer: str, args, error=None, **extra):
    """vLLM's offline LLM with this project's defaults (also judge.py's): explicit sampling only
    (generation_config="vllm"), every visible GPU that splits the heads, and on CPU eager mode, a 1 GiB KV cache and
    30% of the memory (vLLM's defaults ask for most of the machine). A start-up failure is one line naming the way
    out. One model per process: vLLM does not reliably free a model's memory for a second one."""
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default asks for most of the RAM
    from vllm import LLM

    kwargs = dict(model=weights, tokenizer=tokenizer, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
                  generation_config="vllm",
                  tensor_parallel_size=args.tensor_parallel_size or tensor_parallel_default(model_config(weights)),
                  gpu_memory_utilization=args.gpu_memory_utilization or (0.9 if on_gpu else 0.3),
                  enforce_eager=not on_gpu, **extra)
    try:
        return LLM(**kwargs)
    except Exception as e:  # a library's start-up failure, said in one line with the way out
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise (error or GenerationError)(f"vLLM could not start {weights} ({type(e).__name__}: {first}); "
                                         f"--engine hf runs it with transformers") from None


class VLLMEngine:
    """generate.py's vLLM engine: per-answer seeds, a LoRA adapter through LoRARequest."""

    name = "vllm"

    def __init__(self, spec: ModelSpec, args, stop_ids: list[int]):
        from vllm import SamplingParams

        self.sampling_params, self.stop_ids, self.args = SamplingParams, stop_ids, args
        extra, self.lora_request = {}, None
        if spec.adapter:
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(spec.adapter) / "adapter_config.json").read_text()).get("r", 16)
            max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
            if max_rank is None:
                raise GenerationError(f"{spec.adapter}: LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}); "
                                      f"use the merged model ({Path(spec.adapter).parent}) or --engine hf")
            extra = dict(enable_lora=True, max_loras=1, max_lora_rank=max_rank)
            self.lora_request = LoRARequest("adapter", 1, str(Path(spec.adapter).resolve()))
        self.llm = start_vllm(spec.weights, spec.tokenizer, args, **extra)

    def generate(self, batch: list[Request]) -> list[Answer]:
        a = self.args
        params = [self.sampling_params(
            n=1, temperature=a.temperature, top_p=a.top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, max_tokens=a.max_new_tokens, stop_token_ids=self.stop_ids,
            seed=r.sample_seed, skip_special_tokens=True) for r in batch]
        outputs = self.llm.generate([{"prompt_token_ids": r.prompt_ids} for r in batch], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        return [Answer(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason, len(o.prompt_token_ids))
                for o in outputs]


def left_pad(prompts: list[list[int]], pad: int, device):
    """(input ids, attention mask) of a batch padded on the left, so every prompt ends where generation starts."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


class HFEngine:
    """transformers `generate`, batched with left padding (callers sort prompts by length to waste little)."""

    name = "hf"

    def __init__(self, spec: ModelSpec, args, stop_ids: list[int], tokenizer):
        import torch
        from transformers import GenerationConfig

        from models import load_model

        self.torch, self.args, self.stop_ids, self.tokenizer = torch, args, stop_ids, tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(spec.weights, args.dtype)
        if spec.adapter:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, spec.adapter)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise GenerationError(f"{spec.adapter}: peft cannot load this adapter onto {spec.weights} ({first})") from None
        # generate() fills every value left at its global default from the checkpoint's generation_config.json;
        # a blank config leaves only what is passed below.
        model.generation_config = GenerationConfig()
        self.model = model.to(self.device).eval()

    def generate(self, batch: list[Request]) -> list[Answer]:
        torch, a, pad = self.torch, self.args, self.tokenizer.pad_token_id
        input_ids, mask = left_pad([r.prompt_ids for r in batch], pad, self.device)
        width = input_ids.shape[1]
        sampling = dict(do_sample=True, temperature=a.temperature, top_p=a.top_p, top_k=0) if a.temperature > 0 else \
            dict(do_sample=False)
        if a.temperature > 0:
            torch.manual_seed(batch[0].sample_seed)  # per batch: HF has no per-row generator
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=a.max_new_tokens,
                                      eos_token_id=self.stop_ids, pad_token_id=pad, repetition_penalty=1.0, **sampling)
        answers = []
        for r, row in zip(batch, out[:, width:].tolist()):
            end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            kept = row if end is None else row[:end]
            answers.append(Answer(self.tokenizer.decode(kept, skip_special_tokens=True),
                                  len(row) if end is None else end + 1, "length" if end is None else "stop",
                                  len(r.prompt_ids)))
        return answers


# ---------------------------------------------------------------- keys, rows, the loop


def sampling_settings(args, stop_ids: list[int], template: str, max_prompt_tokens: int) -> dict:
    """Everything that shapes an answer besides the model and the prompt; hashed into the row key."""
    settings = {"temperature": args.temperature, "top_p": args.top_p if args.temperature > 0 else 1.0, "top_k": 0,
                "repetition_penalty": 1.0, "max_new_tokens": args.max_new_tokens, "stop_token_ids": stop_ids,
                "chat_template": template, "max_prompt_tokens": max_prompt_tokens, "dtype": args.dtype}
    if args.temperature > 0:
        settings["seed"] = args.seed  # greedy answers do not depend on it: changing it must not redo them
    return settings


def digest(value, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:n]


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    return int(digest([seed, prompt_id, sample_index], 8), 16) & 0x7FFFFFFF


def format_prompt(tokenizer, prompt: Prompt, max_prompt_tokens: int, template: str):
    """chat_format.fit_prompt, with a failing chat template named by the prompt it failed on."""
    try:
        return fit_prompt(tokenizer, prompt.messages, max_prompt_tokens, template)
    except Exception as e:  # jinja2 raises TemplateError (a plain Exception) for histories a strict template refuses
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GenerationError(f"prompt {prompt.id}: the chat template cannot format it ({type(e).__name__}: {first})") from None


def with_answer(prompt: Prompt, answer: str) -> Prompt:
    """The MT-Bench follow-up: the model's own first answer stays in the history, as FastChat does."""
    return Prompt(f"{prompt.id}/turn{prompt.meta['turn'] + 1}",
                  prompt.messages + ({"role": "assistant", "content": answer}, {"role": "user", "content": prompt.next_turns[0]}),
                  prompt.next_turns[0], {**prompt.meta, "turn": prompt.meta["turn"] + 1}, prompt.next_turns[1:])


class OutputLock:
    """One writer per output file: a second generate.py on the same file would duplicate rows."""

    def __init__(self, out: Path, error=None, script: str = "generate.py"):
        self.fh = open(out.with_name(out.name + ".lock"), "w")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise (error or GenerationError)(f"{out}: another {script} is writing this file") from None


def run(args, log=print) -> dict:
    from chat_format import resolve_template
    from models import load_tokenizer

    out = Path(args.out)
    if out.is_dir():
        raise GenerationError(f"--out {out}: is a folder; name a .jsonl file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out)  # noqa: F841  (held while run() runs)
    except OSError as e:
        raise GenerationError(f"--out {out}: cannot write there ({e.strerror})") from None
    spec = resolve_model(args.model, args.name, args.base_model)
    tokenizer = load_tokenizer(spec.tokenizer)
    template_mode = args.chat_template or (load_config(spec.run_config).tokenize.chat_template if spec.run_config else "auto")
    template = resolve_template(tokenizer, template_mode)
    stop_ids = stop_token_ids(tokenizer, spec.weights)
    context = context_length(model_config(spec.weights))
    if context and args.max_model_len > context:
        raise GenerationError(f"--max-model-len {args.max_model_len} is longer than {spec.weights}'s context ({context})")
    # at most 2048 by default: KV cache for longer contexts than evaluation prompts need is memory vLLM reserves for nothing
    args.max_model_len = args.max_model_len or min(context or 2048, 2048)
    max_prompt_tokens = args.max_model_len - args.max_new_tokens
    if max_prompt_tokens < 1:
        raise GenerationError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in --max-model-len "
                              f"{args.max_model_len}")
    settings = sampling_settings(args, stop_ids, template, max_prompt_tokens)
    settings_hash = digest(settings)
    prompts = load_prompts(args.prompts, args.model, args.turns, args.limit, args.subset_seed)

    dropped = repair_tail(out)
    if dropped:
        log(f"{out}: cut a torn last line ({dropped} bytes) left by a kill")
    try:
        done = {row["key"]: row for row in read_jsonl(out) if "key" in row}
    except (ValueError, UnicodeDecodeError) as e:  # a line broken mid-file: not ours to repair silently
        raise GenerationError(f"--out {out}: cannot resume from it ({e}); move it aside or fix that line") from None
    engine, stats = None, {"written": 0, "skipped": 0, "new_tokens": 0, "generate_s": 0.0, "engine_start_s": 0.0}
    wave = [(p, i) for p in prompts for i in range(args.n)]
    while wave:  # one wave per turn: MT-Bench's second turns need the first answers
        requests, formatted = [], {}
        for prompt, i in wave:
            # per Prompt object: samples share a first turn, but each second turn holds its own first answer
            ids, kept, truncated = formatted.get(id(prompt)) or format_prompt(tokenizer, prompt, max_prompt_tokens, template)
            formatted[id(prompt)] = ids, kept, truncated
            key = f"{spec.fingerprint}|{prompt.id}|{i}|{settings_hash}|{digest(ids, 8)}"
            if key in done:
                stats["skipped"] += 1
                continue
            requests.append(Request(prompt, i, ids, truncated, kept, sample_seed(args.seed, prompt.id, i), key))
        if requests and engine is None:
            started = time.time()
            engine = make_engine(spec, args, stop_ids, tokenizer, log)
            stats["engine_start_s"] = round(time.time() - started, 1)
        if requests:
            generate_all(engine, requests, spec, args, settings, settings_hash, out, done, stats)
        answered = {(r["prompt_id"], r["sample_index"]): r["response"] for r in done.values()
                    if r["key"].startswith(spec.fingerprint + "|") and r["sampling_hash"] == settings_hash}
        wave = [(with_answer(p, answered[p.id, i]), i) for p, i in wave if p.next_turns]
    rate = stats["new_tokens"] / stats["generate_s"] if stats["generate_s"] else 0.0
    log(f"{spec.name}: wrote {stats['written']} answers, skipped {stats['skipped']} already in {out}"
        + (f"; engine start {stats['engine_start_s']} s, {stats['new_tokens']} tokens in {stats['generate_s']:.1f} s "
           f"({rate:.0f} tok/s)" if stats["written"] else ""))
    return {**stats, "tokens_per_s": round(rate, 1), "engine": engine.name if engine else None, "out": str(out)}


def make_engine(spec: ModelSpec, args, stop_ids, tokenizer, log):
    name = args.engine
    if name == "auto":
        name = "vllm" if vllm_available() else "hf"
    elif name == "vllm" and not vllm_available():
        raise GenerationError("--engine vllm: vLLM is not installed here (requirements-cpu.txt or requirements-gpu.txt)")
    log(f"{spec.name}: starting the {name} engine on {spec.weights}" + (f" + LoRA {spec.adapter}" if spec.adapter else ""))
    args.batch_size = args.batch_size or DEFAULT_BATCH[name]
    return VLLMEngine(spec, args, stop_ids) if name == "vllm" else HFEngine(spec, args, stop_ids, tokenizer)


def generate_all(engine, requests: list[Request], spec: ModelSpec, args, settings: dict, settings_hash: str,
                 out: Path, done: dict, stats: dict) -> None:
    from tqdm import tqdm

    requests = sorted(requests, key=lambda r: len(r.prompt_ids))
    bar = tqdm(total=len(requests), unit="answer", desc=spec.name, file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start:start + args.batch_size]
        began = time.time()
        answers = engine.generate(batch)
        stats["generate_s"] += time.time() - began
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for r, answer in zip(batch, answers):
            row = {"key": r.key, "prompt_id": r.prompt.id, "sample_index": r.sample_index, **r.prompt.meta,
                   "prompt": r.prompt.given, "messages": list(r.messages), "prompt_tokens": answer.prompt_tokens,
                   "prompt_truncated": r.prompt_truncated, "response": answer.text,
                   "finish_reason": answer.finish_reason, "new_tokens": answer.new_tokens, "model": spec.path,
                   "model_name": spec.name, "model_fingerprint": spec.fingerprint, "engine": engine.name,
                   "sampling": settings, "sampling_hash": settings_hash, "seed": args.seed,
                   "sample_seed": r.sample_seed, "timestamp": stamp}
            append_jsonl(out, row)
            done[r.key] = row
            stats["written"] += 1
            stats["new_tokens"] += answer.new_tokens
        bar.update(len(batch))
        bar.set_postfix_str(f"{stats['new_tokens'] / max(stats['generate_s'], 1e-9):.0f} tok/s")
    bar.close()


def engine_rules(args) -> list[tuple[str, bool, str]]:
    """(flag, holds, rule) for the engine flags generate.py and judge.py share (0 = the engine's default)."""
    return [("--batch-size", args.batch_size >= 0, ">= 1"),
            ("--max-model-len", args.max_model_len == 0 or args.max_model_len >= 2, ">= 2"),
            ("--tensor-parallel-size", args.tensor_parallel_size >= 0, ">= 1"),
            ("--gpu-memory-utilization", 0 <= args.gpu_memory_utilization <= 1, "in (0, 1]")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, LoRA adapter folder or hub id")
    p.add_argument("--prompts", required=True, nargs="+",
                   help="one or more of: heldout[:config|run] | mt_bench | alpaca_eval | FILE.jsonl")
    p.add_argument("--out", required=True, help="JSONL file the answers are appended to")
    p.add_argument("--engine", default="auto", choices=("auto", "vllm", "hf"), help="auto: vLLM where it imports")
    p.add_argument("--n", type=int, default=1, help="answers per prompt (needs --temperature > 0 when > 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="sampling seed; each answer's own seed derives from it")
    p.add_argument("--batch-size", type=int, default=0, help="prompts per engine call, the most a kill loses "
                                                              f"(default hf {DEFAULT_BATCH['hf']}, vllm {DEFAULT_BATCH['vllm']})")
    p.add_argument("--limit", type=int, default=0, help="answer only a seeded subset of this many prompts")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--turns", default="first", choices=("first", "both"), help="MT-Bench: first turn, or both")
    p.add_argument("--chat-template", default="", choices=("", "auto", "model", "hh"),
                   help="default: the training run's tokenize.chat_template, else auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--max-model-len", type=int, default=0, help="prompt + answer tokens (0: the model's context, at "
                   "most 2048); longer prompts lose their earliest turns, as in training")
    p.add_argument("--tensor-parallel-size", type=int, default=0, help="vLLM; 0 = every visible GPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.0, help="vLLM; 0 = 0.9 on GPU, 0.3 on CPU")
    p.add_argument("--name", default="", help="model name in the rows (default: the run folder's name)")
    p.add_argument("--base-model", default="", help="base model of a LoRA adapter (default: its adapter_config.json)")
    args = p.parse_args(argv)
    for flag, ok, rule in (("--n", args.n >= 1, ">= 1"), ("--temperature", args.temperature >= 0, ">= 0"),
                           ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"), ("--max-new-tokens", args.max_new_tokens >= 1, ">= 1"),
                           ("--limit", args.limit >= 0, ">= 0"), *engine_rules(args)):
        if not ok:
            p.error(f"{flag} must be {rule}")
    if 0 < args.temperature < 1e-3:
        p.error("--temperature below 1e-3 is greedy in vLLM but sampling in HF; use 0 for greedy")
    if args.n > 1 and args.temperature == 0:
        p.error("--n > 1 with --temperature 0 gives n identical greedy answers; set --temperature")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (UserInputError, FormattingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # vLLM spawns workers that re-import this file
    sys.exit(main())
