"""Full-scale runs: named configurations of the course notebooks, run with papermill into ``runs/<name>/``.

A configuration is a YAML file in ``configs/``, one per paper table row (or per group of rows
that one notebook run produces together)::

    notebook: 01_datamux.ipynb            # a course notebook
    paper: "DataMUX (Murahari et al., NeurIPS 2022)"
    reproduces: "Figure 3: MLP and CNN on MNIST, accuracy against N"
    data: {name: MNIST, get: "torchvision downloads it into data_dir"}
    resources: {gpu_hours: 0.5, gpu_memory_gb: 2, gpus: 1, estimate: "how the numbers were estimated"}
    parameters: {dataset: mnist, data_dir: "{data_root}/mnist", steps: 20000}
    smoke: {steps: 3, device: cpu}          # tiny overrides: the same code path in a minute, for CI
    paper_figures: {source: "...", figures: {mlp_acc_n4: 0.97}}
    plot: [{label: "ConcatPlexer N=2", accuracy: concatplexer_acc_n2, speed: throughput_ratio_concatplexer_n2}]

String parameters may hold ``{data_root}`` (the folder that holds the datasets, ``--data-root``)
and ``{runs}`` (the runs folder, so that one run can start from another's output).

:func:`run_config` executes the notebook with papermill into ``runs/<name>/``: the executed
notebook, ``metrics/<stem>.json``, ``checkpoints/`` (the notebook's ``checkpoint_dir``),
``run.log`` (everything the notebook printed, and a plain progress line of every training every 200 steps,
``MUX_PROGRESS_EVERY``, also echoed to the job's stderr) and ``run.json`` (the run's identity and
status). Running the same configuration again skips a finished run and resumes an
interrupted one: the notebook runs again with the same ``checkpoint_dir``, so every model
already trained is loaded from its final checkpoint and one killed mid-way resumes from its
newest checkpoint (``mux.train``'s exact resume). The notebook runs through
:func:`mux.runner.execute_notebook`, so a kernel whose reply is lost (the kernel idle, the
client waiting) makes the notebook run once more, resuming the same way, and then fails with a
message naming the cell, instead of waiting forever. A folder that holds another
configuration's run, or the same configuration with other parameters, is refused.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
import os
import re
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..env import gpu_problem
from ..params import check_value, declared_parameters
from ..reporting import atomic_write

__all__ = ["ConfigError", "RunConfig", "RunOptions", "load_config", "config_files", "check_config", "resolve_parameters",
           "check_gpu", "run_config", "run_configs", "report", "ROOT", "CONFIGS", "NOTEBOOKS"]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
NOTEBOOKS = ROOT / "notebooks"
# set by the runner itself: a configuration that sets them is refused
RESERVED = ("out_dir", "checkpoint_dir")
TOP_LEVEL = {"notebook": str, "paper": str, "reproduces": (str, list), "data": dict, "resources": dict,
             "parameters": dict, "smoke": dict, "paper_figures": dict, "plot": list, "notes": str}
REQUIRED = ("notebook", "paper", "reproduces", "data", "resources", "parameters")
RESOURCES = {"gpu_hours": (int, float), "gpu_memory_gb": (int, float), "gpus": int, "estimate": str}
PLACEHOLDER = re.compile(r"\{(data_root|runs)\}")


class ConfigError(ValueError):
    """A configuration is malformed, names something that does not exist, or clashes with a run."""


@dataclass
class RunConfig:
    name: str
    path: Path
    notebook: str
    paper: str
    reproduces: list[str]
    data: dict
    resources: dict
    parameters: dict
    smoke: dict = field(default_factory=dict)
    paper_figures: dict = field(default_factory=dict)
    plot: list = field(default_factory=list)
    notes: str = ""


@dataclass
class RunOptions:
    """How a configuration is run, beside its parameters (``full``'s flags).

    ``variant``: the run goes to ``<runs>/<name>@<variant>/``, a run of its own (with ``-p``/``-y`` overrides: one
    GLUE task, other seeds, ...), so the configuration's own run is neither refused nor touched.
    ``evaluate``: evaluation only, from the finished run ``<runs>/<name>/``: the notebook runs again with that
    run's checkpoints, every training loads its final checkpoint and trains nothing (``mux.TrainConfig.evaluate_only``;
    one without a final checkpoint is an error that names it), and the results go to ``<runs>/<name>@<variant>/``
    (variant ``evaluate`` unless named).
    ``tracker`` (Accelerate's ``log_with``, e.g. ``tensorboard``; files under the run's ``tracker/``), ``tf32`` and
    ``compile`` (a ``torch.compile`` backend) set every training's switches of the same names through the kernel's
    environment (:data:`mux.training.config.TRACKER` and the others)."""

    variant: str | None = None
    evaluate: bool = False
    tracker: str = ""
    tf32: bool = False
    compile: str = ""

    def __post_init__(self):
        if self.evaluate and not self.variant:
            self.variant = "evaluate"
        if self.variant is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.variant):
            raise ConfigError(f"--variant names a folder suffix: letters, digits, '_', '.', '-', got {self.variant!r}")

    def folder_name(self, config: RunConfig) -> str:
        return f"{config.name}@{self.variant}" if self.variant else config.name

    def environment(self, folder: Path) -> dict[str, str]:
        env = {}
        if self.tracker:
            env.update(MUX_TRACKER=self.tracker, MUX_TRACKER_DIR=str(folder / "tracker"))
        if self.tf32:
            env["MUX_TF32"] = "1"
        if self.compile:
            env["MUX_COMPILE"] = self.compile
        if self.evaluate:
            env["MUX_EVALUATE_ONLY"] = "1"
        return env


def config_files(target: str | Path) -> list[Path]:
    """A configuration file, or every ``*.yaml`` in a folder (sorted); a clear error when there is none."""
    target = Path(target)
    if target.is_dir():
        files = sorted(target.glob("*.yaml"))
        if not files:
            raise ConfigError(f"no configuration (*.yaml) in folder '{target}'")
        return files
    if not target.is_file():
        hint = ""
        if CONFIGS.is_dir():
            names = [p.stem for p in CONFIGS.glob("*.yaml")]
            close = difflib.get_close_matches(target.stem, names, n=1)
            hint = f" (did you mean '{CONFIGS / (close[0] + '.yaml')}'?)" if close else f"; configurations are in '{CONFIGS}'"
        raise ConfigError(f"configuration '{target}' does not exist{hint}")
    return [target]


def _type_error(where: str, value, expected) -> ConfigError:
    names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
    return ConfigError(f"{where} should be {names}, got {value!r} ({type(value).__name__})")


def load_config(path: str | Path) -> RunConfig:
    """Read and check the shape of one configuration file (not yet against its notebook: :func:`check_config`)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {', '.join(TOP_LEVEL)}, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in TOP_LEVEL]
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a configuration has "
                          f"{', '.join(TOP_LEVEL)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    for key, expected in TOP_LEVEL.items():
        if key in raw and not isinstance(raw[key], expected):
            raise _type_error(f"{path}: {key}", raw[key], expected)
    for key, expected in RESOURCES.items():
        value = raw["resources"].get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, expected):
            raise _type_error(f"{path}: resources.{key}", value, expected)
    if raw["resources"]["gpus"] < 1:
        raise ConfigError(f"{path}: resources.gpus must be >= 1, got {raw['resources']['gpus']}")
    reproduces = raw["reproduces"] if isinstance(raw["reproduces"], list) else [raw["reproduces"]]
    return RunConfig(name=path.stem, path=path, notebook=raw["notebook"], paper=raw["paper"], reproduces=reproduces,
                     data=raw["data"], resources=raw["resources"], parameters=raw["parameters"],
                     smoke=raw.get("smoke", {}), paper_figures=raw.get("paper_figures", {}), plot=raw.get("plot", []),
                     notes=raw.get("notes", ""))


