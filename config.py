"""Configuration: nested dataclasses, YAML files, dotted overrides, and command lines built from dataclasses.

    cfg = load_config("configs/default.yaml", ["loss.beta=0.05", "train.max_steps=10"])
    print(to_yaml(cfg))
    args = parse_cli(GenerateArgs, sys.argv[1:])       # generate.py's and judge.py's flags are their fields

Every script speaks these names. An unknown key or a bad value raises ConfigError naming the key; one builder
(`build`) and one override parser (`apply_override`) serve training configs and sweep files alike.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from objectives import F_DIVERGENCES, SPECS, needs_reference


class UserInputError(Exception):
    """Bad input from the user (config, data, model path): scripts print it and exit 2, no stack trace."""


class ConfigError(UserInputError):
    pass


DTYPES = ("float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "hh", "pairs", "messages")
LOSS_NAMES = ("sft", "dpo")
LOSS_TYPES = tuple(SPECS)
CHAT_TEMPLATES = ("auto", "model", "hh")


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class ModelConfig:
    path: str = "models/smollm2-135m-instruct"
    """Local checkpoint folder or hub id (gpt2, mistralai/Mistral-7B-v0.1)."""
    dtype: str = "float32"
    """Dtype the weights are loaded in: float32 (master weights for training), bfloat16, float16."""
    tokenizer: str = ""
    """Tokenizer folder or hub id; empty means model.path."""

    def __post_init__(self):
        require(bool(self.path), "model.path", "must not be empty")
        one_of("model.dtype", self.dtype, DTYPES)


@dataclass
class FilterConfig:
    min_response_chars: int = 0
    """Drop pairs where either response is shorter than this many characters (0 = off)."""
    max_overlap: float = 1.0
    """Drop pairs whose chosen and rejected word sets overlap more than this (Jaccard; 1.0 = off)."""
    min_score_diff: float = 0.0
    """Drop pairs whose score_chosen - score_rejected is below this (needs score columns; 0 = off)."""

    def __post_init__(self):
        require(self.min_response_chars >= 0, "data.filter.min_response_chars", "must be >= 0")
        require(0.0 <= self.max_overlap <= 1.0, "data.filter.max_overlap", "must be in [0, 1]")
        require(self.min_score_diff >= 0.0, "data.filter.min_score_diff", "must be >= 0")


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
        require(bool(self.path), "data.path", "must not be empty")
        one_of("data.format", self.format, DATA_FORMATS)
        require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1); got {self.eval_fraction}")
        require(self.max_pairs >= 0, "data.max_pairs", f"must be >= 0; got {self.max_pairs}")
        one_of("data.on_bad_record", self.on_bad_record, ("error", "skip"))
        known = {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
        for key in self.columns:
            require(key in known, f"data.columns.{key}", f"is not a field; map one of {', '.join(sorted(known))}")


@dataclass
class TokenizeConfig:
    max_length: int = 512
    """Maximum tokens of prompt + response; responses are cut from the right."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; prompts are cut from the left (the last turn matters most)."""
    chat_template: str = "auto"
    """auto: the model's chat template if it has one, else hh; model: require it; hh: plain Human/Assistant text."""

    def __post_init__(self):
        require(self.max_length > 1, "tokenize.max_length", f"must be > 1; got {self.max_length}")
        require(0 < self.max_prompt_length <= self.max_length, "tokenize.max_prompt_length",
                 f"must be in [1, tokenize.max_length={self.max_length}]; got {self.max_prompt_length}")
        one_of("tokenize.chat_template", self.chat_template, CHAT_TEMPLATES)


