"""Networks and losses for virtual staining: brightfield planes in, fluorescence channels out.

Generators (`build_generator`) map (N, in_channels, H, W) to (N, out_channels, H, W) with a linear
output; H and W must be multiples of the generator's `multiple`.

- "unet": a classic U-Net (two 3x3 conv + BatchNorm + ReLU per block, max-pool down, transposed conv
  up, skips by concatenation).
- "unext2": a UNeXt2-style network (after VisCy's UNeXt2): a stride-2 patchify stem, stages of
  ConvNeXt-v2 blocks, a light decoder and a PixelShuffle head back to full resolution.

The input channels are brightfield planes. With stem "2d" (2.5-D) they enter the first 2-D
convolution as channels, each plane with its own weights. With stem "3d" a 3-D convolution spanning
`STEM_3D_PLANES` planes runs along z first, the same weights at every depth (a defocus pattern means
the same one plane up or down), and the depths it leaves are folded into channels for the 2-D network
(VisCy's UNeXt2 stem does the same).

Tiled inference must agree with whole-image inference, so in eval mode every layer is translation
equivariant away from the borders: BatchNorm is a fixed affine map in eval mode (no instance or group
norm, whose statistics depend on the tile), LayerNorm works per pixel, and the ConvNeXt-v2 GRN uses a
local window instead of the whole image (see `_LocalGRN`). Tiles then match the whole image exactly
wherever the tile covers the pixel's receptive field; the receptive field is large (a few hundred
pixels for the default unext2), but far-away pixels weigh little, so usual tile overlaps suffice in
practice.

Critic (`build_critic`): a PatchGAN for a conditional WGAN-GP, fed concat([brightfield, fluorescence]).

Losses: `masked_l1` and `masked_ms_ssim_l1` average over the (sample, channel) pairs whose target
exists (training plates may lack channels); `gradient_penalty` (WGAN-GP) and
`adaptive_adversarial_weight` (VQGAN) for adversarial training.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim
from torch import Tensor, nn

ARCHITECTURES = ("unet", "unext2")
STEMS = ("2d", "3d")
STEM_3D_PLANES = 3  # planes one kernel of the 3-D stem spans
LOSSES = ("l1", "ms_ssim_l1")

CONVNEXT_EXPANSION = 4  # pointwise expansion of a ConvNeXt block
ENCODER_BLOCKS = 2  # ConvNeXt-v2 blocks per unext2 encoder stage (the decoder has one per level)
GRN_WINDOW = 15  # side of the local window of the GRN statistic, in pixels of the feature map
LAYER_NORM_EPS = 1e-6
GRN_EPS = 1e-6

# MS-SSIM (Wang et al. 2003) scale weights; fewer scales use the first ones, renormalised to sum 1.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MAX_WIN = 11
# Added to the target's range before rescaling to [0, 1]: keeps a flat target from blowing up the scale.
MS_SSIM_SPAN_EPS = 1e-2


# ---------------------------------------------------------------------------------------------
# Argument checks and seeding
# ---------------------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    """`value` as an int, or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _seeded(build: Callable[[], nn.Module], seed: int | None) -> nn.Module:
    """Run `build` with its random draws taken from `seed`, leaving the global CPU RNG as it was."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        # Seed the CPU generator only: torch.manual_seed would also reseed every CUDA device, which
        # fork_rng(devices=[]) does not restore. Layers are built on the CPU.
        torch.default_generator.manual_seed(int(seed))
        return build()


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


class _Generator(nn.Module):
    """What every generator has: `config`, `multiple`, `last_layer` and input checks."""

    head: nn.Conv2d

    def __init__(self, config: dict, multiple: int) -> None:
        super().__init__()
        self.config = config
        self.multiple = multiple

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final output convolution (for the adaptive adversarial weight)."""
        return self.head.weight

    def _check_input(self, x: Tensor) -> None:
        in_channels = self.config["in_channels"]
        if x.ndim != 4 or x.shape[1] != in_channels:
            raise ValueError(f"input must be (N, {in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.multiple or x.shape[-1] % self.multiple:
            raise ValueError(f"input height and width must be multiples of {self.multiple}, "
                             f"got {tuple(x.shape[-2:])}")


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # No conv bias: BatchNorm's shift replaces it.
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(in_channels, out_channels),
                         *_conv_bn_relu(out_channels, out_channels))


