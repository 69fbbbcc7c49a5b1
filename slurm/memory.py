"""The memory model of one train_dpo.py training process: what it holds on one GPU (weights, gradients, optimizer
state, activations, the chunked LM head, buffers, the CUDA context), for a config, a world size, a DeepSpeed ZeRO
stage and a GPU. slurm/plan.py prints it and suggests what would fit; bench/bench_memory.py and bench/gpu_check.py
measure it.

    est = estimate(load_config("configs/mistral7b.yaml"), gpus=8, gpu="h100-80gb", deepspeed=deepspeed_for(3))
    est.total_gib, fits(est), est.components

The estimate follows what train_dpo.py does, not a generic trainer: reference log-probs are cached on disk (no
reference model during training), log-probs come from add_logps_head (the [rows, length, vocab] logits never exist,
1,024 label tokens go through the LM head at a time), a micro-batch is chosen + rejected = 2 x train.batch_size rows
padded to at most tokenize.max_length, bf16 is autocast over model.dtype weights, LoRA adapters are fp32 unless
DeepSpeed casts them, AdamW holds two states per trainable parameter. In GiB (2^30 bytes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from config import Config, UserInputError
from objectives import needs_reference

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEAD_CHUNK_TOKENS = 1024  # add_logps_head's chunk_tokens


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    """What the device reports as its total (nvidia-smi's MiB / 1024), not the marketing GB."""
    kind: str = "cuda"
    """cuda, or cpu: host memory measured as RSS, no CUDA context."""


# Totals as nvidia-smi reports them (MiB / 1024); a framework can allocate slightly less than this.
GPUS = {g.name: g for g in [
    Gpu("h100-80gb", 81559 / 1024), Gpu("h200", 143771 / 1024), Gpu("a100-80gb", 81920 / 1024),
    Gpu("a100-40gb", 40960 / 1024), Gpu("l40s", 46068 / 1024), Gpu("a10g", 23028 / 1024), Gpu("l4", 23034 / 1024),
    Gpu("v100-32gb", 32768 / 1024), Gpu("v100-16gb", 16384 / 1024),
]}
GPU_ALIASES = {"h100": "h100-80gb", "a100": "a100-80gb", "v100": "v100-32gb"}

# Memory a CUDA process holds outside PyTorch's allocator (not in torch.cuda.max_memory_allocated): the CUDA context,
# cuBLAS/cuDNN workspaces and kernels loaded lazily (CUDA >= 11.7), typically 0.5-0.7 GiB with torch 2.x on
# A100/H100; NCCL's communicator buffers add about as much once a process group exists. Typical values, not measured
# here (no GPU on the machine this was written on): bench/bench_memory.py prints torch.cuda figures to check them.
CUDA_CONTEXT_GIB = 0.6
NCCL_GIB = 0.5


def count_text(n: float) -> str:
    """A parameter count as people say it: 7.24B, 134.5M, 12.3K."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def host_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def get_gpu(name: str) -> Gpu:
    key = GPU_ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        return Gpu("cpu", host_memory_gib(), "cpu")
    if key not in GPUS:
        raise UserInputError(f"unknown GPU {name!r}; choose one of {', '.join([*GPUS, 'cpu'])}")
    return GPUS[key]


# ---------------------------------------------------------------- model shapes


# Published config.json hyperparameters of the hub models the configs name (no hub access needed to plan for them).
MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
LLAMA_3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
HUB_CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "mistralai/Mistral-7B-v0.1": MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.2": MISTRAL_7B,  # the same shapes (its rope theta and window differ)
    "meta-llama/Meta-Llama-3-8B": LLAMA_3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": LLAMA_3_8B,
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}
LLAMA_LIKE = ("llama", "mistral", "qwen2")  # pre-norm RMSNorm, RoPE, GQA, SwiGLU: the same modules and saved tensors


@dataclass(frozen=True)
class ModelShape:
    family: str
    """llama (also mistral, qwen2) or gpt2."""
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    positions: int = 0
    """Learned position embeddings (GPT-2); 0 for RoPE models."""
    qkv_bias: bool = False
    mlp_bias: bool = False
    source: str = ""

    @classmethod
    def from_config(cls, cfg: dict, source: str = "") -> ModelShape:
        kind = cfg.get("model_type", "")
        if kind == "gpt2":
            h = cfg["n_embd"]
            return cls("gpt2", cfg["vocab_size"], h, cfg["n_layer"], cfg["n_head"], cfg["n_head"], h // cfg["n_head"],
                       cfg.get("n_inner") or 4 * h, True, cfg.get("n_positions", 1024), True, True, source)
        if kind not in LLAMA_LIKE:
            raise UserInputError(f"{source or 'model'}: the planner knows the architectures "
                                 f"{', '.join(('gpt2',) + LLAMA_LIKE)}; this one is {kind or 'unnamed'!r}")
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls("llama", cfg["vocab_size"], h, cfg["num_hidden_layers"], heads, cfg.get("num_key_value_heads") or heads,
                   cfg.get("head_dim") or h // heads, cfg["intermediate_size"], bool(cfg.get("tie_word_embeddings", False)),
                   0, kind == "qwen2" or bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias")), source)

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in features, out features) of every linear layer in one block, as peft and the weights see them."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        if self.family == "gpt2":
            return [("c_attn", h, 3 * h), ("c_proj", h, h), ("c_fc", h, i), ("mlp.c_proj", i, h)]
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def block_parameters(self) -> int:
        weights = sum(n_in * n_out for _, n_in, n_out in self.linears())
        if self.family == "gpt2":  # every Conv1D has a bias; two LayerNorms with weight and bias
            return weights + sum(n_out for _, _, n_out in self.linears()) + 4 * self.hidden
        biases = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        biases += (2 * self.intermediate + self.hidden) if self.mlp_bias else 0
        return weights + biases + 2 * self.hidden  # two RMSNorm weights

    def embedding_parameters(self) -> int:
        """Input embeddings, plus the LM head when it is not tied, plus GPT-2's position table."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.positions * self.hidden

    def parameters(self) -> int:
        final_norm = 2 * self.hidden if self.family == "gpt2" else self.hidden
        return self.embedding_parameters() + self.layers * self.block_parameters() + final_norm

    def lora_parameters(self, r: int, targets: list[str]) -> int:
        """r * (in + out) per adapted linear: A is [r, in], B is [out, r]. all-linear is every linear but lm_head."""
        chosen = self.adapted(targets)
        return self.layers * sum(r * (n_in + n_out) for name, n_in, n_out in self.linears() if name in chosen)

    def adapted(self, targets: list[str]) -> set[str]:
        if targets == ["all-linear"]:
            return {name for name, _, _ in self.linears()}
        # peft matches a target against the end of the module name: c_proj adapts both of GPT-2's c_proj layers
        return {name for name, _, _ in self.linears() if any(name == t or name.endswith("." + t) for t in targets)}

    def largest_tensor(self) -> int:
        return max([self.vocab * self.hidden] + [n_in * n_out for _, n_in, n_out in self.linears()])


def model_shape(path: str) -> ModelShape:
    """From a local checkpoint folder's config.json, or the built-in table of hub ids; nothing is downloaded."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return ModelShape.from_config(json.loads((folder / "config.json").read_text()), str(folder))
    if path in HUB_CONFIGS:
        return ModelShape.from_config(HUB_CONFIGS[path], path)
    raise UserInputError(f"model.path={path!r}: no config.json there and not a hub id the planner knows "
                         f"({', '.join(HUB_CONFIGS)}); point model.path at a local checkpoint folder")


def meta_parameter_count(config: dict) -> int:
    """Parameters of the real transformers architecture, instantiated on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the distributed setup


@dataclass(frozen=True)
class DeepSpeed:
    """The parts of a DeepSpeed JSON that change memory; defaults are DeepSpeed 0.19's."""
    stage: int = 2
    bf16: bool | None = None
    """None: "auto", i.e. accelerate's --mixed_precision (train.mixed_precision)."""
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: float | None = 5e8
    """Elements; None: "auto", which accelerate sets to hidden_size^2."""
    contiguous_gradients: bool = True
    overlap_comm: bool | None = None
    """None: DeepSpeed's default, on for stage 3 only."""
    prefetch_bucket_size: float | None = 5e7
    sub_group_size: float = 1e9
    """ZeRO-3 runs the optimizer step over its partition this many elements at a time."""

    @classmethod
    def from_json(cls, path: str | Path) -> DeepSpeed:
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"{path}: DeepSpeed config not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}: not valid JSON ({e})") from None
        zero = raw.get("zero_optimization") or {}
        bf16 = (raw.get("bf16") or {}).get("enabled", False)

        def size(key: str, default: float):
            value = zero.get(key, default)
            return None if value == "auto" else float(value)

        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        return cls(int(zero.get("stage", 0)), None if bf16 == "auto" else bool(bf16), offloaded("offload_optimizer"),
                   offloaded("offload_param"), size("reduce_bucket_size", 5e8),
                   bool(zero.get("contiguous_gradients", True)), zero.get("overlap_comm"),
                   size("stage3_prefetch_bucket_size", 5e7), float(zero.get("sub_group_size", 1e9)))


