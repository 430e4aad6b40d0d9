"""Locally aware patch features (PatchCore section 3.1): two stages, 3x3 neighbourhoods, one grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchcore_milvus.backbones import Backbone, build_backbone
from patchcore_milvus.config import Config
from patchcore_milvus.description import ExtractorDescription
from patchcore_milvus.images import NORMALIZATION_STATS, Preprocess


class PatchFeatureExtractor(nn.Module):
    """Image batch (B, 3, H, W) -> patch embeddings (B, H/8, W/8, D)."""

    def __init__(self, backbone: Backbone, target_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.target_dim = target_dim

    @property
    def dim(self) -> int:
        return self.target_dim or sum(self.backbone.channels)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.backbone(images)
        # Each patch sees its 3x3 neighbourhood; padding is left out of the average so that
        # border patches are not dimmed (defects at the image border stay visible).
        fine = F.avg_pool2d(fine, 3, stride=1, padding=1, count_include_pad=False)
        coarse = F.avg_pool2d(coarse, 3, stride=1, padding=1, count_include_pad=False)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        patches = torch.cat([fine, coarse], dim=1).permute(0, 2, 3, 1)  # (B, h, w, C)
        if self.target_dim is not None and self.target_dim != patches.shape[-1]:
            b, h, w, c = patches.shape
            pooled = F.adaptive_avg_pool1d(patches.reshape(-1, 1, c), self.target_dim)
            patches = pooled.reshape(b, h, w, self.target_dim)
        return patches.contiguous()


class FeaturePipeline:
    """Preprocessing plus extractor, and the description a bank records to refuse mismatches."""

    def __init__(self, config: Config):
        backbone = build_backbone(config.backbone, config.weights, config.seed)
        normalization = backbone.native_normalization if config.normalization == "backbone" else "imagenet"
        mean, std = NORMALIZATION_STATS[normalization]
        self.preprocess = Preprocess(config.image_size, config.center_crop, mean, std)
        self.extractor = PatchFeatureExtractor(backbone, config.target_dim).eval()
        self.description = ExtractorDescription(
            backbone=config.backbone,
            weights_sha256=backbone.weights_sha256(),
            layers=list(backbone.layers),
            image_size=config.image_size,
            center_crop=config.center_crop,
            normalization={"mean": list(mean), "std": list(std)},
            aggregation="avg_pool 3x3 stride 1, coarse map bilinear to the stride-8 grid, concat",
            target_dim=config.target_dim,
            dim=self.extractor.dim,
        )

    @property
    def dim(self) -> int:
        return self.extractor.dim

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.extractor(batch)