class _UNet(_Generator):
    """Classic U-Net: `depth` poolings, `width` channels on top, doubling per level."""

    def __init__(self, config: dict) -> None:
        depth = config["depth"]
        super().__init__(config, multiple=2**depth)
        widths = [config["width"] * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList([_double_conv(config["in_channels"], widths[0])] +
                                     [_double_conv(widths[lv - 1], widths[lv]) for lv in range(1, depth + 1)])
        coarse_to_fine = list(reversed(range(depth)))
        self.upsamplers = nn.ModuleList(nn.ConvTranspose2d(widths[lv + 1], widths[lv], 2, stride=2)
                                        for lv in coarse_to_fine)
        self.decoder = nn.ModuleList(_double_conv(2 * widths[lv], widths[lv]) for lv in coarse_to_fine)
        self.head = nn.Conv2d(widths[0], config["out_channels"], 1)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        skips.pop()  # the bottleneck's output is no skip
        for upsample, block in zip(self.upsamplers, self.decoder, strict=True):
            x = block(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.head(x)


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor, at each pixel separately."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in float32 even under autocast: a float16 variance loses precision.
        y = x.float()
        mean = y.mean(dim=1, keepdim=True)
        variance = (y - mean).pow(2).mean(dim=1, keepdim=True)
        y = (y - mean) * torch.rsqrt(variance + LAYER_NORM_EPS)
        return y.to(x.dtype) * self.weight.to(x.dtype) + self.bias.to(x.dtype)


def _local_mean(x: Tensor, window: int) -> Tensor:
    """Mean over the window x window neighbourhood of each pixel, clipped at the borders.

    Two 1-D box filters (2 * window operations per pixel instead of window**2); with
    count_include_pad=False both divide by the clipped length, whose product is the clipped 2-D area.
    """
    pad = window // 2
    x = F.avg_pool2d(x, (1, window), stride=1, padding=(0, pad), count_include_pad=False)
    return F.avg_pool2d(x, (window, 1), stride=1, padding=(pad, 0), count_include_pad=False)


class _LocalGRN(nn.Module):
    """ConvNeXt-v2 global response normalisation with a local instead of a global statistic.

    The original GRN divides each channel's spatial L2 norm over the whole image by the mean of these
    norms over the channels. A whole-image statistic makes a pixel's output depend on every other
    pixel, so tiled inference would differ from whole-image inference. Here the norm is the RMS over a
    GRN_WINDOW neighbourhood (the RMS is the L2 norm up to a constant factor, which the division by the
    channel mean cancels), so the layer is translation equivariant away from the borders and tiles
    agree with the whole image. gamma and beta start at zero: the layer starts as the identity.
    """

    def __init__(self, channels: int, window: int = GRN_WINDOW) -> None:
        super().__init__()
        self.window = window
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # float32 even under autocast (squares overflow float16 from 256 on); eps inside the root,
        # where the gradient of sqrt would be infinite at 0.
        response = torch.sqrt(_local_mean(x.float().pow(2), self.window) + GRN_EPS)
        relative = (response / (response.mean(dim=1, keepdim=True) + GRN_EPS)).to(x.dtype)
        return self.gamma.to(x.dtype) * (x * relative) + self.beta.to(x.dtype) + x


class _ConvNeXtV2Block(nn.Module):
    """Depthwise 7x7 -> LayerNorm -> pointwise x4 -> GELU -> GRN -> pointwise back, plus residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = CONVNEXT_EXPANSION * channels
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = _ChannelLayerNorm(channels)
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.activation = nn.GELU()
        self.grn = _LocalGRN(hidden)
        self.project = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.depthwise(x))
        y = self.grn(self.activation(self.expand(y)))
        return x + self.project(y)


def _encoder_stage(in_channels: int, out_channels: int, downsample: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    if downsample:
        layers += [_ChannelLayerNorm(in_channels), nn.Conv2d(in_channels, out_channels, 2, stride=2)]
    layers += [_ConvNeXtV2Block(out_channels) for _ in range(ENCODER_BLOCKS)]
    return nn.Sequential(*layers)


class _UpStage(nn.Module):
    """Bilinear x2 upsampling, concatenation with the encoder skip, 1x1 projection, ConvNeXt-v2 block."""

    def __init__(self, coarse_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(coarse_channels + skip_channels, skip_channels, 1)
        self.block = _ConvNeXtV2Block(skip_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(self.fuse(torch.cat([skip, x], dim=1)))


class _UNeXt2(_Generator):
    """UNeXt2-style network: stride-2 stem, `depth` ConvNeXt-v2 stages, decoder, PixelShuffle head."""

    STEM_STRIDE = 2

    def __init__(self, config: dict) -> None:
        depth, width = config["depth"], config["width"]
        # The stem halves the size and each stage after the first halves it again.
        super().__init__(config, multiple=self.STEM_STRIDE * 2 ** (depth - 1))
        widths = [width * 2**stage for stage in range(depth)]
        self.stem = nn.Sequential(nn.Conv2d(config["in_channels"], width, self.STEM_STRIDE,
                                            stride=self.STEM_STRIDE),
                                  _ChannelLayerNorm(width))
        self.stages = nn.ModuleList(_encoder_stage(widths[max(s - 1, 0)], widths[s], downsample=s > 0)
                                    for s in range(depth))
        self.decoder = nn.ModuleList(_UpStage(widths[s + 1], widths[s]) for s in reversed(range(depth - 1)))
        # 3x3 rather than 1x1: each 2x2 output block then also sees the neighbouring features, which
        # avoids blocky 2x2 artefacts after the PixelShuffle.
        self.head = nn.Conv2d(width, config["out_channels"] * self.STEM_STRIDE**2, 3, padding=1)
        self.to_full_resolution = nn.PixelShuffle(self.STEM_STRIDE)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        skips.pop()  # the deepest stage's output is no skip
        for up_stage in self.decoder:
            x = up_stage(x, skips.pop())
        return self.to_full_resolution(self.head(x))


_GENERATORS: dict[str, type[_Generator]] = {"unet": _UNet, "unext2": _UNeXt2}


class _ZStem(nn.Module):
    """A 3-D convolution over (plane, y, x), its weights shared along z, then BatchNorm and ReLU;
    (N, planes, H, W) in, (N, out_channels, H, W) out with the depths it leaves folded into channels.
    It gives `width` channels in all (at least 4 per depth), so the 2-D network above it is as wide as
    the 2.5-D model's."""

    def __init__(self, planes: int, width: int) -> None:
        super().__init__()
        if planes < STEM_3D_PLANES:
            raise ValueError(f"a 3d stem needs at least {STEM_3D_PLANES} brightfield planes (half_width "
                             f">= 1), got {planes}")
        depths = planes - STEM_3D_PLANES + 1
        per_depth = max(width // depths, 4)
        # no padding along z: a depth is only where the kernel has all its planes
        self.conv = nn.Conv3d(1, per_depth, (STEM_3D_PLANES, 3, 3), padding=(0, 1, 1), bias=False)
        self.norm = nn.BatchNorm3d(per_depth)
        self.out_channels = per_depth * depths

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x.unsqueeze(1)))).flatten(1, 2)


