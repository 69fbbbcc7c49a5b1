"""No process this project starts outlives the command that started it.

    procs.stop_on_signals()        # SIGTERM and SIGHUP end the command the way Ctrl-C does: its cleanup runs
    ...
    except KeyboardInterrupt:
        procs.stop_children(grace_s)   # every process below this one: SIGTERM, wait, then SIGKILL

A closed terminal (SIGHUP), `timeout` or a scheduler's kill (SIGTERM) used to end a launcher and leave the local job
it was running going; the same signal to generate.py left vLLM's engine core running at 100% of a core. Three
mechanisms close that:
- the launchers and scripts turn SIGTERM/SIGHUP into KeyboardInterrupt, so their `finally` blocks and interrupt
  handlers run (engines shut down, finished rows stay on disk);
- they become child subreapers (prctl PR_SET_CHILD_SUBREAPER): a process whose parent dies first is re-parented to
  them instead of init, so `stop_children` still finds every descendant, sessions of their own included;
- a process that vLLM spawns (it re-imports the script as __mp_main__) asks the kernel to kill it when its parent
  dies (PR_SET_PDEATHSIG), which covers even a SIGKILL of the script.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
stopping = threading.Event()  # set once a stop signal arrived: nothing new may start


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def stop_on_signals(signals=STOP_SIGNALS, subreaper: bool = True) -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread (once: a second signal during the cleanup is
    ignored), like Ctrl-C. A signal the caller's parent set to ignore (nohup's SIGHUP) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        if stopping.is_set():
            return
        stopping.set()
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in signals:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)
    if subreaper:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a process spawned by multiprocessing (vLLM's engine core): the kernel sends `sig` when the parent dies."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    _prctl(PR_SET_PDEATHSIG, int(sig))
    if parent is not None and os.getppid() != parent.pid:  # it died before we asked
        os._exit(1)


def _running(p: psutil.Process) -> bool:
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p.pid, os.WNOHANG)  # ours (a child or an adopted orphan): reap it
            return False
        return p.is_running()
    except psutil.NoSuchProcess:
        return False


def children(root: psutil.Process | None = None) -> list[psutil.Process]:
    """Every process below `root` (this one) that still runs."""
    try:
        return [p for p in (root or psutil.Process()).children(recursive=True) if _running(p)]
    except psutil.NoSuchProcess:
        return []


def stop_children(grace_s: float = 60.0, say=None) -> tuple[int, int]:
    """Stop every process below this one: SIGTERM first (a trainer saves a checkpoint at its next step boundary and
    exits, generate.py and judge.py shut their engines down, submitit's local controller passes it on), up to
    `grace_s` seconds for them to end (processes started meanwhile get it too), then SIGKILL. Returns (stopped,
    killed)."""
    stopping.set()
    return stop_tree(None, grace_s, say)


def interrupted(error: KeyboardInterrupt, grace_s: float, say) -> str:
    """After Ctrl-C, SIGTERM or SIGHUP in a launcher: stop every process below it (stop_children) and say so, as
    the start of its last line."""
    stopped, killed = stop_children(grace_s, say)
    return (f"interrupted ({str(error) or 'SIGINT'}); stopped {stopped} process(es)"
            + (f", {killed} killed after {grace_s:g} s" if killed else ""))


def stop_tree(root: psutil.Process | None, grace_s: float = 60.0, say=None) -> tuple[int, int]:
    """stop_children for the processes below `root` and `root` itself (None: below this process)."""
    seen: dict[int, psutil.Process] = {}
    deadline = time.time() + grace_s
    told = False
    while True:
        for p in _below(root):
            if p.pid not in seen:
                seen[p.pid] = p
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGTERM)
        alive = [p for p in seen.values() if _running(p)] + [p for p in _below(root) if p.pid not in seen]
        if not alive or time.time() > deadline:
            break
        if say and not told and time.time() > deadline - grace_s + 5:
            say(f"waiting up to {grace_s:.0f} s for {len(alive)} process(es) to save and stop")
            told = True
        time.sleep(0.2)
    killed = 0
    for _ in range(3):  # a process may start another as it dies
        alive = [p for p in seen.values() if _running(p)] + _below(root)
        if not alive:
            break
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
                killed += 1
        psutil.wait_procs(alive, timeout=5)
        for p in alive:
            _running(p)
    return len(seen), killed


def _below(root: psutil.Process | None) -> list[psutil.Process]:
    if root is None:
        return children()
    return ([root] if _running(root) else []) + children(root)