def deepspeed_for(zero_stage: int, offload_optimizer: bool = False, offload_param: bool = False) -> DeepSpeed | None:
    if zero_stage not in (0, 1, 2, 3):
        raise UserInputError(f"--zero: must be 0 (no DeepSpeed), 1, 2 or 3; got {zero_stage}")
    if offload_param and zero_stage != 3:
        raise UserInputError("--offload-param needs ZeRO stage 3 (--zero 3)")
    if offload_optimizer and zero_stage == 0:
        raise UserInputError("--offload-optimizer needs DeepSpeed (--zero 1, 2 or 3)")
    return DeepSpeed(zero_stage, offload_optimizer=offload_optimizer, offload_param=offload_param) if zero_stage else None


# ---------------------------------------------------------------- the memory model


@dataclass(frozen=True)
class Precision:
    weight: int
    """Bytes per weight as held during training (DeepSpeed bf16 casts the whole module to bf16)."""
    compute: int
    """Bytes per activation element: 2 under bf16 autocast or with 16-bit weights."""
    trainable: int
    """Bytes per trainable parameter and per gradient: the weights', or fp32 LoRA adapters (peft upcasts them)."""
    autocast_casts: bool
    """fp32 weights under bf16 autocast: every linear casts its input and its weight to bf16 and saves the copies."""
    deepspeed_bf16: bool


