"""progress.py's lines and pipeline.py's relay of them from job logs."""
import os
import time

from pipeline import LogRelay
from progress import PREFIX, Progress


def test_a_long_call_still_gets_lines_with_rate_and_eta():
    lines = []
    with Progress("reference log-probs", total=8, unit="pairs", every_s=0.15, log=lines.append) as bar:
        time.sleep(0.4)              # the first batch: heartbeat lines, no rate yet
        bar.update(2, tokens=500)
        time.sleep(0.4)              # one long call: the heartbeat keeps reporting
        bar.update(6, tokens=1500)
    assert len(lines) >= 4 and all(line.startswith(f"{PREFIX} reference log-probs: ") for line in lines)
    assert "0/8 pairs (0%)" in lines[0] and "ETA after the first batch" in lines[0]
    during = [line for line in lines if "2/8 pairs (25%)" in line]
    assert during and "pairs/s" in during[0] and "tok/s" in during[0] and "ETA" in during[0]
    assert "8/8 pairs (100%)" in lines[-1] and "ETA" not in lines[-1]


def test_short_work_prints_nothing_and_a_resumed_count_starts_where_it_was():
    lines = []
    with Progress("eval", total=4, every_s=30, log=lines.append) as bar:
        bar.update(4)
    assert lines == []
    bar = Progress("dpo train", total=10, unit="steps", every_s=30, done=6, log=lines.append, enabled=False)
    bar.update(1)
    assert "7/10 steps" in bar.line() and lines == []


def test_the_pipeline_relays_the_newest_progress_line_of_each_job_log(tmp_path):
    logs = tmp_path / "submitit"
    logs.mkdir()
    old = logs / "1_0_log.err"
    old.write_text(f"{PREFIX} from an earlier pipeline run\n")
    relay = LogRelay(logs, since=time.time() + 10)  # the old log predates this relay
    job = logs / "2_0_log.err"
    job.write_text(f"Loading weights 10%\r50%\r\n{PREFIX} generate sft: 1/64 answers\n{PREFIX} generate sft: 9/64 "
                   f"answers\nhalf a line")
    relay.since = time.time() - 5
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert relay.lines() == [f"{PREFIX} generate sft: 9/64 answers"]
    assert relay.lines() == []  # nothing new
    with open(job, "a") as fh:
        fh.write(f" done\n{PREFIX} generate sft: 64/64 answers\n")
    assert relay.lines() == [f"{PREFIX} generate sft: 64/64 answers"]
