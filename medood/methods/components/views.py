"""Batched random views for self-supervised training, and the shifting transformations of negatives.

Positive views (Rafiee thesis ch. 5 and 6; torchvision semantics, batched in torch so one call
augments a whole batch on the device):

- ``random_resized_crop``: ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3))`` composed with
  ``RandomRotation(degrees)`` (zero fill) and ``RandomHorizontalFlip(p)`` into one affine
  ``grid_sample`` per image (thesis P Tab. 2: crop, then rotation, then flip).
- ``color_jitter``: ``ColorJitter(brightness, contrast, 0, 0)``: brightness ``x * b``, contrast
  ``c * x + (1 - c) * mean(x)``, ``b, c ~ U[1 - s, 1 + s]``, clipped to [0, 1]. torchvision applies
  the two in a random order; here brightness always comes first (the two commute up to clipping).
- ``gaussian_blur`` and ``solarize``: DINO's extra photometric views (thesis ch. 6 builds on DINO's
  pipeline, I Sec. 4). Saturation, hue and grayscale are no-ops on grey images repeated to RGB, so
  they are not implemented.

Negative views (thesis I Sec. 3.2 and 4.1, M Sec. 2.2): a shifting transformation ``R`` applied
*before* the positive augmentation ``T``, ``x- = T(R(x))``:

- ``rot``: rotation by r ~ U{90, 180, 270} degrees (exact, ``torch.rot90``);
- ``rot360``: rotation by r ~ U(0, 360) degrees (bilinear, zero fill);
- ``perm4`` / ``perm16``: the image cut into 2 x 2 / 4 x 4 equal patches, randomly permuted;
- ``pixperm``: all pixels randomly permuted (the same permutation for every channel);
- ``identity``: the image itself (auxiliary images used raw: "ImgN", "DTI").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SHIFTS = ("none", "identity", "rot", "rot360", "perm4", "perm16", "pixperm")

# ImageNet statistics (torchvision's Normalize as in MoCo / DINO); grey inputs use their channel means.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalise(image: Tensor) -> Tensor:
    """``Normalize(IMAGENET_MEAN, IMAGENET_STD)``; a 1-channel image uses the means of the three."""
    c = image.shape[1]
    mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=image.dtype)
    std = torch.tensor(IMAGENET_STD, device=image.device, dtype=image.dtype)
    if c != 3:
        mean, std = mean.mean().expand(c), std.mean().expand(c)
    return (image - mean.view(1, c, 1, 1)) / std.view(1, c, 1, 1)


def random_resized_crop(
    image: Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rotation_degrees: float = 0.0,
    hflip_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One random crop (area fraction in ``scale``, aspect in ``ratio``), rotation and flip per image.

    The crop is resampled to ``size`` x ``size`` bilinearly. torchvision retries a crop that does not
    fit 10 times before a centre crop; here the sides are clipped to the image instead (same support).
    """
    b, device = image.shape[0], image.device
    kw = {"device": device, "generator": generator}
    area = torch.empty(b, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(b, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the image side
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, **kw) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates, crop inside the image
    cy = (torch.rand(b, **kw) * 2 - 1) * (1 - h)
    angle = (torch.rand(b, **kw) * 2 - 1) * math.radians(rotation_degrees)
    flip = torch.where(torch.rand(b, **kw) < hflip_prob, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    # input point = centre + diag(w, h) @ Rot(angle) @ diag(flip, 1) @ output point
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = w * cos * flip, -w * sin, cx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = h * sin * flip, h * cos, cy
    grid = F.affine_grid(theta, [b, image.shape[1], size, size], align_corners=False)
    return F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(
    image: Tensor, brightness: float, contrast: float, prob: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """``ColorJitter(brightness, contrast, 0, 0)`` applied with probability ``prob``; values stay in [0, 1]."""
    b, device = image.shape[0], image.device
    shape = (b, 1, 1, 1)
    bright = torch.empty(shape, device=device).uniform_(1 - brightness, 1 + brightness, generator=generator)
    contr = torch.empty(shape, device=device).uniform_(1 - contrast, 1 + contrast, generator=generator)
    out = (image * bright).clamp(0, 1)
    grey_mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (contr * out + (1 - contr) * grey_mean).clamp(0, 1)
    if prob >= 1:
        return out
    keep = torch.rand(shape, device=device, generator=generator) < prob
    return torch.where(keep, out, image)


def gaussian_blur(
    image: Tensor, prob: float, sigma: tuple[float, float] = (0.1, 2.0), generator: torch.Generator | None = None
) -> Tensor:
    """Gaussian blur with sigma ~ U(sigma) in pixels, applied with probability ``prob`` (DINO's ``GaussianBlur``)."""
    if prob <= 0:
        return image
    b, c, hgt, wid = image.shape
    device = image.device
    s = torch.empty(b, device=device).uniform_(sigma[0], sigma[1], generator=generator)
    radius = max(1, min(int(math.ceil(3 * sigma[1])), (min(hgt, wid) - 1) // 2))
    x = torch.arange(-radius, radius + 1, device=device, dtype=image.dtype)
    kernel = torch.exp(-(x[None] ** 2) / (2 * s[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, k)
    weight = kernel.repeat_interleave(c, 0)  # one kernel per (image, channel)
    flat = image.reshape(1, b * c, hgt, wid)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, weight.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(flat, weight.view(b * c, 1, -1, 1), groups=b * c)
    blurred = flat.view(b, c, hgt, wid)
    keep = torch.rand(b, 1, 1, 1, device=device, generator=generator) < prob
    return torch.where(keep, blurred, image)


def solarize(image: Tensor, prob: float, threshold: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """``RandomSolarize(threshold, p)`` on [0, 1] images: pixels above the threshold are inverted."""
    if prob <= 0:
        return image
    keep = torch.rand(image.shape[0], 1, 1, 1, device=image.device, generator=generator) < prob
    return torch.where(keep & (image >= threshold), 1 - image, image)


# -- shifting transformations R (negatives) --------------------------------------------------------


def shift(image: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """The shifting transformation ``R`` of the thesis' negatives, drawn independently per image."""
    if kind == "identity":
        return image
    if kind == "rot":
        k = torch.randint(1, 4, (image.shape[0],), device=image.device, generator=generator)
        return rotate90(image, k)
    if kind == "rot360":
        angle = torch.rand(image.shape[0], device=image.device, generator=generator) * 2 * math.pi
        return rotate(image, angle)
    if kind in ("perm4", "perm16"):
        return permute_patches(image, 2 if kind == "perm4" else 4, generator)
    if kind == "pixperm":
        return permute_pixels(image, generator)
    raise ValueError(f"unknown shift {kind!r}; known: {', '.join(SHIFTS)}")


def rotate90(image: Tensor, k: Tensor) -> Tensor:
    """Each image rotated by ``k[i]`` quarter turns (exact; square images)."""
    out = image.clone()
    for turns in (1, 2, 3):
        idx = (k == turns).nonzero().flatten()
        if len(idx):
            out[idx] = torch.rot90(image[idx], turns, dims=(-2, -1))
    return out


def rotate(image: Tensor, angle: Tensor) -> Tensor:
    """Each image rotated by ``angle[i]`` radians about its centre (bilinear, zero fill)."""
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(image.shape[0], 2, 3, device=image.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def permute_patches(image: Tensor, grid: int, generator: torch.Generator | None = None) -> Tensor:
    """Perm-N (N = grid**2): equal patches randomly permuted, a new permutation per image."""
    b, c, h, w = image.shape
    if h % grid or w % grid:
        raise ValueError(f"patch permutation needs a side divisible by {grid}; got {h} x {w}")
    ph, pw = h // grid, w // grid
    patches = image.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    order = torch.argsort(torch.rand(b, grid * grid, device=image.device, generator=generator), dim=1)
    patches = torch.gather(patches, 1, order.view(b, -1, 1, 1, 1).expand_as(patches))
    return patches.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def permute_pixels(image: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Pix.Perm: all pixel positions shuffled, one permutation per image shared by its channels."""
    b, c = image.shape[:2]
    flat = image.reshape(b, c, -1)
    order = torch.argsort(torch.rand(b, flat.shape[-1], device=image.device, generator=generator), dim=1)
    return torch.gather(flat, 2, order[:, None].expand_as(flat)).reshape(image.shape)