def precision(cfg: Config, ds: DeepSpeed | None) -> Precision:
    autocast = cfg.train.mixed_precision in ("bf16", "auto")
    ds_bf16 = ds is not None and (ds.bf16 if ds.bf16 is not None else autocast)
    weight = 2 if ds_bf16 else DTYPE_BYTES[cfg.model.dtype]
    compute = 2 if autocast or weight == 2 else 4
    trainable = weight if not cfg.lora.r else (2 if ds_bf16 else 4)
    return Precision(weight, compute, trainable, autocast and weight == 4, ds_bf16)


def layer_bytes_per_token(shape: ModelShape, cfg: Config, p: Precision, seq_len: int, device: str) -> float:
    """Bytes autograd saves in one transformer block per token, for the modules as transformers implements them.

    The method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1:
    count every tensor the backward pass keeps), applied to these modules rather than their GPT: their
    s·b·h·(34 + 5·a·s/h) per layer counts dropout masks and the a·s² attention scores, and neither exists here
    (dropout is off, SDPA's flash / memory-efficient kernels keep a logsumexp instead of the scores, Dao et al. 2022).
    Every term was checked against torch.autograd.graph.saved_tensors_hooks on CPU (tests/test_plan.py).
    """
    h, i, c, r, t = shape.hidden, shape.intermediate, p.compute, p.weight, p.trainable
    full = not cfg.lora.r  # a frozen weight (LoRA) does not need its input saved: only the adapter beside it does
    # SDPA with the padding mask: q, k, v and the output (o_proj reads the output in place), a fp32 logsumexp per
    # head, and the boolean mask turned into an additive one in the compute dtype, [rows, 1, s, s] in every layer.
    # With a mask transformers repeats k and v to all heads first (its GQA path needs mask=None).
    attention = 4 * c * shape.heads * shape.head_dim + 4 * shape.heads + c * seq_len
    if shape.family == "gpt2":
        norms = 2 * (r * h + 8)  # LayerNorm keeps its input, mean and rstd
        mlp = 4 * c * i  # gelu_new is a Python formula that saves four intermediate-sized tensors
        # what each linear's input costs when it must be kept (c_proj reads the attention output in place)
        normed = c * h if p.autocast_casts else r * h  # the LayerNorm output, cast to bf16 under autocast
        inputs = {"c_attn": normed, "c_proj": 0, "c_fc": normed, "mlp.c_proj": c * i}
    else:
        # RMSNorm computes in fp32: it keeps the fp32 input (a copy if the residual is 16-bit) and rsqrt, and with a
        # trained weight the normalised input too (for the weight's gradient)
        norms = 2 * (4 * h + 4 + (r * h if full else 0))
        mlp = 3 * c * i  # SwiGLU: the gate output (for SiLU), the SiLU and up outputs (for their product)
        # q/k/v share the normalised input, gate/up too; o_proj reads the attention output in place; down_proj the
        # SwiGLU product. Under autocast each linear casts the fp32 input afresh: separate bf16 copies.
        shared = c * h if p.autocast_casts else r * h
        inputs = {"q_proj": shared, "k_proj": shared if p.autocast_casts else 0, "v_proj": shared if p.autocast_casts
                  else 0, "o_proj": 0, "gate_proj": shared, "up_proj": shared if p.autocast_casts else 0,
                  "down_proj": c * i}
    saved = norms + attention + mlp
    if full:
        return saved + sum(inputs.values())
    autocast = cfg.train.mixed_precision in ("bf16", "auto")
    kept_as = 2 if autocast else t  # lora_A keeps its input in the dtype it computes in
    for name, n_in, _ in shape.linears():
        if name not in shape.adapted(cfg.lora.target_modules):
            continue
        if cfg.lora.dropout:  # the dropout's mask (fp32 noise on CPU, bool on CUDA) and its output for lora_A
            saved += (t if device == "cpu" else 1) * n_in + kept_as * n_in
        elif kept_as != (c if name in ("o_proj", "down_proj", "c_proj", "mlp.c_proj") else r) or t != kept_as:
            saved += kept_as * n_in  # peft casts x to the adapter dtype (and autocast back): a copy per linear
        else:
            saved += inputs[name]  # lora_A keeps the block's own tensor, shared as in full fine-tuning
        saved += kept_as * cfg.lora.r  # lora_B's input
    return saved


