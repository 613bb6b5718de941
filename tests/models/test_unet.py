"""DenseUNet and SegmenterNet: shapes, input checks, batch independence, ONNX export."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import pytest
import torch

from segassist.models.networks import DenseUNet, SegmenterNet


def test_dense_features_at_input_resolution_on_non_square_input() -> None:
    net = DenseUNet(channels=(4, 8, 16))
    x = torch.rand(2, 1, 32, 48)
    y = net(x)
    assert y.shape == (2, 4, 32, 48)
    assert net.feature_channels == 4
    assert net.size_divisor == 4


def test_forward_features_are_fine_to_coarse_and_start_with_forward() -> None:
    net = DenseUNet(channels=(4, 8, 16, 32)).eval()
    x = torch.rand(1, 1, 32, 16)
    maps = net.forward_features(x)
    assert [tuple(m.shape) for m in maps] == [(1, 4, 32, 16), (1, 8, 16, 8), (1, 16, 8, 4)]
    torch.testing.assert_close(maps[0], net(x))


def test_default_network_divisor_and_channels() -> None:
    net = DenseUNet()
    assert net.size_divisor == 16
    assert net.feature_channels == 16


def test_input_not_multiple_of_size_divisor_names_the_shape() -> None:
    net = DenseUNet(channels=(4, 8, 16))
    with pytest.raises(ValueError, match=r"\(30, 32\)"):
        net(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match="B×1"):
        net(torch.rand(1, 2, 32, 32))


def test_three_dimensional_backbone() -> None:
    net = DenseUNet(spatial_dims=3, channels=(2, 4))
    assert net(torch.rand(1, 1, 8, 8, 4)).shape == (1, 2, 8, 8, 4)


def test_features_of_a_slice_do_not_depend_on_the_rest_of_the_batch() -> None:
    # Instance norm has no batch statistics: slice-wise inference gives the training-time output.
    net = DenseUNet(channels=(4, 8, 16))
    x = torch.rand(3, 1, 16, 16)
    alone = net.eval()(x[:1])
    together = net.train()(x)[:1]
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("head", "multiscale"), [("linear", False), ("mlp", True)])
def test_segmenter_outputs_and_head_features(
    head: Literal["linear", "mlp"], multiscale: bool
) -> None:
    net = SegmenterNet(
        DenseUNet(channels=(4, 8, 16)),
        num_classes=3,
        num_clusters=5,
        head=head,
        multiscale=multiscale,
    ).eval()
    x = torch.rand(2, 1, 16, 32)
    logits, clusters = net(x)
    assert logits.shape == (2, 3, 16, 32)
    assert clusters.shape == (2, 5, 16, 32)
    features = net.head_features(x)
    assert features.shape == (2, net.head_channels, 16, 32)
    assert net.head_channels == (4 + 8 if multiscale else 4)
    # A probe trained on cached head features reproduces the network's logits.
    torch.testing.assert_close(net.seg_head(features), logits)


def test_a_pooled_segmenter_is_the_network_on_the_averaged_slice_brought_back() -> None:
    torch.manual_seed(0)
    encoder = DenseUNet(channels=(4, 8, 16))
    pooled = SegmenterNet(encoder, 3, 5, multiscale=True, pool=2).eval()
    native = SegmenterNet(encoder, 3, 5, multiscale=True).eval()
    native.load_state_dict(pooled.state_dict())  # same weights, pooling is no parameter
    assert (native.size_divisor, pooled.size_divisor) == (4, 8)
    x = torch.rand(2, 1, 16, 24)
    logits, clusters = pooled(x)
    assert logits.shape == (2, 3, 16, 24) and clusters.shape == (2, 5, 16, 24)
    # The naive reference: average 2×2 blocks by hand, run, upsample.
    averaged = x.reshape(2, 1, 8, 2, 12, 2).mean(dim=(3, 5))
    ref_logits, ref_clusters = native(averaged)
    up = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, up(ref_logits))
    torch.testing.assert_close(clusters, up(ref_clusters))
    assert pooled.head_features(x).shape == (2, pooled.head_channels, 8, 12)
    with pytest.raises(ValueError, match="pool"):
        SegmenterNet(DenseUNet(spatial_dims=3, channels=(4, 8)), 2, 4, pool=2)


def test_segmenter_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="head"):
        SegmenterNet(DenseUNet(channels=(4, 8)), 2, 4, head="transformer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        SegmenterNet(DenseUNet(channels=(4, 8)), 1, 4)


def test_segmenter_exports_to_onnx_with_dynamic_shapes(tmp_path: Path) -> None:
    net = SegmenterNet(DenseUNet(channels=(4, 8, 16)), 3, 5, head="mlp", multiscale=True).eval()
    path = tmp_path / "model.onnx"
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}
    torch.onnx.export(
        net,
        (torch.rand(2, 1, 32, 48),),
        str(path),
        input_names=["image"],
        output_names=["logits", "clusters"],
        dynamic_shapes={"x": dims},
        dynamo=True,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 1, 64, 16)  # another batch size and a non-square shape
    outputs = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = net(x)
    for got, ref in zip(outputs, expected, strict=True):
        assert got.shape == tuple(ref.shape)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
