"""The Inception network of FID: pytorch-fid's variant of InceptionV3, up to its 2048-d pool3 features.

FID as papers report it is computed on the features of one network: TensorFlow's Inception graph
of 2015-12-05, which pytorch-fid ported to PyTorch (``pt_inception-2015-12-05-6726825d.pth``). It
differs from torchvision's InceptionV3 in three places, kept here: the average pools of the
Mixed_5*, Mixed_6b-e and Mixed_7b blocks leave the zero padding out of the mean
(``count_include_pad=False``, TensorFlow's pooling), the last block (Mixed_7c) pools its branch
with a 3x3 max pool instead, and the classifier has 1008 classes.

Images go in as (N, 3, H, W) in [-1, 1] (minidiff's image range; pytorch-fid takes [0, 1] and
scales it), are resized bilinearly to 299x299 (``align_corners=False``, as pytorch-fid's
``F.interpolate``) and run through the blocks; the features are the global average of the last
block, (N, 2048). Without the resize the network runs on any input of at least 75x75.

Every convolution is followed by a batch norm with its stored statistics (inference only) and a
ReLU (``BasicConv2d``); the norm is folded into the convolution's weight and bias on each call.
Attribute names are the keys of the weights file (torchvision's spelling), so it loads by name.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from .. import functional as F
from ..backend import DEFAULT_DTYPE
from ..nn import Linear, Module, Parameter
from ..nn.layers import without_init

FID_SIZE = 299  # the input size the FID network was trained and is evaluated at
FEATURES = 2048
MIN_SIZE = 75  # the smallest input every valid convolution and stride-2 pool of the network accepts


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class ConvWeight(Module):
    """The bias-free ``conv`` of a BasicConv2d, with any (kH, kW): the blocks use 1x7, 7x1, 1x3
    and 3x1 kernels. Initialized as PyTorch does (uniform in +-1/sqrt(fan_in)); ``init=False``
    leaves it unfilled, for weights loaded right after."""

    def __init__(self, in_channels, out_channels, kernel_size, rng=None, dtype=None, init=True):
        kh, kw = _pair(kernel_size)
        shape = (out_channels, in_channels, kh, kw)
        dtype = dtype or DEFAULT_DTYPE
        if not init:
            self.weight = Parameter(np.empty(shape, dtype=dtype))
            return
        bound = 1 / math.sqrt(in_channels * kh * kw)
        rng = rng if rng is not None else np.random.default_rng()
        self.weight = Parameter(rng.uniform(-bound, bound, size=shape), dtype=dtype)


class BatchNorm2d(Module):
    """Batch norm at inference: (x - running_mean) / sqrt(running_var + eps) * weight + bias per channel."""

    def __init__(self, channels, eps=1e-3, dtype=None):
        dtype = dtype or DEFAULT_DTYPE
        self.eps = eps
        self.weight = Parameter(np.ones(channels), dtype=dtype)
        self.bias = Parameter(np.zeros(channels), dtype=dtype)
        self.running_mean = Parameter(np.zeros(channels), dtype=dtype)
        self.running_var = Parameter(np.ones(channels), dtype=dtype)

    def scale_shift(self):
        scale = self.weight / F.sqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale


class BasicConv2d(Module):
    """conv (no bias) -> batch norm (eps 1e-3, as TensorFlow's graph) -> ReLU."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, rng=None, dtype=None, init=True
    ):
        self.conv = ConvWeight(in_channels, out_channels, kernel_size, rng=rng, dtype=dtype, init=init)
        self.bn = BatchNorm2d(out_channels, dtype=dtype)
        self.stride, self.padding = _pair(stride), _pair(padding)

    def forward(self, x):
        # the norm folded into the convolution: one conv with a bias, no pass over the output
        scale, shift = self.bn.scale_shift()
        weight = self.conv.weight * F.reshape(scale, (-1, 1, 1, 1))
        return F.relu(F.conv2d(x, weight, shift, stride=self.stride, padding=self.padding))


