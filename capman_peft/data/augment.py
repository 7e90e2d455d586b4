"""The paper's +ADA baseline (Karras et al. 2020 applied to diffusion): geometric augmentation of the training images,
with the augmentation given to the model as extra conditioning so that it does not leak into samples, which are
drawn with the "no augmentation" conditioning (all zeros).

The form is the one the CBDM authors' code uses for its ADA baseline: k-diffusion's `KarrasAugmentationPipeline`
with a fixed probability 0.12 per transformation group (no adaptive tuning of the probability, unlike ADA for GANs),
the 9-number conditioning vector, and a bias-free linear embedding of it added to the time embedding. Where we had to
choose: the later k-diffusion version's centred transforms and rotations in [-pi, pi) (its earlier one rotated about
the top-left corner by [0, pi)), and the warp runs batched on the training device with torch's bicubic
``grid_sample`` and mirrored borders, where k-diffusion warps each image on the CPU with skimage's cubic spline.
The parameters are drawn with the step's other random choices (`capman_peft.randomness.draw_augmentation`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENT_CONDITION_DIM = 9
SCALE_BASE = 2**0.2  # a_scale: isotropic scale 2^(0.2 * N(0, 1))
ANISOTROPY_BASE = 2**0.2  # a_aniso
TRANSLATION = 1 / 8  # a_trans: translation N(0, 1) / 8 of the image size


def augment_condition(params: torch.Tensor) -> torch.Tensor:
    """k-diffusion's conditioning vector (B, 9) of the parameters a0..a7: [a0, a1, a2, cos a3 - 1, sin a3,
    a5 cos a4, a5 sin a4, a6, a7]; all zeros for no augmentation."""
    a0, a1, a2, a3, a4, a5, a6, a7 = params.unbind(1)
    return torch.stack([a0, a1, a2, a3.cos() - 1, a3.sin(), a5 * a4.cos(), a5 * a4.sin(), a6, a7], dim=1)


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    cos, sin = theta.cos(), theta.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def _diagonal(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(torch.stack([x, y], -1))


def augment_matrices(params: torch.Tensor) -> torch.Tensor:
    """The affine maps (B, 2, 3) from input to output image, in coordinates centred on the image and scaled so that
    its border is at ±1 (``grid_sample``'s with ``align_corners=False``): x-flip · y-flip · scale · rotation(-a3) ·
    anisotropy · translation, applied right to left as in k-diffusion."""
    a0, a1, a2, a3, a4, a5, a6, a7 = params.float().unbind(1)
    one = torch.ones_like(a0)
    linear = (
        _diagonal(1 - 2 * a0, one)
        @ _diagonal(one, 1 - 2 * a1)
        @ _diagonal(SCALE_BASE**a2, SCALE_BASE**a2)
        @ _rotation(-a3)
        @ _rotation(a4)
        @ _diagonal(ANISOTROPY_BASE**a5, ANISOTROPY_BASE ** (-a5))
        @ _rotation(-a4)
    )
    # k-diffusion translates by a_trans * size * N(0, 1) pixels: 2 * a_trans * N(0, 1) in these units.
    shift = 2 * TRANSLATION * torch.stack([a6, a7], -1)
    return torch.cat([linear, (linear @ shift[..., None])], dim=2)


def augment_images(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """`images` (B, C, S, S) warped by :func:`augment_matrices`: output pixel p samples the input at M⁻¹p (bicubic,
    mirrored at the border). Rows whose parameters are all 0 come back unchanged."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"ADA needs square images, got {tuple(images.shape[-2:])}")
    forward = augment_matrices(params)
    full = torch.cat([forward, forward.new_tensor([0.0, 0.0, 1.0]).expand(len(forward), 1, 3)], dim=1)
    inverse = torch.linalg.inv(full)[:, :2].to(images.dtype)
    grid = F.affine_grid(inverse, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    identity = (params == 0).all(dim=1).reshape(-1, 1, 1, 1)
    return torch.where(identity, images, warped)
