"""The inference layer generate.py and judge.py share: engines, the facts of a checkpoint they need, and the keyed,
resumable JSONL file both write.

    engine = HFEngine(weights, tokenizer, stop_ids, dtype="float32")          # or VLLMEngine(...), OpenAIEngine(...)
    answers = engine.complete(prompt_ids, max_tokens=128, temperature=0.0)   # [Completion]
    letters = engine.choice(prompt_ids, token_ids=[a, b, c])                 # next-token log-probs of those tokens
    out = KeyedJsonl(path, error=GenerationError, script="generate.py")      # rows already written, by key

Every engine takes prompts as token ids (the callers format them once, with the same chat template training used)
and sets every sampling parameter itself: vLLM runs with generation_config="vllm" and HF with a blank
GenerationConfig, because both otherwise fill unset values from the checkpoint's generation_config.json
(Llama-3-8B-Instruct's asks for temperature 0.6, top_p 0.9).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import inspect
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from arguments import EngineArgs
from config import UserInputError
from host import kv_cache_gib, on_cuda as on_gpu, vllm_cpu_env  # on_gpu: every engine's device test
from jsonl import append_jsonl, read_jsonl, repair_tail
from models import load_model

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


CALLER_ENV = {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU_")}
"""vLLM-CPU settings the caller set before this module loaded: start_vllm keeps them."""

# ---------------------------------------------------------------- what a checkpoint says about itself


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention kernels


def vllm_cpu_problem(weights: str) -> str | None:
    """Why vLLM-CPU cannot run this checkpoint (an attention head size it has no kernel for: the tiny test models'
    16), in words; None when it can, on a GPU, or when the config does not say."""
    if on_gpu():
        return None
    config = model_config(weights)
    heads, hidden = config.get("num_attention_heads") or config.get("n_head"), config.get("hidden_size") or \
        config.get("n_embd")
    head = config.get("head_dim") or (hidden // heads if heads and hidden else None)
    if head and head not in VLLM_CPU_HEAD_SIZES:
        return (f"vLLM-CPU has no attention kernel for head size {head} ({weights}; it has "
                f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))})")
    return None


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


def tensor_parallel_default(config: dict) -> int:
    """The most visible GPUs that split the model's attention heads evenly (SmolLM2's 9 heads: 1 or 3)."""
    heads = [config.get(k) for k in ("num_attention_heads", "num_key_value_heads", "n_head") if config.get(k)]
    gpus = max(1, torch.cuda.device_count())
    return next(n for n in range(gpus, 0, -1) if all(h % n == 0 for h in heads))


def left_pad(prompts: list[list[int]], pad: int, device):
    """(input ids, attention mask) of a batch padded on the left, so every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


# ---------------------------------------------------------------- engines