@dataclass
class LossConfig:
    name: str = "dpo"
    """sft (NLL on chosen responses) or dpo (a preference objective, loss.type)."""
    type: str | list[str] = "sigmoid"
    """Preference objective, or a list of them summed with loss.weights (TRL's loss_type): sigmoid, hinge, ipo,
    exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft,
    sigmoid_norm, simpo, orpo, cpo. MPO: [sigmoid, bco_pair, sft] with weights [0.8, 0.2, 1.0]."""
    weights: list[float] = field(default_factory=list)
    """One weight per loss.type entry (TRL's loss_weights); empty = 1 each."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (IPO's τ, ORPO's λ)."""
    label_smoothing: float = 0.0
    """Assumed label-noise rate ε: sigmoid (cDPO), robust (rDPO), exo_pair (> 0), aot, cpo."""
    simpo_gamma: float = 0.0
    """SimPO target reward margin."""
    rpo_alpha: float = 0.0
    """Weight of an added NLL on chosen responses (RPO): an alias of adding sft to loss.type with this weight."""
    f_divergence: str = "reverse_kl"
    """f-DPO divergence: reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence (loss.f_alpha)."""
    f_alpha: float = 0.5
    """α of alpha_divergence."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature τ."""
    wpo: bool = False
    """WPO: weight each pair by its responses' aligned probabilities under the policy (Zhou et al. 2024)."""
    ld_alpha: float | None = None
    """LD-DPO: weight of the response tokens beyond the shorter response's length, in [0, 1]; none = off."""
    sync_ref_every: int = 0
    """TR-DPO: every this many steps the reference moves toward the policy (loss.sync_ref_alpha); 0 = frozen."""
    sync_ref_alpha: float = 0.6
    """TR-DPO mixing weight: reference = α·policy + (1 − α)·reference; 1 = hard update."""
    reference_path: str = ""
    """Frozen reference model; empty = the policy's starting weights (with LoRA: the model with adapters off)."""
    ref_cache_dir: str = "logs/ref_cache"
    """Reference log-probs are computed once per (reference, data, tokenisation) and stored here."""

    def __post_init__(self):
        one_of("loss.name", self.name, LOSS_NAMES)
        types = self.type if isinstance(self.type, list) else [self.type]
        require(bool(types), "loss.type", "must name at least one objective")
        for i, t in enumerate(types):
            one_of("loss.type" if isinstance(self.type, str) else f"loss.type[{i}]", t, LOSS_TYPES)
        require(len(set(types)) == len(types), "loss.type", f"lists an objective twice: {types}")
        require(not self.weights or len(self.weights) == len(types), "loss.weights",
                f"has {len(self.weights)} weights for the {len(types)} objectives of loss.type {types}")
        require(self.beta > 0, "loss.beta", f"must be > 0; got {self.beta}")
        require(0.0 <= self.label_smoothing < 0.5, "loss.label_smoothing", f"must be in [0, 0.5); got {self.label_smoothing}")
        require(self.rpo_alpha >= 0, "loss.rpo_alpha", f"must be >= 0; got {self.rpo_alpha}")
        require(not (self.rpo_alpha and "sft" in types), "loss.rpo_alpha",
                "adds sft to loss.type, which already lists sft: give its weight in loss.weights instead")
        one_of("loss.f_divergence", self.f_divergence, F_DIVERGENCES)
        off = [t for t in types if not SPECS[t].f_divergence]
        require(self.f_divergence == "reverse_kl" or not off, "loss.f_divergence",
                f"{self.f_divergence} applies to the margin losses only "
                f"({', '.join(t for t in SPECS if SPECS[t].f_divergence)}); loss.type has {', '.join(off)}")
        require(self.discopop_tau > 0, "loss.discopop_tau", f"must be > 0; got {self.discopop_tau}")
        require("exo_pair" not in types or self.label_smoothing > 0, "loss.label_smoothing",
                "must be > 0 with loss.type exo_pair (its target distribution is (1 − ε, ε); the paper uses 1e-3)")
        sorting = [t for t in types if SPECS[t].sorts]
        require(not (self.wpo and sorting), "loss.wpo",
                f"weights each pair, but loss.type {', '.join(sorting)} sorts the batch (no per-pair losses)")
        require(self.ld_alpha is None or 0.0 <= self.ld_alpha <= 1.0, "loss.ld_alpha",
                f"must be in [0, 1] (1 = plain DPO) or null; got {self.ld_alpha}")
        require(self.sync_ref_every >= 0, "loss.sync_ref_every", f"must be >= 0; got {self.sync_ref_every}")
        require(0.0 < self.sync_ref_alpha <= 1.0, "loss.sync_ref_alpha", f"must be in (0, 1]; got {self.sync_ref_alpha}")
        require(not (self.sync_ref_every and self.name == "dpo" and not needs_reference(types)),
                "loss.sync_ref_every", f"moves the reference, but loss.type {types} uses none")

    @property
    def types(self) -> list[str]:
        """The objectives summed, rpo_alpha's sft included."""
        return (self.type if isinstance(self.type, list) else [self.type]) + (["sft"] if self.rpo_alpha else [])

    @property
    def term_weights(self) -> list[float]:
        """One weight per entry of `types`."""
        own = list(self.weights) or [1.0] * (len(self.types) - bool(self.rpo_alpha))
        return own + ([self.rpo_alpha] if self.rpo_alpha else [])


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
    """no (compute in model.dtype), bf16 (autocast; keep model.dtype=float32 master weights), or auto: bf16 where the
    hardware runs it natively (a GPU, a CPU with avx512_bf16/amx_bf16), no elsewhere, decided where the run runs."""
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
    """Write a resumable checkpoint every N steps (0 = none but the one a stop signal writes)."""
    keep_checkpoints: int = 1
    """How many of the newest checkpoints to keep."""
    save_final_state: bool = False
    """Also write a resumable checkpoint (optimizer state included: ~3x the weights) when the run completes; by
    default a completed run writes final/ only (and the save_every checkpoint when its last step is one)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir; never: start fresh (refuses a used dir)."""
    log_every: int = 1
    """Write a train line to metrics.jsonl every N steps."""

    def __post_init__(self):
        require(self.max_steps > 0, "train.max_steps", f"must be > 0; got {self.max_steps}")
        one_of("train.scheduler", self.scheduler, ("linear", "cosine", "constant"))
        one_of("train.mixed_precision", self.mixed_precision, ("no", "bf16", "auto"))
        one_of("train.resume", self.resume, ("auto", "never"))
        require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "train.adam_betas",
                 f"must be two numbers in [0, 1); got {self.adam_betas}")
        for key in ("warmup_steps", "freeze_layers", "eval_every", "max_eval_pairs", "save_every"):
            require(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0; got {getattr(self, key)}")
        for key in ("eval_batch_size", "keep_checkpoints", "log_every"):
            require(getattr(self, key) > 0, f"train.{key}", f"must be > 0; got {getattr(self, key)}")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0; got {self.max_grad_norm}")
        require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0; got {self.weight_decay}")
        require(self.batch_size > 0, "train.batch_size", f"must be > 0; got {self.batch_size}")
        require(self.grad_accum > 0, "train.grad_accum", f"must be > 0; got {self.grad_accum}")
        require(self.lr > 0, "train.lr", f"must be > 0; got {self.lr}")


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
        require(self.r >= 0, "lora.r", f"must be >= 0; got {self.r}")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1); got {self.dropout}")
        require(bool(self.target_modules), "lora.target_modules", "must name at least one module")