def _declared(notebook: Path) -> dict:
    return declared_parameters(notebook)


def check_config(config: RunConfig, notebooks: str | Path = NOTEBOOKS, overrides: dict | None = None) -> dict:
    """Check ``config`` (and ``overrides``) against its notebook: it exists, and every parameter is one
    the notebook declares, of the declared type. Returns the notebook's declared parameters."""
    book = Path(notebooks) / config.notebook
    if not book.is_file():
        known = sorted(p.name for p in Path(notebooks).glob("[0-9][0-9]_*.ipynb"))
        close = difflib.get_close_matches(config.notebook, known, n=1)
        raise ConfigError(f"{config.path}: notebook '{config.notebook}' does not exist in '{notebooks}'"
                          + (f" (did you mean '{close[0]}'?)" if close else f"; the notebooks are {', '.join(known)}"))
    declared = _declared(book)
    problems = []
    for section, values in (("parameters", config.parameters), ("smoke", config.smoke),
                            ("overrides", overrides or {})):
        for name, value in values.items():
            where = f"{section}.{name}"
            if name in RESERVED:
                problems.append(f"{where}: set by the runner (runs/<name>/...); leave it out")
            elif name not in declared:
                close = difflib.get_close_matches(name, list(declared), n=1)
                problems.append(f"{where}: {config.notebook} has no parameter {name!r}"
                                + (f" (did you mean {close[0]!r}?)" if close else ""))
            else:
                problem = check_value(name, _substitute(value, data_root="/data", runs="/runs"),
                                      declared[name]["inferred_type_name"])
                if problem:
                    problems.append(f"{where}: {problem}")
    for i, entry in enumerate(config.plot):
        if not isinstance(entry, dict) or set(entry) != {"label", "accuracy", "speed"}:
            problems.append(f"plot[{i}]: expected {{label, accuracy, speed}} (speed: a metric key, or a number "
                            f"such as 1.0 for the baseline), got {entry!r}")
    if problems:
        raise ConfigError(f"{config.path}:\n  - " + "\n  - ".join(problems))
    return declared


