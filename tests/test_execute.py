"""The course's notebook execution (mux.runner.execute): no run can wait forever on an idle kernel.

The hang it prevents (measured with scripts/stress_notebooks.py, README "Notebook runs that
cannot hang"): the kernel's reply sits in the client's shell socket, a poll waits on it, and the
socket's edge-triggered wake-up was consumed by a send that pyzmq's asyncio layer never saw
(nbclient mirroring an ``Output`` widget). It strikes about one run in 30 under load, too
rarely for a test, so these tests put a client in that state on purpose, at a chosen cell:

- ``lose the wake-up``: the shell socket's event handler is skipped once when the reply has
  arrived, so nothing will wake the waiting poll again (the state caught in the act);
- ``send over it``: instead, the client sends a comm message through the blocking shadow
  socket, as nbclient's widget mirror does, and the send swallows the wake-up;
- ``drop the reply``: the reply is thrown away, as if it never arrived, while the kernel says
  it has finished (the watchdog's case).

Plain papermill (today's code before the fix) waits forever in the first two; the tests bound
that wait and show it. The course's path recovers, or retries once and fails with a message.
"""
import threading
import time
from queue import Empty

import nbformat
import papermill as pm
import pytest
import zmq
from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient
from traitlets import Float, default

from mux.runner import LostReplyError, NotebookHangError, execute_notebook
from mux.runner.execute import CourseKernelClient, CourseKernelManager, ReplyWatch

pytestmark = pytest.mark.notebook

MARK = "# <- the fault strikes here"


def notebook(tmp_path, *cells):
    path = tmp_path / "book.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


class Faults:
    """Which fault to inject at the marked cell, and how often it struck (a test sets these)."""

    kind = "lose the wake-up"
    attempts_to_spoil = 1  # on how many runs of the notebook the fault strikes
    struck = 0
    client = None  # the last plain client, so that a test can end its hung run


def _arm(client, msg):
    """Arm the fault when the marked cell's execute_request goes out."""
    if msg["header"]["msg_type"] == "execute_request" and MARK in msg["content"]["code"]:
        if Faults.struck < Faults.attempts_to_spoil:
            Faults.struck += 1
            client.armed = msg["header"]["msg_id"]


def _install(client):
    client.armed = None
    shell = client.shell_channel
    socket = shell.socket
    handle = socket._handle_events
    send = shell.send
    recv = shell._recv

    def send_and_arm(msg):
        send(msg)
        _arm(client, msg)

    def handle_events(*args):
        if client.armed and socket._shadow_sock.get(zmq.EVENTS) & zmq.POLLIN and Faults.kind != "drop the reply":
            client.armed = None
            if Faults.kind == "send over it":  # nbclient's widget mirror: a comm_msg through the blocking shadow
                comm = client.session.msg("comm_msg", content={"comm_id": "no-such-comm", "data": {}})
                client.shell_channel.send(comm)
            return  # the wake-up is gone; the reply stays in the socket
        return handle(*args)

    async def recv_or_drop(**kwargs):
        msg = await recv(**kwargs)
        if Faults.kind == "drop the reply" and msg["parent_header"].get("msg_id") == client.armed:
            client.armed = None
            raise Empty  # thrown away: to the waiting client, nothing came
        return msg

    shell.send = send_and_arm
    socket._handle_events = handle_events
    shell._recv = recv_or_drop


class PlainFaultyClient(AsyncKernelClient):
    """jupyter_client's own asyncio client (what papermill uses), with the fault."""

    def start_channels(self, *args, **kwargs):
        super().start_channels(*args, **kwargs)
        _install(self)
        Faults.client = self


class CourseFaultyClient(CourseKernelClient):
    """The course's client, with the fault, and a short watchdog for the test."""

    lost_reply_after = Float(2.0)

    def start_channels(self, *args, **kwargs):
        super().start_channels(*args, **kwargs)
        _install(self)


class PlainFaultyManager(AsyncKernelManager):
    @default("client_factory")
    def _faulty(self):
        return PlainFaultyClient


class CourseFaultyManager(CourseKernelManager):
    @default("client_factory")
    def _faulty(self):
        return CourseFaultyClient


@pytest.fixture(autouse=True)
def faults():
    Faults.kind, Faults.attempts_to_spoil, Faults.struck, Faults.client = "lose the wake-up", 1, 0, None
    yield Faults


CELLS = ("x = 1", f"print('the marked cell ran')  {MARK}", "print('after it', x)")


def test_plain_papermill_waits_forever_once_the_wake_up_is_lost(tmp_path, faults):
    # the stand-in is faithful: today's client, with the reply in its socket, never finishes
    book = notebook(tmp_path, *CELLS)
    outcome = {}

    def run():
        try:
            pm.execute_notebook(str(book), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
                                kernel_manager_class=PlainFaultyManager)
            outcome["finished"] = True
        except Exception as err:  # the kernel is shut down under it at the end of the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while faults.struck == 0 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)  # the kernel starts and reaches the marked cell
    thread.join(timeout=10)  # the reply is in the socket: an unhindered client reads it in milliseconds
    hung = faults.struck == 1 and thread.is_alive() and not outcome
    if faults.client is not None:
        faults.client.parent.provisioner.process.kill()  # end it: nbclient notices the dead kernel within a second
    thread.join(timeout=30)
    assert hung, f"plain papermill was expected to hang here (fault struck {faults.struck} times, got {outcome})"


