"""Defaults are stated once, in config/config.yaml: the settings dataclasses built without the
workflow (library and test callers) get exactly its values, and a missing file or section is named."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import pytest
import yaml

from brightpaint.defaults import DEFAULT_CONFIG, DefaultsError, config_default, config_defaults
from brightpaint.segment.settings import SegmentError, SegmentSettings
from brightpaint.stain.settings import StainError, StainSettings

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
# StainSettings fields the config does not carry (no schema key): their defaults live in the dataclass
STAIN_ONLY = {"gan_l1_weight", "gan_gp_weight", "gan_adversarial"}
# `segment:` keys that are the workflow's, not SegmentSettings' (weights, devices, batching of sites)
SEGMENT_WORKFLOW_KEYS = {"nuclei_weights", "cell_weights", "sites_per_batch", "device", "truth_masks",
                         "train"}


def test_the_helper_reads_the_repository_config():
    assert DEFAULT_CONFIG == REPO / "config" / "config.yaml"
    assert config_defaults("stain", "model") == CONFIG["stain"]["model"]
    assert config_default("segment", "tile") == CONFIG["segment"]["tile"]
    config_defaults("segment")["tile"] = -1  # a copy: the next lookup is unchanged
    assert config_defaults("segment")["tile"] == CONFIG["segment"]["tile"]


def test_stain_settings_defaults_are_config_yaml_stain_model():
    section = CONFIG["stain"]["model"]
    names = {f.name for f in fields(StainSettings)}
    assert set(section) == names - STAIN_ONLY
    for settings in (StainSettings(), StainSettings.defaults(), StainSettings.from_config({})):
        values = asdict(settings)
        for key, value in section.items():
            assert values[key] == value and type(values[key]) is type(value), key
    merged = StainSettings.from_config({"max_epochs": 3, "arch": "unext2"})
    assert (merged.max_epochs, merged.arch, merged.patience) == (3, "unext2", section["patience"])
    with pytest.raises(StainError, match="unknown key"):
        StainSettings.defaults(epochs=3)


def test_segment_settings_defaults_are_config_yaml_segment():
    section = {k: v for k, v in CONFIG["segment"].items() if k not in SEGMENT_WORKFLOW_KEYS}
    assert set(section) == {f.name for f in fields(SegmentSettings)}
    for settings in (SegmentSettings(), SegmentSettings.defaults(), SegmentSettings.from_config({})):
        values = asdict(settings)
        for key, value in section.items():
            assert values[key] == value and type(values[key]) is type(value), key
    assert SegmentSettings.from_config({"tile": 0, "device": "cpu"}).tile == 0
    with pytest.raises(SegmentError, match="multiple of 16"):
        SegmentSettings.defaults(tile=100)


def test_a_missing_defaults_file_or_section_is_named(tmp_path):
    missing = tmp_path / "config.yaml"
    with pytest.raises(DefaultsError, match=f"{missing}.* is missing"):
        config_defaults("stain", "model", path=missing)
    missing.write_text("stain: {device: auto}\n")
    with pytest.raises(DefaultsError, match="no `stain: model`"):
        config_defaults("stain", "model", path=missing)


def test_match_defaults_are_config_yaml_match():
    from brightpaint.match import MATCH_DEFAULTS

    assert MATCH_DEFAULTS == CONFIG["match"]
