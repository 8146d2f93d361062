"""Execute a notebook with papermill so that it can never wait forever on an idle kernel.

Why this exists: the lost wake-up
---------------------------------
Under load, about one papermill run in 50 of a notebook with a ``widgets.interact`` cell (3 in
150) used to stop for good with the kernel idle (``scripts/stress_notebooks.py`` measures the rate; the
README's "Notebook runs that cannot hang" gives the figures). Caught in the act, the client's
shell socket held the kernel's ``execute_reply`` (``zmq.EVENTS`` had ``POLLIN``), its file
descriptor was registered with the event loop, and a poll was waiting on it, yet the loop never
woke; scheduling the socket's event handler by hand finished the run at once.

The chain of causes:

1. ``interact`` draws into an ``Output`` widget. nbclient mirrors that widget and, for every
   output and clear it sees on IOPub, sends the widget's new state to the kernel as a
   ``comm_msg`` on the *shell* channel, while it is still awaiting the cell's reply on that
   same socket.
2. ``jupyter_client.Session.send`` sends through a plain (blocking) shadow of the
   ``zmq.asyncio`` socket, so pyzmq's asyncio layer does not see that send.
3. A ZeroMQ socket's file descriptor is edge-triggered: any send, receive or ``EVENTS`` read
   processes the socket's pending commands, and with them the "a message has arrived" signal.
   If the reply arrived just before the ``comm_msg`` went out, the send consumes its signal;
   pyzmq re-checks the socket after its *own* sends, but this one bypassed it. The poll that
   waits for the reply (``timeout=None``) then sleeps forever beside the reply.

The fix, in two layers (:class:`CourseChannel`):

- after every send, read ``EVENTS`` through the asyncio socket, which makes pyzmq look again
  and wake any waiting poll (the root cause);
- never wait on the descriptor alone: an unbounded wait is cut into slices of
  ``poll_slice`` seconds, and each slice ends with a direct check of the socket, so any
  other lost wake-up costs at most one slice.

And a watchdog (:class:`ReplyWatch`), for the replies to cells: the kernel announces on IOPub when it has finished a
request (``status: idle``, with that request as parent). A cell that is still computing, for
a minute or a day, is left alone; a request whose kernel went idle ``lost_reply_after`` seconds
ago without its reply arriving raises :class:`LostReplyError`. :func:`execute_notebook` then
runs the notebook once more (a full-scale run resumes from its checkpoints) and, if the reply
is lost again, raises :class:`NotebookHangError` naming the notebook, the cell and what it
waited for.

``make lab`` is not on this path: JupyterLab's server talks to the kernel through tornado's
``ZMQStream``, which handles every send itself, and nbval uses jupyter_client's blocking client,
whose ``zmq.Poller`` reads the socket's state directly; neither mirrors widgets by sending.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from queue import Empty

import zmq
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from nbclient.util import run_sync
from papermill.clientwrap import PapermillNotebookClient
from papermill.log import logger
from papermill.engines import NBClientEngine, papermill_engines
from papermill.utils import merge_kwargs, remove_args
from traitlets import Float, Type, default

__all__ = ["CourseChannel", "CourseKernelClient", "CourseKernelManager", "CourseNotebookClient", "CourseEngine",
           "LostReplyError", "NotebookHangError", "ReplyWatch", "execute_notebook"]

ENGINE = "course"


class LostReplyError(RuntimeError):
    """The kernel finished a request (its IOPub status went idle) but the reply never arrived."""


class NotebookHangError(RuntimeError):
    """A notebook's reply was lost on every attempt; the message names the notebook and the cell."""


