"""Training on several processes from inside one: ``TrainConfig(num_processes=K)``.

``mux.train(model, data, TrainConfig(num_processes=K, checkpoint_dir=...), n, ...)`` called
from a single process (a notebook's kernel, a plain script) does not train there: it hands the
call to :func:`train_in_processes`, registered as the training library's process launcher
(the entry point ``processes`` of the group ``mux.launchers``, in ``pyproject.toml``). It

1. checks that K devices exist (K GPUs, or K CPU cores with ``cpu=True`` or without a GPU);
2. pickles the job (model, data, configuration, N, loss, collate and eval functions) with
   ``cloudpickle`` into ``<checkpoint_dir>/launch/job.pkl``; functions, lambdas and classes
   defined in a notebook (its ``__main__``) are copied by value, those of importable
   modules by reference (the workers get the caller's ``sys.path``);
3. runs ``python -m torch.distributed.run --nproc_per_node K -m mux.runner.launch <job>``, relaying
   the workers' output (written to ``stdout.log`` and ``stderr.log`` next to the job) into the
   caller's as it comes, so it shows in the notebook, and raises a RuntimeError with the
   workers' exception and the end of that output if they fail;
4. in each worker (:func:`main`), calls :func:`mux.train` with the same arguments: inside
   a distributed run now, it trains with Accelerate and DDP (gloo on CPUs, NCCL on GPUs),
   checkpoints and resumes as usual; the main worker writes the result's fields to
   ``<checkpoint_dir>/launch/result.json``;
5. loads the final checkpoint's weights into the caller's model and returns a
   :class:`~mux.TrainResult` with that model and the workers' fields.

Running the same call again resumes from the checkpoints (an interrupted run), or returns at
once, without starting processes, when the newest checkpoint is the end of this very run.
Interrupting the caller (Ctrl-C, a notebook's stop button) asks the workers to finish their
step and save a checkpoint, then raises KeyboardInterrupt with the caller's model holding that
checkpoint; a second interrupt stops them at once. If the caller dies (a kernel restarted or
killed), the workers likewise save and stop (on Linux) rather than train on for nobody.

Why not Accelerate's ``notebook_launcher``: it forks the kernel and needs CUDA uninitialised
in it, but the course notebooks use the GPU between trainings (evaluation, timing), so
forking is not possible. Launching the package's worker under ``torchrun`` in fresh
processes works whatever the kernel has done, and is the same code path as ``accelerate
launch`` or ``torchrun`` of a script.

What does not come back: everything the workers do besides the weights and the result
fields. A loss or eval function that records something in a notebook variable records it in
the workers' copies; a ``loss_fn`` with state (``set_step``) is not advanced in the caller.
What cannot be sent: objects cloudpickle cannot pickle (open files, locks, running
generators, database or network connections), anywhere in the model, the data or the
functions (a closure's captured variables included). Tensors on a GPU inside the data or the
functions are unpickled on that GPU in every worker: keep data on the CPU (the model itself
is moved to the CPU before pickling, which also frees its GPU memory for the workers).
"""
from __future__ import annotations

import codecs
import collections
import json
import os
import pickle
import signal
import site
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from ..reporting import atomic_write
from ..training import TrainConfig, TrainingInterrupted, TrainResult, load_weights, model_fingerprint, train
from ..training.checkpoints import UNREADABLE, readable_checkpoints, refuse_existing, run_identity
from ..training.data import build_loader
from ..training.parts import resolve_precision

__all__ = ["train_in_processes", "check_devices", "main", "JOB_FOLDER", "JOB_FILE", "RESULT_FILE"]

JOB_FOLDER = "launch"  # inside checkpoint_dir
JOB_FILE = "job.pkl"
RESULT_FILE = "result.json"
JOB_VERSION = 1
RESULT_FIELDS = ("steps", "history", "evaluations", "resumed_from", "seconds", "device", "num_processes")
TAIL_CHARS = 4000  # of the workers' output, in the error raised when they fail
ERROR_FILE = "error-{rank}.txt"  # a worker's exception, next to the job
# variables of a distributed run that the caller may carry and torchrun sets for each worker
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _uses_cuda(cfg: TrainConfig) -> bool:
    return not cfg.cpu and torch.cuda.is_available()


