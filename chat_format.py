"""Chat formatting and tokenisation shared by training, generation and judging.

    prompt_ids = encode_prompt(tokenizer, messages, template="auto")      # what generate.py feeds the model
    tok = tokenize_pair(tokenizer, pair, max_length=512, max_prompt_length=256)
    input_ids, labels = sequence_and_labels(tok.prompt_ids, tok.chosen_ids)

One function renders a prompt for every stage, so training and generation can never format it differently.
The chat template is applied exactly once: the rendered text already holds whatever BOS the template wants, so it is
encoded without special tokens, and a doubled BOS raises. Models without a chat template (gpt2, Mistral-7B-v0.1)
get HH's plain `\\n\\nHuman: ...\\n\\nAssistant:` text, with the tokenizer's own BOS and an EOS after responses.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


class FormattingError(ValueError):
    pass


def resolve_template(tokenizer, template: str = "auto") -> str:
    """'model' when the chat template applies, 'hh' for plain Human/Assistant text."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "model" and not has_template:
        raise FormattingError("tokenize.chat_template=model, but the tokenizer has no chat template; use auto or hh")
    if template == "auto":
        return "model" if has_template else "hh"
    return template


def render_hh(messages) -> str:
    """Messages as HH text: `\\n\\nHuman: ...\\n\\nAssistant: ...` ending with the open `\\n\\nAssistant:` slot."""
    roles = {"user": "Human", "assistant": "Assistant", "system": "Human"}
    turns = "".join(f"\n\n{roles.get(m['role'], 'Human')}: {m['content']}" for m in messages)
    return turns + "\n\nAssistant:"


def render_prompt(tokenizer, messages, template: str = "auto") -> str:
    """The prompt text up to where the assistant's answer starts."""
    if resolve_template(tokenizer, template) == "model":
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return render_hh(messages)


def render_response(tokenizer, messages, response: str, template: str = "auto") -> str:
    """The text that follows render_prompt for this response, end-of-turn marker included."""
    if resolve_template(tokenizer, template) == "model":
        prompt = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            list(messages) + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
        return response + (tokenizer.eos_token or "")  # templates that rewrite earlier turns
    return " " + response.strip() + (tokenizer.eos_token or "")


def check_single_bos(ids: list[int], tokenizer) -> None:
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        raise FormattingError("prompt starts with two BOS tokens: the chat template and the tokenizer both added one")


def encode_prompt(tokenizer, messages, template: str = "auto") -> list[int]:
    """Token ids of the formatted prompt, with exactly one BOS where the model uses one."""
    text = render_prompt(tokenizer, messages, template)
    add_special = resolve_template(tokenizer, template) == "hh"  # plain text: let the tokenizer add its BOS
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    check_single_bos(ids, tokenizer)
    return ids


def encode_response(tokenizer, messages, response: str, template: str = "auto") -> list[int]:
    return tokenizer(render_response(tokenizer, messages, response, template), add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class TokenizedPair:
    id: str
    prompt_ids: list
    chosen_ids: list
    rejected_ids: list
    prompt_truncated: bool
    response_truncated: bool


def truncate_tokens(ids: list[int], max_prompt_length: int, bos_token_id) -> list[int]:
    """Keep the last tokens; keep a leading BOS too when it is a true sequence start (seen nowhere else)."""
    if len(ids) <= max_prompt_length:
        return ids
    if bos_token_id is not None and ids[0] == bos_token_id and bos_token_id not in ids[1:]:
        return [ids[0]] + ids[len(ids) - (max_prompt_length - 1):]
    return ids[len(ids) - max_prompt_length:]


def fit_prompt(tokenizer, messages, max_prompt_length: int, template: str = "auto") -> tuple[list[int], tuple, bool]:
    """Prompt ids within max_prompt_length: whole earliest turns go first (system message kept, the prompt still
    starting with a user turn), and the tokens of what is left are cut from the left only as a last resort.
    Returns (ids, the messages kept, truncated?)."""
    messages = tuple(messages)
    ids = encode_prompt(tokenizer, messages, template)
    if len(ids) <= max_prompt_length:
        return ids, messages, False
    system = messages[:1] if messages[0]["role"] == "system" else ()
    body = messages[len(system):]
    while len(body) > 1:
        body = body[1:]
        while len(body) > 1 and body[0]["role"] != "user":
            body = body[1:]
        ids = encode_prompt(tokenizer, system + body, template)
        if len(ids) <= max_prompt_length:
            return ids, system + body, True
    return truncate_tokens(ids, max_prompt_length, tokenizer.bos_token_id), system + body, True


def tokenize_pair(tokenizer, pair, max_length: int, max_prompt_length: int, template: str = "auto"):
    """TokenizedPair, or the drop reason (str) when a response is empty after truncation."""
    prompt_ids, messages, prompt_truncated = fit_prompt(tokenizer, pair.prompt, max_prompt_length, template)
    budget = max_length - len(prompt_ids)
    chosen = encode_response(tokenizer, messages, pair.chosen, template)
    rejected = encode_response(tokenizer, messages, pair.rejected, template)
    if budget <= 0 or not chosen[:budget] or not rejected[:budget]:
        return "empty_response_after_truncation"
    return TokenizedPair(
        id=pair.id, prompt_ids=prompt_ids, chosen_ids=chosen[:budget], rejected_ids=rejected[:budget],
        prompt_truncated=prompt_truncated, response_truncated=len(chosen) > budget or len(rejected) > budget,
    )


def sequence_and_labels(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[int]]:
    """input_ids = prompt + response; labels mask the prompt with IGNORE_INDEX so only the response is trained."""
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)


def tokenize_pairs(tokenizer, pairs, max_length: int, max_prompt_length: int, template: str = "auto"):
    """Tokenise every pair; returns (kept TokenizedPairs, Counter of drop reasons and truncation counts)."""
    kept, counts = [], {"empty_response_after_truncation": 0, "prompt_truncated": 0, "response_truncated": 0}
    for pair in pairs:
        tok = tokenize_pair(tokenizer, pair, max_length, max_prompt_length, template)
        if isinstance(tok, str):
            counts[tok] += 1
            continue
        counts["prompt_truncated"] += tok.prompt_truncated
        counts["response_truncated"] += tok.response_truncated
        kept.append(tok)
    return kept, counts
