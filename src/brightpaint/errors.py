"""The one error type for problems with what a user gave: files, config, command-line options.

Every such problem is a `UserError` or a subclass (`io.InputError`, `workflow.ConfigError`,
`plate.PlateError`, `stain.StainError`, `segment.SegmentError`), whose message names the file, line
and field concerned. The command line prints the message alone and exits non-zero; a workflow script
logs it as one line (its traceback goes to the job's log only). Any other exception is a bug in
brightpaint and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave cannot be used; the message says where and why."""
