"""Preference data: every source normalised to (prompt messages, chosen, rejected), split and filtered.

    pairs, report = load_pairs(cfg.data)          # DataConfig from config.py
    train, eval_ = split_pairs(pairs, cfg.data.eval_fraction, cfg.data.split_seed)
    cfg, held_out = heldout_pairs("logs/default/sft")    # the pairs a run held out (generate.py, judge.py)

Sources: HH-RLHF dialogues (`\\n\\nHuman: ... \\n\\nAssistant: ...`), explicit prompt/chosen/rejected columns (TRL's
standard form), TRL's conversational form (lists of {role, content}), the OpenAI/Azure DPO schema
(input.messages, preferred_output, non_preferred_output), in json, jsonl, jsonl.gz, csv and parquet, or a hub id.
A bad record raises DataError naming the file, the line or record and what is wrong; with
`data.on_bad_record=skip` it is dropped and counted per reason instead.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from config import DataConfig, UserInputError, load_config, lone_surrogate, path_problem, read_problem

REPO = Path(__file__).resolve().parent

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class DataError(UserInputError):
    pass


class BadRecord(Exception):
    """One record is unusable; `reason` is the counter key used with on_bad_record=skip."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PreferencePair:
    id: str
    """Stable id: source name and record number (`test.jsonl.gz#17`)."""
    prompt: tuple
    """Chat history as ({"role", "content"}, ...) ending with a user turn."""
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None


@dataclass
class LoadReport:
    source: str
    records: int = 0
    dropped: Counter = field(default_factory=Counter)
    """Bad records skipped, per reason (only with on_bad_record=skip)."""
    filtered: Counter = field(default_factory=Counter)
    """Valid pairs removed by the strong-preference filter, per rule."""
    first_dropped: dict = field(default_factory=dict)
    """First location seen for each drop reason, to show the user where to look."""
    pairs: int = 0

    def lines(self) -> list[str]:
        out = [f"source: {self.source}", f"records read: {self.records}", f"pairs kept: {self.pairs}"]
        for reason, n in sorted(self.dropped.items()):
            out.append(f"dropped (bad record) {reason}: {n}   e.g. {self.first_dropped[reason]}")
        for rule, n in sorted(self.filtered.items()):
            out.append(f"dropped (filter) {rule}: {n}")
        return out


