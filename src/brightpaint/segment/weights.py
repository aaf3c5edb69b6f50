"""Cellpose weight files: resolving a config entry to a file (never a download), reading and checking
a state dict, the (reduced) network it describes, loading it strictly, and its description."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from cellpose.resnet_torch import CPnet

from ..inference import channels_last
from ..provenance import sha256_file
from .cellpose_modules import import_cellpose
from .settings import SegmentError

NAMED_MODELS = ("cyto", "cyto2", "cyto3", "nuclei", "cpsam", "tissuenet_cp3", "livecell_cp3",
                "yeast_PhC_cp3", "yeast_BF_cp3", "bact_phase_cp3", "bact_fluor_cp3",
                "deepbacs_cp3", "cyto2_cp3")
REDUCED_WIDTHS = (16, 32, 64, 128)
STYLE_WIDTH = 256  # cellpose.core.run_net allocates styles of this width whatever the network
_FIRST_CONV = "downsample.down.res_down_{}.conv.conv_0.2.weight"


def resolve_weights(weights: str | Path, base: str | Path = ".") -> Path:
    """The weight file a config entry names. A Cellpose model name (`cyto3`, `nuclei`, `cpsam`, ...)
    is accepted only when its file already sits in Cellpose's model folder: brightpaint never lets
    Cellpose download it."""
    text = str(weights).strip()
    if not text:
        raise SegmentError("no Cellpose weight file given")
    path = Path(text) if Path(text).is_absolute() else Path(base) / text
    if path.is_file():
        return path
    if text in NAMED_MODELS:
        # inside: cellpose.models takes seconds to import; read at call time (tests move it)
        MODEL_DIR = import_cellpose("cellpose.models").MODEL_DIR  # noqa: N806 (Cellpose's name)

        cached = [MODEL_DIR / name for name in (text, f"{text}torch_0")]
        for candidate in cached:
            if candidate.is_file():
                return candidate
        raise SegmentError(
            f"Cellpose model {text!r} is a named model whose weights Cellpose downloads at run time; "
            f"brightpaint never downloads weights. Put the weight file at {cached[0]} or give its path "
            "in the config (segment: nuclei_weights / cell_weights), or use the shipped models in "
            "resources/cellpose/")
    raise SegmentError(f"Cellpose weight file {path} not found")


def cellpose_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a Cellpose weight file, checked: it must be a torch file of a Cellpose
    CPnet (every layer present), never something that would load partially."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SegmentError(f"{path}: not a Cellpose weight file (torch cannot read it: "
                           f"{type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(state, dict) or _FIRST_CONV.format(0) not in state:
        what = f"keys like {sorted(state)[:3]}" if isinstance(state, dict) else type(state).__name__
        raise SegmentError(f"{path}: not a Cellpose 3 CPnet state dict ({what}); a Cellpose 4 "
                           "(cpsam) or other network cannot be used here")
    return state


def network_widths(state: dict[str, torch.Tensor]) -> list[int]:
    """[input channels, width 1, ..., width 4] of the CPnet a state dict belongs to."""
    widths = [int(state[_FIRST_CONV.format(0)].shape[1])]
    level = 0
    while _FIRST_CONV.format(level) in state:
        widths.append(int(state[_FIRST_CONV.format(level)].shape[0]))
        level += 1
    return widths


class StylePaddedCPnet(CPnet):
    """CPnet whose style vector is zero-padded to the 256 values `run_net` stores, so a reduced
    network runs through Cellpose's own tiling and mask code unchanged."""

    def forward(self, data):
        output, style, downsampled = super().forward(data)
        if style.shape[1] < STYLE_WIDTH:
            style = F.pad(style, (0, STYLE_WIDTH - style.shape[1]))
        return output, style, downsampled


def build_network(widths: Sequence[int], diam_mean: float):
    """A fresh (randomly initialised) Cellpose network of the given widths, for training."""
    return StylePaddedCPnet(list(widths), 3, 3, mkldnn=False, max_pool=True, diam_mean=float(diam_mean))


def load_cellpose_model(weights: str | Path, device: torch.device | str = "cpu"):
    """A cellpose.models.CellposeModel whose network is the one in `weights`, loaded strictly."""
    # at call time: cellpose.models takes seconds to import (OpenCV and more)
    CellposeModel = import_cellpose("cellpose.models").CellposeModel  # noqa: N806 (Cellpose's name)

    logging.getLogger("cellpose").setLevel(logging.ERROR)  # per-call progress lines, not news
    path = Path(weights)
    state = cellpose_state(path)
    widths = network_widths(state)
    device = torch.device(device)
    net = build_network(widths, float(state["diam_mean"][0]) if "diam_mean" in state else 30.0)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SegmentError(f"{path}: Cellpose weights do not fit a CPnet of widths {widths}: "
                           f"{str(err)[:300]}") from err
    # Built without weights on purpose: its random network is replaced at once by the loaded one
    # and the object never leaves this function otherwise.
    # No MKL-DNN: Cellpose would then convert the network (a deep copy) and every input at each
    # forward call. Channels-last weights instead: the same masks, 15 % less time for the demo's cell
    # network on 8 sites of 256 px (2.84 s against 3.34 s, 1 thread, AMD EPYC).
    model = CellposeModel(gpu=device.type == "cuda", pretrained_model=False, nchan=widths[0], device=device,
                          mkldnn=False)
    net.mkldnn = False
    model.net = channels_last(net.to(device))
    model.net.eval()
    model.pretrained_model = str(path)
    model.diam_mean = float(net.diam_mean.item())
    model.diam_labels = float(net.diam_labels.item())
    model.nbase = widths
    return model


def model_card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def model_description(weights: str | Path) -> dict:
    """What the report and the site tables record of a weight file: path, sha256, widths, diameters,
    and the card beside it when there is one."""
    state = cellpose_state(weights)
    card_file = model_card_path(weights)
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    return {"path": str(weights), "sha256": sha256_file(weights), "widths": network_widths(state),
            "diam_mean": float(state["diam_mean"][0]) if "diam_mean" in state else None,
            "diam_labels": float(state["diam_labels"][0]) if "diam_labels" in state else None,
            "card": card}
