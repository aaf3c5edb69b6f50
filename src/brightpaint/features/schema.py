"""Names the feature modules share: the default channel and object names, the key columns of the
cell and image tables, the 16-bit range of CellProfiler's inputs, and FeatureError."""

from __future__ import annotations

CHANNELS = ("DNA", "CYTO", "DAMAGE")
OBJECTS = ("Nuclei", "Cells", "Cytoplasm")
SITE_KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Source"]
OBJECT_KEY = "Metadata_ObjectNumber"
SiteKey = tuple[str, str, int, str]  # (plate, well, site, source)
ADU_MAX = 65535


class FeatureError(RuntimeError):
    """CellProfiler failed, or its output cannot be read; the message quotes what it said."""


def site_where(plate: str, well: str, site: int, source: str = "") -> str:
    """How messages name a site: `plate P1 well A01 site 3 (real)`."""
    return f"plate {plate} well {well} site {site}" + (f" ({source})" if source else "")
