"""Execute a notebook many times and count the runs that hang: a reproducer and a rate.

    .venv/bin/python scripts/stress_notebooks.py NOTEBOOK [--runs 200] [--parallel 3] [--load 1] \\
        [--engine course|papermill] [--hang-after 300] [-p NAME VALUE]... [--json FILE]
    .venv/bin/python scripts/stress_notebooks.py --write-reproducer widget_figure.ipynb

Each of ``--parallel`` workers is a child process that executes the notebook again and again,
through the course's path (``--engine course``: :func:`mux.runner.execute_notebook`, with its
watchdog and one retry) or through plain papermill (``--engine papermill``, as the course ran
before its fix). A run that has not finished ``--hang-after`` seconds after it started counts
as a hang: its worker is killed with its kernel, and a new worker carries on with the runs that
were left. ``--load`` busy processes keep the cores loaded beside them, since the hang this
measures showed up only on a busy machine. A run that raises (a failing cell, say, or a
reply lost on both attempts of the course's path) is a failure, not a hang; a run that the
watchdog saves by running the notebook again takes over a minute (its limit), so give such
measurements a ``--hang-after`` above that. Prints one line per run and a summary, writes
``{"runs": R, "hangs": h, "failures": f, "seconds": [...], ...}`` to ``--json``, and exits 1
if any run hung or failed.

``--write-reproducer PATH`` writes the smallest notebook known to trigger the hang: about a
second of matrix work printing a table, a figure, a ``widgets.interact`` of that figure, and a
last print.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mux.params import declared_parameters

ROOT = Path(__file__).resolve().parents[1]

REPRODUCER_CELLS = [
    "import time\n\nimport ipywidgets as widgets\nimport matplotlib.pyplot as plt\nimport numpy as np",
    "started = time.perf_counter()\na = np.random.default_rng(0).random((300, 300))\n"
    "while time.perf_counter() - started < 1.0:\n    a = a @ a / np.linalg.norm(a)\n"
    "for i in range(5):\n    print(f'row {i}: {a[i, :3]}')",
    "def show(k=1):\n    fig, ax = plt.subplots(figsize=(3, 2))\n    ax.plot(np.arange(10) ** k)\n    plt.show()\n\n\nshow(2)",
    "widgets.interact(show, k=widgets.IntSlider(min=1, max=3, value=1));",
    "print('done')",
]


def write_reproducer(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in REPRODUCER_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


# ----------------------------------------------------------------------------- the worker (child process)

def worker(spec: dict) -> None:
    """Execute the notebook ``spec["runs"]`` times, printing ``START i`` / ``DONE i s`` / ``FAIL i s error`` lines."""
    import papermill as pm

    from mux.runner import execute as course

    course.CourseChannel.poll_slice = spec["poll_slice"]
    with tempfile.TemporaryDirectory() as tmp:
        params = dict(spec["parameters"])
        if spec["out_dir"]:
            params.setdefault("out_dir", tmp)
        for i in spec["indices"]:
            print(f"START {i}", flush=True)
            started = time.perf_counter()
            retries = []
            try:
                kwargs = dict(parameters=params, cwd=spec["cwd"], kernel_name="python3", progress_bar=False)
                if spec["engine"] == "papermill":
                    pm.execute_notebook(spec["notebook"], str(Path(tmp) / "out.ipynb"), **kwargs)
                else:
                    course.execute_notebook(spec["notebook"], str(Path(tmp) / "out.ipynb"), log=retries.append,
                                            **kwargs)
            except Exception as err:  # a failing cell is a failure, reported, and the next run goes on
                line = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                print(f"FAIL {i} {time.perf_counter() - started:.2f} {type(err).__name__}: {line[:300]}", flush=True)
                continue
            print(f"DONE {i} {time.perf_counter() - started:.2f} {len(retries)}", flush=True)


# ----------------------------------------------------------------------------- the parent

def _start(spec: dict, lines: queue.Queue, slot: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True, cwd=str(ROOT))

    def read():
        for line in proc.stdout:
            lines.put((slot, proc, line.strip()))
        lines.put((slot, proc, "EXIT"))

    threading.Thread(target=read, daemon=True).start()
    return proc


def _kill(proc: subprocess.Popen) -> None:
    """Kill the worker and everything under it (its kernel runs in a session of its own)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for pid in [proc.pid, *(p.pid for p in tree)]:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def stress(notebook: Path, runs: int, parallel: int, load: int, hang_after: float, engine: str,
           poll_slice: float, parameters: dict, log=print) -> dict:
    declared = declared_parameters(notebook)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise SystemExit(f"{notebook.name} declares no parameter {', '.join(map(repr, unknown))}")
    base = {"notebook": str(notebook), "cwd": str(notebook.parent), "engine": engine, "poll_slice": poll_slice,
            "parameters": parameters, "out_dir": "out_dir" in declared}
    quotas = [list(range(k, runs, parallel)) for k in range(parallel)]
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    lines: queue.Queue = queue.Queue()
    result = {"notebook": str(notebook), "engine": engine, "runs": runs, "hangs": 0, "failures": 0, "recovered": 0,
              "seconds": [], "parallel": parallel, "load": load, "hang_after": hang_after,
              "poll_slice": poll_slice if engine == "course" else None, "errors": []}
    workers, current = {}, {}
    try:
        for slot, indices in enumerate(quotas):
            if indices:
                workers[slot] = _start(dict(base, indices=indices), lines, slot)
        while workers:
            try:
                slot, proc, line = lines.get(timeout=1.0)
            except queue.Empty:
                slot = proc = line = None
            if line and workers.get(slot) is proc:
                kind, _, rest = line.partition(" ")
                if kind == "START":
                    current[slot] = (int(rest), time.monotonic())
                elif kind in ("DONE", "FAIL"):
                    index, seconds, detail = (rest.split(" ", 2) + [""])[:3]
                    quotas[slot].remove(int(index))
                    current.pop(slot, None)
                    if kind == "DONE":
                        result["seconds"].append(float(seconds))
                        result["recovered"] += int(detail) > 0
                        log(f"run {index}: {float(seconds):.1f} s" + (" (recovered from a lost reply)" if int(detail) else ""))
                    else:
                        result["failures"] += 1
                        result["errors"].append(f"run {index}: {detail}")
                        log(f"run {index}: FAILED after {float(seconds):.1f} s: {detail}")
                elif kind == "EXIT":
                    del workers[slot]
                    if quotas[slot]:  # the worker died between runs: count its run as a failure, go on
                        index = current.pop(slot, (quotas[slot][0], 0))[0]
                        quotas[slot].remove(index)
                        result["failures"] += 1
                        result["errors"].append(f"run {index}: the worker exited with {proc.wait()}")
                        if quotas[slot]:
                            workers[slot] = _start(dict(base, indices=quotas[slot]), lines, slot)
            for slot, (index, since) in list(current.items()):
                if time.monotonic() - since > hang_after:
                    _kill(workers.pop(slot))
                    del current[slot]
                    quotas[slot].remove(index)
                    result["hangs"] += 1
                    log(f"run {index}: HANG (no end {hang_after:.0f} s after it started); worker and kernel killed")
                    if quotas[slot]:
                        workers[slot] = _start(dict(base, indices=quotas[slot]), lines, slot)
    finally:
        for proc in workers.values():
            _kill(proc)
        for proc in burners:
            proc.kill()
            proc.wait()
    return result


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", help="the notebook to execute again and again")
    parser.add_argument("--runs", type=_positive, default=20, help="executions in all (default 20)")
    parser.add_argument("--parallel", type=_positive, default=1, help="workers side by side (default 1)")
    parser.add_argument("--load", type=int, default=0, help="busy processes beside them (default 0)")
    parser.add_argument("--hang-after", type=float, default=600.0,
                        help="seconds after which an unfinished run counts as a hang (default 600)")
    parser.add_argument("--engine", choices=("course", "papermill"), default="course",
                        help="the course's execution path (default) or plain papermill")
    parser.add_argument("--poll-slice", type=float, default=1.0,
                        help="course engine: longest wait on a socket between checks; 0 = the send fix alone "
                             "(no slices, so no watchdog checks either)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--json", help="write the counts here")
    parser.add_argument("--write-reproducer", metavar="PATH", help="write the small widget notebook and stop")
    args = parser.parse_args(argv)
    if args.write_reproducer:
        write_reproducer(Path(args.write_reproducer))
        print(f"wrote {args.write_reproducer}")
        return 0
    if args.poll_slice < 0:
        parser.error(f"--poll-slice must be >= 0 seconds, got {args.poll_slice}")
    if not args.notebook:
        parser.error("give a notebook to execute (or --write-reproducer PATH)")
    notebook = Path(args.notebook).resolve()
    if not notebook.is_file() or notebook.suffix != ".ipynb":
        parser.error(f"no notebook at {args.notebook!r}: expected the path of an existing .ipynb file")
    import yaml

    parameters = {name: yaml.safe_load(value) for name, value in args.parameter}
    result = stress(notebook, args.runs, args.parallel, max(0, args.load), args.hang_after, args.engine,
                    args.poll_slice, parameters)
    print(f"{notebook.name} ({args.engine}): {result['runs']} runs, {result['hangs']} hangs, "
          f"{result['failures']} failures, {result['recovered']} recovered from a lost reply")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["hangs"] or result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
