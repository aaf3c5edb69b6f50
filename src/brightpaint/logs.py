"""Logging for workflow scripts: to stderr and to the rule's `log:` file, uncaught errors included."""

from __future__ import annotations

import logging
import sys


def log_to_rule(snakemake) -> logging.Logger:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(message)s", force=True)
    logger = logging.getLogger("brightpaint")

    def log_uncaught(kind, value, tb):
        logger.error("%s", value, exc_info=(kind, value, tb))

    sys.excepthook = log_uncaught
    return logger
