"""Run configuration: nested dataclasses, YAML files, dotted command-line overrides.

    cfg = load_config("configs/default.yaml", ["loss.beta=0.05", "train.max_steps=10"])
    print(to_yaml(cfg))

Every script speaks these names. An unknown key or a bad value raises ConfigError naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class UserInputError(Exception):
    """Bad input from the user (config, data, model path): scripts print it and exit 2, no stack trace."""


class ConfigError(UserInputError):
    pass


DTYPES = ("float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "hh", "pairs", "messages")
LOSS_NAMES = ("sft", "dpo")
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")
CHAT_TEMPLATES = ("auto", "model", "hh")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class ModelConfig:
    path: str = "models/smollm2-135m-instruct"
    """Local checkpoint folder or hub id (gpt2, mistralai/Mistral-7B-v0.1)."""
    dtype: str = "float32"
    """Dtype the weights are loaded in: float32 (master weights for training), bfloat16, float16."""
    tokenizer: str = ""
    """Tokenizer folder or hub id; empty means model.path."""

    def __post_init__(self):
        _require(bool(self.path), "model.path", "must not be empty")
        _choice("model.dtype", self.dtype, DTYPES)


@dataclass
class FilterConfig:
    min_response_chars: int = 0
    """Drop pairs where either response is shorter than this many characters (0 = off)."""
    max_overlap: float = 1.0
    """Drop pairs whose chosen and rejected word sets overlap more than this (Jaccard; 1.0 = off)."""
    min_score_diff: float = 0.0
    """Drop pairs whose score_chosen - score_rejected is below this (needs score columns; 0 = off)."""

    def __post_init__(self):
        _require(self.min_response_chars >= 0, "data.filter.min_response_chars", "must be >= 0")
        _require(0.0 <= self.max_overlap <= 1.0, "data.filter.max_overlap", "must be in [0, 1]")
        _require(self.min_score_diff >= 0.0, "data.filter.min_score_diff", "must be >= 0")


@dataclass
class DataConfig:
    path: str = "../shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
    """Preference data: a json/jsonl/jsonl.gz/csv/parquet file, or a hub dataset id (Anthropic/hh-rlhf)."""
    format: str = "auto"
    """auto | hh (Human/Assistant dialogues) | pairs (prompt/chosen/rejected text) | messages (chat lists)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Source column for each field, e.g. {prompt: question, chosen: response_j, rejected: response_k}."""
    eval_fraction: float = 0.05
    """Fraction of pairs held out for evaluation and generation."""
    split_seed: int = 0
    """Seed of the train/held-out split. Independent of train.seed, so every seed of a sweep (and the SFT model it
    starts from) holds out the same pairs, and generate.py's heldout prompts were never trained on."""
    max_pairs: int = 0
    """Use only the first N valid pairs of the source (0 = all)."""
    on_bad_record: str = "error"
    """error: stop at the first bad record, naming it; skip: drop bad records and count them per reason."""
    split: str = "train"
    """Split to read from a hub dataset."""
    name: str = ""
    """Hub dataset configuration name, if it has several."""
    data_dir: str = ""
    """Hub dataset sub-folder, e.g. harmless-base for Anthropic/hh-rlhf."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    """Strong-preference filter; each rule reports how many pairs it dropped."""

    def __post_init__(self):
        _require(bool(self.path), "data.path", "must not be empty")
        _choice("data.format", self.format, DATA_FORMATS)
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1); got {self.eval_fraction}")
        _require(self.max_pairs >= 0, "data.max_pairs", f"must be >= 0; got {self.max_pairs}")
        _choice("data.on_bad_record", self.on_bad_record, ("error", "skip"))
        known = {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
        for key in self.columns:
            _require(key in known, f"data.columns.{key}", f"is not a field; map one of {', '.join(sorted(known))}")


@dataclass
class TokenizeConfig:
    max_length: int = 512
    """Maximum tokens of prompt + response; responses are cut from the right."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; prompts are cut from the left (the last turn matters most)."""
    chat_template: str = "auto"
    """auto: the model's chat template if it has one, else hh; model: require it; hh: plain Human/Assistant text."""

    def __post_init__(self):
        _require(self.max_length > 1, "tokenize.max_length", f"must be > 1; got {self.max_length}")
        _require(0 < self.max_prompt_length <= self.max_length, "tokenize.max_prompt_length",
                 f"must be in [1, tokenize.max_length={self.max_length}]; got {self.max_prompt_length}")
        _choice("tokenize.chat_template", self.chat_template, CHAT_TEMPLATES)


