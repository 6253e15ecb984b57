"""The shape half of the ShapesWorld judge: a small CNN trained on renders of the world.

Trained by ``scripts/train_shapesworld.py judge`` on freshly rendered images with random blur,
noise and colour jitter (:func:`degrade`), so it also reads the softer images a diffusion model
draws. Its accuracy on held-out clean renders is in the model card.

Example:
    >>> import torch
    >>> model = ShapeClassifier()
    >>> model(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ShapeClassifier(nn.Module):
    """CNN over ``(N, 3, 64, 64)`` images in 0..1; returns logits over ``world.SHAPES``."""

    def __init__(self, width: int = 16, n_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width), _block(4 * width, 4 * width)
        )
        self.head = nn.Linear(8 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Subtract the border colour so the network sees "object vs background", not absolute colour.
        bg = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1).median(dim=-1).values
        h = self.features(x - bg[..., None, None])
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.head(h)


def elastic(x: torch.Tensor, generator: torch.Generator, max_px: float = 4.0) -> torch.Tensor:
    """Smooth random warp (a 4x4 displacement grid, bicubic-upsampled) of up to ``max_px`` pixels.

    Diffusion models draw shapes with wobbly edges; the judge learns to see through that.
    """
    n, _, h, w = x.shape
    amp = torch.rand(n, 1, 1, 1, generator=generator) * (2 * max_px / h)
    coarse = (torch.rand(n, 2, 4, 4, generator=generator) * 2 - 1) * amp
    flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1).unsqueeze(0) + flow
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random smooth warp, blur, noise and colour jitter, per image, for training a robust judge."""
    n = x.shape[0]
    warp = torch.rand(n, generator=generator) < 0.6
    if warp.any():
        x = x.clone()
        x[warp] = elastic(x[warp], generator)
    sigma = torch.rand(n, generator=generator) * 1.6
    out = torch.empty_like(x)
    coords = torch.arange(-3, 4, dtype=x.dtype)
    for i in range(n):
        s = float(sigma[i])
        if s < 0.2:
            out[i] = x[i]
            continue
        k = torch.exp(-(coords**2) / (2 * s * s))
        k = k / k.sum()
        img = x[i : i + 1]
        img = F.conv2d(F.pad(img, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7).repeat(3, 1, 1, 1), groups=3)
        img = F.conv2d(F.pad(img, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1).repeat(3, 1, 1, 1), groups=3)
        out[i] = img[0]
    gain = 1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    noise = torch.randn(x.shape, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) * 0.06)
    return (out * gain + noise).clamp(0, 1)