@dataclass
class PruneConfig:
    """Rules that stop a DPO run early when its metrics say it has failed (a sweep's `prune:` section sets them for
    every DPO run). Checked at each step boundary after the step is logged; a run that meets one checkpoints, is
    marked pruned (reason, step) in run.json and exits 0, freeing its slot. They watch a run, they do not define it:
    a resumed run may change them (--retry-pruned after loosening them)."""
    margin_below: float | None = None
    """Margin collapse: the train reward margin (rewards/margins) below this for `patience` train logs in a row."""
    chosen_logps_slope: float | None = None
    """Chosen log-probs falling faster than this many nats per step (a positive number), fitted over the last
    `patience` + 1 train logs: the policy is leaving its chosen answers behind."""
    eval_loss_rising: int = 0
    """The eval loss higher than at the eval before, this many evals in a row (0 = off)."""
    non_finite: bool = False
    """A NaN or inf in the loss or gradient prunes the run instead of failing it (status pruned, not resubmitted)."""
    patience: int = 3
    """Train logs in a row a train-metric rule must hold for."""
    min_steps: int = 0
    """No rule is checked before this step."""

    def __post_init__(self):
        require(self.patience >= 1, "prune.patience", f"must be >= 1; got {self.patience}")
        require(self.eval_loss_rising >= 0, "prune.eval_loss_rising", f"must be >= 0; got {self.eval_loss_rising}")
        require(self.min_steps >= 0, "prune.min_steps", f"must be >= 0; got {self.min_steps}")
        require(self.chosen_logps_slope is None or self.chosen_logps_slope > 0, "prune.chosen_logps_slope",
                f"is a rate of fall in nats per step: must be > 0; got {self.chosen_logps_slope}")

    @property
    def active(self) -> bool:
        return (self.margin_below is not None or self.chosen_logps_slope is not None or self.eval_loss_rising > 0
                or self.non_finite)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    output_dir: str = "logs/default"
    """Where the run writes metrics.jsonl, config.yaml, run.json, checkpoints and final/."""

    def __post_init__(self):
        require(not (self.loss.sync_ref_every and self.lora.r and self.loss.name == "dpo"), "loss.sync_ref_every",
                f"TR-DPO moves a reference copy of the full model, but lora.r={self.lora.r} trains adapters whose "
                f"reference is the base model with adapters off: set loss.sync_ref_every=0 or lora.r=0")



