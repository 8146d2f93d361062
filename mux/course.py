"""``python -m mux.course``: run the course notebooks headless and summarise their metrics.

    python -m mux.course run [--notebooks notebooks] [--out outputs] [-p NAME VALUE]... [-f params.yaml]
    python -m mux.course summary [--out outputs]
    python -m mux.course refresh [--notebooks notebooks]

``run`` executes every ``NN_*.ipynb`` with papermill (in the notebook's folder, as
JupyterLab would), writes the executed copies to ``<out>/executed/`` and the metrics to
``<out>/metrics/``, then prints one table of every notebook's headline metrics. Parameters
given with ``-p``/``-f`` go to the notebooks that declare them; one that no selected notebook
declares (a misspelt name, usually) stops the run before any notebook executes.

``refresh`` re-executes the notebooks in place on their defaults, so that the committed
copies carry the outputs of their default run, and strips what would only add noise to a
diff: papermill's timing metadata and finished progress bars.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path

from .reporting import read_metrics, summary_table

__all__ = ["course_notebooks", "run_course", "main"]


def course_notebooks(folder: str | Path) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb`` in ``folder``, in teaching order."""
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _check_declared(parameters: dict, declared: dict[str, dict]) -> None:
    """Raise ``SystemExit`` naming every parameter that none of the notebooks declares.

    ``declared`` maps a notebook's name to its parameters (as ``papermill.inspect_notebook``
    returns them). Each unknown name comes with the closest declared name, if any.
    """
    known = sorted({name for params in declared.values() for name in params})
    unknown = [name for name in parameters if name not in known]
    if not unknown:
        return
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        lines.append(f"unknown parameter {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise SystemExit(
        "\n".join(lines) + f"\nno notebook declares {'it' if len(unknown) == 1 else 'them'}; notebooks considered: "
        + ", ".join(declared) + "\ntheir parameters are: " + ", ".join(known)
    )


def run_course(notebooks: str | Path, out: str | Path, parameters: dict | None = None, only: list[str] | None = None) -> dict:
    """Execute the course notebooks with papermill; return ``{stem: seconds}``.

    Each parameter goes to the notebooks that declare it; a parameter that none of the selected
    notebooks declares raises ``SystemExit`` before any notebook runs.
    """
    import papermill as pm

    out = Path(out).resolve()
    books = course_notebooks(notebooks)
    if only:
        books = [b for b in books if any(b.stem.startswith(o) for o in only)]
    if not books:
        raise SystemExit(f"no notebooks named NN_*.ipynb found in {notebooks!r} (filter: {only})")
    declared = {book.name: pm.inspect_notebook(str(book)) for book in books}
    _check_declared(parameters or {}, declared)
    (out / "executed").mkdir(parents=True, exist_ok=True)
    timings = {}
    for book in books:
        params = {"out_dir": str(out / "metrics")}
        params.update({k: v for k, v in (parameters or {}).items() if k in declared[book.name]})
        print(f"==> {book.name}  {params}", flush=True)
        started = time.perf_counter()
        pm.execute_notebook(
            str(book), str(out / "executed" / book.name), parameters=params,
            cwd=str(book.parent), kernel_name="python3", progress_bar=False,
        )
        timings[book.stem] = time.perf_counter() - started
        print(f"    done in {timings[book.stem]:.0f} s", flush=True)
    return timings


def _is_progress_bar(output) -> bool:
    data = output.get("data", {})
    text = data.get("text/plain", "")
    return "application/vnd.jupyter.widget-view+json" in data and "it/s]" in text


def clean_notebook(nb) -> None:
    """Drop papermill timing metadata, widget state and progress-bar outputs (in place)."""
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not _is_progress_bar(o)]


def refresh(notebooks: str | Path) -> None:
    """Execute every course notebook in place on its defaults, then clean it."""
    import nbformat
    import papermill as pm

    for book in course_notebooks(notebooks):
        print(f"==> {book.name}", flush=True)
        pm.execute_notebook(str(book), str(book), cwd=str(book.parent), kernel_name="python3", progress_bar=False)
        nb = nbformat.read(str(book), as_version=4)
        clean_notebook(nb)
        nbformat.write(nb, str(book))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mux.course", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks and print the summary")
    run.add_argument("--notebooks", default="notebooks")
    run.add_argument("--out", default="outputs")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    run.add_argument("-f", "--parameters-file", help="YAML file of parameters")
    run.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 01")
    summ = sub.add_parser("summary", help="print the summary of an earlier run")
    summ.add_argument("--out", default="outputs")
    ref = sub.add_parser("refresh", help="re-execute the notebooks in place on their defaults")
    ref.add_argument("--notebooks", default="notebooks")
    args = parser.parse_args(argv)

    if args.command == "refresh":
        refresh(args.notebooks)
        return 0

    if args.command == "run":
        import yaml

        params = yaml.safe_load(Path(args.parameters_file).read_text()) if args.parameters_file else {}
        params.update({k: _parse_value(v) for k, v in args.parameter})
        timings = run_course(args.notebooks, args.out, params, args.only)
        print("\nrun time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    metrics = read_metrics(Path(args.out) / "metrics")
    print("\n" + summary_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