# ---------------------------------------------------------------- reading files


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("invalid_utf8", f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: Path, opener) -> Iterator[tuple[str, dict | BadRecord]]:
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, where))
            except BadRecord as e:
                yield where, e
                continue
            except json.JSONDecodeError as e:
                bom = lineno == 1 and raw.startswith(b"\xef\xbb\xbf")
                yield where, BadRecord("malformed_json", f"{where}: malformed JSON ({e.msg} at column {e.colno})"
                                       + (": the file starts with a byte-order mark; save it as UTF-8 without one"
                                          if bom else ""))
                continue
            surrogate = lone_surrogate(json.dumps(record, ensure_ascii=False)) if b"\\u" in raw else None
            if surrogate:
                yield where, BadRecord("invalid_text", f"{where}: text with a lone UTF-16 surrogate ({surrogate}), "
                                       f"which is not Unicode text: fix whatever wrote the file")
                continue
            if not isinstance(record, dict):
                yield where, BadRecord("wrong_type", f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            yield where, record


def _read_json_array(path: Path, text: str) -> Iterator[tuple[str, dict | BadRecord]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records or JSON Lines")
    for i, record in enumerate(records):
        where = f"{path} record {i}"
        if not isinstance(record, dict):
            yield where, BadRecord("wrong_type", f"{where}: expected a JSON object, got {type(record).__name__}")
        else:
            yield where, record


def _read_csv(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for record in reader:
        yield f"{path}:{reader.line_num}", dict(record)


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read parquet ({e})") from None
    for i, record in enumerate(table.to_pylist()):
        yield f"{path} row {i}", record


def _read_hub(cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, cfg.name or None, data_dir=cfg.data_dir or None, split=cfg.split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data.path={cfg.path!r}: not a local file, and loading it from the hub failed ({first}). "
            f"Offline, point data.path at a local copy (.jsonl, .jsonl.gz, .json, .csv or .parquet), "
            f"e.g. data.path=../shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
        ) from None
    for i, record in enumerate(ds):
        yield f"{cfg.path}[{cfg.split}] record {i}", record


def _read_text(path: Path, encoding: str) -> str:
    """A whole file as text; bytes that are not UTF-8 raise DataError naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _looks_like_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in {".json", ".jsonl", ".gz", ".csv", ".parquet"}


def read_records(cfg: DataConfig) -> Iterator[tuple[str, dict | BadRecord]]:
    """Yield (location, record) for every record of the source; unreadable records come as BadRecord. A file that
    cannot be read (cut short, vanished, no permission) raises DataError naming it."""
    path = Path(cfg.path).expanduser()
    problem = path_problem(path)
    if problem == "no such file" and not _looks_like_path(cfg.path):
        yield from _read_hub(cfg)
        return
    if problem == "no such file":
        raise DataError(f"data.path={cfg.path!r}: file not found")
    if problem == "is a folder, not a file":
        raise DataError(f"data.path={cfg.path!r}: is a folder; name a .jsonl, .jsonl.gz, .json, .csv or .parquet file")
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        yield from _read_file(path)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: {read_problem(e)}") from None


def _read_file(path: Path) -> Iterator[tuple[str, dict | BadRecord]]:
    name = path.name.lower()
    if name.endswith((".jsonl.gz", ".json.gz")):
        yield from _read_jsonl(path, gzip.open)
    elif name.endswith(".jsonl"):
        yield from _read_jsonl(path, open)
    elif name.endswith(".json"):
        if path.read_bytes().lstrip()[:1] == b"[":
            yield from _read_json_array(path, _read_text(path, "utf-8"))
        else:
            yield from _read_jsonl(path, open)
    elif name.endswith(".csv"):
        yield from _read_csv(path, _read_text(path, "utf-8-sig"))
    elif name.endswith(".parquet"):
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown file type; use .jsonl, .jsonl.gz, .json, .csv or .parquet")


# ---------------------------------------------------------------- normalising records


def _text(record: dict, key: str, where: str) -> str:
    if key not in record or record[key] is None:
        raise BadRecord("missing_field", f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"{where}: field {key!r} should be text, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord("empty_field", f"{where}: field {key!r} is empty")
    return value


def split_hh(text: str, where: str, field_name: str) -> tuple[str, str]:
    """Split an HH dialogue at the last `\\n\\nAssistant:` into (prompt text with the marker, response)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRecord("not_a_dialogue", f"{where}: field {field_name!r} has no '\\n\\nAssistant:' turn")
    response = text[cut + len(HH_ASSISTANT):].strip()
    if not response:
        raise BadRecord("empty_field", f"{where}: field {field_name!r} has an empty final Assistant response")
    return text[: cut + len(HH_ASSISTANT)], response


def hh_messages(prompt_text: str, where: str) -> list[dict]:
    """`\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:` -> user/assistant/user messages."""
    parts = _HH_TURN.split(prompt_text)  # ['', 'Human', ' a', 'Assistant', ' b', ..., 'Assistant', '']
    messages = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2])][:-1]  # drop the empty final Assistant slot
    if parts[0].strip() or not messages or messages[-1]["role"] != "user" or not all(m["content"] for m in messages):
        raise BadRecord("not_a_dialogue", f"{where}: the prompt is not a Human/Assistant dialogue ending with a Human turn")
    return messages


def _pair_from_hh(record: dict, where: str) -> tuple[list[dict], str, str]:
    chosen_prompt, chosen = split_hh(_text(record, "chosen", where), where, "chosen")
    rejected_prompt, rejected = split_hh(_text(record, "rejected", where), where, "rejected")
    if chosen_prompt != rejected_prompt:
        raise BadRecord("prompt_mismatch", f"{where}: chosen and rejected dialogues differ before the last Assistant turn")
    return hh_messages(chosen_prompt, where), chosen, rejected


