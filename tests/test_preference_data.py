"""Preference data: every format normalises to the same pairs; bad input names file, line and problem."""
import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import DataConfig, FilterConfig
from preference_data import DataError, hh_messages, load_pairs, split_pairs

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5, probably."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I won't."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]


def cfg(path, **kw):
    return DataConfig(path=str(path), **kw)


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def expected():
    return [((({"role": "user", "content": p["prompt"]}),), p["chosen"], p["rejected"]) for p in PAIRS]


def as_tuples(pairs):
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


def test_real_hh_file(hh_path):
    pairs, report = load_pairs(cfg(hh_path, on_bad_record="skip"))
    assert report.records == 2312
    assert report.dropped == {"empty_field": 4, "prompt_mismatch": 5}
    assert len(pairs) == 2303 == report.pairs
    first = pairs[0]
    assert first.id == "test.jsonl.gz#0"
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first.chosen.startswith("No, sorry!") and first.rejected.startswith("There are lots of funny things")
    assert len({p.id for p in pairs}) == len(pairs)


def test_real_hh_file_errors_by_default_naming_the_line(hh_path):
    with pytest.raises(DataError, match=r"test.jsonl.gz:87: field '(chosen|rejected)' has an empty final Assistant"):
        load_pairs(cfg(hh_path))


def test_hh_dialogue_parsing():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert hh_messages(text, "x") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "json", "json-lines", "csv", "parquet"])
def test_pairs_in_every_file_type(tmp_path, suffix):
    if suffix == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    elif suffix == "jsonl.gz":
        path = write_jsonl(tmp_path / "d.jsonl.gz", PAIRS, gzip.open)
    elif suffix == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(PAIRS))
    elif suffix == "json-lines":
        path = write_jsonl(tmp_path / "d.json", PAIRS)
    elif suffix == "csv":
        path = tmp_path / "d.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(PAIRS)
    else:
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(PAIRS), path)
    pairs, report = load_pairs(cfg(path))
    assert as_tuples(pairs) == expected()
    assert report.records == 3 and not report.dropped


def test_column_mapping(tmp_path):
    records = [{"question": p["prompt"], "good": p["chosen"], "bad": p["rejected"]} for p in PAIRS]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    pairs, _ = load_pairs(cfg(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}))
    assert as_tuples(pairs) == expected()


def test_column_mapping_naming_a_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    with pytest.raises(DataError, match=r"d.jsonl:1: data.columns.prompt='question' names a column that is not there"):
        load_pairs(cfg(path, columns={"prompt": "question"}))


def test_trl_conversational_explicit_and_implicit_prompt(tmp_path):
    explicit = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PAIRS]
    implicit = [{"chosen": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}]}
                for p in PAIRS]
    for name, records in (("explicit", explicit), ("implicit", implicit)):
        pairs, _ = load_pairs(cfg(write_jsonl(tmp_path / f"{name}.jsonl", records)))
        assert as_tuples(pairs) == expected(), name


def test_openai_dpo_schema_real_orca_sample():
    from conftest import SHARED_DATA

    pairs, report = load_pairs(cfg(SHARED_DATA / "orca_dpo_pairs_sample" / "validation.jsonl", on_bad_record="skip"))
    assert report.records == 284 and len(pairs) + sum(report.dropped.values()) == 284
    assert pairs[0].prompt[0]["role"] == "system" and pairs[0].prompt[-1]["role"] == "user"


def test_hh_written_as_pairs_matches_hh_parse(tmp_path):
    record = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: goodbye",
              "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: go away"}
    pairs, _ = load_pairs(cfg(write_jsonl(tmp_path / "hh.jsonl", [record])))
    assert as_tuples(pairs) == [(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                  {"role": "user", "content": "bye"}), "goodbye", "go away")]


