"""Virtual-staining settings (`StainSettings`, recorded in every model card) and errors
(`StainError`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..defaults import config_field
from ..errors import UserError
from ..inference import PRECISIONS
from . import models

TARGET_NORMS = ("plate", "fov")


def _model(name: str):
    return config_field("stain", "model", name)


class StainError(UserError):
    """Bad input to virtual staining: names the plate / channel / file and what is wrong."""


@dataclass(frozen=True)
class StainSettings:
    """Everything that shapes a model; recorded in its card."""

    # Defaults: config/config.yaml `stain: model:` (the one place they are stated; see `defaults`).
    arch: str = _model("arch")  # models.ARCHITECTURES
    stem: str = _model("stem")  # models.STEMS: planes as channels (2d) or a 3-D convolution over them
    width: int = _model("width")
    depth: int = _model("depth")
    loss: str = _model("loss")  # models.LOSSES
    gan: bool = _model("gan")  # conditional WGAN-GP on top of the reconstruction loss
    half_width: int = _model("half_width")  # brightfield planes on each side of focus as extra inputs
    target_norm: str = _model("target_norm")  # plate | fov
    patch: int = _model("patch")
    batch: int = _model("batch")
    lr: float = _model("lr")
    steps_per_epoch: int = _model("steps_per_epoch")
    max_epochs: int = _model("max_epochs")
    patience: int = _model("patience")
    val_fraction: float = _model("val_fraction")
    max_sites: int = _model("max_sites")  # training sites held in memory (sampled across plates, seeded)
    max_megapixels: float = _model("max_megapixels")  # and at most this many pixels of them
    augment: bool = _model("augment")
    seed: int = _model("seed")
    precision: str = _model("precision")  # inference.PRECISIONS: auto = bf16 where the hardware has it
    # The GAN's loss weights are not workflow settings (the config schema has no key for them): they
    # are stated here only. L1 x 100 as pix2pix, gradient penalty x 10 as WGAN-GP.
    gan_l1_weight: float = 100.0
    gan_gp_weight: float = 10.0
    gan_adversarial: float = 0.5  # times the adaptive weight (adversarial <= reconstruction gradient)

    @classmethod
    def from_config(cls, config: dict) -> StainSettings:
        """config/config.yaml's `stain: model:` defaults with `config` on top, checked (the workflow
        passes the whole merged section; an unknown key is a StainError)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise StainError(f"stain settings: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**config).checked()

    @classmethod
    def defaults(cls, **overrides) -> StainSettings:
        """The defaults (config/config.yaml `stain: model:`) with `overrides`, checked."""
        return cls.from_config(overrides)

    def checked(self) -> StainSettings:
        if self.arch not in models.ARCHITECTURES:
            raise StainError(f"stain.arch: {self.arch!r} is not one of {models.ARCHITECTURES}")
        if self.stem not in models.STEMS:
            raise StainError(f"stain.stem: {self.stem!r} is not one of {models.STEMS}")
        if self.loss not in models.LOSSES:
            raise StainError(f"stain.loss: {self.loss!r} is not one of {models.LOSSES}")
        if self.precision not in PRECISIONS:
            raise StainError(f"stain.precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.target_norm not in TARGET_NORMS:
            raise StainError(f"stain.target_norm: {self.target_norm!r} is not one of {TARGET_NORMS}")
        for name in ("width", "depth", "patch", "batch", "steps_per_epoch", "max_epochs", "patience",
                     "max_sites"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StainError(f"stain.{name}: must be an integer >= 1, got {value!r}")
        if isinstance(self.max_megapixels, bool) or not self.max_megapixels > 0:
            raise StainError(f"stain.max_megapixels: must be > 0, got {self.max_megapixels!r}")
        if self.half_width < 0:
            raise StainError(f"stain.half_width: must be >= 0, got {self.half_width}")
        if self.stem == "3d" and 2 * self.half_width + 1 < models.STEM_3D_PLANES:
            raise StainError(f"stain.stem: 3d spans {models.STEM_3D_PLANES} planes; half_width "
                             f"{self.half_width} gives {2 * self.half_width + 1}")
        if not 0 < self.val_fraction < 1:
            raise StainError(f"stain.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise StainError(f"stain.lr: must be > 0, got {self.lr}")
        return self
