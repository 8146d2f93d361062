"""The course's run machinery: executing notebooks headless (papermill, nbclient, a kernel).

Nothing in the teaching modules of :mod:`mux` imports this package; it serves the commands
that run notebooks (``make course``, ``python -m mux.course full``, the notebook tests and the
benchmark and stress scripts).
"""
from .execute import LostReplyError, NotebookHangError, execute_notebook

__all__ = ["LostReplyError", "NotebookHangError", "execute_notebook"]
