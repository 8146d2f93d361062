"""The course's run machinery, a layer above the teaching library (nothing in :mod:`mux` imports it).

- :mod:`.execute`: executing a notebook headless (papermill, nbclient, a kernel) without ever
  waiting forever on a lost reply; ``python -m mux.runner`` is papermill's command line on it;
- :mod:`.course`: ``python -m mux.runner.course`` (``make course``, ``make notebooks``, full-scale
  runs, the report);
- :mod:`.runs`: full-scale configurations (``configs/*.yaml``) run into ``runs/<name>/``;
- :mod:`.launch`: ``mux.train`` with ``num_processes`` K > 1 from a notebook, in K worker processes
  under ``torchrun``, on the training library's public checkpoint API (registered as its process
  launcher through the entry point group ``mux.launchers``).
"""
from .execute import LostReplyError, NotebookHangError, execute_notebook

__all__ = ["LostReplyError", "NotebookHangError", "execute_notebook"]