def check_devices(cfg: TrainConfig) -> None:
    """ValueError unless ``cfg.num_processes`` devices exist: GPUs, or CPU cores (``os.cpu_count()``)."""
    k = cfg.num_processes
    if _uses_cuda(cfg):
        have = torch.cuda.device_count()
        if k > have:
            raise ValueError(
                f"num_processes={k} asks for {k} GPUs (one process each), but {have} "
                f"{'is' if have == 1 else 'are'} present (torch.cuda.device_count()): set num_processes to "
                f"{have} or fewer (1 trains in this process), make more GPUs visible (CUDA_VISIBLE_DEVICES), "
                "or pass cpu=True to train in CPU processes"
            )
    else:
        have = os.cpu_count() or 1
        if k > have:
            raise ValueError(
                f"num_processes={k} asks for {k} CPU processes, but this machine has {have} CPU "
                f"core{'' if have == 1 else 's'} (os.cpu_count()): set num_processes to {have} or fewer "
                "(1 trains in this process)"
                + ("" if torch.cuda.is_available() else "; no GPU is available")
            )


def _parent_device(cfg: TrainConfig) -> torch.device:
    """Where a single-process :func:`mux.train` would leave the model (Accelerate's choice for cuda or cpu)."""
    return torch.device("cuda") if _uses_cuda(cfg) else torch.device("cpu")


def _workers_device(cfg: TrainConfig) -> str:
    """``str(accelerator.device)`` of the main worker."""
    return "cuda:0" if _uses_cuda(cfg) else "cpu:0"


def _parent_sys_path() -> list[str]:
    return [os.path.abspath(p) if p else os.getcwd() for p in sys.path]