def _substitute(value, **places):
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: str(places[m.group(1)]), value)
    if isinstance(value, list):
        return [_substitute(v, **places) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, **places) for k, v in value.items()}
    return value


def resolve_parameters(config: RunConfig, data_root: str | Path, runs: str | Path, smoke: bool = False,
                       overrides: dict | None = None) -> dict:
    """The parameters the notebook gets: the configuration's, its smoke overrides (``smoke``), then
    ``overrides``, placeholders filled with absolute folders (the notebook runs in ``notebooks/``)."""
    params = dict(config.parameters)
    if smoke:
        params.update(config.smoke)
    params.update(overrides or {})
    return _substitute(params, data_root=Path(data_root).resolve(), runs=Path(runs).resolve())


SHARED = "shared"  # {runs}/shared/...: folders sibling runs share (chapter 03's baseline_dir), not a run


def needs(config: RunConfig) -> list[str]:
    """The runs this configuration starts from: the other names in its ``{runs}/<name>/...`` parameters (its
    own name there is a folder of its own run, such as where it saves its stages; ``{runs}/shared/`` holds
    what sibling runs share, such as a baseline each may train or load)."""
    found = set()
    for value in [*config.parameters.values(), *config.smoke.values()]:
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                found.update(re.findall(r"\{runs\}/([^/]+)", text))
    return sorted(found - {config.name, SHARED})


def _write_json(path: Path, value: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode()))


