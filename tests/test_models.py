"""Models: the prepared SmolLM2 checkpoint, tiny GPT-2/Llama/Mistral models with the real tokenizer, hub errors."""
import json

import pytest
import torch

from chat_format import encode_prompt
from models import ModelError, TINY_ARCHS, build_tiny_model, load_model, load_tokenizer, save_tiny_model


def test_prepared_default_model_is_a_normal_bf16_llama(default_model_dir, tokenizer):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    info = json.loads((default_model_dir / "prepared.json").read_text())
    assert 134e6 < info["parameters"] < 135e6
    assert tokenizer.chat_template and tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"


def test_prepared_model_answers_sensibly(default_model_dir, tokenizer):
    model = load_model(str(default_model_dir), "bfloat16")
    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])])
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_run_forward_and_backward(tokenizer, arch):
    model = build_tiny_model(arch, tokenizer)
    assert model.config.model_type == arch and model.config.vocab_size == len(tokenizer)
    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": "hello"}])])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters()) < 5e6


def test_tiny_model_saves_and_loads_with_tokenizer(tmp_path, default_model_dir):
    out = save_tiny_model("mistral", tmp_path / "tiny", str(default_model_dir))
    model, tok = load_model(str(out)), load_tokenizer(str(out))
    assert model.config.model_type == "mistral" and tok.chat_template


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"model.path='gpt2': not a local folder.*--local-dir models/NAME"):
        load_tokenizer("gpt2")
    with pytest.raises(ModelError, match=r"'mistralai/Mistral-7B-v0.1': not a local folder"):
        load_model("mistralai/Mistral-7B-v0.1")


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"nowhere'.*folder not found"):
        load_tokenizer(str(tmp_path / "nowhere"))
