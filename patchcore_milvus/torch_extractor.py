"""The reference extractor in torch (PatchCore section 3.1: two stages, 3x3 neighbourhoods, one
grid), and its export to ONNX, the format banks carry and stations run (see features.py)."""

from __future__ import annotations

import io
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from patchcore_milvus.backbones import Backbone, build_backbone
from patchcore_milvus.config import Config
from patchcore_milvus.description import ExtractorDescription, aggregation
from patchcore_milvus.errors import ConfigError
from patchcore_milvus.images import NORMALIZATION_STATS


class PatchFeatureExtractor(nn.Module):
    """Image batch (B, 3, H, W) -> patch embeddings (B, H/8, W/8, D)."""

    def __init__(self, backbone: Backbone, target_dim: int | None = None, border: str = "zeros"):
        super().__init__()
        self.backbone = backbone
        self.target_dim = target_dim
        self.count_padding = border == "zeros"

    @property
    def dim(self) -> int:
        return self.target_dim or sum(self.backbone.channels)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.backbone(images)
        # Each patch sees its 3x3 neighbourhood (eq. 2, p = 3). At the border the padding is
        # left out of the average ("inside") or counted as zeros ("zeros", as anomalib does).
        fine = F.avg_pool2d(fine, 3, stride=1, padding=1, count_include_pad=self.count_padding)
        coarse = F.avg_pool2d(coarse, 3, stride=1, padding=1, count_include_pad=self.count_padding)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        patches = torch.cat([fine, coarse], dim=1).permute(0, 2, 3, 1)  # (B, h, w, C)
        if self.target_dim is not None and self.target_dim != patches.shape[-1]:
            b, h, w, c = patches.shape
            pooled = F.adaptive_avg_pool1d(patches.reshape(-1, 1, c), self.target_dim)
            patches = pooled.reshape(b, h, w, self.target_dim)
        return patches.contiguous()


def build(
    config: Config, image_shape: tuple[int, int] | None = None
) -> tuple[PatchFeatureExtractor, ExtractorDescription]:
    """The configured backbone with its weights, cut and aggregated, and its description (for
    images resized to `image_shape`, height and width; None: `image_size` squared)."""
    backbone = build_backbone(config.backbone, config.weights, config.seed)
    native = sum(backbone.channels)  # the patch dims before any pooling
    if config.target_dim is not None and config.target_dim > native:
        raise ConfigError(
            f"target_dim {config.target_dim} is more than the {native} dims {config.backbone}'s "
            "patches have: pooling can only reduce them; give at most that, or leave target_dim out"
        )
    normalization = backbone.native_normalization if config.normalization == "backbone" else "imagenet"
    mean, std = NORMALIZATION_STATS[normalization]
    extractor = PatchFeatureExtractor(backbone, config.target_dim, config.border).eval()
    description = ExtractorDescription(
        backbone=config.backbone,
        weights_sha256=backbone.weights_sha256(),
        layers=list(backbone.layers),
        image_size=config.image_size,
        center_crop=config.center_crop,
        normalization={"mean": list(mean), "std": list(std)},
        aggregation=aggregation(config.border),
        target_dim=config.target_dim,
        dim=extractor.dim,
        image_shape=None if image_shape is None else list(image_shape),
        tile=config.tile,
    )
    return extractor, description


def export_onnx(extractor: PatchFeatureExtractor, input_shape: tuple[int, int]) -> bytes:
    """The extractor as an ONNX model (opset 17) for (batch, 3, height, width) float32 inputs of
    `input_shape`, any batch size. ONNX Runtime reproduces torch's outputs to about 2e-5 (tested)."""
    example = torch.zeros(1, 3, *input_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; the new one needs onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            extractor,
            (example,),
            buffer,
            input_names=["images"],
            output_names=["patches"],
            dynamic_axes={"images": {0: "batch"}, "patches": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()
