"""The workflow's defaults, stated once: in the repository's config/config.yaml.

Settings dataclasses (`stain.StainSettings`, `segment.SegmentSettings`) take their field defaults from
its sections with `config_field`, so a library or test caller that builds settings without the
workflow gets the values a real screen runs with, and no second copy of a value exists to drift. The
file is read once, when a default is first needed (importing a settings module reads nothing).
"""

from __future__ import annotations

import copy
from dataclasses import field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# Beside the package (an editable install: src/brightpaint -> repo root); workflow.py uses it too.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"


class DefaultsError(UserError):
    """config/config.yaml (the defaults) is missing, unreadable, or lacks a section asked for."""


@cache
def _read(path: Path) -> dict:
    if not path.is_file():
        raise DefaultsError(f"brightpaint's defaults file {path} is missing (the settings' defaults are "
                            "read from the repository's config/config.yaml: use an editable install of "
                            "the repository, or pass every setting explicitly)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DefaultsError(f"brightpaint's defaults file {path} cannot be read: {err}") from err
    if not isinstance(config, dict):
        raise DefaultsError(f"brightpaint's defaults file {path}: a YAML mapping expected")
    return config


def config_default(*keys: str, path: Path = DEFAULT_CONFIG) -> Any:
    """The value at `keys` in config/config.yaml (a copy: changing it changes no later lookup), e.g.
    `config_default("stain", "model")` is the `stain: model:` section as a dict. A DefaultsError names
    the file and the missing key."""
    value: Any = _read(Path(path))
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise DefaultsError(f"brightpaint's defaults file {path}: no "
                                f"`{': '.join(keys[:depth + 1])}` (defaults of {'.'.join(keys)})")
        value = value[key]
    return copy.deepcopy(value)


def config_defaults(*keys: str, path: Path = DEFAULT_CONFIG) -> dict:
    """The section at `keys` of config/config.yaml as a dict (a copy), e.g.
    `config_defaults("segment")`."""
    section = config_default(*keys, path=path)
    if not isinstance(section, dict):
        raise DefaultsError(f"brightpaint's defaults file {path}: `{': '.join(keys)}` is not a section")
    return section


def config_field(*keys: str) -> Any:
    """A dataclass field whose default is config/config.yaml's value at `keys`, looked up when an
    instance is made without that field."""
    return field(default_factory=lambda: config_default(*keys))
