"""Measure each course notebook's wall time and peak memory on its default parameters.

    .venv/bin/python scripts/benchmark_notebooks.py [notebooks/01_datamux.ipynb ...]

Runs the notebook (papermill, through ``mux.runner``) in a child process and samples the resident memory of the whole process
tree (papermill and its kernel) every 0.1 s. Prints one line per notebook. A measurement,
not a test: timings depend on the machine and on what else it is doing.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(notebook: Path) -> tuple[float, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        # the course's own execution path (mux.runner: papermill with the lost-reply watchdog)
        run = "import sys; from mux.runner import execute_notebook; " \
              "execute_notebook(sys.argv[1], sys.argv[2], {'out_dir': sys.argv[3]}, cwd=sys.argv[4])"
        cmd = [sys.executable, "-c", run, str(notebook), str(Path(tmp) / notebook.name), tmp, str(notebook.parent)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(ps))
            time.sleep(0.1)
        return time.perf_counter() - started, peak, proc.returncode


def main(argv: list[str]) -> int:
    books = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    print(f"{'notebook':28s} {'wall (s)':>9s} {'peak RSS (MB)':>14s}  status   [{psutil.cpu_count()} CPUs]")
    failed = 0
    for book in books:
        seconds, peak, rc = measure(book.resolve())
        failed += rc != 0
        print(f"{book.name:28s} {seconds:9.1f} {peak / 2**20:14.0f}  {'ok' if rc == 0 else 'FAILED'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