def autocast_copies(shape: ModelShape, cfg: Config, p: Precision, trained_only: bool = False) -> int:
    """Bytes per block of the bf16 copies autocast makes of fp32 weights (base linears, LoRA adapters) and keeps for
    their backward, until the backward of that block. trained_only: the copies it caches for a whole forward, even
    under no_grad (it caches those of weights that require grad)."""
    if cfg.train.mixed_precision not in ("bf16", "auto"):
        return 0
    base = sum(n_in * n_out for _, n_in, n_out in shape.linears()) if p.weight == 4 else 0
    base = 0 if trained_only and cfg.lora.r else base
    adapted = shape.adapted(cfg.lora.target_modules) if cfg.lora.r else set()
    adapters = sum(cfg.lora.r * (n_in + n_out) for name, n_in, n_out in shape.linears() if name in adapted)
    return 2 * (base + (adapters if p.trainable == 4 else 0))


def head_copy(shape: ModelShape, cfg: Config, p: Precision) -> int:
    """The bf16 copy autocast caches of a trained fp32 LM head (the tied embedding) for the forward's head chunks."""
    cached = cfg.train.mixed_precision in ("bf16", "auto") and p.weight == 4 and not cfg.lora.r
    return 2 * shape.vocab * shape.hidden if cached else 0


