"""How the command line shows the library's ``logging`` messages: one ``dlkunet: ...`` line each on stderr.

Library modules log to ``dlkunet.*`` loggers and never print; the CLI calls :func:`log_to_stderr`
once.  Lines go through ``tqdm.write`` so they do not tear a progress bar, and ``sys.stderr`` is
looked up at each message (not bound once), so redirected or captured streams still get them.
"""
from __future__ import annotations

import logging
import sys


class _TqdmStderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a logging failure must not end the run
            self.handleError(record)


def log_to_stderr(level: int = logging.INFO) -> None:
    """Show ``dlkunet`` log records at ``level`` and above on stderr (idempotent)."""
    logger = logging.getLogger("dlkunet")
    logger.setLevel(level)
    if not any(isinstance(h, _TqdmStderrHandler) for h in logger.handlers):
        handler = _TqdmStderrHandler()
        handler.setFormatter(logging.Formatter("dlkunet: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # one line per message, even when the root logger has handlers
