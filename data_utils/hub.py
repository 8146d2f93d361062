"""Is a Hugging Face Hub dataset loadable by ``datasets``? Asked before any data is read.

Since ``datasets`` 4.0 a Hub repository whose revision holds a loading script (``<name>.py``) is
refused ("Dataset scripts are no longer supported"), and a missing repository fails only when
``load_dataset`` reaches it: in a corpus of several parts, after the first parts have streamed,
with an error that looks like a network problem. :func:`check_hub_dataset` asks the Hub first
(``HfApi().list_repo_files``) and raises a :class:`~data_utils.images.DatasetUnavailableError`
that names the source, the repository and what to do instead. When the Hub cannot be asked
(``HF_HUB_OFFLINE=1``, no connection) it reads the saved description of the repositories the
loaders name, ``hub_repos.json`` next to this module (:func:`saved_hub_repos`); a repository not
described there is let through, and ``datasets`` (its cache) decides.
"""
from __future__ import annotations

import json
import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from .images import DatasetUnavailableError

__all__ = [
    "PARQUET_EXPORT",
    "HUB_REPOS_FILE",
    "DATA_EXTENSIONS",
    "check_hub_dataset",
    "classify_repo_files",
    "describe_hub_repos",
    "saved_hub_repos",
    "saved_hub_entry",
]

# The branch where the Hub's dataset viewer publishes a Parquet copy of a dataset (also of one
# defined by a loading script, converted while the Hub still ran scripts). It holds Parquet files
# only, in folders <config>/<split>/; ``datasets`` reads it as one configuration, "default".
PARQUET_EXPORT = "refs/convert/parquet"

HUB_REPOS_FILE = Path(__file__).with_name("hub_repos.json")

# Files ``datasets`` can read without a script (text, tables, and the media / archive formats of
# its other builders, so that a non-text repository is not taken for an empty one).
DATA_EXTENSIONS = frozenset({
    ".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".txt", ".text", ".xml",
    ".h5", ".hdf5", ".lance", ".tar", ".zip", ".pdf",
    ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff",
    ".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".mp4", ".webm",
})
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")

_TRUE = {"1", "on", "yes", "true"}


