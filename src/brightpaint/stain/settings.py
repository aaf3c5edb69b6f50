"""Virtual-staining settings (`StainSettings`, recorded in every model card) and errors
(`StainError`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import UserError
from ..inference import PRECISIONS
from . import models

TARGET_NORMS = ("plate", "fov")


class StainError(UserError):
    """Bad input to virtual staining: names the plate / channel / file and what is wrong."""


@dataclass(frozen=True)
class StainSettings:
    """Everything that shapes a model; recorded in its card."""

    arch: str = "unet"  # models.ARCHITECTURES
    width: int = 32
    depth: int = 3
    loss: str = "l1"  # models.LOSSES
    gan: bool = False  # conditional WGAN-GP on top of the reconstruction loss
    half_width: int = 1  # brightfield planes on each side of focus as extra input channels
    target_norm: str = "plate"  # plate | fov
    patch: int = 128
    batch: int = 8
    lr: float = 2e-3
    steps_per_epoch: int = 50
    max_epochs: int = 10
    patience: int = 3
    val_fraction: float = 0.2
    max_sites: int = 256  # training sites held in memory (sampled across plates, seeded)
    augment: bool = True
    seed: int = 0
    precision: str = "auto"  # inference.PRECISIONS: auto trains in bf16 where the hardware has bf16 units
    gan_l1_weight: float = 100.0
    gan_gp_weight: float = 10.0
    gan_adversarial: float = 0.5  # times the adaptive weight (adversarial <= reconstruction gradient)

    @classmethod
    def from_config(cls, config: dict) -> StainSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise StainError(f"stain settings: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**config).checked()

    def checked(self) -> StainSettings:
        if self.arch not in models.ARCHITECTURES:
            raise StainError(f"stain.arch: {self.arch!r} is not one of {models.ARCHITECTURES}")
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
        if self.half_width < 0:
            raise StainError(f"stain.half_width: must be >= 0, got {self.half_width}")
        if not 0 < self.val_fraction < 1:
            raise StainError(f"stain.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise StainError(f"stain.lr: must be > 0, got {self.lr}")
        return self
