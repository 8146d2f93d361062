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

Sampling must not slow what it measures. RSS is cheap to read (``/proc/<pid>/statm``) and is read every 0.1 s;
PSS needs ``/proc/<pid>/smaps_rollup``, which walks every page of the process while holding its memory-map
lock, so an allocation in the notebook's kernel can wait for it; read every 0.1 s, it may slow the run it
measures (a cost we reason from the mechanism and have not measured on its own). PSS is therefore read only
when the tree's RSS reaches a new high (PSS <= RSS, and their peaks come together), and at least every 2 s.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_memory(proc: psutil.Process, with_pss: bool) -> tuple[int, int, int]:
    """(PSS of the tree or 0 without ``with_pss``, sum of the tree's RSS, the largest single process's RSS: the
    kernel), in bytes."""
    pss = rss = largest = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info() if with_pss else p.memory_info()  # smaps_rollup, or statm (cheap)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss, rss, largest = pss + (info.pss if with_pss else 0), rss + info.rss, max(largest, info.rss)
    return pss, rss, largest


def measure(notebook: Path) -> tuple[float, tuple[int, int, int], int, str]:
    """(seconds, (peak PSS, peak RSS sum, peak kernel RSS), return code, the last lines of stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        # the course's own execution path (mux.runner: papermill with the lost-reply watchdog)
        run = "import sys; from mux.runner import execute_notebook; " \
              "execute_notebook(sys.argv[1], sys.argv[2], {'out_dir': sys.argv[3]}, cwd=sys.argv[4])"
        cmd = [sys.executable, "-c", run, str(notebook), str(Path(tmp) / notebook.name), tmp, str(notebook.parent)]
        started = time.perf_counter()
        errors = open(Path(tmp) / "stderr.txt", "w+")  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        ps, peak, last_pss = psutil.Process(proc.pid), (0, 0, 0), 0.0
        while proc.poll() is None:
            _, rss, kernel = tree_memory(ps, with_pss=False)
            if rss > peak[1] or time.perf_counter() - last_pss > 2.0:  # a new high, or 2 s since the last PSS
                pss, rss, kernel = tree_memory(ps, with_pss=True)
                last_pss = time.perf_counter()
                peak = (max(peak[0], pss), peak[1], peak[2])
            peak = (peak[0], max(peak[1], rss), max(peak[2], kernel))  # each figure's own peak
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        errors.seek(0)
        tail = "\n".join(errors.read().splitlines()[-15:])
        errors.close()
        return seconds, peak, proc.returncode, tail


def main(argv: list[str]) -> int:
    books = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    print(f"{'notebook':28s} {'wall (s)':>9s} {'peak PSS (MB)':>14s} {'sum of RSS':>11s} {'kernel RSS':>11s}  status"
          f"   [{psutil.cpu_count()} CPUs, load {psutil.getloadavg()[0]:.1f}]")
    failed = 0
    for book in books:
        seconds, (pss, rss, kernel), rc, tail = measure(book.resolve())
        failed += rc != 0
        mb = [f"{v / 2**20:.0f}" for v in (pss, rss, kernel)]
        print(f"{book.name:28s} {seconds:9.1f} {mb[0]:>14s} {mb[1]:>11s} {mb[2]:>11s}  {'ok' if rc == 0 else 'FAILED'}",
              flush=True)
        if rc != 0:  # why, from the run's own error output
            print("    " + tail.replace("\n", "\n    "), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
