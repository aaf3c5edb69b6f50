"""What every torch stage shares: the device (chosen explicitly, never a silent CPU fallback), thread
caps, the training precision, and tiled inference with blended overlaps (Noise2Void denoising and
virtual staining)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger("brightpaint")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(requested: str = "auto", *, log: bool = True, what: str = "torch") -> torch.device:
    """The torch device for `requested` ("auto", "cpu" or "cuda"). "auto" takes the GPU when torch
    sees one; "cuda" without a GPU is an error, never a silent CPU fallback (a run sized for a GPU
    would take hours on CPU). The choice is logged (logger "brightpaint") unless `log` is False
    (per-image calls); `what` names the stage in that line."""
    if requested not in DEVICES:
        raise ValueError(f"device: {requested!r} is not one of {DEVICES}")
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise RuntimeError(
            f"device 'cuda' was requested but torch {torch.__version__} sees no CUDA GPU "
            f"(torch.version.cuda = {torch.version.cuda}); install a CUDA build of torch on a GPU "
            "machine, or ask for device 'cpu' or 'auto'")
    device = torch.device("cuda" if requested == "cuda" or (requested == "auto" and cuda) else "cpu")
    if log:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        LOGGER.info("%s device: %s (%s; requested %r)", what, device, name, requested)
    return device


@cache
def cpu_has_fast_bf16() -> bool:
    """Whether the CPU computes bf16 convolutions natively, which oneDNN then uses: AMX tiles (Intel
    Sapphire Rapids and later; Linux's flag `amx_bf16`) or AVX-512 bf16 instructions (AMD Zen 4 and
    later, Intel Cooper Lake; `avx512_bf16`). Without either, bf16 is emulated and slower than fp32.
    Measured on a 2-vCPU AMD EPYC with avx512_bf16 (2 threads, the demo's U-Net, batch 8 x 128 px):
    a training step 0.71 s in fp32, 0.34 s in bf16."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(requested: str, device: torch.device) -> str:
    """The training precision for `requested` ("auto", "fp32" or "bf16") on `device`. "auto" trains in
    bf16 mixed precision (weights, optimiser and loss in fp32; convolutions in bf16) where the hardware
    computes bf16 natively: a CUDA GPU that supports bf16, a CPU with AMX or AVX-512 bf16. There a
    U-Net training step took 2.0-2.5x less time than in fp32 (bench/stain.py, `precision`);
    elsewhere fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision: {requested!r} is not one of {PRECISIONS}")
    if requested != "auto":
        return requested
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return "bf16" if fast else "fp32"


def autocast(device: torch.device, precision: str):
    """The context a training forward pass runs in: bf16 autocast for precision "bf16", else none.
    Callers cast the output to fp32 before the loss."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def channels_last(item: nn.Module | torch.Tensor) -> nn.Module | torch.Tensor:
    """A network with its 4-D weights in channels-last (NHWC) memory format (in place), or a 4-D
    tensor in that format (other tensors as they are). oneDNN's convolutions run on NHWC without
    reordering: on a 2-vCPU AMD EPYC, the demo's U-Net trained 25 % faster (fp32 and bf16) and
    predicted 1.7-1.9x faster in fp32, the Noise2Void U-Net 1.2x and 1.5x. Values are unchanged;
    savers make tensors contiguous where a file format needs it."""
    if isinstance(item, nn.Module):
        # 4-D tensors only: Module.to(memory_format=...) fails on a Conv3d's 5-D weight
        for tensor in (*item.parameters(), *item.buffers()):
            if tensor.ndim == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
        return item
    return item.contiguous(memory_format=torch.channels_last) if item.ndim == 4 else item


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a block with `threads` intra-op threads and restore the previous count: more threads than
    the job's cores made torch runs 3-100x slower on a shared machine."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: must be an integer >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tile_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Start offsets of tiles of `tile` px along an axis of `length` px, neighbours overlapping by at
    least `overlap`; the last tile ends at the image edge. With `length` and `tile` multiples of
    `multiple`, every start is one too: the U-Net's pooling grid then lines up with the whole image's,
    so a tile's interior equals whole-image inference."""
    if length <= tile:
        return [0]
    step = max(multiple, (tile - overlap) // multiple * multiple)
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def balanced_tile(length: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """The smallest tile side (a multiple of `multiple`, at most `tile`) that covers an axis of
    `length` px with as few tiles as `tile` does (`tile_starts`). Tiles of a fixed side overhang each
    other more than the overlap wherever the axis is not a whole number of steps: a 1080 px site in
    512 px tiles takes 3 per axis, 1,536 px of network input for 1,080; 424 px tiles also take 3 and
    cover 1,272 px (31 % fewer pixels through the network on the site)."""
    if length <= tile:
        return tile
    count = len(tile_starts(length, tile, overlap, multiple))
    side = -(-((length - overlap) // count + overlap) // multiple) * multiple
    while side < tile and (side <= overlap or len(tile_starts(length, side, overlap, multiple)) > count):
        side += multiple
    return min(side, tile)


def blend_ramp(size: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """Blending weight along one tile axis. On each side that borders another tile, the first
    overlap/2 px get weight 0 (there the network saw the tile's zero padding instead of the image,
    so they differ from whole-image inference), the next overlap/2 px a raised cosine up to 1; flat
    1 inside and at the image's own edges. Neighbouring tiles overlap by at least `overlap`, so every
    pixel lies at least overlap/2 px inside some tile: with overlap/2 >= the network's receptive
    radius, tiled inference equals whole-image inference, and the smooth weights leave no seams."""
    weight = np.ones(size, dtype=np.float64)
    overlap = min(overlap, size)
    margin = overlap // 2
    if overlap:
        ramp = np.zeros(overlap)
        rise = overlap - margin
        ramp[margin:] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(rise) + 0.5) / rise)
        if not at_start:
            weight[:overlap] = np.minimum(weight[:overlap], ramp)
        if not at_end:
            weight[-overlap:] = np.minimum(weight[-overlap:], ramp[::-1])
    return weight


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """`image` (..., Y, X) reflect-padded at the bottom and right to a multiple of `multiple` in both
    axes (a U-Net halves the size `depth` times)."""
    pad_y, pad_x = (-image.shape[-2]) % multiple, (-image.shape[-1]) % multiple
    if not (pad_y or pad_x):
        return image
    mode = "reflect" if min(image.shape[-2:]) > max(pad_y, pad_x) else "symmetric"
    return np.pad(image, [(0, 0)] * (image.ndim - 2) + [(0, pad_y), (0, pad_x)], mode=mode)


GPU_TILES_PER_PASS = 8


def tiles_per_pass(batch: int | str, device: torch.device | str) -> int:
    """Tiles per forward pass: `batch`, or for "auto" 1 on a CPU and GPU_TILES_PER_PASS on a GPU.
    On a CPU a pass over 8 tiles does the same arithmetic as 8 passes over one, but its activations
    (tens to hundreds of MB a layer) are allocated and freed layer by layer from pages the kernel
    must zero anew each time: on a 2-vCPU AMD EPYC, virtual staining of a 1080 px site took 5.8
    CPU-s with 8 tiles a pass and 2.9 with one (user time 2.9 and 2.5 s: the rest is the kernel's),
    Cellpose 11.1 and 8.3 CPU-s (docs/performance.md). A GPU needs batches to be kept busy."""
    if batch == "auto":
        return 1 if torch.device(device).type == "cpu" else GPU_TILES_PER_PASS
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: tiles per forward pass must be an integer >= 1 or 'auto', got {batch!r}")
    return batch


def check_tiling(tile: int, overlap: int, multiple: int) -> tuple[int, int]:
    """`tile` and `overlap` rounded down to the network's size multiple, or a ValueError."""
    tile, overlap = tile // multiple * multiple, overlap // multiple * multiple
    if tile < multiple or not 0 <= overlap < tile:
        raise ValueError(f"tile {tile} / overlap {overlap}: need tile >= {multiple} and 0 <= overlap < "
                         "tile (after rounding down to multiples of the network's size multiple)")
    return tile, overlap


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on a GPU (halves memory traffic; the networks are small and bf16 keeps the
    float32 range); plain float32 on CPU, where bf16 is emulated and slower on CPUs without bf16
    units, so predictions stay the same from one CPU machine to the next."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def predict_tiled(model: nn.Module, image: np.ndarray, *, tile: int = 256, overlap: int = 32,
                  batch: int | str = "auto", device: torch.device | str = "cpu", amp: bool = True,
                  balance: bool = True) -> np.ndarray:
    """A network applied to a (C, Y, X) float32 image in overlapping tiles, blended with raised-cosine
    ramps: (C_out, Y, X) float32. Tiles of one size go through the network `batch` at a time
    (`tiles_per_pass`: "auto" is one on a CPU). The model must be in eval mode and on `device`; it
    is put in channels-last format (`channels_last`).
    Its `multiple` attribute (default 1) gives the size divisor. An overlap of at least twice the
    network's receptive radius makes the result equal whole-image inference within float tolerance
    (`blend_ramp`). With `balance`, each axis's tiles are shrunk to the fewest pixels that need no
    more tiles (`balanced_tile`): the same result, less network time on sites larger than a tile."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or min(image.shape) < 1:
        raise ValueError(f"predict_tiled: need a (C, Y, X) image, got shape {image.shape}")
    multiple = int(getattr(model, "multiple", 1))
    tile, overlap = check_tiling(tile, overlap, multiple)
    device = torch.device(device)
    batch = tiles_per_pass(batch, device)
    data = pad_to_multiple(image, multiple)
    height, width = data.shape[-2:]
    tile_y, tile_x = ((balanced_tile(height, tile, overlap, multiple),
                       balanced_tile(width, tile, overlap, multiple)) if balance else (tile, tile))
    windows = [(y, x) for y in tile_starts(height, tile_y, overlap, multiple)
               for x in tile_starts(width, tile_x, overlap, multiple)]
    total = weights = None
    channels_last(model)
    with torch.inference_mode(), _autocast(device, amp):
        for start in range(0, len(windows), batch):
            group = windows[start:start + batch]
            stack = np.stack([data[:, y:y + tile_y, x:x + tile_x] for y, x in group])
            tensor = channels_last(torch.from_numpy(stack).to(device))
            out = model(tensor).float().cpu().numpy()
            if total is None:
                total = np.zeros((out.shape[1], height, width), dtype=np.float64)
                weights = np.zeros((height, width), dtype=np.float64)
            for (y, x), result in zip(group, out, strict=True):
                h, w = result.shape[-2:]
                weight = np.outer(blend_ramp(h, overlap, y == 0, y + h == height),
                                  blend_ramp(w, overlap, x == 0, x + w == width))
                total[:, y:y + h, x:x + w] += weight * result
                weights[y:y + h, x:x + w] += weight
    return (total / weights)[:, :image.shape[1], :image.shape[2]].astype(np.float32)
