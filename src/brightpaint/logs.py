"""Logging for workflow scripts: to stderr and to the rule's `log:` file, uncaught errors included."""

from __future__ import annotations

import logging
import sys

from .errors import UserError


def log_to_rule(snakemake) -> logging.Logger:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(message)s", force=True)
    logger = logging.getLogger("brightpaint")

    def log_uncaught(kind, value, tb):
        if not issubclass(kind, UserError):
            logger.error("%s", value, exc_info=(kind, value, tb))
            return
        # a problem with the user's input: its message (file, line, field) is what the run shows;
        # the traceback goes to the job's log file only
        for handler in handlers:
            trace = (kind, value, tb) if isinstance(handler, logging.FileHandler) else None
            handler.handle(logger.makeRecord(logger.name, logging.ERROR, "", 0, "%s", (value,),
                                             trace))

    sys.excepthook = log_uncaught
    return logger
