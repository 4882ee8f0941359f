"""ResNets written from scratch, in torchvision's layout, with the S3L *small architecture* switch.

Implements ResNet-18/34/50 (He et al. 2016, arXiv 1512.03385; v1.5: the stride of a bottleneck sits
on its 3x3 conv) with parameter names, shapes and initialisation equal to torchvision's, so a
state_dict moves between this file and torchvision/timm with no renaming. Two switches:
  * `conv5=False` removes `layer4` (conv5_x): S3L's *small architecture* (Cao & Wu 2021, arXiv
    2103.13559; the official custom_resnet). The feature width becomes 256 x expansion.
  * `small_stem=True` uses a 3x3 stride-1 `conv1` and no max-pool, for inputs of 64 px and below
    (the CIFAR variant used by SimCLR and the public SSL libraries).
Public names in reading order: BasicBlock, Bottleneck, ResNet, resnet18/34/50, ARCHS, macs.
"""
import torch
import torch.nn as nn


# ----- residual blocks (He et al. 2016, Fig. 5) ---------------------------------------------------

def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity or 1x1 projection shortcut (ResNet-18/34).

    x: (N, in_planes, H, W) -> (N, planes, H / stride, W / stride).
    """
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand x4 (ResNet-50).

    x: (N, in_planes, H, W) -> (N, 4 * planes, H / stride, W / stride).
    """
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# ----- the network --------------------------------------------------------------------------------

class ResNet(nn.Module):
    """ResNet backbone + optional classifier, torchvision layout (conv1, bn1, layer1..4, fc).

    x: (N, 3, H, W) -> (N, num_classes) logits, or (N, feature_dim) pooled features when num_classes
    = 0 (then `fc` is an Identity, which the SSL methods replace with their projection head, as MoCo
    does). conv5=False drops `layer4` (S3L small architecture); small_stem=True: 3x3/1 conv1, no
    max-pool.
    """

    def __init__(self, block, layers, num_classes: int = 0, conv5: bool = True,
                 small_stem: bool = False):
        super().__init__()
        self.in_planes = 64
        # a 32 px image through the 7x7/2 + max-pool stem would leave 1x1 maps at conv5
        if small_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        # small architecture: without conv5 the output stride is 16 and the width 256 x expansion
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2) if conv5 else None
        self.feature_dim = (512 if conv5 else 256) * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():  # torchvision's init; Linear keeps PyTorch's default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.in_planes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features: (N, 3, H, W) -> (N, feature_dim); any H, W (global pooling)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.layer4 is not None:
            x = self.layer4(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def resnet18(num_classes: int = 0, conv5: bool = True, small_stem: bool = False) -> ResNet:
    """ResNet-18: 11,689,512 parameters with a 1000-way fc (torchvision's count)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, conv5, small_stem)


def resnet34(num_classes: int = 0, conv5: bool = True, small_stem: bool = False) -> ResNet:
    """ResNet-34: 21,797,672 parameters with a 1000-way fc."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, conv5, small_stem)


def resnet50(num_classes: int = 0, conv5: bool = True, small_stem: bool = False) -> ResNet:
    """ResNet-50 v1.5: 25,557,032 parameters with a 1000-way fc."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, conv5, small_stem)


ARCHS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


# ----- cost accounting (S3L compares accuracy against training cost) ------------------------------

@torch.no_grad()
def macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one forward pass of one (3, input_size, input_size) image.

    Counted from the real Conv2d and Linear layers the image passes through (BN, ReLU, pooling and
    the residual additions are not MACs). ResNet-50: about 4.09 G at 224 px, 1.08 G at 112 px.
    """
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()  # eval mode: counting must not touch the BatchNorm running statistics
    try:
        param = next(model.parameters())
        model(torch.zeros(1, 3, input_size, input_size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