# ---------------------------------------------------------------- dataclasses from YAML, overrides and command lines
# One builder for every configuration this project reads: training configs (Config), sweep files (slurm/spec.py's
# Sweep) and the arguments of generate.py and judge.py. `kind` names the schema in errors ("unknown sweep key").


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _optional(hint) -> tuple[typing.Any, bool]:
    """(the type inside `T | None`, whether None is allowed)."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dataclass schema."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        keys += all_keys(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [prefix + f.name]
    return keys


def unknown_key(key: str, root, kind: str = "config") -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(root), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}: unknown {kind} key{hint}")


def coerce(hint, value, key: str, kind: str = "config", root=None):
    """`value` (from YAML or an override) as the type `hint` asks for; a wrong type names the key."""
    hint, nullable = _optional(hint)
    if value is None and nullable:
        return None
    origin = typing.get_origin(hint) or (hint if hint in (list, dict) else None)
    if hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):  # `str | list[str]`: a list stays a list, anything else a string
        listed = next(a for a in typing.get_args(hint) if typing.get_origin(a) is list)
        as_list = isinstance(value, list) or (isinstance(value, str) and "," in value)  # sigmoid,sft
        return coerce(listed if as_list else str, value, key, kind, root)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".", kind, root)
    if hint is bool:
        require(isinstance(value, bool), key, f"expected true or false; got {value!r}")
        return value
    if hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-7 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number; got {value!r}")
        return float(value)
    if hint is str:
        require(not isinstance(value, bool), key,
                f"expected a string; got {value!r} (YAML reads no/yes/on/off as booleans: quote it, e.g. 'no')")
        require(isinstance(value, (str, int, float)), key, f"expected a string; got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        require(isinstance(value, list), key, f"expected a list; got {value!r}")
        (item,) = typing.get_args(hint) or (typing.Any,)
        return [coerce(item, v, f"{key}[{i}]", kind, root) for i, v in enumerate(value)]
    if origin is dict:
        require(isinstance(value, dict), key, f"expected a mapping; got {value!r}")
        _, item = typing.get_args(hint) or (str, typing.Any)
        if item is str:  # text values; numbers are written as text
            for k, v in value.items():
                require(isinstance(v, (str, int, float)) and not isinstance(v, bool), f"{key}.{k}",
                        f"expected a string or number; got {v!r}")
            return {str(k): str(v) for k, v in value.items()}
        return {str(k): coerce(item, v, f"{key}.{k}", kind, root) for k, v in value.items()}
    raise TypeError(f"{key}: unsupported {kind} type {hint}")


def build(cls, raw, prefix: str = "", kind: str = "config", root=None):
    """A (nested) dataclass from a mapping: unknown keys and wrong types raise ConfigError naming the dotted key;
    each dataclass's __post_init__ checks the values."""
    require(isinstance(raw, dict), prefix.rstrip(".") or kind, f"expected a mapping; got {raw!r}")
    root = root or cls
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise unknown_key(prefix + str(key), root, kind)
    hints = _hints(cls)
    return cls(**{name: coerce(hints[name], value, prefix + name, kind, root) for name, value in raw.items()})


