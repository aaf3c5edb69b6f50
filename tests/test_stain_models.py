"""Virtual-staining networks and losses (brightpaint.stain.models): shapes, sizes, seeding, tiled vs
whole-image inference, a tiny overfit, masked losses, the WGAN-GP penalty and the adaptive weight.

Everything is tiny (width 4-8, images up to 848 px only for the tiling check of unext2, whose receptive
field is ~350 px) and runs on one thread: more threads than free cores make torch many times slower
on a shared machine.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brightpaint.stain.models import (
    ARCHITECTURES,
    LOSSES,
    STEM_3D_PLANES,
    adaptive_adversarial_weight,
    build_critic,
    build_generator,
    gradient_penalty,
    masked_l1,
    masked_ms_ssim_l1,
    reconstruction_loss,
)

# Receptive radius (px) of the default-depth generators, measured from the support of the gradient of
# one output pixel: unet 46, unext2 352 (the GRN windows and 7x7 kernels at 1/8 resolution).
TILING_MARGIN = {"unet": 48, "unext2": 360}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("depth", "multiple", "height", "width"), [(3, 8, 16, 24), (2, 4, 12, 20)])
def test_generator_shape_and_multiple(arch, depth, multiple, height, width):
    model = build_generator(arch, 3, 2, width=4, depth=depth, seed=0)
    assert model.multiple == multiple
    out = model(noise(2, 3, height, width))
    assert out.shape == (2, 2, height, width)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generator_rejects_bad_input(arch):
    model = build_generator(arch, 3, 2, width=4, depth=3, seed=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(noise(1, 3, 16, 20))
    with pytest.raises(ValueError, match="3"):
        model(noise(1, 1, 16, 16))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_output_is_linear_in_last_layer(arch):
    """The final convolution's weight is `last_layer` and nothing non-linear follows it."""
    model = build_generator(arch, 2, 3, width=4, depth=2, seed=0).eval()
    x = noise(1, 2, 16, 16)
    step = noise(*model.last_layer.shape, seed=1)
    outputs = []
    with torch.no_grad():
        for _ in range(3):
            outputs.append(model(x))
            model.last_layer.add_(step)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)
    torch.testing.assert_close(outputs[1] - outputs[0], outputs[2] - outputs[1], atol=1e-5, rtol=1e-4)
    assert any(p is model.last_layer for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_rebuilds_the_model(arch):
    model = build_generator(arch, 2, 3, width=4, depth=2, seed=5)
    assert model.config == {"arch": arch, "in_channels": 2, "out_channels": 3, "width": 4, "depth": 2,
                            "stem": "2d"}
    rebuilt = build_generator(**json.loads(json.dumps(model.config)), seed=5)
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # a config written before `stem` existed rebuilds the same (2-D) model
    older = {k: v for k, v in model.config.items() if k != "stem"}
    assert build_generator(**older, seed=5).state_dict().keys() == model.state_dict().keys()


# ---------------------------------------------------------------------------------------------
# The 3-D stem
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_3d_stem_generator_shape_and_rebuild(arch):
    model = build_generator(arch, 5, 2, width=8, depth=2, stem="3d", seed=0)
    assert model.config["stem"] == "3d" and model.multiple == build_generator(arch, 5, 2, depth=2).multiple
    rebuilt = build_generator(**json.loads(json.dumps(model.config)), seed=0)
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert model(noise(2, 5, 16, 24)).shape == (2, 2, 16, 24)
    # 5 planes leave 3 depths of the 3-plane kernel; 8 channels in all, at least 4 per depth
    assert model.z_stem.out_channels == 3 * 4
    with pytest.raises(ValueError, match="input must be"):
        model(noise(1, 3, 16, 16))


def test_3d_stem_shares_its_weights_along_z():
    """The same planes one depth further down give the same stem features one depth further down:
    the stem is a convolution along z, not a per-plane weighting as the 2-D stem is."""
    model = build_generator("unet", 5, 1, width=8, depth=2, stem="3d", seed=0).eval()
    randomise_normalisation(model)
    x = noise(1, 6, 16, 16, seed=2)
    with torch.no_grad():
        # channels are folded channel-major: (N, channels x depths, H, W) -> (N, channels, depths, ...)
        upper, lower = (model.z_stem(planes).unflatten(1, (-1, 3)) for planes in (x[:, :5], x[:, 1:]))
    torch.testing.assert_close(lower[:, :, :2], upper[:, :, 1:], atol=1e-5, rtol=0)
    assert (lower[:, :, 0] - upper[:, :, 0]).abs().max() > 1e-2  # and the depths do differ


def test_3d_stem_needs_the_planes_its_kernel_spans():
    with pytest.raises(ValueError, match=f"at least {STEM_3D_PLANES} brightfield planes"):
        build_generator("unet", STEM_3D_PLANES - 1, 1, stem="3d")
    with pytest.raises(ValueError, match="stem must be one of"):
        build_generator("unet", 3, 1, stem="4d")


def test_default_parameter_counts():
    unet = n_parameters(build_generator("unet", 3, 3))
    unext2 = n_parameters(build_generator("unext2", 3, 3))
    assert 1_000_000 < unet < 2_500_000
    assert 300_000 < unext2 < 3_000_000


def test_generator_normalisation_is_tile_independent_by_construction():
    """unet uses BatchNorm (a fixed affine map in eval mode); no generator uses per-image statistics."""
    unet = build_generator("unet", 1, 1, width=4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in unet.modules())
    for arch in ARCHITECTURES:
        model = build_generator(arch, 1, 1, width=4)
        assert not any(isinstance(m, nn.InstanceNorm2d | nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_seed_reproducible_and_global_rng_untouched(arch):
    state = torch.get_rng_state()
    a = build_generator(arch, 2, 2, width=4, depth=2, seed=3).state_dict()
    b = build_generator(arch, 2, 2, width=4, depth=2, seed=3).state_dict()
    c = build_generator(arch, 2, 2, width=4, depth=2, seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    conv_weights = [name for name in a if name.endswith("weight") and a[name].ndim == 4]
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not any(torch.equal(a[name], c[name]) for name in conv_weights)
    # Without a seed the global RNG is used (and advanced).
    build_generator(arch, 2, 2, width=4, depth=2)
    assert not torch.equal(torch.get_rng_state(), state)


def randomise_normalisation(model: nn.Module) -> None:
    """Make GRN and BatchNorm do something (GRN starts as the identity, BatchNorm as ~ the identity)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm3d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.uniform_(0.5, 2.0, generator=generator)


@pytest.mark.parametrize(("arch", "stem"), [(arch, "2d") for arch in ARCHITECTURES] + [("unet", "3d")])
def test_eval_tiles_equal_whole_image(arch, stem):
    """A crop's output equals the whole image's wherever the crop covers the receptive field: no layer
    uses a statistic of the whole input (as the original ConvNeXt-v2 GRN does)."""
    margin = TILING_MARGIN[arch]  # the 3-D stem's 3x3 kernel adds 1 px: 47 for unet, still inside
    planes = 3 if stem == "3d" else 2
    model = build_generator(arch, planes, 2, width=4, stem=stem, seed=0).eval()
    randomise_normalisation(model)
    offset = 4 * model.multiple  # keeps the crop on the pooling grid
    crop = 2 * margin + 64
    image = noise(1, planes, crop + 2 * offset, crop + 2 * offset, seed=1)
    with torch.no_grad():
        whole = model(image)[..., offset:offset + crop, offset:offset + crop]
        tile = model(image[..., offset:offset + crop, offset:offset + crop])
    inner = slice(margin, crop - margin)
    assert whole[..., inner, inner].abs().mean() > 0.05
    torch.testing.assert_close(tile[..., inner, inner], whole[..., inner, inner], atol=1e-4, rtol=0)
    # Near the crop's border the zero padding differs: the comparison above is not vacuous.
    assert (tile - whole).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generator_overfits_a_fixed_mapping(arch):
    """Learns target = 2 x (3x3 blur of input channel 0, shifted by (2, -1)) on one batch."""
    x = noise(2, 2, 32, 32)
    target = 2 * torch.roll(F.avg_pool2d(x[:, :1], 3, stride=1, padding=1), shifts=(2, -1), dims=(2, 3))
    mask = torch.ones(2, 1)
    model = build_generator(arch, 2, 1, width=8, depth=2, seed=0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = masked_l1(model(x), target, mask)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"arch": "resnet"}, "arch"),
    ({"in_channels": 0}, "in_channels"),
    ({"out_channels": -1}, "out_channels"),
    ({"width": 2.5}, "width"),
    ({"depth": 0}, "depth"),
    ({"depth": True}, "depth"),
])
def test_build_generator_rejects_bad_arguments(kwargs, argument):
    arguments = {"arch": "unet", "in_channels": 1, "out_channels": 1} | kwargs
    with pytest.raises(ValueError, match=argument):
        build_generator(**arguments)


# ---------------------------------------------------------------------------------------------
# Critic, gradient penalty, adaptive weight
# ---------------------------------------------------------------------------------------------


def test_patchgan_critic_shape_and_no_batchnorm():
    critic = build_critic(4, width=8, seed=0)
    scores = critic(noise(2, 4, 64, 64))
    assert scores.shape == (2, 1, 6, 6)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())
    assert build_critic(4, width=8, n_layers=2)(noise(1, 4, 32, 48)).shape == (1, 1, 6, 10)
    with pytest.raises(ValueError, match="n_layers"):
        build_critic(4, n_layers=0)


class LinearCritic(nn.Module):
    """score(x) = sum(x * w): its input gradient is w everywhere."""

    def __init__(self, shape: tuple[int, ...], norm: float, patches: bool) -> None:
        super().__init__()
        w = noise(*shape, seed=7)
        self.w = nn.Parameter(w * (norm / w.norm()))
        self.patches = patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.w).flatten(1).sum(dim=1)
        # As a 2 x 2 map of identical patch scores: the per-sample score is their mean.
        return score[:, None, None, None].expand(-1, 1, 2, 2) if self.patches else score


@pytest.mark.parametrize("patches", [False, True])
def test_gradient_penalty_of_linear_critics(patches):
    real, fake = noise(3, 2, 8, 8, seed=1), noise(3, 2, 8, 8, seed=2)
    unit = LinearCritic((2, 8, 8), 1.0, patches)
    assert gradient_penalty(unit, real, fake).item() == pytest.approx(0.0, abs=1e-8)
    steep = LinearCritic((2, 8, 8), 3.0, patches)
    penalty = gradient_penalty(steep, real, fake)
    assert penalty.item() == pytest.approx(4.0, rel=1e-5)
    # Backpropagates to the critic: d (||w|| - 1)^2 / dw = 2 (||w|| - 1) w / ||w||.
    penalty.backward()
    torch.testing.assert_close(steep.w.grad, steep.w.detach() * (2 * 2 / 3))


def test_gradient_penalty_trains_a_patchgan_critic():
    critic = build_critic(3, width=4, seed=0)
    generator_output = noise(2, 3, 32, 32, seed=2).requires_grad_(True)
    penalty = gradient_penalty(critic, noise(2, 3, 32, 32, seed=1), generator_output)
    assert penalty.ndim == 0 and penalty.item() > 0
    penalty.backward()
    # Every weight gets a gradient (the last bias shifts the scores and leaves their gradient alone).
    weights = [p for name, p in critic.named_parameters() if name.endswith("weight")]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in weights)
    assert generator_output.grad is None  # the penalty trains the critic only


def test_adaptive_weight_is_the_gradient_norm_ratio():
    last_layer = torch.tensor([1.0, 2.0], requires_grad=True)
    reconstruction = (last_layer * torch.tensor([3.0, 4.0])).sum()  # gradient norm 5
    adversarial = (last_layer * torch.tensor([0.0, 10.0])).sum() ** 2 / 40  # gradient (0, 10)
    weight = adaptive_adversarial_weight(reconstruction, adversarial, last_layer)
    assert weight.item() == pytest.approx(5 / (10 + 1e-4))
    assert not weight.requires_grad
    (reconstruction + weight * adversarial).backward()  # the graphs were kept
    assert last_layer.grad is not None


def test_adaptive_weight_is_clamped():
    last_layer = torch.tensor([1.0, 2.0], requires_grad=True)
    reconstruction = (last_layer * torch.tensor([30.0, 40.0])).sum()  # gradient norm 50
    adversarial = (last_layer * torch.tensor([0.0, 1.0])).sum()  # gradient norm 1
    assert adaptive_adversarial_weight(reconstruction, adversarial, last_layer).item() == 1.0
    weight = adaptive_adversarial_weight(reconstruction, adversarial, last_layer, max_weight=20.0)
    assert weight.item() == 20.0
    weight = adaptive_adversarial_weight(reconstruction, adversarial, last_layer, max_weight=100.0)
    assert weight.item() == pytest.approx(50 / (1 + 1e-4))


def test_adaptive_weight_with_a_generator():
    model = build_generator("unext2", 2, 1, width=4, depth=2, seed=0)
    x, target = noise(1, 2, 16, 16), noise(1, 1, 16, 16, seed=1)
    prediction = model(x)
    reconstruction = masked_l1(prediction, target, torch.ones(1, 1))
    weight = adaptive_adversarial_weight(reconstruction, -prediction.mean() * 1e6, model.last_layer)
    assert 0 < weight.item() < 1e-3  # a huge adversarial gradient gets a tiny weight


# ---------------------------------------------------------------------------------------------
# Masked reconstruction losses
# ---------------------------------------------------------------------------------------------


def test_masked_l1_with_all_channels_is_l1():
    prediction, target = noise(2, 3, 8, 8, seed=1), noise(2, 3, 8, 8, seed=2)
    loss = masked_l1(prediction, target, torch.ones(2, 3))
    torch.testing.assert_close(loss, F.l1_loss(prediction, target))


def test_masked_l1_averages_the_available_pairs():
    prediction, target = noise(2, 3, 8, 8, seed=1), noise(2, 3, 8, 8, seed=2)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    pair_means = (prediction - target).abs().mean(dim=(2, 3))
    expected = (pair_means[0, 0] + pair_means[0, 2] + pair_means[1, 2]) / 3
    torch.testing.assert_close(masked_l1(prediction, target, mask), expected)


@pytest.mark.parametrize("name", LOSSES)
def test_masked_out_channel_is_ignored(name):
    loss_fn = reconstruction_loss(name)
    prediction = noise(2, 2, 64, 64, seed=1).requires_grad_(True)
    target = noise(2, 2, 64, 64, seed=2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = loss_fn(prediction, target, mask)
    loss.backward()
    assert torch.all(prediction.grad[0, 1] == 0)
    assert prediction.grad[0, 0].abs().sum() > 0 and prediction.grad[1, 1].abs().sum() > 0
    other_target = target.clone()
    other_target[0, 1] = 0.0  # a missing channel, zero-filled
    torch.testing.assert_close(loss_fn(prediction, other_target, mask), loss)
    other_target[0, 0] = 0.0
    assert loss_fn(prediction, other_target, mask).item() != pytest.approx(loss.item())


@pytest.mark.parametrize("name", LOSSES)
def test_all_zero_mask_gives_zero_with_grad(name):
    prediction = noise(2, 2, 64, 64, seed=1).requires_grad_(True)
    loss = reconstruction_loss(name)(prediction, torch.zeros(2, 2, 64, 64), torch.zeros(2, 2))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.all(prediction.grad == 0)


def blobs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth images of normalised-intensity scale (about -3 .. 3), not bounded to [0, 1]."""
    image = F.avg_pool2d(noise(n, 1, size, size, seed=seed), 9, stride=1, padding=4)
    return 3 * image / image.abs().amax(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("shape", [(64, 64), (96, 128), (128, 128)])
def test_ms_ssim_l1_is_zero_for_identical_images_and_grows_with_noise(shape):
    target = torch.cat([blobs(2, max(shape), seed=s)[..., :shape[0], :shape[1]] for s in (1, 2)], dim=1)
    mask = torch.ones(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. pytorch-msssim skipping its smoothing at a small scale
        identical = masked_ms_ssim_l1(target, target, mask)
        losses = [masked_ms_ssim_l1(target + level * noise(*target.shape, seed=3), target, mask).item()
                  for level in (0.05, 0.2, 0.8)]
    assert identical.item() == pytest.approx(0.0, abs=1e-5)
    assert 0 < losses[0] < losses[1] < losses[2]


def test_ms_ssim_term_is_invariant_to_the_intensity_scale():
    """The SSIM term rescales each pair by the target's range: normalised intensities need no [0, 1]."""
    target = blobs(2, 64, seed=1)
    prediction = target + 0.5 * noise(2, 1, 64, 64, seed=2)
    mask = torch.ones(2, 1)
    loss = masked_ms_ssim_l1(prediction, target, mask, alpha=1.0)
    scaled = masked_ms_ssim_l1(10 * prediction + 5, 10 * target + 5, mask, alpha=1.0)
    assert loss.item() > 0.05
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-2)


def test_ms_ssim_l1_with_alpha_zero_is_l1():
    prediction, target = noise(2, 2, 64, 64, seed=1), noise(2, 2, 64, 64, seed=2)
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(masked_ms_ssim_l1(prediction, target, mask, alpha=0.0),
                               masked_l1(prediction, target, mask))


def test_ms_ssim_l1_rejects_tiny_images_and_bad_shapes():
    with pytest.raises(ValueError, match="33"):
        masked_ms_ssim_l1(noise(1, 1, 32, 64), noise(1, 1, 32, 64), torch.ones(1, 1))
    with pytest.raises(ValueError, match="mask"):
        masked_l1(noise(1, 2, 8, 8), noise(1, 2, 8, 8), torch.ones(2, 1))
    with pytest.raises(ValueError, match="target"):
        masked_l1(noise(1, 2, 8, 8), noise(1, 1, 8, 8), torch.ones(1, 2))


def test_reconstruction_loss_names():
    assert reconstruction_loss("l1") is masked_l1
    assert reconstruction_loss("ms_ssim_l1") is masked_ms_ssim_l1
    with pytest.raises(ValueError, match="loss"):
        reconstruction_loss("mse")