@pytest.mark.parametrize("kind, poll_slice", [("lose the wake-up", 1.0), ("send over it", 0.0)])
def test_the_course_client_recovers_a_lost_wake_up(tmp_path, faults, kind, poll_slice, monkeypatch):
    # a lost wake-up costs one poll slice; a shadow send is followed by a look at the socket (with
    # slicing off, poll_slice=0, that alone must recover it)
    from mux.runner.execute import CourseChannel

    monkeypatch.setattr(CourseChannel, "poll_slice", poll_slice)
    faults.kind = kind
    said = []
    nb = execute_notebook(notebook(tmp_path, *CELLS), tmp_path / "out.ipynb", kernel_manager_class=CourseFaultyManager,
                          log=said.append)
    assert faults.struck == 1 and said == [], said  # recovered in the same run, not by the watchdog's retry
    assert "after it 1" in nb.cells[2].outputs[0]["text"]


def test_a_lost_reply_runs_the_notebook_again(tmp_path, faults):
    faults.kind = "drop the reply"
    said = []
    nb = execute_notebook(notebook(tmp_path, *CELLS), tmp_path / "out.ipynb", kernel_manager_class=CourseFaultyManager,
                          log=said.append)
    assert faults.struck == 1 and "after it 1" in nb.cells[2].outputs[0]["text"]
    assert len(said) == 1 and "cell 1" in said[0] and "running the notebook again (attempt 2 of 2)" in said[0]


def test_a_reply_lost_twice_fails_naming_the_notebook_the_cell_and_the_request(tmp_path, faults):
    faults.kind, faults.attempts_to_spoil = "drop the reply", 2
    started = time.monotonic()
    with pytest.raises(NotebookHangError) as err:
        execute_notebook(notebook(tmp_path, *CELLS), tmp_path / "out.ipynb", kernel_manager_class=CourseFaultyManager,
                         log=lambda line: None)
    message = str(err.value)
    assert "book.ipynb" in message and "on each of 2 attempts" in message
    assert "cell 1 (\"print('the marked cell ran')" in message
    assert "waited for the reply to execute_request" in message and "status idle" in message
    assert isinstance(err.value.__cause__, LostReplyError) and time.monotonic() - started < 90


def test_a_busy_kernel_is_not_a_lost_reply(tmp_path, faults):
    # a cell that computes for longer than the watchdog's limit (2 s here) is left alone
    faults.attempts_to_spoil = 0
    said = []
    nb = execute_notebook(notebook(tmp_path, "import time\ntime.sleep(5)\nprint('slept')"), tmp_path / "out.ipynb",
                          kernel_manager_class=CourseFaultyManager, log=said.append)
    assert said == [] and nb.cells[0].outputs[0]["text"] == "slept\n"


def test_a_failing_cell_fails_at_once_without_a_retry(tmp_path):
    said = []
    with pytest.raises(pm.PapermillExecutionError) as err:
        execute_notebook(notebook(tmp_path, "raise ValueError('bad input, as a cell would say')"),
                         tmp_path / "out.ipynb", log=said.append)
    assert "bad input, as a cell would say" in str(err.value) and said == []


def test_attempts_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="attempts must be at least 1, got 0"):
        execute_notebook(tmp_path / "any.ipynb", tmp_path / "out.ipynb", attempts=0)


def test_reply_watch_tells_a_lost_reply_from_a_busy_kernel(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    watch = ReplyWatch(lost_reply_after=30)
    request = {"header": {"msg_type": "execute_request", "msg_id": "a"}}
    watch.on_send(request)
    watch.on_send({"header": {"msg_type": "comm_msg", "msg_id": "c"}})  # no reply expected
    assert set(watch.sent) == {"a"}
    clock[0] = 10_000.0
    watch.check()  # busy for hours: no idle status, nothing raised
    status = {"header": {"msg_type": "status"}, "parent_header": {"msg_id": "a"},
              "content": {"execution_state": "idle"}}
    watch.on_receive(status)
    clock[0] += 29
    watch.check()
    clock[0] += 2
    with pytest.raises(LostReplyError, match="reply to execute_request a: the kernel reported it finished"):
        watch.check()
    watch.on_receive({"header": {"msg_type": "execute_reply"}, "parent_header": {"msg_id": "a"}, "content": {}})
    watch.check()
    assert watch.sent == {} and watch.idle == {}


@pytest.mark.parametrize("argv, engine", [(["in.ipynb", "out.ipynb", "-p", "seed", "3"], "course"),
                                          (["in.ipynb", "out.ipynb", "--engine=nbclient"], None)])
def test_the_command_line_is_papermills_on_the_course_engine(monkeypatch, argv, engine):
    import runpy
    import sys

    from papermill.cli import papermill

    called = []
    monkeypatch.setattr(papermill, "main", lambda args, prog_name: called.append(args))
    monkeypatch.setattr(sys, "argv", ["python -m mux.runner", *argv])
    if engine is None:
        with pytest.raises(SystemExit, match="always uses the course's engine"):
            runpy.run_module("mux.runner", run_name="__main__")
        assert called == []
    else:
        runpy.run_module("mux.runner", run_name="__main__")
        assert called == [[*argv, "--engine", engine]]


def _stress_main():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "stress_notebooks", Path(__file__).resolve().parents[1] / "scripts" / "stress_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("argv, message", [
    (["/no/such/notebook.ipynb"], "no notebook at '/no/such/notebook.ipynb'"),
    (["book.ipynb", "--runs", "0"], "must be an integer >= 1, got 0"),
])
def test_stress_script_refuses_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        _stress_main()(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_stress_script_counts_a_failing_cell_as_a_failure_not_a_hang(tmp_path):
    import json

    book = notebook(tmp_path, "raise RuntimeError('this cell fails')")
    report = tmp_path / "stress.json"
    assert _stress_main()([str(book), "--runs", "1", "--hang-after", "300", "--json", str(report)]) == 1
    result = json.loads(report.read_text())
    assert (result["runs"], result["hangs"], result["failures"]) == (1, 0, 1)
    assert "this cell fails" in result["errors"][0]