def write_job(path: Path, job: dict) -> None:
    """Pickle ``job`` to ``path`` atomically: a small header (format, ``sys.path``), then the job by cloudpickle."""
    import cloudpickle

    header = {"version": JOB_VERSION, "sys_path": _parent_sys_path(), "cwd": os.getcwd()}

    def write(f):
        pickle.dump(header, f, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            cloudpickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            raise TypeError(
                f"train(num_processes={job['cfg'].num_processes}) hands the model, the data, the loss and the other "
                "arguments to its worker processes pickled by cloudpickle, and this one cannot be pickled: "
                f"{type(err).__name__}: {err}. Create such objects (open files, locks, running generators, connections) "
                "inside the functions passed, or train with num_processes=1."
            ) from err

    atomic_write(path, write)


def read_job(path: str | os.PathLike) -> dict:
    """The job written by :func:`write_job`. This process's ``sys.path`` becomes the caller's (then
    its own other entries), so that what was pickled by reference is found where the caller found it."""
    with open(path, "rb") as f:
        header = pickle.load(f)
        if not isinstance(header, dict) or header.get("version") != JOB_VERSION:
            raise ValueError(f"{path} is not a job written by this version of mux.runner.launch")
        caller = header["sys_path"]
        sys.path[:] = caller + [p for p in sys.path if p not in caller]
        return pickle.load(f)  # cloudpickle's output is read by the standard unpickler


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torchrun's agent, told to stop when the caller dies (a notebook kernel restarted or killed):
# Linux's parent-death signal SIGINT, which the agent passes on to the workers (they save a
# checkpoint and stop) instead of leaving them training with nobody to hand the result to
_AGENT = """\
import ctypes, os, signal, sys
caller = int(sys.argv.pop(1))
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGINT))  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != caller:
    sys.exit("mux.runner.launch: the caller exited before the workers started")
sys.argv[0] = "torchrun"
from torch.distributed.run import main
main()
"""


def _command(job: Path, k: int) -> list[str]:
    """``python -m torch.distributed.run ... -m mux.runner.launch <job>`` (on Linux through :data:`_AGENT`)."""
    agent = ["-c", _AGENT, str(os.getpid())] if sys.platform.startswith("linux") else ["-m", "torch.distributed.run"]
    return [sys.executable, *agent, "--nnodes", "1", "--nproc_per_node", str(k), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "mux.runner.launch", str(job)]


def _environment(k: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCH_VARIABLES}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // k)))
    env["PYTHONUNBUFFERED"] = "1"  # the workers' prints arrive as they happen
    # the workers import this very package, even where the caller found it through sys.path (not
    # installed); an installed one is found anyway (and site-packages must not precede the stdlib)
    package_root = Path(__file__).resolve().parents[1]
    site_dirs = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if package_root not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join([str(package_root), *filter(None, [env.get("PYTHONPATH")])])
    if env.get("MPLBACKEND", "").startswith("module://"):  # a notebook's inline backend: no kernel in a worker
        env["MPLBACKEND"] = "Agg"
    return env


class _Relay:
    """Copies a log file the workers write into one of this process's streams (looked up at each
    write, so it follows a notebook's or pytest's redirections) as it grows, and keeps the end of
    everything relayed. ``quiet``: keep the end only (after an interrupt: the agent's and
    workers' reports of it).

    Files, not pipes: workers whose caller has died (a killed kernel) can still print while they
    save their last checkpoint; a pipe with no reader would make that print fail."""

    POLL_S = 0.1

    def __init__(self, tail: collections.deque, lock: threading.Lock, done: threading.Event):
        self.tail, self.lock, self.done, self.quiet = tail, lock, done, False

    def start(self, path: Path, stream_name: str) -> threading.Thread:
        thread = threading.Thread(target=self._copy, args=(path, stream_name), daemon=True,
                                  name=f"mux.runner.launch {stream_name}")
        thread.start()
        return thread

    def _copy(self, path: Path, stream_name: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(path, "rb") as f:
            while True:
                finished = self.done.is_set()  # before reading: what was written before it is read
                chunk = f.read(65536)
                text = decoder.decode(chunk, final=finished and not chunk)
                if text:
                    with self.lock:
                        self.tail.append(text)
                        while sum(map(len, self.tail)) > 2 * TAIL_CHARS and len(self.tail) > 1:
                            self.tail.popleft()
                    if not self.quiet:
                        try:
                            stream = getattr(sys, stream_name)
                            stream.write(text)
                            stream.flush()
                        except (OSError, ValueError, AttributeError):  # closed or no stream
                            pass
                if not chunk:
                    if finished:
                        break
                    time.sleep(self.POLL_S)


def _interrupt_workers(proc: subprocess.Popen) -> None:
    """SIGINT to the workers (the agent's children): they finish their step, save a checkpoint and
    stop, however long saving takes; the agent then exits. Without psutil: SIGINT to the agent,
    which passes it on (and kills workers still running 30 s later)."""
    try:
        import psutil

        workers = psutil.Process(proc.pid).children(recursive=False)
    except Exception:
        workers = []
    for worker in workers:
        try:
            worker.send_signal(signal.SIGINT)
        except Exception:
            pass
    if not workers and proc.poll() is None:
        proc.send_signal(signal.SIGINT)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's agent and its workers (which run in sessions of their own)."""
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing, or the agent is gone
        children = []
    for child in children:
        try:
            child.kill()
        except Exception:
            pass
    if proc.poll() is None:
        proc.kill()


def run_workers(job: Path, k: int) -> tuple[int, str, bool]:
    """Run the job under torchrun with ``k`` workers; ``(exit code, end of the output, interrupted)``.

    Their output goes to ``stdout.log`` and ``stderr.log`` next to the job, and from there to
    this process's ``sys.stdout`` and ``sys.stderr`` as it comes.

    A KeyboardInterrupt while waiting sends SIGINT to the workers (they finish their step, save
    a checkpoint and stop; what they and the agent print about it is not relayed); a second one
    kills them.
    """
    tail, lock, done = collections.deque(), threading.Lock(), threading.Event()
    relay = _Relay(tail, lock, done)
    logs = {name: job.with_name(f"{name}.log") for name in ("stdout", "stderr")}
    with open(logs["stdout"], "wb") as out, open(logs["stderr"], "wb") as err:
        # a session of its own: a notebook's interrupt (SIGINT to the kernel's process group)
        # reaches the workers only through this process, once
        proc = subprocess.Popen(_command(job, k), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=_environment(k), start_new_session=True)
    threads = [relay.start(path, name) for name, path in logs.items()]
    interrupts = 0
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    relay.quiet = True
                    print(f"\nInterrupted: the {k} workers finish their step and save a checkpoint (interrupt again "
                          "to stop them at once, without saving)", file=sys.stderr, flush=True)
                    _interrupt_workers(proc)
                else:
                    _kill_tree(proc)
    finally:
        if proc.poll() is None:  # an exception other than an interrupt: leave no workers behind
            _kill_tree(proc)
            proc.wait()
        done.set()
        for thread in threads:
            thread.join(timeout=10)
    with lock:
        text = "".join(tail)[-TAIL_CHARS:]
    return code, text, interrupts > 0


def _finished(model: nn.Module, train_data, cfg: TrainConfig, n: int, kwargs: dict) -> TrainResult | None:
    """The result of this run if the newest checkpoint is its end (nothing left to train), else None.

    The check is the one the workers would make (same model, same run); any doubt returns
    None, and the workers then decide (resume, or refuse naming what differs)."""
    if not cfg.resume:
        return None
    started = time.perf_counter()
    loader, _, _ = build_loader(train_data, cfg, n, kwargs.get("collate_fn"))
    run = run_identity(cfg, n, loader, kwargs["loss_fn"], cfg.num_processes, "cuda" if _uses_cuda(cfg) else "cpu",
                        resolve_precision(cfg))
    for ckpt, state in readable_checkpoints(cfg.checkpoint_dir, "train"):
        step, evaluations = state.get("step"), state.get("evaluations", [])
        if step != cfg.max_steps or state.get("run") != run or state.get("fingerprint") != model_fingerprint(model):
            return None
        if kwargs.get("eval_fn") is not None and not (evaluations and evaluations[-1]["step"] == step):
            return None  # train() would evaluate the end of the run
        try:
            load_weights(model, ckpt)
        except UNREADABLE:
            return None
        return TrainResult(model=model, steps=step, history=state["history"], evaluations=evaluations,
                           resumed_from=step, seconds=time.perf_counter() - started, device=_workers_device(cfg),
                           num_processes=cfg.num_processes)
    return None


def _load_step(model: nn.Module, root: Path, step: int | None) -> int | None:
    """Load the newest readable checkpoint (the one of ``step`` if given) into ``model``; its step."""
    for ckpt, state in readable_checkpoints(root, "train"):
        if step is None or state.get("step") == step:
            load_weights(model, ckpt)
            return state.get("step")
        if step is not None and state.get("step", 0) < step:
            break
    return None


def train_in_processes(model: nn.Module, train_data, cfg: TrainConfig, n: int, **kwargs) -> TrainResult:
    """:func:`mux.train` in ``cfg.num_processes`` new worker processes (see the module docstring).

    ``kwargs``: the other arguments of :func:`mux.train` (``loss_fn``, ``collate_fn``,
    ``eval_fn``), passed on to the workers. Returns ``model`` with the trained weights, on
    the device :func:`mux.train` would use in this process.
    """
    k = cfg.num_processes
    if not cfg.checkpoint_dir:
        raise ValueError(f"TrainConfig(num_processes={k}) needs a checkpoint_dir: the {k} worker processes hand the "
                         "trained weights back through its checkpoints (and running the same call again resumes "
                         "from them)")
    check_devices(cfg)
    root = Path(cfg.checkpoint_dir)
    refuse_existing(root, cfg)
    device = _parent_device(cfg)
    done = _finished(model, train_data, cfg, n, kwargs)
    if done is not None:
        done.model = model.to(device).train()
        return done

    folder = root / JOB_FOLDER
    job, result_path = folder / JOB_FILE, folder / RESULT_FILE
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [result_path, *folder.glob(ERROR_FILE.format(rank="*"))]:
        stale.unlink(missing_ok=True)
    # the workers receive the weights on the CPU (Accelerate moves them to their devices), and
    # the GPU memory the model held here is theirs while they train
    model.to("cpu")
    try:
        write_job(job, {"model": model, "train_data": train_data, "cfg": cfg, "n": n, "kwargs": kwargs})
        code, tail, interrupted = run_workers(job, k)
        if interrupted:
            job.unlink(missing_ok=True)
            try:
                step = _load_step(model, root, None)
            except (*UNREADABLE, FileNotFoundError):
                step = None
            raise TrainingInterrupted(step, None, f"the model holds the newest checkpoint (step {step}) of {root}: run "
                                      "the same call again to resume" if step is not None else "")
        if code != 0:
            raise RuntimeError(
                f"training in {k} worker processes failed (exit code {code}){_worker_errors(folder)}\n"
                f"The end of their output (all of it in {folder}/stdout.log and stderr.log):\n{tail}\n"
                f"The job is {job}; to run it by hand: {sys.executable} -m torch.distributed.run "
                f"--nproc_per_node {k} -m mux.runner.launch {job}"
            )
        if not result_path.is_file():
            raise RuntimeError(f"the {k} worker processes finished but wrote no {result_path}. The end of their "
                               f"output:\n{tail}")
        fields = json.loads(result_path.read_text())
        if _load_step(model, root, fields["steps"]) is None:
            raise RuntimeError(f"the workers trained {fields['steps']} steps but {root} holds no readable checkpoint "
                               "of that step")
        for path in (job, result_path, folder / "stdout.log", folder / "stderr.log"):
            path.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass
    finally:
        model.to(device)
    model.train()  # as train() leaves it
    return TrainResult(model=model, **{name: fields[name] for name in RESULT_FIELDS}, is_main_process=True)


def _worker_errors(folder: Path) -> str:
    """``": <the exception>"`` as the failing workers reported it (grouped when identical), or ``"."``."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.glob(ERROR_FILE.format(rank="*"))):
        try:
            found.setdefault(path.read_text().strip(), []).append(path.stem.split("-")[-1])
            path.unlink()
        except OSError:
            pass
    if not found:
        return "."
    return ":\n" + "\n".join(f"worker{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {text}"
                              for text, ranks in found.items())


def _write_result(path: Path, result: TrainResult) -> None:
    text = json.dumps({name: getattr(result, name) for name in RESULT_FIELDS}, indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))


def _record(fn):
    """torchrun's error recording (the failing worker's traceback in the agent's summary), where available."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        return fn
    return record(fn)


@_record
def main(argv: list[str] | None = None) -> int:
    """A worker: ``python -m mux.runner.launch <job.pkl>`` under torchrun (one of the job's processes)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m torch.distributed.run --nproc_per_node K -m mux.runner.launch <checkpoint_dir>/launch/job.pkl",
              file=sys.stderr)
        return 2
    path = Path(argv[0])
    job = read_job(path)  # an error here has no error file: the message ends the output
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = train(job["model"], job["train_data"], job["cfg"], job["n"], **job["kwargs"])
    except TrainingInterrupted as err:
        if rank == 0:  # stopped after a step, checkpoint saved: no traceback
            print(err, file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # for the caller's error message (the traceback is in the output)
        text = "".join(traceback.format_exception_only(type(err), err)).strip()
        try:
            path.with_name(ERROR_FILE.format(rank=rank)).write_text(text)
        except OSError:
            pass
        raise
    if result.is_main_process:
        _write_result(path.with_name(RESULT_FILE), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
