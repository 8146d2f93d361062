"""Measure each course notebook's wall time and peak memory on its default parameters.

    .venv/bin/python scripts/benchmark_notebooks.py [notebooks/01_datamux.ipynb ...]

Runs the notebook (papermill, through ``mux.runner``) in a child process and samples the memory of the whole
process tree (papermill and its kernel) every 0.1 s. Prints one line per notebook. A measurement, not a test:
timings depend on the machine and on what else it is doing.

Memory is the peak of the tree's proportional set size (PSS): each process's private pages, plus its share of
the pages it shares with others (torch's libraries, mapped once into papermill and once into the kernel). That
is what the tree takes from the machine, and the figure the course's 1.5 GB budget is about. The sum of the
processes' resident sizes (RSS) counts every shared page once per process that maps it, so it overstates the
total; it is printed beside, with the kernel's own peak RSS (what a learner's JupyterLab kernel would hold).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_memory(proc: psutil.Process) -> tuple[int, int, int]:
    """(PSS of the tree, sum of the tree's RSS, the largest single process's RSS: the kernel), in bytes."""
    pss = rss = largest = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()  # /proc/<pid>/smaps_rollup on Linux
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss, rss, largest = pss + info.pss, rss + info.rss, max(largest, info.rss)
    return pss, rss, largest


def measure(notebook: Path) -> tuple[float, tuple[int, int, int], int]:
    with tempfile.TemporaryDirectory() as tmp:
        # the course's own execution path (mux.runner: papermill with the lost-reply watchdog)
        run = "import sys; from mux.runner import execute_notebook; " \
              "execute_notebook(sys.argv[1], sys.argv[2], {'out_dir': sys.argv[3]}, cwd=sys.argv[4])"
        cmd = [sys.executable, "-c", run, str(notebook), str(Path(tmp) / notebook.name), tmp, str(notebook.parent)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ps, peak = psutil.Process(proc.pid), (0, 0, 0)
        while proc.poll() is None:
            peak = tuple(map(max, peak, tree_memory(ps)))  # each figure's own peak
            time.sleep(0.1)
        return time.perf_counter() - started, peak, proc.returncode


def main(argv: list[str]) -> int:
    books = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    print(f"{'notebook':28s} {'wall (s)':>9s} {'peak PSS (MB)':>14s} {'sum of RSS':>11s} {'kernel RSS':>11s}  status"
          f"   [{psutil.cpu_count()} CPUs, load {psutil.getloadavg()[0]:.1f}]")
    failed = 0
    for book in books:
        seconds, (pss, rss, kernel), rc = measure(book.resolve())
        failed += rc != 0
        mb = [f"{v / 2**20:.0f}" for v in (pss, rss, kernel)]
        print(f"{book.name:28s} {seconds:9.1f} {mb[0]:>14s} {mb[1]:>11s} {mb[2]:>11s}  {'ok' if rc == 0 else 'FAILED'}",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
