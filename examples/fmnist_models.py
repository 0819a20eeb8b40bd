"""The float architectures the project trains on Fashion-MNIST (1x28x28 inputs).

``resnet20``: gluoncv's CIFAR ResNet-20 (v1).  ``mobilenetv2``: a small MobileNet-v2
(inverted residuals, depthwise 3x3 convs, ReLU6 written as ``clip(0, 6)`` as Gluon does),
the architecture where per-tensor INT8 weights lose accuracy and DFQ matters.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mxnet.gluon import HybridBlock, nn  # noqa: E402

from quant_ops.zoo import get_model  # noqa: E402


def _conv_bn(out: nn.HybridSequential, channels: int, kernel: int, stride: int = 1,
             groups: int = 1, relu6: bool = True) -> None:
    out.add(nn.Conv2D(channels, kernel, stride, kernel // 2, groups=groups, use_bias=False),
            nn.BatchNorm())
    if relu6:
        out.add(ReLU6())


class ReLU6(HybridBlock):
    def hybrid_forward(self, F, x):
        return F.clip(x, 0, 6)


class InvertedResidual(HybridBlock):
    """1x1 expand -> depthwise 3x3 -> 1x1 linear project, with a skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, **kw):
        super().__init__(**kw)
        self.skip = stride == 1 and cin == cout
        with self.name_scope():
            self.body = nn.HybridSequential()
            hidden = cin * expand
            if expand != 1:
                _conv_bn(self.body, hidden, 1)
            _conv_bn(self.body, hidden, 3, stride, groups=hidden)
            _conv_bn(self.body, cout, 1, relu6=False)

    def hybrid_forward(self, F, x):
        y = self.body(x)
        return x + y if self.skip else y


class MobileNetV2Small(HybridBlock):
    # (expansion, channels, repeats, first stride): MobileNet-v2's table cut for 28x28 inputs
    # (the stem has stride 2: 14x14 -> 7x7 -> 4x4)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 2, 2))

    def __init__(self, classes: int = 10, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.features = nn.HybridSequential()
            _conv_bn(self.features, 32, 3, stride=2)
            cin = 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    self.features.add(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            _conv_bn(self.features, 256, 1)
            self.features.add(nn.GlobalAvgPool2D(), nn.Flatten())
            self.output = nn.Dense(classes)

    def hybrid_forward(self, F, x):
        return self.output(self.features(x))


def build(arch: str) -> HybridBlock:
    if arch == "resnet20":
        return get_model("cifar_resnet20_v1", classes=10)
    if arch == "mobilenetv2":
        return MobileNetV2Small(prefix="mobilenetv2_")
    raise ValueError(f"unknown architecture {arch!r}: resnet20 or mobilenetv2")