@dataclass
class Estimate:
    """Memory of one training process in GiB, by component, and the peak over the phases of a training step."""
    components: dict[str, float]
    why: dict[str, str]
    total_gib: float
    gpu: Gpu
    world: int
    parameters: int
    trainable: int
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def headroom_gib(self) -> float:
        return self.gpu.memory_gib - self.total_gib


def trainable_parameters(shape: ModelShape, cfg: Config) -> int:
    if cfg.lora.r:
        return shape.lora_parameters(cfg.lora.r, cfg.lora.target_modules)
    if not cfg.train.freeze_layers:
        return shape.parameters()
    # freeze_first_layers: the input embeddings (with tied weights, the LM head too) and the first N blocks
    frozen = shape.vocab * shape.hidden + min(cfg.train.freeze_layers, shape.layers) * shape.block_parameters()
    return shape.parameters() - frozen


def estimate(cfg: Config, gpus: int = 1, zero_stage: int = 0, gpu: str | Gpu = "h100-80gb",
             deepspeed: DeepSpeed | None = None, reference: str = "cached", seq_len: int | None = None,
             shape: ModelShape | None = None, offload_optimizer: bool = False, offload_param: bool = False,
             label_tokens: int | None = None) -> Estimate:
    """Peak memory of one training process of train_dpo.py for `cfg`, `gpus` data-parallel processes in all.

    zero_stage 0 is no DeepSpeed (DDP when gpus > 1); a `deepspeed` (from its JSON) wins over zero_stage and the
    offload flags. reference: cached (what train_dpo.py does) or model (a resident reference copy, as TRL keeps).
    seq_len: the padded width of the micro-batch, label_tokens: its response tokens (by default the worst case:
    tokenize.max_length, and every position but the first). The peak is
        weights + optimizer state + buffers + reference + overhead + max(training pass, optimizer step, evaluation).
    """
    gpu = gpu if isinstance(gpu, Gpu) else get_gpu(gpu)
    if gpus < 1:
        raise UserInputError(f"--gpus: must be at least 1; got {gpus}")
    if reference not in ("cached", "model"):
        raise UserInputError(f"--reference: cached or model; got {reference!r}")
    ds = deepspeed if deepspeed is not None else deepspeed_for(zero_stage, offload_optimizer, offload_param)
    ds = ds if ds is not None and ds.stage else None
    shape = shape or model_shape(cfg.model.path)
    p = precision(cfg, ds)
    n, stage = gpus, ds.stage if ds else 0
    h, vocab, t = shape.hidden, shape.vocab, p.trainable
    seq = min(seq_len or cfg.tokenize.max_length, cfg.tokenize.max_length)
    rows = 2 * cfg.train.batch_size if cfg.loss.name == "dpo" else cfg.train.batch_size  # collate: chosen + rejected
    tokens = rows * seq
    label_tokens = min(label_tokens or rows * (seq - 1), rows * (seq - 1))
    params, trainable = shape.parameters(), trainable_parameters(shape, cfg)
    comp: dict[str, float] = {}
    why: dict[str, str] = {}

    def put(name: str, n_bytes: float, reason: str) -> None:
        comp[name], why[name] = n_bytes / GIB, reason

    weights = params * p.weight + (trainable * t if cfg.lora.r else 0)
    reason = f"{count_text(params)} x {p.weight} B" + (f" + LoRA {count_text(trainable)} x {t} B" if cfg.lora.r else "")
    if stage == 3:  # the module being computed is gathered whole, and the prefetch bucket ahead of it
        gathered = (shape.largest_tensor() + (ds.prefetch_bucket_size or 0.9 * h * h)) * p.weight
        weights = (0 if ds.offload_param else weights / n) + gathered
        reason += (", offloaded to CPU" if ds.offload_param else f", ZeRO-3 shards over {n}" if n > 1 else "") + \
            " + the gathered module and prefetch bucket"
    put("weights", weights, reason)

    grad_shards = n if stage >= 2 else 1
    put("gradients", trainable * t / grad_shards, f"{count_text(trainable)} trainable x {t} B"
        + (f", ZeRO-{stage} shards over {n}" if grad_shards > 1 else ""))

    if ds is None:  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype
        put("optimizer state", 2 * trainable * t, f"AdamW exp_avg + exp_avg_sq, {t} B each")
    elif ds.offload_optimizer:
        put("optimizer state", 0, "offloaded (ZeRO-Offload): masters and AdamW states take "
            f"{12 * trainable / n / GIB:.1f} GiB of host RAM per process")
    else:  # DeepSpeed keeps an fp32 master partition (even of fp32 weights) and two fp32 AdamW states
        put("optimizer state", 12 * trainable / n, "fp32 master + 2 AdamW states, 12 B per trainable param"
            + (f", ZeRO-{stage} shards over {n}" if n > 1 else ""))

    per_layer = layer_bytes_per_token(shape, cfg, p, seq, gpu.kind)
    layers = shape.layers - (min(cfg.train.freeze_layers, shape.layers) if not cfg.lora.r else 0)  # frozen: no graph
    final_norm = 4 * h + 4 + (p.weight * h if not cfg.lora.r else 0) if shape.family == "llama" else p.weight * h + 8
    head_inputs = label_tokens * p.weight * h  # the response positions' hidden states, the chunked head's input
    weight_copies = layers * autocast_copies(shape, cfg, p) + head_copy(shape, cfg, p)
    # a block's backward holds gradients of its widest activations (SwiGLU: of the product and both its factors)
    backward = 3 * p.compute * max(shape.intermediate, h) * tokens
    if cfg.train.gradient_checkpointing:
        # HF checkpoints every block (use_reentrant=False): each keeps its input; the block under backward is
        # recomputed whole (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost")
        activations = tokens * (layers * p.weight * h + per_layer + final_norm) + head_inputs + weight_copies / max(
            layers, 1) + backward
        reason = f"checkpointed: {layers} block inputs x {p.weight * h} B + one block ({per_layer / 1024:.1f} KiB)"
    else:
        activations = tokens * (layers * per_layer + final_norm) + head_inputs + weight_copies + backward
        reason = f"{layers} blocks x {per_layer / 1024:.1f} KiB"
    put("activations", activations, f"{rows} rows x {seq} tokens, {reason} per token"
        + (" + autocast's bf16 weight copies" if weight_copies else ""))

    chunk = min(HEAD_CHUNK_TOKENS, label_tokens)
    # the chunk's backward: its fp32 logits (the copy, for 16-bit compute) kept by logsumexp, exp(x - lse) and its
    # product with the incoming gradient, then that gradient cast back to the compute dtype for the head's matmul
    per_entry = 4 + 8 + (p.compute if p.compute != 4 else 0)
    put("logits (LM head)", chunk * vocab * per_entry, f"add_logps_head: [{chunk}, {vocab}] at a time, recomputed in "
        f"backward, {per_entry} B per entry; the [rows, len, vocab] logits never exist")

    dpo = cfg.loss.name == "dpo"
    if dpo and not needs_reference(cfg.loss.types):
        put("reference", 0, f"loss.type {'+'.join(cfg.loss.types)} is reference-free: no reference at all")
    elif dpo and cfg.loss.sync_ref_every:  # its no-grad forward runs before the policy's, so it adds no activations
        put("reference", params * p.weight, f"TR-DPO (loss.sync_ref_every): a resident copy moved toward the policy, "
            f"{count_text(params)} x {p.weight} B, its log-probs computed each step after the first sync")
    elif reference == "model":
        put("reference", params * p.weight / (n if stage == 3 else 1), f"what-if: a resident frozen copy, "
            f"{count_text(params)} x {p.weight} B" + (f" sharded over {n}" if stage == 3 else "") + " (TRL's)")
    else:
        put("reference", 0, "cached log-probs (loss.ref_cache_dir, --precompute-ref): no reference model in training")

    if ds is not None and ds.contiguous_gradients:  # allocated at full size whatever the model's size
        bucket = ds.reduce_bucket_size or h * h
        count = 2 if (ds.overlap_comm if ds.overlap_comm is not None else stage == 3) and stage < 3 else 1
        put("ZeRO/DDP buffers", count * bucket * t, f"{count} DeepSpeed reduce bucket(s), {bucket:.0e} x {t} B")
    elif ds is None and n > 1:
        put("ZeRO/DDP buffers", trainable * t, "DDP's gradient buckets: a second copy of the gradients")
    else:
        put("ZeRO/DDP buffers", 0, "none")

    if ds is not None:  # the gradient partition in fp32 and AdamW's sqrt(v) intermediate; ZeRO-3 goes by sub-group
        part = trainable / n if stage < 3 else min(trainable / n, ds.sub_group_size)
        put("step temporaries", 0 if ds.offload_optimizer else 8 * part, "on CPU" if ds.offload_optimizer else
            "fp32 gradient partition + AdamW's sqrt(v) intermediate" + (", per sub-group" if stage == 3 else ""))
    elif gpu.kind == "cuda":  # torch's default on CUDA, foreach AdamW, takes sqrt(exp_avg_sq) of all params at once
        put("step temporaries", trainable * t, "AdamW (foreach): sqrt(exp_avg_sq) of every param at once")
    else:  # the for-loop AdamW (torch's default on CPU) does one tensor at a time
        largest = shape.largest_tensor() if not cfg.lora.r else shape.intermediate * cfg.lora.r
        put("step temporaries", 2 * largest * t, "AdamW (for-loop): two temporaries of the largest tensor")

    eval_rows = 2 * cfg.train.eval_batch_size  # compute_logps collates chosen and rejected, also for SFT
    put("evaluation", no_grad_pass(shape, cfg, p, eval_rows, seq), f"no-grad pass, "
        f"train.eval_batch_size={cfg.train.eval_batch_size} pairs ({eval_rows} rows x {seq}), one block at a time")

    overhead = (CUDA_CONTEXT_GIB + (NCCL_GIB if n > 1 else 0)) * GIB if gpu.kind == "cuda" else 0
    put("CUDA context + NCCL", overhead, ("CUDA context, kernels, cuBLAS workspace" + (", NCCL" if n > 1 else ""))
        if gpu.kind == "cuda" else "none on CPU")

    # Gradients of earlier micro-batches are alive through the training pass when accumulating (and ZeRO-3 keeps
    # its gradient partitions in a persistent buffer); otherwise only the LM head's, which backward makes first.
    head_trained = not cfg.lora.r and not (cfg.train.freeze_layers and shape.tied)  # freezing embeddings freezes a tied head
    head_grad = vocab * h * t if head_trained else 0
    live_grads = comp["gradients"] if cfg.train.grad_accum > 1 or stage == 3 else min(head_grad / GIB,
                                                                                      comp["gradients"])
    phases = {"training pass": comp["activations"] + comp["logits (LM head)"] + live_grads,
              "optimizer step": comp["gradients"] + comp["step temporaries"],
              "evaluation": comp["evaluation"] + (comp["gradients"] if stage == 3 else 0)}
    resident = sum(comp[k] for k in ("weights", "optimizer state", "ZeRO/DDP buffers", "reference",
                                     "CUDA context + NCCL"))
    notes = []
    if not cfg.lora.r and p.weight == 2 and not p.deepspeed_bf16:
        notes.append("full fine-tuning of 16-bit weights without fp32 masters: DPO-sized AdamW updates round away in "
                     "bf16 (FACTS.md); use model.dtype=float32 (+ train.mixed_precision=bf16) or DeepSpeed bf16")
    return Estimate(comp, why, resident + max(phases.values()), gpu, n, params, trainable, phases, notes)