def _alive(pid: int, host: str) -> bool:
    """Whether the process that wrote a run's record may still be running it: on this host only (a record from
    another host is taken as stopped; several machines must not run one configuration into one folder)."""
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_processes(config: RunConfig, params: dict) -> None:
    """Before the notebook starts: the device check ``mux.train`` makes for ``num_processes`` (mux.launch)."""
    wanted = params.get("num_processes", 1)
    if isinstance(wanted, int) and wanted > 1:
        from .launch import check_devices
        from ..training import TrainConfig

        try:
            check_devices(TrainConfig(num_processes=wanted, cpu=params.get("device", "auto") == "cpu"))
        except ValueError as err:
            raise ConfigError(f"{config.name}: {err}") from err


@contextmanager
def termination_as_interrupt(log=print):
    """While a run executes, SIGTERM (SLURM's pre-emption or time limit, a scheduler's stop) is
    passed on to the notebook's kernel as SIGINT, so the training finishes its step, saves a
    checkpoint and stops (:mod:`mux.training.interrupt`), instead of this process dying at once and
    taking the kernel with it. Yields a dict whose ``"signal"`` is set once SIGTERM arrived.

    SLURM signals every process of the job, the kernel included; the kernel counts that signal
    and this forwarded one, a moment apart, as one request (see ``StopRequest``)."""
    import psutil

    seen: dict = {"signal": None}

    def forward(signum, frame):
        seen["signal"] = signum
        log(f"{signal.Signals(signum).name}: asking the notebook's kernel to finish its step and save a checkpoint")
        for child in psutil.Process().children():
            try:
                child.send_signal(signal.SIGINT)
            except psutil.NoSuchProcess:
                pass

    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


PROGRESS_EVERY = 200  # steps between two progress lines in run.log, unless MUX_PROGRESS_EVERY says otherwise


@contextmanager
def progress_environment(log_file: Path, extra: dict[str, str] | None = None):
    """The kernel's environment while a run executes: ``mux.train`` appends a plain progress line every
    ``MUX_PROGRESS_EVERY`` steps (and at each evaluation) to ``log_file`` and to the job's stderr, since the
    notebook's progress bars are widgets that reach neither (:class:`mux.training.parts.ProgressReport`);
    ``extra``: more variables (the run-time switches of :class:`RunOptions`)."""
    wanted = {"MUX_PROGRESS_FILE": str(log_file), "MUX_PROGRESS_EVERY": os.environ.get("MUX_PROGRESS_EVERY")
              or str(PROGRESS_EVERY), **(extra or {})}
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_gpu(config: RunConfig, params: dict) -> None:
    """Refuse to start a configuration whose ``resources.gpus`` asks for a GPU that torch cannot use.

    ``device: auto`` would otherwise fall back to the CPU in fp32 without a word (a driver too old for
    the CUDA build of torch, a CPU-only torch). A ``device`` of ``cpu`` (or ``mps``) in the parameters,
    the smoke overrides or the command line (``-p device cpu``) is taken as meant, and not checked."""
    wanted = config.resources.get("gpus", 0)
    device = str(params.get("device", "auto")).lower()
    if wanted < 1 or device.startswith(("cpu", "mps")):
        return
    problem = gpu_problem()
    if problem:
        raise ConfigError(f"{config.name}: resources.gpus is {wanted} and device is {device!r}, but {problem}. "
                          f"To run on the CPU on purpose (slow, in fp32), pass -p device cpu")