def apply_override(raw: dict, override: str, cls=None, kind: str = "config") -> None:
    """Set `a.b.c=value` in the nested mapping `raw`, checked against the schema `cls` first. The value is YAML
    (`lora.target_modules=[q_proj,v_proj]`), except for text fields, which take it as typed
    (`train.mixed_precision=no` is "no", not false). Under a mapping field the rest of the key is one key of that
    mapping: `data.columns.prompt=question`, `grid.loss.beta=[0.1,0.3]`, `sft.overrides.train.lr=1e-5`."""
    cls = cls or Config
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node_cls, path = cls, []
    hint = None
    for i, part in enumerate(parts):
        hints = _hints(node_cls) if node_cls is not None else {}
        if part not in hints:
            raise unknown_key(key.strip(), cls, kind)
        hint, _ = _optional(hints[part])
        path.append(part)
        if dataclasses.is_dataclass(hint):
            node_cls = hint
            continue
        if typing.get_origin(hint) is dict and i < len(parts) - 1:
            path.append(".".join(parts[i + 1:]))
            hint = (typing.get_args(hint) or (str, typing.Any))[1]
            break
        node_cls = None
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"{key.strip()}: is a section of {kind} keys, not one key (e.g. {key.strip()}.<key>=...)")
    inner, nullable = _optional(hint)
    if inner is str and not (nullable and text.strip() in ("", "null", "~")):
        value = text
    else:
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {override!r}: the value is not valid YAML (a list is [a,b]: quote "
                              f"the whole override for the shell)") from None
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key.strip()}: the YAML file gives {part} a value that is not a mapping")
        node = child
    node[path[-1]] = value


def path_problem(path: str | Path) -> str | None:
    """What keeps `path` from being read as a file, in words (no such file, a symlink loop, a symlink whose target
    is gone, a folder, no permission); None when it can be read."""
    import errno
    import os
    import stat

    name = os.path.expanduser(str(path))
    try:
        st = os.stat(name)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop (the links lead back to themselves)"
        if e.errno == errno.ENOENT and os.path.islink(name):
            return f"a symlink to {os.readlink(name)}, which does not exist (moved or deleted?)"
        if e.errno == errno.ENOENT:
            return "no such file"
        if e.errno == errno.EACCES:
            return "permission denied"
        return e.strerror or str(e)
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    if not os.access(name, os.R_OK):
        return "permission denied"
    return None


def read_problem(error: BaseException) -> str:
    """An error met while reading a file, in words: a gzip file cut short, a file that vanished, ..."""
    import gzip
    import zlib

    if isinstance(error, EOFError):
        return "the gzip file is cut short (a copy or download that did not finish?)"
    if isinstance(error, (gzip.BadGzipFile, zlib.error)):
        return f"not valid gzip ({error})"
    if isinstance(error, FileNotFoundError):
        return "vanished while being read"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error.reason} at byte {error.start})"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


def lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in `text` (JSON may escape one, \\ud800, that no UTF-8 file can hold), as
    \\uXXXX; None when there is none."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"\\u{ord(text[e.start]):04x}"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    problem = path_problem(path)
    if problem:
        raise ConfigError(f"{path}: {'config file not found' if problem == 'no such file' else problem}")
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


def load(cls, path: str | Path | None = None, overrides=(), kind: str = "config"):
    """Defaults <- YAML file <- dotted overrides, validated; errors name the key (and the file)."""
    raw = read_yaml(path) if path else {}
    try:
        for override in overrides:
            apply_override(raw, override, cls, kind)
        return build(cls, raw, kind=kind)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    """A training config: configs/*.yaml, then `key=value` overrides."""
    return load(Config, path, overrides)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    items = {}
    for k, v in d.items():
        items.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return items


