"""Dense U-Net backbone returning a per-pixel feature map at input resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

__all__ = ["DenseUNet"]


class DenseUNet(nn.Module):
    r"""U-Net whose output is the dense feature map of its last decoder block.

    The backbone of both self-supervised objectives (Pix2Rep: Seince et al., "Dense Self-Supervised
    Learning for Medical Image Segmentation"; IIC-boundary: Peng et al., "Boundary-aware
    Information Maximization for Self-supervised Medical Image Segmentation"). Built from MONAI's
    ``basic_unet`` blocks: a ``TwoConv`` stem, ``len(channels) - 1`` max-pool ``Down`` blocks and as
    many transposed-convolution ``UpCat`` blocks with skip connections. There is no output
    convolution: heads (projection, cluster, segmentation) are 1×1 convolutions on top.

    Normalisation is instance norm (with affine parameters). It has no running statistics, so the
    network behaves identically in train and eval mode and with any batch size — self-supervised
    batches are small on a CPU, a frozen encoder is used for linear probing, and the exported model
    segments one slice at a time. It exports to a single ONNX ``InstanceNormalization`` op.

    Default channels ``(16, 32, 64, 128, 256)`` were chosen by timing the eval forward pass of an
    8×1×256×256 batch on 2 CPU threads (torch 2.13): 0.50-0.60 s, i.e. ~6-7 s for a 256×256×100
    volume slice-wise. ``(16, 32, 64, 128)`` is no faster (0.45-0.72 s: the full-resolution
    layers dominate) with half the receptive field; ``(32, 64, 128, 256)`` takes 1.1 s and
    ``(8, 16, 32, 64, 128)`` 0.21 s with only 8 feature channels. Pix2Rep used 64…2048 channels,
    Peng et al. 32…512; scale up on a GPU.

    Args:
        spatial_dims: number of spatial dimensions (2 for slices, 3 for volumes).
        in_channels: number of input channels.
        channels: output channels of the stem and of each encoder level, fine to coarse; the
            decoder mirrors them, so the feature map has ``channels[0]`` channels.
        act: activation type and arguments (MONAI factory syntax).
        norm: normalisation type and arguments (MONAI factory syntax).
        dropout: dropout ratio inside the convolution blocks.

    Shapes:
        ``forward``: ``B×in_channels×H×W[×D]`` -> ``B×channels[0]×H×W[×D]``, where every spatial
        size is a multiple of :attr:`size_divisor`.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {tuple(channels)}.")
        if any(c < 2 for c in channels):
            raise ValueError(f"every entry of channels must be >= 2, got {tuple(channels)}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.channels = tuple(int(c) for c in channels)
        self.stem = TwoConv(spatial_dims, in_channels, self.channels[0], act, norm, True, dropout)
        self.downs = nn.ModuleList(
            Down(spatial_dims, c_in, c_out, act, norm, True, dropout)
            for c_in, c_out in zip(self.channels[:-1], self.channels[1:], strict=True)
        )
        # Decoder, coarse to fine: upsample level i+1 and merge the skip of level i.
        self.ups = nn.ModuleList(
            UpCat(spatial_dims, c_deep, c_skip, c_skip, act, norm, True, dropout, is_pad=False)
            for c_skip, c_deep in reversed(
                list(zip(self.channels[:-1], self.channels[1:], strict=True))
            )
        )

    @property
    def feature_channels(self) -> int:
        """Channels ``C`` of the dense feature map (the last decoder block)."""
        return self.channels[0]

    @property
    def size_divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this (``2**downsamplings``)."""
        return 2 ** (len(self.channels) - 1)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape B×{self.in_channels}×spatial ({self.spatial_dims} spatial "
                f"dims), got {tuple(x.shape)}."
            )
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            bad = [s for s in x.shape[2:] if s % self.size_divisor]
            if bad:
                raise ValueError(
                    f"input spatial shape {tuple(x.shape[2:])} is not a multiple of "
                    f"size_divisor={self.size_divisor}; pad it first."
                )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decoder feature maps, fine to coarse.

        Args:
            x: input ``B×in_channels×H×W[×D]``.

        Returns:
            ``len(channels) - 1`` maps; map ``i`` is ``B×channels[i]×(H/2^i)×(W/2^i)``. Map 0 is
            what :meth:`forward` returns.
        """
        self._check_input(x)
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        decoded = []
        for up in self.ups:
            y = up(y, skips.pop())
            decoded.append(y)
        return decoded[::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features ``B×C×H×W[×D]`` of the last decoder block, at input resolution."""
        return self.forward_features(x)[0]
