"""The one logging set-up: ``setup(verbosity)``, called once by the ``vitscale`` command (``-q`` / ``-v``).

Modules never configure logging; they write ``log = logging.getLogger(__name__)`` and call
``log.info(...)`` for progress, ``log.warning(...)`` for what the user should act on. Everything goes to
stderr, so stdout holds only what a command produces (a table, a YAML config, a job id) and can be piped.

Levels: ``-q`` shows warnings and errors only; the default adds this project's progress lines (info);
``-v`` adds its debug lines; ``-vv`` adds other libraries' info lines (Ray, MLflow, ...), which are
otherwise held at warning so they do not drown ours.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

OURS = ("pipelines", "pretrain", "vitscale")  # the loggers of this project (``getLogger(__name__)``)
ENV = "VITSCALE_LOG_LEVEL"  # inherited by processes started after setup (a local Ray cluster's workers)


class _Format(logging.Formatter):
    """Info lines as they are (they carry their own ``[vitscale]`` prefix); others with their level."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno == logging.INFO:
            return message
        return f"{record.levelname.lower()}: {message}"


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the record, not when set up: a redirected or
    captured stderr (pytest, ``contextlib.redirect_stderr``) still gets the lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


def level_of(verbosity: int) -> int:
    """-1 (``-q``) -> WARNING, 0 -> INFO, 1 or more (``-v``) -> DEBUG."""
    return logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG


def setup(verbosity: Optional[int] = None) -> None:
    """Route every log record to stderr at the level ``verbosity`` asks for (None: ``$VITSCALE_LOG_LEVEL``,
    else 0). Calling it again replaces the earlier set-up rather than adding a second handler."""
    if verbosity is None:
        verbosity = int(os.environ.get(ENV, "0") or 0)
    os.environ[ENV] = str(verbosity)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_Format("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
    for name in OURS:
        logging.getLogger(name).setLevel(level_of(verbosity))
