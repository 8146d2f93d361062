"""``python -m mux.runner.course``: run the course notebooks headless and summarise their metrics.

    python -m mux.runner.course run [--notebooks notebooks] [--out outputs] [-p NAME VALUE]... [-f params.yaml]
    python -m mux.runner.course summary [--out outputs]
    python -m mux.runner.course refresh [--notebooks notebooks] [--only 01 ...]
    python -m mux.runner.course full CONFIG_OR_FOLDER [--runs runs] [--data-root data] [--smoke] [-p NAME VALUE]... [-y YAML]
        [--variant NAME] [--evaluate] [--tracker tensorboard] [--tf32] [--compile inductor]
    python -m mux.runner.course report [--runs runs] [--configs configs]
    python -m mux.runner.course check-configs [--configs configs]
    python -m mux.runner.course preflight CONFIG_OR_FOLDER [--offline] [--json F] [--rates F] [--smoke] [--steps K]
        [--device cuda|cpu] [--skip-data] [-p NAME VALUE]...

``run`` executes every ``NN_*.ipynb`` with papermill (in the notebook's folder, as
JupyterLab would), writes the executed copies to ``<out>/executed/`` and the metrics to
``<out>/metrics/``, then prints one table of every notebook's headline metrics. Parameters
given with ``-p``/``-f`` go to the notebooks that declare them; one that no selected notebook
declares (a misspelt name, usually) stops the run before any notebook executes.

``refresh`` re-executes the notebooks in place on their defaults, so that the committed
copies carry the outputs of their default run, and strips what would only add noise to a
diff: papermill's timing metadata and finished progress bars.

``full`` runs named full-scale configurations (``configs/*.yaml``) into ``runs/<name>/``, skipping
finished ones and resuming interrupted ones; ``report`` gathers every run beside the papers'
figures; ``check-configs`` checks every configuration against its notebook (see :mod:`mux.runner.runs`);
``preflight`` projects each configuration's models, memory, disk and GPU-hours, and on the target machine
measures them (see :mod:`mux.runner.preflight`).
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from pathlib import Path

from ..params import declared_parameters
from ..reporting import read_metrics, summary_table

__all__ = ["course_notebooks", "run_course", "main"]


def course_notebooks(folder: str | Path) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb`` in ``folder``, in teaching order."""
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _check_declared(parameters: dict, declared: dict[str, dict]) -> None:
    """Raise ``SystemExit`` naming every parameter that none of the notebooks declares.

    ``declared`` maps a notebook's name to its parameters (as :func:`mux.params.declared_parameters`
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

    from .execute import execute_notebook

    out = Path(out).resolve()
    books = course_notebooks(notebooks)
    if only:
        books = [b for b in books if any(b.stem.startswith(o) for o in only)]
    if not books:
        raise SystemExit(f"no notebooks named NN_*.ipynb found in {notebooks!r} (filter: {only})")
    declared = {book.name: declared_parameters(book) for book in books}
    _check_declared(parameters or {}, declared)
    (out / "executed").mkdir(parents=True, exist_ok=True)
    timings = {}
    for book in books:
        params = {"out_dir": str(out / "metrics")}
        params.update({k: v for k, v in (parameters or {}).items() if k in declared[book.name]})
        print(f"==> {book.name}  {params}", flush=True)
        started = time.perf_counter()
        execute_notebook(book, out / "executed" / book.name, params, cwd=str(book.parent))
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


def refresh(notebooks: str | Path, only: list[str] | None = None) -> None:
    """Execute every course notebook (or those whose names start with one of ``only``) in place on
    its defaults, then clean it."""
    import nbformat

    from .execute import execute_notebook

    for book in course_notebooks(notebooks):
        if only and not any(book.name.startswith(prefix) for prefix in only):
            continue
        print(f"==> {book.name}", flush=True)
        execute_notebook(book, book, cwd=str(book.parent))
        nb = nbformat.read(str(book), as_version=4)
        clean_notebook(nb)
        nbformat.write(nb, str(book))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mux.runner.course", description=__doc__.splitlines()[0])
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
    ref.add_argument("--only", nargs="*", help="notebook name prefixes to refresh, e.g. 01")
    full = sub.add_parser("full", help="run full-scale configurations (a YAML file or a folder) into runs/<name>/")
    full.add_argument("target", help="a configuration file, or a folder of them (e.g. configs/)")
    full.add_argument("--runs", default=None, help="where runs/<name>/ folders go (default: runs, or runs/smoke with --smoke)")
    full.add_argument("--data-root", default=os.environ.get("MUX_DATA_ROOT", "data"),
                      help="the folder holding the datasets ({data_root} in a configuration; env MUX_DATA_ROOT)")
    full.add_argument("--smoke", action="store_true", help="apply each configuration's tiny 'smoke' overrides")
    full.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    full.add_argument("-y", "--yaml", action="append", default=[], help="parameters as YAML, e.g. 'seeds: [0, 1]'")
    full.add_argument("--list", action="store_true", help="list the configurations and their cost; run nothing")
    full.add_argument("--variant", help="run into runs/<name>@<variant>/, a run of its own (e.g. one task with -p tasks)")
    full.add_argument("--evaluate", action="store_true",
                      help="evaluation only, from the finished runs/<name>/ checkpoints (into runs/<name>@evaluate/)")
    full.add_argument("--tracker", default="", help="Accelerate's log_with for every training (tensorboard, wandb, ...)")
    full.add_argument("--tf32", action="store_true", help="TF32 matrix products and convolutions on NVIDIA GPUs")
    full.add_argument("--compile", default="", metavar="BACKEND", help="torch.compile every model (e.g. inductor)")
    rep = sub.add_parser("report", help="every run's metrics beside the papers' figures (runs/report.md, .png)")
    rep.add_argument("--runs", default="runs")
    rep.add_argument("--configs", default=None, help="the configurations (default: the repository's configs/)")
    chk = sub.add_parser("check-configs", help="check every configuration against its notebook")
    chk.add_argument("--configs", default=None, help="the configurations (default: the repository's configs/)")
    _preflight_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "preflight":
        return _preflight_command(args)
    if args.command in ("full", "report", "check-configs"):
        return _runs_command(args)

    if args.command == "refresh":
        refresh(args.notebooks, args.only)
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


def _preflight_parser(sub) -> None:
    pre = sub.add_parser("preflight", help="project (or, on the target machine, measure) each configuration's cost")
    pre.add_argument("target", help="a configuration file, or a folder of them (e.g. configs/)")
    pre.add_argument("--offline", action="store_true", help="CPU only, no data: models on the meta device, formulas")
    pre.add_argument("--json", help="write the report as JSON to this file")
    pre.add_argument("--rates", help="measured instances/s (a preflight's JSON) instead of the assumed rates")
    pre.add_argument("--smoke", action="store_true", help="apply each configuration's smoke overrides")
    pre.add_argument("--steps", type=int, default=50, help="training steps of each model kind (not --offline)")
    pre.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to measure (not --offline)")
    pre.add_argument("--skip-data", action="store_true", help="do not read the data sources (not --offline)")
    pre.add_argument("--data-root", default=os.environ.get("MUX_DATA_ROOT", "data"))
    pre.add_argument("--runs", default="runs")
    pre.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))


def _preflight_command(args) -> int:
    import json

    from . import runs
    from .preflight import preflight

    overrides = {k: _parse_value(v) for k, v in args.parameter}
    try:
        result = preflight(args.target, offline=args.offline, smoke=args.smoke, overrides=overrides,
                           data_root=args.data_root, runs_folder=args.runs, steps=args.steps, device=args.device,
                           rates=args.rates, data=not args.skip_data)
    except runs.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    for name, problems in result["problems"].items():
        print(f"{name}: " + "; ".join(problems), file=sys.stderr)
    return 1 if result["problems"] and not args.offline else 0


def _runs_command(args) -> int:
    import yaml

    from . import runs

    try:
        if args.command == "check-configs":
            files = runs.config_files(args.configs or runs.CONFIGS)
            for path in files:
                runs.check_config(runs.load_config(path))
            print(f"{len(files)} configurations checked against their notebooks: all good")
        elif args.command == "report":
            print(runs.report(args.runs, args.configs or runs.CONFIGS))
        elif args.list:
            configs = [runs.load_config(p) for p in runs.config_files(args.target)]
            for c in configs:
                r = c.resources
                print(f"{c.name:32s} {c.notebook:22s} {r['gpu_hours']:>7} GPU-h  {r['gpu_memory_gb']:>4} GB  "
                      f"x{r['gpus']}  {'; '.join(c.reproduces)}")
            print(f"total: {sum(c.resources['gpu_hours'] for c in configs):g} GPU-hours (estimates)")
        else:
            overrides = {k: _parse_value(v) for k, v in args.parameter}
            for text in args.yaml:
                value = yaml.safe_load(text)
                if not isinstance(value, dict):
                    raise runs.ConfigError(f"-y expects 'name: value' YAML, got {text!r}")
                overrides.update(value)
            folder = args.runs or ("runs/smoke" if args.smoke else "runs")
            options = runs.RunOptions(variant=args.variant, evaluate=args.evaluate, tracker=args.tracker,
                                      tf32=args.tf32, compile=args.compile)
            runs.run_configs(args.target, folder, args.data_root, args.smoke, overrides, options=options)
    except runs.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