def _avg_pool_3x3(x):
    # TensorFlow's average pool: the zero padding does not count in the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(Module):
    """Mixed_5b-d (35x35): 1x1, 5x5, double 3x3 and pooled branches, concatenated."""

    def __init__(self, in_channels, pool_features, rng=None, dtype=None, init=True):
        kw = dict(rng=rng, dtype=dtype, init=init)
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, **kw)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, **kw)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return F.concat([b1, b5, b3, bp], axis=1)


class InceptionB(Module):
    """Mixed_6a: 35x35 -> 17x17 by a stride-2 3x3, a double 3x3 and a max pool."""

    def __init__(self, in_channels, rng=None, dtype=None, init=True):
        kw = dict(rng=rng, dtype=dtype, init=init)
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return F.concat([b3, bd, F.max_pool2d(x, 3, stride=2)], axis=1)


class FIDInceptionC(Module):
    """Mixed_6b-e (17x17): 7x7 convolutions factored into 1x7 and 7x1."""

    def __init__(self, in_channels, channels_7x7, rng=None, dtype=None, init=True):
        kw = dict(rng=rng, dtype=dtype, init=init)
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, **kw)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, **kw)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3):
            bd = conv(bd)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return F.concat([b1, b7, bd, bp], axis=1)


class InceptionD(Module):
    """Mixed_7a: 17x17 -> 8x8 by stride-2 convolutions and a max pool."""

    def __init__(self, in_channels, rng=None, dtype=None, init=True):
        kw = dict(rng=rng, dtype=dtype, init=init)
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return F.concat([b3, b7, F.max_pool2d(x, 3, stride=2)], axis=1)


class FIDInceptionE(Module):
    """Mixed_7b and 7c (8x8): 3x3 convolutions split into parallel 1x3 and 3x1 halves. The pooled
    branch averages (without the padding) in Mixed_7b and takes the 3x3 maximum in Mixed_7c, as
    the TensorFlow graph does (pytorch-fid's FIDInceptionE_1 and FIDInceptionE_2)."""

    def __init__(self, in_channels, max_pool=False, rng=None, dtype=None, init=True):
        kw = dict(rng=rng, dtype=dtype, init=init)
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, **kw)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, **kw)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = F.concat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = F.concat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return F.concat([b1, b3, bd, self.branch_pool(pooled)], axis=1)


class InceptionV3(Module):
    """The FID Inception network: ``features(images)`` gives the (N, 2048) pool3 features."""

    def __init__(self, num_classes=1008, rng=None, dtype=None, init=True):
        """``init=False`` leaves every weight unfilled (for ``metrics.load_inception``, which loads
        them all right after: drawing 24M random numbers first costs most of a second)."""
        rng = rng if rng is not None else np.random.default_rng()
        kw = dict(rng=rng, dtype=dtype, init=init)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32, **kw)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64, **kw)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128, **kw)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = FIDInceptionE(1280, **kw)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True, **kw)
        with contextlib.nullcontext() if init else without_init():
            # in the weights file; features() stops before it
            self.fc = Linear(FEATURES, num_classes, rng=rng, dtype=dtype)

    def forward(self, images, resize=True):
        return self.features(images, resize=resize)

    def features(self, images, resize=True):
        """Images (N, 3, H, W) in [-1, 1] -> pool3 features (N, 2048). ``resize=False`` skips the
        bilinear resize to 299x299 (then H and W must be at least 75)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3: images must have shape (N, 3, H, W), got {images.shape}")
        x = F.resize_bilinear(images, FID_SIZE) if resize else images
        if min(x.shape[2:]) < MIN_SIZE:
            raise ValueError(f"InceptionV3: images of {x.shape[2:]} are below {MIN_SIZE}x{MIN_SIZE}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b):
            x = block(x)
        for block in (
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return F.mean(x, axis=(2, 3))  # the global average pool: pool3

    def logits(self, images, resize=True):
        """The 1008 class scores of the classifier on top of the features."""
        return self.fc(self.features(images, resize=resize))
