"""SIGTERM (SLURM pre-emption) reaches a run's kernel as one stop request."""
import os
import signal
import subprocess
import sys
import time

import pytest

from mux.runner.runs import termination_as_interrupt
from mux.training import interrupt


def test_the_runner_passes_sigterm_on_to_its_children_as_sigint(tmp_path):
    mark, before = tmp_path / "got", signal.getsignal(signal.SIGTERM)
    child = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGINT, lambda *a: (open({str(mark)!r}, 'w').write('SIGINT'), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        lines = []
        with termination_as_interrupt(lines.append) as seen:
            os.kill(os.getpid(), signal.SIGTERM)
            child.wait(timeout=20)
        assert seen["signal"] == signal.SIGTERM and mark.read_text() == "SIGINT"
        assert "finish its step and save a checkpoint" in lines[0]
    finally:
        child.kill()
    assert signal.getsignal(signal.SIGTERM) is before  # the runner's handler lasts only while a run executes


def test_two_signals_within_a_second_are_one_request_and_a_later_one_stops_at_once(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(interrupt.time, "monotonic", lambda: clock[0])
    stop = interrupt.StopRequest()
    stop._handler(signal.SIGTERM, None)  # SLURM's SIGTERM to the kernel
    clock[0] += 0.05
    stop._handler(signal.SIGINT, None)  # the runner passing its own SIGTERM on
    assert stop.requested
    clock[0] += 5
    with pytest.raises(KeyboardInterrupt):
        stop._handler(signal.SIGINT, None)  # a person's second Ctrl-C, later: stop now