class _ZStemGenerator(_Generator):
    """`_ZStem`, then a 2-D generator on its channels."""

    def __init__(self, config: dict) -> None:
        z_stem = _ZStem(config["in_channels"], config["width"])
        body = _GENERATORS[config["arch"]]({**config, "in_channels": z_stem.out_channels, "stem": "2d"})
        super().__init__(config, multiple=body.multiple)  # before any submodule is assigned
        self.z_stem, self.body = z_stem, body

    @property
    def last_layer(self) -> nn.Parameter:
        return self.body.last_layer

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.body(self.z_stem(x))


def build_generator(arch: str, in_channels: int, out_channels: int, *, width: int = 32, depth: int = 3,
                    stem: str = "2d", seed: int | None = None) -> nn.Module:
    """A generator (see the module docstring); `build_generator(**model.config)` rebuilds it (a
    config without `stem`, from a model file written before it existed, is a 2-D stem)."""
    if arch not in _GENERATORS:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    config = {"arch": arch,
              "in_channels": _positive_int("in_channels", in_channels),
              "out_channels": _positive_int("out_channels", out_channels),
              "width": _positive_int("width", width),
              "depth": _positive_int("depth", depth),
              "stem": stem}
    build = _ZStemGenerator if stem == "3d" else _GENERATORS[arch]
    return _seeded(lambda: build(config), seed)