def run_config(config: RunConfig, runs: str | Path = "runs", data_root: str | Path = "data", smoke: bool = False,
               overrides: dict | None = None, notebooks: str | Path = NOTEBOOKS, log=print,
               options: RunOptions | None = None) -> dict:
    """Run one configuration into ``<runs>/<name>/`` (``<runs>/<name>@<variant>/``, see :class:`RunOptions`);
    return its ``run.json`` record.

    A finished run is skipped; an interrupted one (stopped, killed, failed) runs again and resumes
    from its checkpoints; a folder holding another configuration's run, or the same one with other
    parameters, raises :class:`ConfigError` before anything runs.
    """
    from .execute import execute_notebook

    check_config(config, notebooks, overrides)
    params = resolve_parameters(config, data_root, runs, smoke, overrides)
    _check_processes(config, params)
    for needed in needs(config):
        other = Path(runs) / needed / "run.json"
        status = json.loads(other.read_text()) if other.is_file() else None
        if status is None or status["status"] != "finished" or status["identity"]["smoke"] != smoke:
            raise ConfigError(f"{config.name} starts from the output of {needed}, which has not finished in "
                              f"'{Path(runs) / needed}'" + (" (as a smoke run)" if smoke else "") + f"; run {needed} first")
    options = options or RunOptions()
    folder = Path(runs).resolve() / options.folder_name(config)
    checkpoints = _evaluated_run(config, runs, smoke) if options.evaluate else folder / "checkpoints"
    # the run's identity keeps {data_root} and {runs} as written, so moved data or runs folders still resume
    identity = {"config": config.name, "notebook": config.notebook, "smoke": smoke,
                "parameters": {**config.parameters, **(config.smoke if smoke else {}), **(overrides or {})}}
    if options.variant:
        identity.update(variant=options.variant, evaluate=options.evaluate)
    record_path = folder / "run.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is None and folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(f"'{folder}' is not empty but holds no run.json: not a run of {config.name}; "
                          f"move it away or choose another --runs folder")
    if record is not None:
        if record["identity"] != identity:
            raise ConfigError(f"'{folder}' holds another run: {_difference(record['identity'], identity)}; "
                              f"choose another --runs folder, or remove '{folder}' to start again")
        if record["status"] == "finished":
            log(f"==> {config.name}: finished on {record['finished']}, skipped (remove '{folder}' to run it again)")
            return record
        if record["status"] == "running" and _alive(record.get("pid", -1), record.get("host", "")):
            raise ConfigError(f"{config.name} is already running in '{folder}' (process {record['pid']} on "
                              f"{record['host']}); wait for it or stop it first")
    check_gpu(config, params)
    folder.mkdir(parents=True, exist_ok=True)
    attempts = (record or {}).get("attempts", 0) + 1
    record = {"identity": identity, "status": "running", "attempts": attempts, "pid": os.getpid(),
              "host": socket.gethostname(), "started": _now(), "finished": None,
              "seconds": (record or {}).get("seconds", 0.0)}
    _write_json(record_path, record)
    book = Path(notebooks).resolve() / config.notebook
    stem = Path(config.notebook).stem
    full = dict(params, out_dir=str(folder / "metrics"), checkpoint_dir=str(checkpoints))
    log(f"==> {config.name}: {config.notebook} into {folder} (attempt {attempts}; log: {folder / 'run.log'})")
    started = time.perf_counter()
    with open(folder / "run.log", "a") as out:
        out.write(f"\n===== attempt {attempts}, {_now()}, parameters {json.dumps(full, sort_keys=True)}\n")
        out.flush()
        def retrying(line: str) -> None:  # a lost kernel reply: the notebook runs again, resuming its models
            log(line)
            out.write(line + "\n")
            out.flush()

        with termination_as_interrupt(retrying) as terminated:
            try:
                with progress_environment(folder / "run.log", options.environment(folder)):
                    execute_notebook(book, folder / config.notebook, full, cwd=str(book.parent), log_output=False,
                                     stdout_file=out, stderr_file=out, log=retrying)
            except BaseException as err:
                stopped = terminated["signal"] is not None or not isinstance(err, Exception)
                record.update(status="interrupted" if stopped else "failed", error=str(err)[-2000:],
                              seconds=record["seconds"] + time.perf_counter() - started)
                _write_json(record_path, record)
                if terminated["signal"] is not None:
                    raise KeyboardInterrupt(f"{config.name}: stopped by SIGTERM after saving; run it again "
                                            "to resume") from err
                raise
    metrics = folder / "metrics" / f"{stem}.json"
    if not metrics.is_file():
        record.update(status="failed", error=f"the notebook finished without writing {metrics}")
        _write_json(record_path, record)
        raise RuntimeError(record["error"])
    record.update(status="finished", finished=_now(), seconds=record["seconds"] + time.perf_counter() - started)
    record.pop("error", None)
    _write_json(record_path, record)
    log(f"    finished in {time.perf_counter() - started:.0f} s: {metrics}")
    return record