# ---------------------------------------------------------------------------------------------
# The saved description
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _read_saved(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:  # an install without the package data: nothing is described
        return {"repos": []}


def saved_hub_repos(path=None) -> list[dict]:
    """The entries of ``hub_repos.json``: one per (repository, revision) that a loader uses."""
    return list(_read_saved(str(path or HUB_REPOS_FILE))["repos"])


def saved_hub_entry(repo: str, revision: str | None = None, path=None) -> dict | None:
    """The saved entry of ``repo`` at ``revision`` (None: ``"main"``), or None if not described."""
    revision = revision or "main"
    for entry in saved_hub_repos(path):
        if entry["repo"] == repo and entry["revision"] == revision:
            return entry
    return None


# ---------------------------------------------------------------------------------------------
# What a listing means
# ---------------------------------------------------------------------------------------------

def _is_data_file(name: str) -> bool:
    lower = name.lower()
    for compression in COMPRESSIONS:
        if lower.endswith(compression) and lower != compression:
            if compression == ".zip":
                return True
            lower = lower[: -len(compression)]
            break
    return os.path.splitext(lower)[1] in DATA_EXTENSIONS


def classify_repo_files(repo: str, files) -> dict:
    """What ``datasets`` >= 4 makes of a repository holding ``files`` (paths in the repository).

    Returns ``{"script": "<name>.py" or None, "data_files": int, "script_only": bool}``.
    ``script``: the loading script that ``datasets`` looks for (the repository's name plus
    ``.py``, at its root): when present the repository is refused, data files or not.
    ``script_only`` is True when the repository holds that script or holds no data file at all.
    """
    files = [str(f) for f in files]
    script = f"{repo.rstrip('/').split('/')[-1]}.py"
    has_script = script in files
    data = [f for f in files if not Path(f).name.startswith(".") and _is_data_file(f)]
    return {"script": script if has_script else None, "data_files": len(data),
            "script_only": has_script or not data}


# ---------------------------------------------------------------------------------------------
# Can the Hub be asked?
# ---------------------------------------------------------------------------------------------

def _offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set, now or at import."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of datasets
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the Hub's endpoint be opened within ``timeout`` seconds?

    Asked before listing, because ``huggingface_hub`` retries a failed request for about 20 s.
    """
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except Exception:  # pragma: no cover
        return False
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _list_files(repo: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi

    return list(HfApi().list_repo_files(repo, repo_type="dataset", revision=revision))


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------

def _label(repo: str, revision: str | None, config: str | None) -> str:
    parts = [f"{repo!r}"]
    if config:
        parts.append(f"configuration {config!r}")
    parts.append(f"revision {revision or 'main'!r}")
    return f"{parts[0]} ({', '.join(parts[1:])})"


def _missing(what: str, repo: str, revision, config, alternative: str, detail: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"{what}: the Hugging Face Hub has no dataset {_label(repo, revision, config)} ({detail}). Check the "
        f"name on https://huggingface.co/datasets/{repo} (a private or gated dataset needs `hf auth login`); "
        f"{alternative}")


def _script_only(what: str, repo: str, revision, config, alternative: str, verdict: dict, basis: str):
    if verdict.get("script"):
        held = f"holds the loading script {verdict['script']}"
        held += " and no data files" if not verdict.get("data_files") else ""
        why = "datasets >= 4 no longer runs loading scripts ('Dataset scripts are no longer supported')"
    else:
        held = "holds no data file that datasets can read (only a card, or loading scripts)"
        why = "datasets >= 4 reads data files only, and runs no loading script"
    todo = alternative
    if revision != PARQUET_EXPORT:
        todo = (f"load its Parquet export instead (revision={PARQUET_EXPORT!r}, the Hub's automatic conversion), "
                f"or {alternative}")
    return DatasetUnavailableError(
        f"{what}: the Hub dataset {_label(repo, revision, config)} {held} ({basis}); {why}, so it cannot be "
        f"loaded. What to do: {todo}")


def check_hub_dataset(repo: str, revision: str | None = None, config: str | None = None, *,
                      source: str | None = None, alternative: str | None = None,
                      offline: bool | None = None) -> str:
    """Raise a :class:`DatasetUnavailableError` if ``datasets`` cannot load Hub dataset ``repo``.

    Refused: a repository that does not exist (or a revision it lacks), and one whose revision
    holds the loading script ``<name>.py`` or no data file (:func:`classify_repo_files`). The
    message names ``source`` (what the caller was asked for, e.g. ``"corpus source
    'bookcorpus'"``), the repository, revision and configuration, and what to do
    (``alternative``, e.g. local files; for a script, also the Parquet export).

    Where the answer comes from: the Hub (``HfApi().list_repo_files``) when it can be reached;
    otherwise (``offline=True``, ``HF_HUB_OFFLINE=1``, no connection, an HTTP error other than
    404) the saved description ``hub_repos.json``. Returns ``"hub"`` or ``"saved"`` for the one
    used, or ``"unchecked"`` when the Hub could not be asked and the saved description does not
    describe ``repo`` at ``revision`` (then ``datasets`` and its cache decide). ``config`` only
    appears in messages: configurations are not checked.
    """
    what = source or f"Hub dataset {repo!r}"
    alternative = alternative or ("put the data into local files and pass their folder instead, or fill the "
                                  "datasets cache on a machine that can load it.")
    if offline is None:
        offline = _offline_mode()
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if not offline and not _hub_reachable():
        reason = "the Hub could not be reached"
    if reason is None:
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, \
            RevisionNotFoundError

        try:
            files = _list_files(repo, revision)
        except GatedRepoError:
            return "hub"  # it exists; access is datasets' business (a token)
        except RevisionNotFoundError as err:
            raise _missing(what, repo, revision, config, alternative,
                           f"the repository exists but has no revision {revision or 'main'!r}") from err
        except RepositoryNotFoundError as err:
            raise _missing(what, repo, revision, config, alternative, "repository not found") from err
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status == 404:
                raise _missing(what, repo, revision, config, alternative, "HTTP 404") from err
            reason = f"the Hub answered {type(err).__name__} {status}"
        except Exception as err:  # a connection error or timeout: fall back on the saved description
            reason = f"the Hub could not be asked ({type(err).__name__})"
        else:
            verdict = classify_repo_files(repo, files)
            if verdict["script_only"]:
                raise _script_only(what, repo, revision, config, alternative, verdict,
                                   "as listed by the Hub now")
            return "hub"
    entry = saved_hub_entry(repo, revision)
    if entry is None:
        return "unchecked"
    basis = f"according to the saved description data_utils/hub_repos.json of {entry.get('checked', '?')}, " \
            f"used because {reason}"
    if entry.get("exists") is False:
        raise _missing(what, repo, revision, config, alternative, basis)
    if entry.get("script_only"):
        files = entry.get("files") or []
        verdict = classify_repo_files(repo, files) if files else {"script": None, "data_files": 0}
        raise _script_only(what, repo, revision, config, alternative, verdict, basis)
    return "saved"


def describe_hub_repos(entries=None, checked: str | None = None) -> list[dict]:
    """Fresh entries for ``hub_repos.json``, listed from the Hub (needs internet access).

    ``entries``: ``[{"repo", "revision", ...}]`` to refresh (default: the saved ones); each comes
    back with ``exists``, ``script_only``, ``files`` and ``source`` filled from the listing, and
    ``checked`` (default: today). Write them with ``json.dump`` to update the saved description.
    """
    import datetime

    from huggingface_hub.errors import RepositoryNotFoundError

    checked = checked or datetime.date.today().isoformat()
    fresh = []
    for entry in entries or saved_hub_repos():
        new = dict(entry, checked=checked, source=f"HfApi().list_repo_files on {checked}")
        try:
            files = _list_files(entry["repo"], entry["revision"])
        except RepositoryNotFoundError:
            new.update(exists=False, script_only=None, files=None)
        else:
            new.update(exists=True, script_only=classify_repo_files(entry["repo"], files)["script_only"],
                       files=sorted(files))
        fresh.append(new)
    return fresh
