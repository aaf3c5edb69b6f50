"""Virtual-staining model files: a safetensors file (weights plus the card as metadata; no pickled
code) and a card.json beside it with the weights' sha256."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from ..atomic import atomic_path
from ..provenance import git_commit, sha256_file
from . import models
from .settings import StainError

CODE_VERSION = "stain-1"
FORMAT = "brightpaint-stain"


def save_stain_model(generator: torch.nn.Module, card: dict, path: str | Path) -> dict:
    """Write the weights (safetensors, with the card as metadata) to `path` and the card, with the
    weights' sha256, to card.json beside it; both appear only when complete. Returns the card."""
    path = Path(path)
    card = {**card, "format": FORMAT, "code_version": CODE_VERSION, "package_version": __version__,
            "git_commit": git_commit(), "torch_version": torch.__version__,
            "architecture": dict(generator.config)}
    text = json.dumps(card, sort_keys=True)
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    with atomic_path(path) as partial:
        save_file(state, str(partial), metadata={"format": FORMAT, "card": text})
    card = {**json.loads(text), "sha256": sha256_file(path), "file": path.name}
    with atomic_path(card_path(path)) as partial:
        partial.write_text(json.dumps(card, indent=2, sort_keys=True))
    return card


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_name("card.json")


def load_stain_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The generator (eval mode, CPU) and card of a model file written by `save_stain_model`, or a
    StainError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise StainError(f"virtual-staining model {path}: file not found")
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise StainError(f"virtual-staining model {path}: unreadable or corrupted ({err})") from err
    if metadata.get("format") != FORMAT or "card" not in metadata:
        raise StainError(f"virtual-staining model {path}: not a brightpaint virtual-staining model "
                         "(no card in its metadata)")
    card = json.loads(metadata["card"])
    generator = models.build_generator(**card["architecture"])
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        raise StainError(f"virtual-staining model {path}: weights do not match its architecture "
                         f"{card['architecture']} ({str(err).splitlines()[0]})") from err
    return generator.eval(), {**card, "sha256": sha256_file(path), "file": path.name}


def load_card(weights: str | Path) -> dict:
    """The card.json beside a model file, checked against the file (a card left from another
    training run is an error, not a silent mismatch)."""
    weights, path = Path(weights), card_path(weights)
    if not path.is_file():
        raise StainError(f"virtual-staining model {weights}: no card.json beside it")
    card = json.loads(path.read_text())
    if card.get("sha256") != sha256_file(weights):
        raise StainError(f"virtual-staining model {weights}: card.json does not describe this file "
                         "(sha256 differs)")
    return card