@dataclass
class LossConfig:
    name: str = "dpo"
    """sft (NLL on chosen responses) or dpo (a preference loss against a reference)."""
    type: str = "sigmoid"
    """Preference loss: sigmoid (DPO/cDPO), robust (rDPO), hinge (SLiC), ipo, simpo."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward."""
    label_smoothing: float = 0.0
    """Assumed label-noise rate for sigmoid (cDPO) and robust (rDPO)."""
    simpo_gamma: float = 0.0
    """SimPO target reward margin."""
    rpo_alpha: float = 0.0
    """Weight of an added NLL on chosen responses (RPO); 0 = off."""
    reference_path: str = ""
    """Frozen reference model; empty = the policy's starting weights (with LoRA: the model with adapters off)."""
    ref_cache_dir: str = "logs/ref_cache"
    """Reference log-probs are computed once per (reference, data, tokenisation) and stored here."""

    def __post_init__(self):
        _choice("loss.name", self.name, LOSS_NAMES)
        _choice("loss.type", self.type, LOSS_TYPES)
        _require(self.beta > 0, "loss.beta", f"must be > 0; got {self.beta}")
        _require(0.0 <= self.label_smoothing < 0.5, "loss.label_smoothing", f"must be in [0, 0.5); got {self.label_smoothing}")
        _require(self.rpo_alpha >= 0, "loss.rpo_alpha", f"must be >= 0; got {self.rpo_alpha}")


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps."""
    batch_size: int = 4
    """Pairs per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-7
    """Peak learning rate."""
    seed: int = 0
    """Seed for the train/eval split, shuffling and initialisation."""
    scheduler: str = "linear"
    """Learning-rate decay after warmup: linear, cosine or constant."""
    warmup_steps: int = 0
    """Linear warmup from 0 to train.lr over this many steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    mixed_precision: str = "no"
    """no (compute in model.dtype) or bf16 (autocast; keep model.dtype=float32 master weights)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    freeze_layers: int = 0
    """Freeze the embeddings and the first N transformer layers (0 = train everything)."""
    eval_every: int = 0
    """Evaluate on the held-out pairs every N steps (0 = only at the end)."""
    eval_batch_size: int = 8
    """Pairs per evaluation batch."""
    max_eval_pairs: int = 0
    """Evaluate on at most N held-out pairs (0 = all)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0 = only the final one)."""
    keep_checkpoints: int = 1
    """How many of the newest checkpoints to keep."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir; never: start fresh (refuses a used dir)."""
    log_every: int = 1
    """Write a train line to metrics.jsonl every N steps."""

    def __post_init__(self):
        _require(self.max_steps > 0, "train.max_steps", f"must be > 0; got {self.max_steps}")
        _choice("train.scheduler", self.scheduler, ("linear", "cosine", "constant"))
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16"))
        _choice("train.resume", self.resume, ("auto", "never"))
        _require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "train.adam_betas",
                 f"must be two numbers in [0, 1); got {self.adam_betas}")
        for key in ("warmup_steps", "freeze_layers", "eval_every", "max_eval_pairs", "save_every"):
            _require(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0; got {getattr(self, key)}")
        for key in ("eval_batch_size", "keep_checkpoints", "log_every"):
            _require(getattr(self, key) > 0, f"train.{key}", f"must be > 0; got {getattr(self, key)}")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0; got {self.max_grad_norm}")
        _require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0; got {self.weight_decay}")
        _require(self.batch_size > 0, "train.batch_size", f"must be > 0; got {self.batch_size}")
        _require(self.grad_accum > 0, "train.grad_accum", f"must be > 0; got {self.grad_accum}")
        _require(self.lr > 0, "train.lr", f"must be > 0; got {self.lr}")


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA path."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, or [all-linear]."""

    def __post_init__(self):
        _require(self.r >= 0, "lora.r", f"must be >= 0; got {self.r}")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1); got {self.dropout}")
        _require(bool(self.target_modules), "lora.target_modules", "must name at least one module")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    output_dir: str = "logs/default"
    """Where the run writes metrics.jsonl, config.yaml, run.json, checkpoints and final/."""


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(Config), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}: unknown config key{hint}")


def _coerce(hint, value, key: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if hint is bool:
        _require(isinstance(value, bool), key, f"expected true or false; got {value!r}")
        return value
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-7 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number; got {value!r}")
        return float(value)
    if hint is str:
        _require(not isinstance(value, bool), key,
                 f"expected a string; got {value!r} (YAML reads no/yes/on/off as booleans: quote it, e.g. 'no')")
        _require(isinstance(value, (str, int, float)), key, f"expected a string; got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _require(isinstance(value, list), key, f"expected a list; got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _require(isinstance(value, dict) and all(isinstance(v, str) for v in value.values()), key,
                 f"expected a mapping of strings; got {value!r}")
        return dict(value)
    raise TypeError(f"{key}: unsupported config type {hint}")


def _build(cls, raw, prefix: str = ""):
    _require(isinstance(raw, dict), prefix.rstrip(".") or "config", f"expected a mapping; got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown_key(prefix + str(key))
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    return cls(**kwargs)


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`lora.target_modules=[q_proj,v_proj]`)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value")
    key, text = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    cls = Config
    for i, part in enumerate(parts):  # check the key against the schema before touching the dict
        if cls is None or part not in typing.get_type_hints(cls):
            raise _unknown_key(key)
        hints = typing.get_type_hints(cls)
        cls = hints[part] if dataclasses.is_dataclass(hints[part]) else None
        if cls is None and typing.get_origin(hints[part]) is dict and i == len(parts) - 2:
            break  # data.columns.prompt=question sets one entry of a mapping field
    if cls is None and hints.get(parts[-1]) is str:
        value = text  # a string field takes the text as typed: `train.mixed_precision=no` is "no", not false
    else:
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: the YAML file gives {part} a value that is not a mapping")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated; errors name the key (and the file)."""
    raw = read_yaml(path) if path else {}
    for override in overrides:
        apply_override(raw, override)
    try:
        return _build(Config, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
