"""``python -m mux.runner NOTEBOOK OUTPUT [papermill's options]``: papermill's command line, on the course's engine.

The same options as ``papermill`` (``-p``, ``-y``, ``-f``, ``--cwd``, ``-k``, ...), with the
client of :mod:`mux.runner.execute`: a lost kernel reply is still read, or stops the run with an
error naming the cell, instead of leaving it waiting forever.
"""
import sys

from papermill.cli import papermill

from .execute import ENGINE

if __name__ == "__main__":
    if any(arg == "--engine" or arg.startswith("--engine=") for arg in sys.argv[1:]):
        sys.exit("python -m mux.runner always uses the course's engine; drop --engine")  # papermill would take the last
    papermill.main(args=[*sys.argv[1:], "--engine", ENGINE], prog_name="python -m mux.runner")