MONITORING = ("prune",)
"""Config sections that watch a run rather than define it: a run may resume under other values."""


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """How a run folder's config.yaml (loaded) differs from `cfg`, as 'key: old -> new': keys of the monitoring
    sections never count, and a key the saved file lacks counts only when `cfg` sets it away from its default (it was
    added to the schema after the run started, and the run behaved as the default does)."""
    old, new, default = flat(saved), flat(to_dict(cfg)), flat(to_dict(Config()))
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in MONITORING or (key not in old and new.get(key) == default.get(key)):
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


# ---------------------------------------------------------------- command lines from dataclasses
# generate.py and judge.py read their arguments into a dataclass (flags named after its fields, help from their
# docstrings, checks in __post_init__), so a sweep file can hand the same arguments over without any argv.


class ArgsError(UserInputError):
    """A bad command-line argument (or the same setting given by a sweep file): usage error, exit 2."""


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and of its bases): the help of its command line."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def cli_fields(cls) -> list:
    """A dataclass's fields in command-line order: its own first, then those of its bases (shared engine flags)."""
    own = set(vars(cls).get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raised, not exited: the caller decides (a CLI prints usage, a sweep names its file)
        raise ArgsError(message)


def arg_parser(cls, description: str = "", required: bool = True, helps: bool = True) -> argparse.ArgumentParser:
    """argparse for a dataclass: --field-name per field (bool: a switch; list: several values; `choices` and `nargs`
    from the field's metadata); only flags given land in the namespace, so the dataclass's defaults apply."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     argument_default=argparse.SUPPRESS)
    docs, hints = field_docs(cls) if helps else {}, _hints(cls)
    for f in cli_fields(cls):
        hint, _ = _optional(hints[f.name])
        needed = required and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs = {"dest": f.name, "help": docs.get(f.name, ""), "required": needed}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if hint is bool:
            parser.add_argument(flag(f.name), action="store_true", **{k: v for k, v in kwargs.items() if k != "choices"})
            continue
        if typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            kwargs.update(nargs=f.metadata.get("nargs", "+"), type=item, metavar=f.metadata.get("metavar"))
        else:
            kwargs["type"] = hint
        parser.add_argument(flag(f.name), **kwargs)
    return parser


def parse_flags(cls, argv, required: bool = False) -> dict:
    """The fields a list of flags sets (`[--turns, both]` -> {"turns": "both"}); ArgsError names a bad one."""
    return vars(arg_parser(cls, required=required, helps=False).parse_args([str(a) for a in argv]))


def parse_cli(cls, argv=None, description: str = ""):
    """The dataclass from this process's command line: a bad flag or value prints usage and exits 2, as argparse."""
    parser = arg_parser(cls, description)
    try:
        return cls(**vars(parser.parse_args(argv)))
    except ArgsError as e:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def to_argv(args) -> list[str]:
    """The command line that gives back `args` (fields left at their defaults are left out)."""
    argv = []
    for f in cli_fields(type(args)):
        value = getattr(args, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if value == default or value is None:
            continue
        if isinstance(value, bool):
            argv += [flag(f.name)] if value else []
        elif isinstance(value, list):
            argv += [flag(f.name), *map(str, value)]
        else:
            argv += [flag(f.name), str(value)]
    return argv


def invalid_choice(name: str, value, choices) -> str | None:
    """argparse's wording for a value outside `choices`, for checks in __post_init__ (None when it is fine)."""
    if value in choices:
        return None
    return f"argument {flag(name)}: invalid choice: {value!r} (choose from {', '.join(map(repr, choices))})"


def check_choices(args) -> None:
    """argparse's check of every field's `choices`, for arguments built without a command line (a sweep file)."""
    for f in dataclasses.fields(args):
        bad = invalid_choice(f.name, getattr(args, f.name), f.metadata["choices"]) if "choices" in f.metadata else None
        if bad:
            raise ArgsError(bad)