def no_grad_pass(shape: ModelShape, cfg: Config, p: Precision, rows: int, seq: int,
                 label_tokens: int | None = None) -> float:
    """Bytes of a forward under no_grad (evaluation, reference log-probs), which keeps nothing for a backward: the
    residual stream in and out of the block being computed, the larger of its two halves' live tensors (attention:
    the normalised input, its fp32 RMSNorm copy, q, k, v, the output and the additive mask; MLP: the normalised input
    and the widest intermediates alive at once, SwiGLU's SiLU output, up output and product or gelu_new's
    temporaries), and the LM head on one chunk (logits, a fp32 copy, logsumexp's x - max)."""
    h, c, r = shape.hidden, p.compute, p.weight
    attention = r * h + (4 * h if shape.family == "llama" else 0) + 4 * c * shape.heads * shape.head_dim + c * seq
    mlp = r * h + (4 if shape.family == "gpt2" else 3) * c * shape.intermediate
    chunk = min(HEAD_CHUNK_TOKENS, label_tokens or rows * (seq - 1))
    head = chunk * shape.vocab * (c + (4 if c != 4 else 0) + 4)
    # autocast caches its bf16 copy of every fp32 weight that requires grad until the forward returns, grad or not
    copies = shape.layers * autocast_copies(shape, cfg, p, trained_only=True) + head_copy(shape, cfg, p)
    return rows * seq * (2 * r * h + max(attention, mlp)) + head + copies