@dataclass
class Completion:
    text: str
    new_tokens: int
    finish_reason: str
    """stop (an end-of-turn token) or length (max_tokens reached)."""
    prompt_tokens: int
    """As the engine saw the prompt: a BOS added on top of the template's would show here."""


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class HFEngine:
    """transformers on the GPU if there is one, else the CPU; batched with left padding (callers sort prompts by
    length to waste little). Sampling is seeded per call: transformers has no per-row generator."""

    name = "hf"

    def __init__(self, weights: str, tokenizer, stop_ids: list[int], dtype: str, adapter: str | None = None,
                 error=UserInputError):
        from transformers import GenerationConfig

        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.device = "cuda" if on_gpu() else "cpu"
        model = load_model(weights, dtype)
        if adapter:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, adapter)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise error(f"{adapter}: peft cannot load this adapter onto {weights} ({_first_line(e)})") from None
        # generate() fills every value left at its global default from the checkpoint's generation_config.json;
        # a blank config leaves only what is passed below.
        model.generation_config = GenerationConfig()
        self.model = model.to(self.device).eval()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
            base.forward).parameters else {}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]

    def complete(self, prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float = 1.0,
                 seed: int | list[int] = 0, repetition_penalty: float = 1.0, on_done=None) -> list[Completion]:
        ids, mask = left_pad(prompts, self.pad, self.device)
        width = ids.shape[1]
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
            dict(do_sample=False)
        if temperature > 0:
            torch.manual_seed(seed[0] if isinstance(seed, list) else seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                      eos_token_id=self.stop_ids, pad_token_id=self.pad,
                                      repetition_penalty=repetition_penalty, **sampling)
        answers = []
        for prompt, row in zip(prompts, out[:, width:].tolist()):
            end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            kept = row if end is None else row[:end]
            answers.append(Completion(self.tokenizer.decode(kept, skip_special_tokens=True),
                                      len(row) if end is None else end + 1, "length" if end is None else "stop",
                                      len(prompt)))
        if on_done:
            on_done(len(prompts))
        return answers

    def close(self) -> None:
        """Let the weights go (a judge panel loads the next model after this one)."""
        self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def choice(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """Log-probabilities of `token_ids` as the next token after each prompt."""
        ids, mask = left_pad(prompts, self.pad, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift absolute positions (GPT-2)
        with torch.no_grad():  # the LM head on the last position alone: 1/width of its cost (a fifth of SmolLM2's)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                **self.last_logits_only).logits[:, -1].float()
        return torch.log_softmax(logits, dim=-1)[:, token_ids].tolist()


def start_vllm(weights: str, tokenizer: str, args: EngineArgs, seed: int, max_model_len: int, error=UserInputError,
               kv_tokens: int = 0, log=None, **extra):
    """vLLM's offline LLM with this project's defaults: explicit sampling only (generation_config="vllm"), every
    visible GPU that splits the heads, and on CPU eager mode, every core the job owns (vLLM reserves one for its
    scheduler otherwise), a KV cache sized for `kv_tokens` tokens at once (the batch; vLLM's default asks for most
    of the RAM) and 30% of the memory. What the caller's environment sets itself is kept. A start-up failure is one
    line naming the way out. One model per process: vLLM does not reliably free a model's memory for a second one."""
    gpu = on_gpu()
    if not gpu:
        gib, why = kv_cache_gib(model_config(weights), args.dtype, max(kv_tokens, max_model_len))
        cpu_env = {"VLLM_CPU_KVCACHE_SPACE": str(gib)}
        if (args.tensor_parallel_size or 1) == 1:  # with several CPU ranks vLLM wants one |-separated list each
            cpu_env.update(vllm_cpu_env())
        os.environ.update({k: v for k, v in cpu_env.items() if k not in CALLER_ENV})
        if log:
            log(f"vLLM on CPU: threads bound to cores {os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')} "
                f"(VLLM_CPU_NUM_OF_RESERVED_CPU={os.environ.get('VLLM_CPU_NUM_OF_RESERVED_CPU', 'default')}); "
                + (why if "VLLM_CPU_KVCACHE_SPACE" not in CALLER_ENV
                   else f"KV cache {CALLER_ENV['VLLM_CPU_KVCACHE_SPACE']} GiB (VLLM_CPU_KVCACHE_SPACE as set)"))
    from vllm import LLM

    kwargs = dict(model=weights, tokenizer=tokenizer, dtype=args.dtype, seed=seed, max_model_len=max_model_len,
                  generation_config="vllm",
                  tensor_parallel_size=args.tensor_parallel_size or tensor_parallel_default(model_config(weights)),
                  gpu_memory_utilization=args.gpu_memory_utilization or (0.9 if gpu else 0.3),
                  enforce_eager=not gpu, **extra)
    try:
        return LLM(**kwargs)
    except Exception as e:  # a library's start-up failure, said in one line with the way out
        raise error(f"vLLM could not start {weights} ({type(e).__name__}: {_first_line(e)}); --engine hf runs it "
                    f"with transformers") from None


def _finished_bar(on_done):
    """What vLLM takes as use_tqdm: called with an iterable while it adds requests (passed through untouched), and
    without one for the bar over finished requests (a _Finished)."""
    def factory(iterable=None, **_):
        return iterable if iterable is not None else _Finished(on_done)
    return factory


class _Finished:
    """The part of tqdm's interface vLLM's offline loop uses, forwarding each finished request to a callback."""

    def __init__(self, on_done):
        self.on_done, self.n, self.postfix, self.started = on_done, 0, "", time.time()

    @property
    def format_dict(self) -> dict:
        return {"elapsed": max(time.time() - self.started, 1e-9)}

    def update(self, n: int = 1) -> None:
        self.n += n
        self.on_done(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


class VLLMEngine:
    """vLLM's offline engine: per-answer seeds, a LoRA adapter through LoRARequest."""

    name = "vllm"

    def __init__(self, weights: str, tokenizer: str, stop_ids: list[int], args: EngineArgs, seed: int,
                 max_model_len: int, adapter: str | None = None, error=UserInputError, kv_tokens: int = 0, log=None):
        from vllm import SamplingParams

        self.sampling_params, self.stop_ids = SamplingParams, stop_ids
        extra, self.lora_request = {}, None
        if adapter:
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 16)
            max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
            if max_rank is None:
                raise error(f"{adapter}: LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}); use the "
                            f"merged model ({Path(adapter).parent}) or --engine hf")
            extra = dict(enable_lora=True, max_loras=1, max_lora_rank=max_rank)
            self.lora_request = LoRARequest("adapter", 1, str(Path(adapter).resolve()))
        self.llm = start_vllm(weights, tokenizer, args, seed, max_model_len, error, kv_tokens, log, **extra)

    def complete(self, prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float = 1.0,
                 seed: int | list[int] = 0, repetition_penalty: float = 1.0, on_done=None) -> list[Completion]:
        """on_done(n) is called as answers finish inside the one engine call (progress lines)."""
        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        params = [self.sampling_params(
            n=1, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, repetition_penalty=repetition_penalty,
            presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_tokens, stop_token_ids=self.stop_ids,
            seed=s, skip_special_tokens=True) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=_finished_bar(on_done) if on_done else False,
                                    lora_request=self.lora_request)
        return [Completion(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason,
                           len(o.prompt_token_ids)) for o in outputs]

    def close(self) -> None:
        """Shut the engine core down: its process (VLLM::EngineCore) holds the model's memory and would otherwise
        outlive this engine (a panel starts the next judge's engine after this)."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None

    def choice(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        # logprob_token_ids: the full-vocabulary log-probs of exactly these tokens (vLLM's default raw_logprobs mode)
        params = self.sampling_params(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids))
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[o.outputs[0].logprobs[0][t].logprob for t in token_ids] for o in outputs]


class RequestFailed(Exception):
    """A request that failed after its retries (an unreachable or erroring server): an error row, retried next run.
    kind "rejected": the server refused the request itself (4xx), which a re-run would repeat: kept like a verdict."""

    def __init__(self, message: str, kind: str = "request"):
        super().__init__(message)
        self.kind = kind


@dataclass
class ServerArgs:
    """How to reach an OpenAI-compatible server."""

    base_url: str
    api_key: str = ""
    served_model_name: str = ""
    concurrency: int = 16
    request_retries: int = 4
    request_timeout: float = 600.0


class OpenAIEngine:
    """Any OpenAI-compatible completions server that takes token-id prompts (vLLM's, which one judge can serve to
    many jobs): the prompt is the same token ids the offline engines see. Bounded concurrency; connection errors,
    timeouts, 429s and 5xx retried with exponential backoff; what still fails comes back as RequestFailed."""

    name = "openai"

    def __init__(self, server: ServerArgs, stop_ids: list[int], error=UserInputError):
        import openai

        self.openai, self.server, self.stop_ids = openai, server, stop_ids
        self.client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key or os.environ.get(
            "OPENAI_API_KEY") or "EMPTY", max_retries=0, timeout=server.request_timeout)
        try:
            served = [m.id for m in self.client.models.list().data]
        except openai.OpenAIError as e:
            raise error(f"--base-url {server.base_url}: no OpenAI-compatible server answers there "
                        f"({type(e).__name__}: {e})") from None
        if server.served_model_name and server.served_model_name not in served:
            raise error(f"--served-model-name {server.served_model_name}: {server.base_url} serves {served}")
        if not server.served_model_name and len(served) != 1:
            raise error(f"{server.base_url} serves {served}; name the judge with --served-model-name")
        self.model = server.served_model_name or served[0]

    def _call(self, **kwargs):
        o, delay = self.openai, 1.0
        for attempt in range(self.server.request_retries + 1):
            try:
                return self.client.completions.create(model=self.model, **kwargs)
            except (o.APIConnectionError, o.RateLimitError, o.InternalServerError) as e:  # APITimeoutError included
                if attempt == self.server.request_retries:
                    return RequestFailed(f"{type(e).__name__} after {attempt + 1} tries: {e}")
                time.sleep(delay)
                delay *= 2
            except o.APIError as e:  # 4xx: the request itself is wrong, retrying cannot help
                return RequestFailed(f"{type(e).__name__}: {e}", "rejected")

    def _map(self, fn, prompts):
        with ThreadPoolExecutor(max_workers=self.server.concurrency) as pool:
            return list(pool.map(fn, prompts))

    def choice(self, prompts, token_ids) -> list:
        def one(p):
            r = self._call(prompt=p, max_tokens=1, temperature=0.0, logprobs=1,
                           extra_body={"logprob_token_ids": list(token_ids), "return_tokens_as_token_ids": True})
            if isinstance(r, RequestFailed):
                return r
            try:
                top = r.choices[0].logprobs.top_logprobs[0]
                return [top[f"token_id:{t}"] for t in token_ids]
            except (AttributeError, IndexError, KeyError, TypeError):
                return RequestFailed("the server returned no log-probs for the verdict letters (choice mode needs "
                                     "vLLM's logprob_token_ids; use --mode generate with other servers)", "rejected")
        return self._map(one, prompts)

    def complete(self, prompts, max_tokens: int, temperature: float, top_p: float = 1.0, seed: int = 0,
                 repetition_penalty: float = 1.0, on_done=None) -> list:
        """Completions, or RequestFailed for a prompt whose request failed."""
        def one(p):
            r = self._call(prompt=p, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           extra_body={"stop_token_ids": self.stop_ids, "top_k": 0,
                                       "repetition_penalty": repetition_penalty})
            if isinstance(r, RequestFailed):
                return r
            choice = r.choices[0]
            return Completion(choice.text, (r.usage.completion_tokens if r.usage else 0) or 0,
                              choice.finish_reason or "", len(p))
        return self._map(one, prompts)


# ---------------------------------------------------------------- the output file


def digest(value, n: int = 12) -> str:
    """A short, stable hash of any JSON value: row keys, sampling settings, template versions."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:n]


class KeyedJsonl:
    """An append-only JSONL file of rows keyed by `key`, held by one writer at a time (a second generate.py or
    judge.py on the same file would duplicate rows). Opening it cuts a last line torn by a kill and reads back what
    is done; a line broken mid-file is an error naming it, never repaired silently. `rows` keeps every row in file
    order, `done` the newest row of each key."""

    def __init__(self, path: Path, error=UserInputError, script: str = "this script", log=print):
        self.path = Path(path)
        if self.path.is_dir():
            raise error(f"--out {self.path}: is a folder; name a .jsonl file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path.with_name(self.path.name + ".lock"), "w")
        except OSError as e:
            raise error(f"--out {self.path}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"{self.path}: another {script} is writing this file") from None
        dropped = repair_tail(self.path)
        if dropped:
            log(f"{self.path}: cut a torn last line ({dropped} bytes) left by a kill")
        try:
            self.rows = read_jsonl(self.path)
        except (ValueError, UnicodeDecodeError) as e:
            raise error(f"--out {self.path}: cannot resume from it ({e}); move it aside or fix that line") from None
        self.done = {row["key"]: row for row in self.rows if isinstance(row, dict) and "key" in row}

    def append(self, row: dict) -> None:
        append_jsonl(self.path, row)
        self.rows.append(row)
        self.done[row["key"]] = row

    def close(self) -> None:
        """Let another writer have the file (a process's exit does the same)."""
        self._lock.close()