# ---------------------------------------------------------------------------------------------
# Critic and adversarial terms
# ---------------------------------------------------------------------------------------------


def build_critic(in_channels: int, *, width: int = 32, n_layers: int = 3,
                 seed: int | None = None) -> nn.Module:
    """PatchGAN critic (pix2pix layout) with unbounded scores, input concat([condition, image]).

    No normalisation: BatchNorm couples the samples of a batch, which breaks the per-sample gradient
    penalty of WGAN-GP. Output (N, 1, H / 2**n_layers - 2, W / 2**n_layers - 2).
    """
    in_channels = _positive_int("in_channels", in_channels)
    width = _positive_int("width", width)
    n_layers = _positive_int("n_layers", n_layers)

    def build() -> nn.Module:
        def channels(layer: int) -> int:
            return width * 2 ** min(layer, 3)  # capped at 8 x width, as in pix2pix

        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for layer in range(1, n_layers):
            layers += [nn.Conv2d(channels(layer - 1), channels(layer), 4, stride=2, padding=1),
                       nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(channels(n_layers - 1), channels(n_layers), 4, padding=1), nn.LeakyReLU(0.2),
                   nn.Conv2d(channels(n_layers), 1, 4, padding=1)]
        critic = nn.Sequential(*layers)
        critic.config = {"in_channels": in_channels, "width": width, "n_layers": n_layers}
        return critic

    return _seeded(build, seed)


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP penalty mean((||d score / d x||_2 - 1)^2) at random interpolates of real and fake.

    A sample's score is the mean of its patch scores, as in the Wasserstein loss. real and fake are
    detached (the penalty trains the critic only); create_graph=True lets the penalty be backpropagated.
    Multiply by lambda (10 in Gulrajani et al. 2017).
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    mix = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), device=real.device, dtype=real.dtype)
    interpolates = (mix * real.detach() + (1 - mix) * fake.detach()).requires_grad_(True)
    scores = critic(interpolates)
    scores = scores.reshape(scores.shape[0], -1).mean(dim=1)  # (N,) or (N, 1, H', W') -> (N,)
    (gradients,) = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
    return (gradients.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def adaptive_adversarial_weight(reconstruction: Tensor, adversarial: Tensor, last_layer: Tensor, *,
                                max_weight: float = 1.0) -> Tensor:
    """VQGAN weight ||d rec / d last|| / (||d adv / d last|| + 1e-4), clamped to [0, max_weight], detached.

    Scales the adversarial loss so that its gradient on the generator's last layer is at most as large
    as the reconstruction loss's: the adversarial term cannot swamp the L1 term. The graphs are kept.
    """
    (reconstruction_grad,) = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    (adversarial_grad,) = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    weight = reconstruction_grad.norm() / (adversarial_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------
# Reconstruction losses with missing channels
# ---------------------------------------------------------------------------------------------


def _check_loss_inputs(prediction: Tensor, target: Tensor, mask: Tensor) -> None:
    if prediction.ndim != 4 or prediction.shape != target.shape:
        raise ValueError(f"prediction and target must be (N, C, H, W) of one shape, got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}")
    if mask.shape != prediction.shape[:2]:
        raise ValueError(f"mask must be (N, C) = {tuple(prediction.shape[:2])}, got {tuple(mask.shape)}")


def _masked_mean(pair_loss: Callable[[Tensor, Tensor], Tensor], prediction: Tensor, target: Tensor,
                 mask: Tensor) -> Tensor:
    """Mean of pair_loss over the (sample, channel) pairs whose mask is non-zero, weighted by the mask.

    Missing pairs are never passed to pair_loss: their zero-filled targets cannot produce NaN or
    infinite gradients that a multiplication by 0 would not cancel, and their gradient is exactly 0.
    """
    _check_loss_inputs(prediction, target, mask)
    available = mask > 0
    if not available.any():
        return prediction.sum() * 0  # keeps a grad_fn, so backward() still works
    weights = mask[available].to(prediction.dtype)
    losses = pair_loss(prediction[available], target[available])  # images (K, H, W) -> (K,)
    return (losses * weights).sum() / weights.sum()


def _pair_l1(prediction: Tensor, target: Tensor) -> Tensor:
    return (prediction - target).abs().flatten(1).mean(dim=1)


def _ms_ssim_settings(smallest_side: int) -> tuple[int, list[float]]:
    """Gaussian window size and scale weights of MS-SSIM for images of this smallest side.

    pytorch-msssim 1.0.0 asserts smallest_side > (win_size - 1) * 16 whatever the number of scales,
    so the window is the largest odd size (at most 11, the standard) that passes: 3 for 64 px, 5 for
    96, 7 for 128, 11 from 176. The scales are as many (at most 5) as keep the coarsest image at least
    2 * win_size wide: 3 for 33-47 px, 4 for 48-351 px, 5 from 352 px. Below 33 px no window fits:
    ValueError.
    """
    win_size = (smallest_side - 1) // 16 + 1
    win_size = min(win_size - (win_size % 2 == 0), MS_SSIM_MAX_WIN)
    if win_size < 3:
        raise ValueError(f"MS-SSIM needs images of at least 33 x 33 pixels, got smallest side "
                         f"{smallest_side}")
    n_scales = 1
    while n_scales < len(MS_SSIM_WEIGHTS) and smallest_side // 2**n_scales >= 2 * win_size:
        n_scales += 1
    weights = MS_SSIM_WEIGHTS[:n_scales]
    return win_size, [w / sum(weights) for w in weights]


def _pair_ms_ssim(prediction: Tensor, target: Tensor) -> Tensor:
    """MS-SSIM of each image pair (K, H, W) -> (K,), both rescaled by the target's range to ~[0, 1].

    Targets are normalised intensities, not bounded to [0, 1]; one affine map per pair (from the
    detached target's min and max) brings the target to [0, 1] and is applied to the prediction too,
    so data_range=1 holds for the target and the comparison is unchanged.
    """
    win_size, weights = _ms_ssim_settings(min(prediction.shape[-2:]))
    reference = target.detach()
    low = reference.amin(dim=(-2, -1), keepdim=True)
    span = reference.amax(dim=(-2, -1), keepdim=True) - low + MS_SSIM_SPAN_EPS
    x = ((prediction - low) / span).unsqueeze(1)
    y = ((target - low) / span).unsqueeze(1)
    return ms_ssim(x, y, data_range=1.0, size_average=False, win_size=win_size, weights=weights)


def masked_l1(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over the available (sample, channel) pairs; mask is (N, C) of 0 / 1."""
    return _masked_mean(_pair_l1, prediction, target, mask)


def masked_ms_ssim_l1(prediction: Tensor, target: Tensor, mask: Tensor, *, alpha: float = 0.5) -> Tensor:
    """alpha * (1 - MS-SSIM) + (1 - alpha) * L1 per available (sample, channel) pair, averaged.

    Images must be at least 33 px per side (64+ recommended); see `_ms_ssim_settings`.
    """

    def pair_loss(p: Tensor, t: Tensor) -> Tensor:
        return alpha * (1 - _pair_ms_ssim(p, t)) + (1 - alpha) * _pair_l1(p, t)

    return _masked_mean(pair_loss, prediction, target, mask)


_RECONSTRUCTION_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "l1": masked_l1,
    "ms_ssim_l1": masked_ms_ssim_l1,
}


def reconstruction_loss(name: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The masked loss called `name` (one of LOSSES), taking (prediction, target, mask)."""
    if name not in _RECONSTRUCTION_LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return _RECONSTRUCTION_LOSSES[name]
