"""Real-valued shortcuts around binary convs (Bi-Real Net, Liu et al. 2018; ReActNet, Liu et al. 2020).

``binarize_model`` rewrites ``norm(conv(x))`` into ``norm(conv(x)) + RealShortcut(x)`` for each binary conv
whose output goes straight into a normalization layer, with that norm initialised to 0 while untrained, so
the binary branch grows in from a real-valued identity path. Without it, a chain of binary convs with no
identity path around each is chaotic at initialisation: a 5 % input perturbation leaves the features of
torchvision's mobilenet_v2, googlenet and shufflenet_v2, binarized, uncorrelated with the unperturbed ones
(cosine 0.00-0.01; 0.37-0.50 for the float models), and their loss does not fall.

The shortcut maps ``x`` (``C_in`` channels) to the conv output's shape without parameters: average pooling
by the conv's stride, then the channels as ReActNet does: tiled when ``C_out > C_in``, averaged over groups
when ``C_in`` is a multiple of ``C_out``, otherwise every ``C_in / C_out``-th channel. Around a centered conv
(one that thresholds a max-pooled input at its channel mean, ``BinaryLayer.center_input``) the shortcut
carries the centered input ``x - m`` too: the mean of a max-pool output is positive and grows with every
pool, so an uncentered path saturates the next hardtanh (vgg11_bn stayed at chance; squeezenet1_0's features
at its classifier were a constant +1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ovsw.layers import centering_mean, subtract_per_channel


def shortcut_fits(conv: nn.Conv2d) -> bool:
    """Whether a pooled, channel-mapped copy of ``conv``'s input has the shape of its output: odd kernel sizes
    with ``(k - 1) / 2`` zero padding (``1x7`` with ``(0, 3)`` too), no dilation, equal strides (the output is
    then ``ceil(H / stride)`` by ``ceil(W / stride)``)."""
    if not isinstance(conv.padding, tuple) or conv.dilation != (1, 1) or conv.stride[0] != conv.stride[1]:
        return False
    return all(k % 2 == 1 and p == (k - 1) // 2 for k, p in zip(conv.kernel_size, conv.padding, strict=True))


class RealShortcut(nn.Module):
    """``x`` -> the conv output's shape: ``avg_pool(stride)`` then a fixed channel map. No parameters, no
    state-dict entries. A ``centered`` one first subtracts the conv's threshold ``m`` as the conv does: the
    batch's channel mean in training, the ``mean`` it is given (the conv's running ``input_mean``) in eval."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, centered: bool = False) -> None:
        super().__init__()
        if min(in_channels, out_channels, stride) < 1:
            raise ValueError(f"RealShortcut needs positive sizes, got {in_channels=}, {out_channels=}, {stride=}.")
        self.in_channels, self.out_channels, self.stride, self.centered = in_channels, out_channels, stride, centered
        self.groups = in_channels // out_channels if in_channels % out_channels == 0 else 1
        if self.groups == 1 and in_channels != out_channels:
            index = torch.arange(out_channels) % in_channels if out_channels > in_channels else (
                torch.arange(out_channels) * in_channels // out_channels)
            self.register_buffer("index", index, persistent=False)
        else:
            self.index = None

    @classmethod
    def for_conv(cls, conv: nn.Conv2d) -> RealShortcut:
        return cls(conv.in_channels, conv.out_channels, conv.stride[0], getattr(conv, "input_mean", None) is not None)

    def forward(self, x: Tensor, mean: Tensor | None = None) -> Tensor:
        if self.centered != (mean is not None):
            raise ValueError("a centered RealShortcut needs the conv's running input mean (forward(x, mean)) and an "
                             "uncentered one takes none; it is called from the graph binarize_model wrote.")
        if mean is not None:
            x = subtract_per_channel(x, centering_mean(x, mean, x.ndim - 3, self.training), x.ndim - 3)
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        if self.groups > 1:  # channel j averages j, j + C_out, j + 2 C_out, ...
            return x.unflatten(-3, (self.groups, self.out_channels)).mean(-4)
        return x if self.index is None else x.index_select(-3, self.index)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}" + (", centered" if self.centered else "")