def reference_job(cfg: Config, gpus: int = 1, gpu: str | Gpu = "h100-80gb", deepspeed: DeepSpeed | None = None,
                  shape: ModelShape | None = None, seq_len: int | None = None, label_tokens: int | None = None) -> float:
    """GiB per process of `train_dpo.py --precompute-ref`: the reference's weights (no adapters, no optimizer) and a
    no-grad pass over train.eval_batch_size pairs; seq_len and label_tokens as in estimate()."""
    gpu = gpu if isinstance(gpu, Gpu) else get_gpu(gpu)
    shape = shape or model_shape(cfg.model.path)
    ds = deepspeed if deepspeed is not None and deepspeed.stage else None
    reference_cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=0))
    p = precision(reference_cfg, ds)
    seq = min(seq_len or cfg.tokenize.max_length, cfg.tokenize.max_length)
    weights = shape.parameters() * p.weight / (gpus if ds and ds.stage == 3 else 1)
    overhead = (CUDA_CONTEXT_GIB + (NCCL_GIB if gpus > 1 else 0)) * GIB if gpu.kind == "cuda" else 0
    return (weights + overhead + no_grad_pass(shape, reference_cfg, p, 2 * cfg.train.eval_batch_size, seq,
                                              label_tokens)) / GIB


def fits(est: Estimate, gpu: str | Gpu | None = None) -> bool:
    device = est.gpu if gpu is None else gpu if isinstance(gpu, Gpu) else get_gpu(gpu)
    return math.isfinite(est.total_gib) and est.total_gib <= device.memory_gib


def verdict(est: Estimate) -> str:
    return "yes" if fits(est) else "no"