def _messages(value, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord("wrong_type", f"{where}: field {key!r} should be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRecord("wrong_type", f"{where}: {key}[{i}] should be a {{role, content}} message with text content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _response_of(messages: list[dict], where: str, key: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRecord("wrong_type", f"{where}: field {key!r} should hold exactly one assistant message after the prompt")
    if not messages[0]["content"].strip():
        raise BadRecord("empty_field", f"{where}: field {key!r} has an empty assistant message")
    return messages[0]["content"]


def _pair_from_messages(record: dict, where: str) -> tuple[list[dict], str, str]:
    if "input" in record and "preferred_output" in record:  # OpenAI/Azure DPO schema
        source = record["input"]
        if not isinstance(source, dict) or "messages" not in source:
            raise BadRecord("wrong_type", f"{where}: field 'input' should be an object with 'messages'")
        prompt = _messages(source["messages"], where, "input.messages")
        chosen = _messages(record.get("preferred_output"), where, "preferred_output")
        rejected = _messages(record.get("non_preferred_output"), where, "non_preferred_output")
    else:
        for key in ("chosen", "rejected"):
            if key not in record or record[key] is None:
                raise BadRecord("missing_field", f"{where}: missing field {key!r}")
        chosen = _messages(record["chosen"], where, "chosen")
        rejected = _messages(record["rejected"], where, "rejected")
        if record.get("prompt") is not None:
            prompt = record["prompt"]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, where, "prompt")
        else:  # implicit prompt: the shared prefix of the two conversations (TRL's convention)
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt:
                raise BadRecord("missing_field", f"{where}: no 'prompt' field and chosen/rejected share no prompt turns")
    return prompt, _response_of(chosen, where, "chosen"), _response_of(rejected, where, "rejected")


def _pair_from_columns(record: dict, where: str) -> tuple[list[dict], str, str]:
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        prompt = _messages(prompt, where, "prompt")
    else:
        prompt = [{"role": "user", "content": _text(record, "prompt", where)}]
    return prompt, _text(record, "chosen", where), _text(record, "rejected", where)


_NORMALISERS = {"hh": _pair_from_hh, "pairs": _pair_from_columns, "messages": _pair_from_messages}


def detect_format(record: dict, where: str, hint: str = "") -> str:
    """Guess the format from the first record's fields (after the column mapping)."""
    if "input" in record and "preferred_output" in record:
        return "messages"
    if isinstance(record.get("chosen"), list):
        return "messages"
    if "prompt" in record and "chosen" in record and "rejected" in record:
        return "pairs"
    if isinstance(record.get("chosen"), str) and HH_ASSISTANT in record["chosen"]:
        return "hh"
    raise DataError(
        f"{where}: cannot tell the data format from fields {sorted(record)}; expected HH dialogues (chosen/rejected), "
        f"prompt/chosen/rejected columns, or chat messages. " + (hint or "Set data.format and data.columns "
        "(e.g. data.columns='{prompt: question, chosen: good, rejected: bad}')")
    )


def _apply_columns(record: dict, columns: dict[str, str], where: str, option: str = "data.columns.") -> dict:
    if not columns:
        return record
    out = dict(record)
    for target, source in columns.items():
        if source not in record:
            raise DataError(f"{where}: {option}{target}={source!r} names a column that is not there; "
                            f"the record has {sorted(record)}")
        out[target] = record[source]
    return out


def _score(record: dict, key: str, where: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadRecord("wrong_type", f"{where}: field {key!r} should be a number, got {value!r}") from None


def _normalise(record: dict, fmt: str, where: str, pair_id: str) -> PreferencePair:
    prompt, chosen, rejected = _NORMALISERS[fmt](record, where)
    if chosen.strip() == rejected.strip():
        raise BadRecord("identical_responses", f"{where}: chosen and rejected responses are identical")
    if prompt[-1]["role"] != "user":
        raise BadRecord("wrong_type", f"{where}: the prompt's last message should come from the user, not {prompt[-1]['role']!r}")
    return PreferencePair(
        id=pair_id, prompt=tuple(prompt), chosen=chosen, rejected=rejected,
        score_chosen=_score(record, "score_chosen", where), score_rejected=_score(record, "score_rejected", where),
    )


# ---------------------------------------------------------------- human-labelled pairs (the judge's calibration)


@dataclass(frozen=True)
class LabelledPair:
    """Two answers to one prompt and which one a human preferred: what judge.py measures a judge against."""
    id: str
    """`<file name>#<record number>`."""
    prompt: tuple
    """The history both answers share, ({"role", "content"}, ...) ending with a user turn."""
    response_a: str
    response_b: str
    label: str
    """"A" (response_a preferred), "B" or "tie"."""
    rest_a: tuple = ()
    """MT-Bench second turns: what came between the shared history and response_a (its first answer, the follow-up)."""
    rest_b: tuple = ()
    where: str = ""


LABEL_FIELDS = ("prompt", "chosen", "rejected", "response_a", "response_b", "label", "conversation_a",
                "conversation_b", "winner", "turn")
_LABELS = {"a": "A", "1": "A", "b": "B", "2": "B", "tie": "tie", "c": "tie"}
_WINNERS = {"model_a": "A", "model_b": "B", "tie": "tie", "tie (bothbad)": "tie"}


def _label(record: dict, where: str) -> str:
    value = record.get("label")
    text = str(value).strip().lower() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text not in _LABELS:
        raise BadRecord("bad_label", f"{where}: field 'label' must be A, B or tie (or 1, 2: which response is "
                                     f"better); got {value!r}")
    return _LABELS[text]


def _turn_of(conversation, where: str, key: str, turn: int) -> tuple[list, str]:
    """(history before the answer, the answer) of an MT-Bench conversation at `turn` (1 or 2)."""
    messages = _messages(conversation, where, key)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(answers) < turn:
        raise BadRecord("missing_field", f"{where}: {key} has {len(answers)} assistant turn(s), turn {turn} asked")
    end = answers[turn - 1]
    if not messages[end]["content"].strip():
        raise BadRecord("empty_field", f"{where}: {key} has an empty assistant message at turn {turn}")
    return messages[:end], messages[end]["content"]


def _labelled_from(record: dict, where: str, pair_id: str) -> LabelledPair:
    if "conversation_a" in record or "conversation_b" in record:  # MT-Bench human judgments
        winner = str(record.get("winner", "")).strip().lower()
        if winner not in _WINNERS:
            raise BadRecord("bad_label", f"{where}: field 'winner' must be model_a, model_b, tie or tie (bothbad); "
                                         f"got {record.get('winner')!r}")
        turn = record.get("turn", 1)
        if str(turn) not in ("1", "2"):
            raise BadRecord("wrong_type", f"{where}: field 'turn' must be 1 or 2; got {turn!r}")
        history_a, response_a = _turn_of(record.get("conversation_a"), where, "conversation_a", int(turn))
        history_b, response_b = _turn_of(record.get("conversation_b"), where, "conversation_b", int(turn))
        shared = 0
        while shared < min(len(history_a), len(history_b)) and history_a[shared] == history_b[shared]:
            shared += 1
        if not shared or history_a[0]["role"] == "assistant":
            raise BadRecord("prompt_mismatch", f"{where}: conversation_a and conversation_b do not start with the same "
                                               f"user question")
        while history_a[shared - 1]["role"] != "user":  # the shared part ends at a question
            shared -= 1
        return LabelledPair(pair_id, tuple(history_a[:shared]), response_a, response_b, _WINNERS[winner],
                            tuple(history_a[shared:]), tuple(history_b[shared:]), where)
    if "response_a" in record or "response_b" in record:  # the explicit form, ties allowed
        prompt = record.get("prompt")
        prompt = _messages(prompt, where, "prompt") if isinstance(prompt, list) else \
            [{"role": "user", "content": _text(record, "prompt", where)}]
        label = _label(record, where)
        response_a, response_b = _text(record, "response_a", where), _text(record, "response_b", where)
        if prompt[-1]["role"] != "user":
            raise BadRecord("wrong_type", f"{where}: the prompt's last message should come from the user")
        if response_a.strip() == response_b.strip():
            raise BadRecord("identical_responses", f"{where}: response_a and response_b are identical")
        return LabelledPair(pair_id, tuple(prompt), response_a, response_b, label, where=where)
    hint = ("Map the file's columns after its name, e.g. pairs:FILE:prompt=question,chosen=good,rejected=bad, or "
            "use {prompt, response_a, response_b, label}")
    pair = _normalise(record, detect_format(record, where, hint), where, pair_id)  # chosen/rejected: training's
    return LabelledPair(pair_id, pair.prompt, pair.chosen, pair.rejected, "A", where=where)


def load_labelled_pairs(path: str, columns: dict[str, str] | None = None) -> list[LabelledPair]:
    """Every record of a local file of human preferences, in the formats users have: the training formats (HH
    dialogues, prompt/chosen/rejected, TRL's conversational pairs, the OpenAI DPO schema: chosen is preferred),
    {prompt, response_a, response_b, label} with label A, B or tie (1, 2: LLMBar's), and MT-Bench's human judgments
    (question_id, model_a, model_b, winner, conversation_a/b, turn), in jsonl(.gz), json, csv or parquet; `columns`
    maps these field names to the file's (as data.columns does for training). The first bad record raises DataError
    naming the file and line."""
    columns = columns or {}
    for key in columns:
        if key not in LABEL_FIELDS:
            raise DataError(f"{path}: column mapping {key}=...: {key!r} is not a field; map one of "
                            f"{', '.join(LABEL_FIELDS)}")
    file = Path(path).expanduser()
    problem = path_problem(file)
    if problem:
        raise DataError(f"{path}: {problem}")
    pairs = []
    for index, (where, record) in enumerate(read_records(DataConfig(path=str(file)))):
        try:
            if isinstance(record, BadRecord):
                raise record
            record = _apply_columns(record, columns, where, "the column mapping ")
            pairs.append(_labelled_from(record, where, f"{file.name}#{index}"))
        except BadRecord as bad:
            raise DataError(str(bad)) from None
    if not pairs:
        raise DataError(f"{path}: no labelled pairs in the file")
    return pairs


# ---------------------------------------------------------------- filter and split


def _overlap(a: str, b: str) -> float:
    words_a, words_b = set(a.lower().split()), set(b.lower().split())
    return len(words_a & words_b) / max(1, len(words_a | words_b))


def filter_reason(pair: PreferencePair, cfg, where: str) -> str | None:
    """The first strong-preference rule (FilterConfig) the pair fails, or None."""
    if cfg.min_response_chars and min(len(pair.chosen.strip()), len(pair.rejected.strip())) < cfg.min_response_chars:
        return "min_response_chars"
    if cfg.max_overlap < 1.0 and _overlap(pair.chosen, pair.rejected) > cfg.max_overlap:
        return "max_overlap"
    if cfg.min_score_diff > 0:
        if pair.score_chosen is None or pair.score_rejected is None:
            raise DataError(f"{where}: data.filter.min_score_diff needs score_chosen and score_rejected "
                            f"(map them with data.columns)")
        if pair.score_chosen - pair.score_rejected < cfg.min_score_diff:
            return "min_score_diff"
    return None


def load_pairs(cfg: DataConfig) -> tuple[list[PreferencePair], LoadReport]:
    """Read, normalise, validate and filter every record of `cfg.path`."""
    report = LoadReport(source=cfg.path)
    fmt = None if cfg.format == "auto" else cfg.format
    source_name = Path(cfg.path).name
    pairs: list[PreferencePair] = []
    for index, (where, record) in enumerate(read_records(cfg)):
        if cfg.max_pairs and len(pairs) >= cfg.max_pairs:
            break
        report.records += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            record = _apply_columns(record, cfg.columns, where)
            fmt = fmt or detect_format(record, where)
            pair = _normalise(record, fmt, where, f"{source_name}#{index}")
        except BadRecord as bad:
            if cfg.on_bad_record == "error":
                raise DataError(f"{bad} (set data.on_bad_record=skip to drop such records and count them)") from None
            report.dropped[bad.reason] += 1
            report.first_dropped.setdefault(bad.reason, where)
            continue
        rule = filter_reason(pair, cfg.filter, where)
        if rule:
            report.filtered[rule] += 1
            continue
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{cfg.path}: no usable preference pairs ({'; '.join(report.lines()[1:])})")
    report.pairs = len(pairs)
    return pairs, report


def split_pairs(pairs: list[PreferencePair], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/eval split: a seeded shuffle of the indices; each split keeps source order."""
    n_eval = round(len(pairs) * eval_fraction)
    if eval_fraction > 0 and len(pairs) > 1:
        n_eval = min(max(1, n_eval), len(pairs) - 1)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [p for i, p in enumerate(pairs) if i not in eval_idx]
    held_out = [p for i, p in enumerate(pairs) if i in eval_idx]
    return train, held_out


# ---------------------------------------------------------------- what generation and judging read


def subset(items: list, limit: int, seed: int) -> list:
    """A seeded subset kept in source order: the same prompts (or judged pairs) for every model with the same seed."""
    if not limit or limit >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [x for i, x in enumerate(items) if i in keep]


def shared_data() -> Path:
    """$DPO_SHARED_DATA, else ../shared/data from the working directory (where training configs point), else beside
    this file's folder (a sweep's jobs run a code snapshot from the directory the sweep was launched in)."""
    candidates = [Path(os.environ["DPO_SHARED_DATA"])] if os.environ.get("DPO_SHARED_DATA") else []
    candidates += [Path("../shared/data"), REPO.parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def run_config_of(model: str) -> Path | None:
    """The training config.yaml of the run that wrote this checkpoint (run/final or run/final/adapter), if any."""
    folder = Path(model).expanduser()
    for parent in (folder, folder.parent, folder.parent.parent):
        if (parent / "config.yaml").is_file() and (parent / "run.json").is_file():
            return parent / "config.yaml"
    return None


def heldout_pairs(source: str, model: str = "", flag: str = "--prompts", error=DataError) -> tuple:
    """(training config, the pairs it held out): same data config, same data.split_seed, same split. `source` names
    the config or run folder; empty, the run that wrote `model`. generate.py answers their prompts, judge.py
    calibrates on their human labels."""
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