class ReplyWatch:
    """What one kernel client has asked and what the kernel has said it finished.

    ``sent`` maps each request's message id (``execute_request``, ``kernel_info_request``, ...)
    to ``(msg_type, time sent)`` until its reply arrives; ``idle`` maps a parent message id to
    the time its ``status: idle`` arrived on IOPub. A request in both for longer than
    ``lost_reply_after`` seconds has lost its reply.
    """

    def __init__(self, lost_reply_after: float):
        self.lost_reply_after = lost_reply_after
        self.sent: dict[str, tuple[str, float]] = {}
        self.idle: dict[str, float] = {}

    def on_send(self, msg: dict) -> None:
        kind = msg["header"]["msg_type"]
        if kind.endswith("_request"):  # comm messages, for one, have no reply
            self.sent[msg["header"]["msg_id"]] = (kind, time.monotonic())

    def on_receive(self, msg: dict) -> None:
        parent = msg.get("parent_header", {}).get("msg_id")
        if msg["header"]["msg_type"].endswith("_reply"):
            self.sent.pop(parent, None)
            self.idle.pop(parent, None)
        elif msg["header"]["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
            if parent in self.sent:
                self.idle[parent] = time.monotonic()

    def check(self) -> None:
        """Raise :class:`LostReplyError` for a request finished long ago whose reply never came."""
        now = time.monotonic()
        for msg_id, since in self.idle.items():
            if now - since > self.lost_reply_after and msg_id in self.sent:
                kind, sent = self.sent[msg_id]
                raise LostReplyError(
                    f"waited for the reply to {kind} {msg_id}: the kernel reported it finished (status idle) "
                    f"{now - since:.0f} s ago, {now - sent:.0f} s after it was sent, and the reply never arrived")


class CourseChannel(AsyncZMQSocketChannel):
    """A shell or IOPub channel that cannot sleep beside a message that has arrived.

    ``send`` re-reads the socket's events through its asyncio wrapper (pyzmq then wakes a
    waiting poll if a message is there); ``get_msg`` waits at most ``poll_slice`` seconds on
    the socket's file descriptor at a time, checking the :class:`ReplyWatch` between slices.
    ``poll_slice = 0`` turns the slicing off, and with it the watchdog's checks (the send fix
    alone, for measurements). The watchdog sees a request finish only while IOPub is read, that
    is while a cell executes; papermill's closing ``kernel_info`` wait is covered by the slices
    against a lost wake-up, not against a reply that never came.
    """

    poll_slice: float = 1.0
    watch: ReplyWatch | None = None
    checks: bool = False  # the shell channel checks the watch while it waits; IOPub only records

    def send(self, msg: dict) -> None:
        super().send(msg)
        if self.watch is not None:
            self.watch.on_send(msg)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no poll can be waiting in this thread: the next one reads the socket's events first
        self.socket.get(zmq.EVENTS)

    async def get_msg(self, timeout: float | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if not self.poll_slice else self.poll_slice
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                wait = left if wait is None else min(wait, left)
            try:
                msg = await super().get_msg(timeout=wait)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if self.checks and self.watch is not None:
                    self.watch.check()
                continue
            if self.watch is not None:
                self.watch.on_receive(msg)
            return msg


class CourseKernelClient(AsyncKernelClient):
    """An asyncio kernel client whose shell and IOPub channels are :class:`CourseChannel`."""

    shell_channel_class = Type(CourseChannel)
    iopub_channel_class = Type(CourseChannel)
    lost_reply_after = Float(60.0, help="seconds after the kernel went idle before a missing reply counts as lost")

    def start_channels(self, *args, **kwargs) -> None:
        super().start_channels(*args, **kwargs)
        self.watch = ReplyWatch(self.lost_reply_after)
        for channel in (self.shell_channel, self.iopub_channel):
            channel.watch = self.watch
        self.shell_channel.checks = True


class CourseKernelManager(AsyncKernelManager):
    """papermill's kernel manager, handing out :class:`CourseKernelClient` s."""

    @default("client_factory")
    def _course_client(self):
        return CourseKernelClient


class CourseNotebookClient(PapermillNotebookClient):
    """papermill's notebook client with the course's kernel manager; a lost reply names its cell."""

    @default("kernel_manager_class")
    def _course_kernel_manager(self):
        return CourseKernelManager

    async def async_execute_cell(self, cell, cell_index, *args, **kwargs):
        try:
            return await super().async_execute_cell(cell, cell_index, *args, **kwargs)
        except LostReplyError as err:
            for task in asyncio.all_tasks():  # nbclient leaves its kernel-alive poll running on this path
                if task is not asyncio.current_task() and "_async_poll_kernel_alive" in repr(task.get_coro()):
                    task.cancel()
            first = next((line for line in cell.source.splitlines() if line.strip()), "")
            raise LostReplyError(f"cell {cell_index} ({first[:70]!r}): {err}") from err

    execute_cell = run_sync(async_execute_cell)


class CourseEngine(NBClientEngine):
    """papermill's nbclient engine with :class:`CourseNotebookClient` (``engine_name="course"``)."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None, stderr_file=None,
                                 start_timeout=60, execution_timeout=None, **kwargs):
        # the same arguments as papermill's own nbclient engine, to another client class
        kwargs = remove_args(["input_path"], **kwargs)
        final = merge_kwargs(remove_args(["timeout", "startup_timeout"], **kwargs),
                             timeout=execution_timeout if execution_timeout else kwargs.get("timeout"),
                             startup_timeout=start_timeout, kernel_name=kernel_name, log=logger,
                             log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file)
        return CourseNotebookClient(nb_man, **final).execute()


papermill_engines.register(ENGINE, CourseEngine)


def execute_notebook(notebook: str | Path, output: str | Path, parameters: dict | None = None, *,
                     attempts: int = 2, log=print, **papermill_kwargs):
    """``papermill.execute_notebook`` through the course's engine; returns the executed notebook.

    A lost reply (:class:`LostReplyError`) runs the notebook again, up to ``attempts`` runs in
    all, then raises :class:`NotebookHangError` naming the notebook, the cell and what was
    waited for. Every other error (a failing cell, a dead kernel, a cell timeout) is raised as
    papermill raises it, at once. ``papermill_kwargs`` go to papermill (``cwd``,
    ``kernel_name``, ``stdout_file``, ...), and through it to the client, so
    ``kernel_manager_class`` can replace the kernel manager (one whose clients are not
    :class:`CourseKernelClient` loses the fix).
    """
    import papermill as pm

    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    papermill_kwargs.setdefault("kernel_name", "python3")
    papermill_kwargs.setdefault("progress_bar", False)
    for attempt in range(1, attempts + 1):
        try:
            return pm.execute_notebook(str(notebook), str(output), parameters=parameters or {}, engine_name=ENGINE,
                                       **papermill_kwargs)
        except LostReplyError as err:
            if attempt == attempts:
                raise NotebookHangError(f"{notebook}: the kernel's reply was lost on each of {attempts} attempts; "
                                        f"last time in {err}") from err
            log(f"    {Path(notebook).name}: {err}; running the notebook again (attempt {attempt + 1} of {attempts})")
