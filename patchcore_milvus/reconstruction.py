"""The seed's two reconstruction baselines as torch modules: an AutoEncoder and a GAN (GANomaly-like).

Both learn to reconstruct good images; a defect is what they reconstruct badly. The layers are
the seed's lists. Shapes for an input of S pixels a side (S a multiple of 16):

    AutoEncoder   (N, 3, S, S) in [0, 1] -> 4 x [Conv2d, BatchNorm2d, ReLU, MaxPool2d] -> (N, 256, S/16, S/16)
                  -> 4 x ConvTranspose2d (x2) -> Sigmoid -> (N, 3, S, S) in [0, 1]
    Generator     (N, 3, S, S) in [-1, 1] -> the same encoder -> Flatten -> Linear (latent) -> Linear
                  -> Reshape (N, 256, S/16, S/16) -> 4 x ConvTranspose2d -> Tanh -> (N, 3, S, S)
    Discriminator (N, 3, S, S) -> 4 x [Conv2d (/2), InstanceNorm2d, LeakyReLU] -> Flatten -> Linear
                  -> Sigmoid -> (N, 1): the probability that the image is a real good one
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS = (32, 64, 128, 256)


def _encoder() -> nn.Sequential:
    """(N, 3, S, S) -> (N, 256, S/16, S/16)."""
    layers: list[nn.Module] = []
    previous = 3
    for channels in CHANNELS:
        layers += [nn.Conv2d(previous, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)]
        previous = channels
    return nn.Sequential(*layers)


def _decoder(last: nn.Module) -> nn.Sequential:
    """(N, 256, S/16, S/16) -> (N, 3, S, S), each ConvTranspose2d doubling the side."""
    layers: list[nn.Module] = []
    widths = (*reversed(CHANNELS[:-1]), 3)
    previous = CHANNELS[-1]
    for k, channels in enumerate(widths):
        layers.append(nn.ConvTranspose2d(previous, channels, 4, stride=2, padding=1))
        if k < len(widths) - 1:
            layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        previous = channels
    return nn.Sequential(*layers, last)


class AutoEncoder(nn.Module):
    """Convolutional encoder-decoder; trained on MSE to reconstruct its input."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = _encoder(), _decoder(nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, S, S) in [0, 1] -> its reconstruction, same shape and range."""
        return self.decoder(self.encoder(x))


class Generator(nn.Module):
    """Encoder, a linear bottleneck of `latent` numbers, decoder: the image through a narrow code."""

    def __init__(self, size: int, latent: int = 256) -> None:
        super().__init__()
        self.grid = size // 16
        flat = CHANNELS[-1] * self.grid * self.grid
        self.encoder = nn.Sequential(_encoder(), nn.Flatten(), nn.Linear(flat, latent))
        self.expand = nn.Linear(latent, flat)
        self.decoder = _decoder(nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, S, S) in [-1, 1] -> its reconstruction, same shape and range."""
        code = self.expand(self.encoder(x))
        return self.decoder(code.view(len(x), CHANNELS[-1], self.grid, self.grid))


class Discriminator(nn.Module):
    """Real good image or the generator's reconstruction."""

    def __init__(self, size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for k, channels in enumerate(CHANNELS):
            layers.append(nn.Conv2d(previous, channels, 4, stride=2, padding=1))
            if k > 0:  # no normalisation on the first layer, as in DCGAN
                layers.append(nn.InstanceNorm2d(channels, affine=True))
            layers.append(nn.LeakyReLU(0.2))
            previous = channels
        grid = size // 16
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(CHANNELS[-1] * grid * grid, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, S, S) in [-1, 1] -> (N, 1) probabilities."""
        return self.net(x)