def _evaluated_run(config: RunConfig, runs: str | Path, smoke: bool) -> Path:
    """The checkpoints of ``config``'s finished run, which ``--evaluate`` reads (and never writes)."""
    source = Path(runs).resolve() / config.name
    if not _finished(source / "run.json"):
        raise ConfigError(f"--evaluate reads the checkpoints of {config.name}'s finished run, and '{source}' holds "
                          f"none; run {config.name} first")
    if json.loads((source / "run.json").read_text())["identity"]["smoke"] != smoke:
        raise ConfigError(f"'{source}' holds a {'smoke' if not smoke else 'full'} run; evaluate it with"
                          f"{' ' if not smoke else 'out '}--smoke")
    return source / "checkpoints"


def _finished(record_path: Path) -> bool:
    try:
        return json.loads(record_path.read_text())["status"] == "finished"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _difference(old: dict, new: dict) -> str:
    if old.get("config") != new.get("config"):
        return f"configuration {old.get('config')!r}, not {new.get('config')!r}"
    if old.get("smoke") != new.get("smoke"):
        return "a smoke run" if old.get("smoke") else "a full run, not a smoke run"
    a, b = old.get("parameters", {}), new.get("parameters", {})
    diffs = [f"{k}: {a.get(k, '(unset)')!r} there, {b.get(k, '(unset)')!r} here"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return f"the same configuration with other parameters ({'; '.join(diffs)})"


def run_configs(target: str | Path, runs: str | Path = "runs", data_root: str | Path = "data", smoke: bool = False,
                overrides: dict | None = None, notebooks: str | Path = NOTEBOOKS, log=print,
                options: RunOptions | None = None) -> dict[str, dict]:
    """Run one configuration or a folder of them. Every configuration is checked first, so a typo in the
    tenth stops the run before the first starts; then each runs in turn (a failed one is reported and
    the others still run). Raises ``RuntimeError`` at the end naming the ones that failed."""
    configs = [load_config(p) for p in config_files(target)]
    for config in configs:
        check_config(config, notebooks, overrides)
    for config in configs:  # every refusal for want of a GPU before the first run starts (finished ones skip)
        if not _finished(Path(runs) / (options or RunOptions()).folder_name(config) / "run.json"):
            check_gpu(config, resolve_parameters(config, data_root, runs, smoke, overrides))
    configs = _in_order(configs)
    records, failed = {}, []
    for config in configs:
        try:
            records[config.name] = run_config(config, runs, data_root, smoke, overrides, notebooks, log, options)
        except Exception as err:  # noqa: BLE001 - reported below, the other configurations still run
            if len(configs) == 1 and isinstance(err, ConfigError):
                raise
            failed.append(config.name)
            text = str(err).strip() or repr(err)
            log(f"    {config.name} FAILED: {text if isinstance(err, ConfigError) else text.splitlines()[-1]}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(configs)} configuration(s) failed: {', '.join(failed)} "
                           f"(see runs/<name>/run.log); run the same command again to resume them")
    return records


def _in_order(configs: list[RunConfig]) -> list[RunConfig]:
    """Configurations sorted so that each comes after the runs it starts from (when they are among them)."""
    names = {c.name for c in configs}
    done, ordered, pending = set(), [], list(configs)
    while pending:
        ready = [c for c in pending if all(n in done or n not in names for n in needs(c))]
        if not ready:  # a cycle: keep the rest as they are, each will say what it misses
            ready = pending[:1]
        for c in ready:
            ordered.append(c)
            done.add(c.name)
            pending.remove(c)
    return ordered


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _metric_rows(figures: dict, ours: dict) -> list[str]:
    """The paper's figures beside this run's, with the difference, and this run's 95% half-width where the
    notebook wrote one (``<key>_ci95``, the course's convention: paired over test items and seeds)."""
    def row(key, paper, value):
        diff = value - paper if all(isinstance(v, (int, float)) for v in (paper, value)) else None
        return f"| {key} | {_fmt(paper)} | {_fmt(value)} | {_fmt(diff)} | {_fmt(ours.get(key + '_ci95'))} |"

    rows = [row(key, paper, ours.get(key)) for key, paper in figures.items()]
    rows += [row(key, None, value) for key, value in ours.items()
             if key not in figures and not (key.endswith("_ci95") and key[:-5] in ours)]
    return ["| metric | paper | this run | this run - paper | 95% half-width |", "| --- | --- | --- | --- | --- |", *rows]


def report(runs: str | Path = "runs", configs: str | Path = CONFIGS, plot: bool = True) -> str:
    """Every configuration beside its run's metrics, in Markdown (written to ``<runs>/report.md``), and
    with ``plot`` a figure of accuracy against speed for the rows that have both (``<runs>/report.png``).

    Each configuration's paper figures are shown beside this course's number for the same metric, with the
    difference and this run's 95% half-width where it has one; a configuration not yet run, or a run not
    finished, says so; its variants (``--variant``, ``--evaluate``) are named. Smoke runs are marked."""
    runs = Path(runs)
    lines = ["# Full-scale runs beside the papers", "",
             "| configuration | reproduces | status | GPU-hours (est.) | hours taken (wall, finished attempts) |",
             "| --- | --- | --- | --- | --- |"]
    tables, points = [], []
    for path in config_files(configs):
        config = load_config(path)
        record_path = runs / config.name / "run.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        status = "not run" if record is None else record["status"] + (" (smoke)" if record["identity"]["smoke"] else "")
        taken = "-" if record is None else f"{record.get('seconds', 0) / 3600:.2f}"
        lines.append(f"| `{config.name}` | {'; '.join(config.reproduces)} | {status} | "
                     f"{config.resources['gpu_hours']} | {taken} |")
        metrics_path = runs / config.name / "metrics" / f"{Path(config.notebook).stem}.json"
        ours = json.loads(metrics_path.read_text()).get("headline", {}) if metrics_path.is_file() else {}
        figures = config.paper_figures.get("figures", {})
        if figures or ours:  # the paper's figures first, beside ours; then every other metric of the run
            source = config.paper_figures.get("source", config.paper)
            tables += ["", f"## `{config.name}`", "", f"Paper: {source}. Status: {status}.", "",
                       *_metric_rows(figures, ours)]
        variants = sorted(p.parent.name for p in runs.glob(f"{config.name}@*/run.json"))
        if variants:
            tables += ["", f"Variants of `{config.name}` (`--variant`, `--evaluate`): " +
                       ", ".join(f"`{v}` ({json.loads((runs / v / 'run.json').read_text())['status']})"
                                 for v in variants) + f"; their metrics are in `{runs}/<variant>/metrics/`."]
        for entry in config.plot:
            acc = ours.get(entry["accuracy"])
            speed = entry["speed"] if isinstance(entry["speed"], (int, float)) else ours.get(entry["speed"])
            if isinstance(acc, (int, float)) and isinstance(speed, (int, float)) and math.isfinite(acc):
                points.append((config.name, entry["label"], float(speed), float(acc)))
    text = "\n".join(lines + tables) + "\n"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "report.md").write_text(text)
    if plot and points:
        _plot(points, runs / "report.png")
        text += f"\n![accuracy against speed]({'report.png'})\n"
        (runs / "report.md").write_text(text)
    return text


def _plot(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({p[0] for p in points}):
        mine = [p for p in points if p[0] == name]
        ax.scatter([p[2] for p in mine], [p[3] for p in mine], label=name)
        for _, label, x, y in mine:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("speed against the one-input model (x)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