BAD = [
    ("malformed_json", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n',
     r"d.jsonl:2: malformed JSON"),
    ("missing_field", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
     r"d.jsonl:2: missing field 'rejected'"),
    ("empty_field", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": " ", "rejected": "c"}\n',
     r"d.jsonl:2: field 'chosen' is empty"),
    ("identical_responses", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b", "rejected": "b"}\n',
     r"d.jsonl:2: chosen and rejected responses are identical"),
    ("invalid_utf8", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff\xfe", "chosen": "b", "rejected": "c"}\n',
     r"d.jsonl:2: not UTF-8"),
    ("wrong_type", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n',
     r"d.jsonl:2: field 'chosen' should be text"),
]


@pytest.mark.parametrize("reason, content, message", BAD, ids=[b[0] for b in BAD])
def test_bad_record_errors_name_file_and_line(tmp_path, reason, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_pairs(cfg(path))


@pytest.mark.parametrize("reason, content, message", BAD, ids=[b[0] for b in BAD])
def test_bad_records_skipped_and_counted(tmp_path, reason, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content + b'{"prompt": "x", "chosen": "y", "rejected": "z"}\n')
    pairs, report = load_pairs(cfg(path, on_bad_record="skip"))
    assert len(pairs) == 2 and report.dropped == {reason: 1} and report.first_dropped[reason].endswith("d.jsonl:2")


def test_non_utf8_csv_and_json_array_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,chosen,rejected\na,b,c\n\xff,b,c\n")
    with pytest.raises(DataError, match=r"d.csv:3: not UTF-8"):
        load_pairs(cfg(path))
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "a" "chosen": "b"}\n]')
    with pytest.raises(DataError, match=r"d.json:3: malformed JSON"):
        load_pairs(cfg(path))


def test_unknown_format_and_file_type(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: cannot tell the data format from fields \['answer', 'question'\]"):
        load_pairs(cfg(path))
    other = tmp_path / "d.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match=r"d.txt: unknown file type"):
        load_pairs(cfg(other))
    with pytest.raises(DataError, match=r"file not found"):
        load_pairs(cfg(tmp_path / "nothing.jsonl"))


def test_format_forced_wrong_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'chosen'|d.jsonl:1: field 'chosen' has no"):
        load_pairs(cfg(path, format="hh"))


def test_hub_id_offline_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"data.path='Anthropic/hh-rlhf': not a local file.*point data.path at a local copy"):
        load_pairs(cfg("Anthropic/hh-rlhf", data_dir="harmless-base", split="test"))


def test_max_pairs_and_deterministic_split(hh_path):
    pairs, _ = load_pairs(cfg(hh_path, on_bad_record="skip", max_pairs=200))
    assert len(pairs) == 200
    train, held_out = split_pairs(pairs, 0.1, seed=3)
    again = split_pairs(pairs, 0.1, seed=3)
    other = split_pairs(pairs, 0.1, seed=4)
    assert (train, held_out) == again and held_out != other[1]
    assert len(held_out) == 20 and len(train) == 180
    assert not {p.id for p in train} & {p.id for p in held_out}
    assert split_pairs(pairs[:2], 0.01, 0)[1] and split_pairs(pairs, 0.0, 0)[1] == []


def test_strong_preference_filter_reports_each_rule(tmp_path):
    records = [
        {"prompt": "p", "chosen": "long enough answer", "rejected": "another long answer", "sc": 9, "sr": 2},
        {"prompt": "p", "chosen": "short", "rejected": "long enough answer here", "sc": 9, "sr": 2},
        {"prompt": "p", "chosen": "the cat sat on the mat", "rejected": "the cat sat on the mat today", "sc": 9, "sr": 2},
        {"prompt": "p", "chosen": "a good full answer", "rejected": "a bad other reply", "sc": 5, "sr": 4.5},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    rules = FilterConfig(min_response_chars=10, max_overlap=0.8, min_score_diff=1.0)
    pairs, report = load_pairs(cfg(path, filter=rules, columns={"score_chosen": "sc", "score_rejected": "sr"}))
    assert [p.chosen for p in pairs] == ["long enough answer"]
    assert report.filtered == {"min_response_chars": 1, "max_overlap": 1, "min_score_diff": 1}
    with pytest.raises(DataError, match="min_score_diff needs score_chosen"):
        load_pairs(cfg(path, filter=rules))
