"""Settings of a segmentation run (config `segment:`) and the error every segmentation check raises."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..defaults import config_field
from ..errors import UserError

TILE_MULTIPLE = 16  # Cellpose's network halves the image four times


def _segment(name: str):
    return config_field("segment", name)


class SegmentError(UserError):
    """A segmentation input or weight file that cannot be used, named with what is wrong."""


@dataclass(frozen=True)
class SegmentSettings:
    """Cellpose and object settings shared by every site of a run (config `segment:`)."""

    # Defaults: config/config.yaml `segment:` (the one place they are stated, with their reasons).
    nuclei_diameter: float = _segment("nuclei_diameter")  # px; 0 = estimated once per plate and input
    cell_diameter: float = _segment("cell_diameter")
    gamma: float = _segment("gamma")  # applied to the [0, 1]-scaled channels before Cellpose; 1 = off
    flow_threshold: float = _segment("flow_threshold")
    cellprob_threshold: float = _segment("cellprob_threshold")
    min_nucleus_area: int = _segment("min_nucleus_area")  # px
    max_nucleus_area: int = _segment("max_nucleus_area")  # px; 0 = no limit
    min_cell_area: int = _segment("min_cell_area")
    max_cell_area: int = _segment("max_cell_area")
    exclude_border: bool = _segment("exclude_border")
    batch: int | str = _segment("batch")  # tiles per forward pass; auto: 1 on CPU (inference.tiles_per_pass)
    # Cellpose's tile (px). 224 is the size it was trained on; 0 runs each (rescaled, padded) site as
    # one tile: on sites smaller than ~2 tiles Cellpose's overlapping 224-px tiles cover it ~2.7 times
    # (a 256-px site: four tiles), so the network does a third of the work (bench/segment.py).
    tile: int = _segment("tile")
    diameter_sites: int = _segment("diameter_sites")  # sites sampled to estimate a plate's diameters

    @classmethod
    def from_config(cls, section: dict) -> SegmentSettings:
        """From the workflow's `segment:` config, on top of config/config.yaml's defaults (keys that
        are not settings, such as the weight paths, are the workflow's and are ignored here; the schema
        checks their spelling)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in known}).checked()

    @classmethod
    def defaults(cls, **overrides) -> SegmentSettings:
        """The defaults (config/config.yaml `segment:`) with `overrides` (setting names only), checked."""
        return cls(**overrides).checked()

    def checked(self) -> SegmentSettings:
        for name in ("nuclei_diameter", "cell_diameter", "min_nucleus_area", "max_nucleus_area",
                     "min_cell_area", "max_cell_area"):
            if getattr(self, name) < 0:
                raise SegmentError(f"segment settings: {name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.gamma <= 5:
            raise SegmentError(f"segment settings: gamma must be in (0, 5], got {self.gamma}")
        if self.batch != "auto" and (isinstance(self.batch, bool) or not isinstance(self.batch, int)
                                     or self.batch < 1):
            raise SegmentError(f"segment settings: batch must be an integer >= 1 or 'auto', got "
                               f"{self.batch!r}")
        if self.diameter_sites < 1:
            raise SegmentError("segment settings: diameter_sites must be >= 1")
        if self.tile and (self.tile < TILE_MULTIPLE or self.tile % TILE_MULTIPLE):
            raise SegmentError(f"segment settings: tile must be 0 or a multiple of {TILE_MULTIPLE} "
                               f"(>= {TILE_MULTIPLE}), got {self.tile}")
        return self
