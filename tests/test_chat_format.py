"""Tokenisation with the real SmolLM2 tokenizer: template applied once, prompt masked, truncation rules."""
import pytest

from chat_format import (IGNORE_INDEX, FormattingError, check_single_bos, encode_prompt, fit_prompt, render_prompt,
                         sequence_and_labels, tokenize_pair, tokenize_pairs)
from config import DataConfig
from preference_data import PreferencePair, load_pairs


def pair(prompt, chosen="Sure, here it is.", rejected="No."):
    messages = tuple({"role": r, "content": c} for r, c in prompt)
    return PreferencePair(id="t#0", prompt=messages, chosen=chosen, rejected=rejected)


def test_chat_template_applied_once_no_double_bos(tokenizer):
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    text = tokenizer.decode(ids)
    assert text == render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert text.count("<|im_start|>system") == 1 and text.endswith("<|im_start|>assistant\n")


def test_double_bos_is_caught(tokenizer):
    doubled = tokenizer("<|im_start|><|im_start|>system", add_special_tokens=False)["input_ids"]
    with pytest.raises(FormattingError, match="two BOS"):
        check_single_bos(doubled, tokenizer)


def test_prompt_masked_response_trained(tokenizer):
    tok = tokenize_pair(tokenizer, pair([("user", "hi")]), max_length=128, max_prompt_length=64)
    input_ids, labels = sequence_and_labels(tok.prompt_ids, tok.chosen_ids)
    n = len(tok.prompt_ids)
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == input_ids[n:] == tok.chosen_ids
    assert tokenizer.decode(tok.chosen_ids) == "Sure, here it is.<|im_end|>\n"
    assert tok.chosen_ids[-2] == tokenizer.eos_token_id
    # prompt + response tokenised apart equals the whole conversation rendered by the template
    whole = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "No."}],
                                          tokenize=False)
    assert tokenizer.decode(tok.prompt_ids + tok.rejected_ids) == whole


def test_long_prompt_drops_earliest_turns_first(tokenizer):
    long_turns = [("user", "first question " * 30), ("assistant", "first answer " * 30), ("user", "last question")]
    ids, kept, truncated = fit_prompt(tokenizer, [{"role": r, "content": c} for r, c in long_turns], 64)
    assert truncated and len(ids) <= 64
    assert [m["content"] for m in kept] == ["last question"]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and "last question" in text and "first" not in text


def test_single_long_turn_cut_from_the_left(tokenizer):
    words = " ".join(f"w{i}" for i in range(200))
    ids, _, truncated = fit_prompt(tokenizer, [{"role": "user", "content": words}], 32)
    assert truncated and len(ids) == 32
    assert tokenizer.decode(ids).endswith("w199<|im_end|>\n<|im_start|>assistant\n")


def test_response_cut_from_the_right_and_empty_dropped(tokenizer):
    long = " ".join(f"w{i}" for i in range(100))
    tok = tokenize_pair(tokenizer, pair([("user", "hi")], chosen=long), max_length=60, max_prompt_length=40)
    assert tok.response_truncated and len(tok.prompt_ids) + len(tok.chosen_ids) == 60
    assert tokenizer.decode(tok.chosen_ids).startswith("w0 w1")
    dropped = tokenize_pair(tokenizer, pair([("user", long)]), max_length=40, max_prompt_length=40)
    assert dropped == "empty_response_after_truncation"
    kept, counts = tokenize_pairs(tokenizer, [pair([("user", long)]), pair([("user", "hi")])], 40, 40)
    assert len(kept) == 1 and counts["empty_response_after_truncation"] == 1


def test_plain_hh_template_for_models_without_one(tokenizer):
    p = pair([("user", "hi"), ("assistant", "hello"), ("user", "bye")])
    assert render_prompt(tokenizer, p.prompt, "hh") == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    tok = tokenize_pair(tokenizer, p, 128, 64, template="hh")
    assert tokenizer.decode(tok.chosen_ids) == " Sure, here it is.<|im_end|>"


def test_every_real_hh_pair_tokenises_within_limits(tokenizer, hh_path):
    pairs, _ = load_pairs(DataConfig(path=str(hh_path), on_bad_record="skip", max_pairs=300))
    kept, counts = tokenize_pairs(tokenizer, pairs, 256, 192)
    assert len(kept) + counts["empty_response_after_truncation"] == 300
    for tok in kept:
        assert len(tok.prompt_ids) <= 192 and len(tok.prompt_ids) + max(len(tok.chosen_ids), len(tok.rejected_ids)) <= 256
        assert tok.prompt_ids[0] == tokenizer.bos_token_id and tok.prompt_ids[1] != tokenizer.bos_token_id
        assert tok.chosen_ids and tok.rejected_ids
