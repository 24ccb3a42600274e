"""ResNet teachers with torchvision's parameter names, returning logits and every block's output.

`BlockNet` is the layout NetTailor needs from any backbone: a stem, a flat sequence of residual
blocks whose pre-activation sum can be read (`forward_pre_relu`), and a task-specific head.
`wide_resnet.py` reuses it for the Visual Decathlon backbone; `backbones.py` builds either.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from utils import UserError

ARCHS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
}


def conv_bn(conv, bn, x):
    """bn(conv(x)); a pair folded by `fast.freeze` runs as the single equivalent convolution."""
    return fast.frozen_conv_bn(conv, x) if fast.is_folded(conv) else fast.apply_bn(bn, conv(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut; `forward_pre_relu` stops before the final ReLU."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)] + ([tuple(self.downsample)] if self.downsample else [])

    def forward_pre_relu(self, x):
        out = F.relu(conv_bn(self.conv1, self.bn1, x))
        out = conv_bn(self.conv2, self.bn2, out)
        shortcut = x if self.downsample is None else conv_bn(*self.downsample, x)
        return out + shortcut

    def forward(self, x):
        return F.relu(self.forward_pre_relu(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision), 1x1 expand by 4, plus a shortcut."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or inplanes != width:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False),
                                            nn.BatchNorm2d(width))

    def conv_bn_pairs(self):
        pairs = [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
        return pairs + ([tuple(self.downsample)] if self.downsample else [])

    def forward_pre_relu(self, x):
        out = F.relu(conv_bn(self.conv1, self.bn1, x))
        out = F.relu(conv_bn(self.conv2, self.bn2, out))
        out = conv_bn(self.conv3, self.bn3, out)
        shortcut = x if self.downsample is None else conv_bn(*self.downsample, x)
        return out + shortcut

    def forward(self, x):
        return F.relu(self.forward_pre_relu(x))


class BlockNet(nn.Module):
    """A stem, a flat list of residual blocks and a head; `forward` returns (logits, block outputs).

    Subclasses define `forward_stem`, `blocks` (list of modules with `forward_pre_relu` and
    `conv_bn_pairs`), `stem_conv_bn` (the stem's (conv, bn) pair), `forward_head`, `head_prefixes`
    (names of the task-specific head modules), `block_kind` ('basic' or 'bottleneck': which proxy
    NetTailor attaches) and `arch` (a name).
    """
    gated_after_relu = False  # NetTailor's gate scales the block's sum before its final ReLU (docs/method.md §3)

    def conv_bn_pairs(self, blocks=None):
        """The (conv, bn) pairs of the stem and of `blocks` (default: every block), for `fast.freeze`."""
        return [self.stem_conv_bn()] + [pair for block in (self.blocks if blocks is None else blocks)
                                        for pair in block.conv_bn_pairs()]

    def universal_path(self, l, x):
        """Block l's output as NetTailor's layer l gates it (`gated_after_relu`: after the block's ReLU)."""
        block = self.blocks[l]
        return block(x) if self.gated_after_relu else block.forward_pre_relu(x)

    def forward(self, x):
        x = self.forward_stem(x)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return self.forward_head(x), outputs


class ResNet(BlockNet):
    """ImageNet ResNet whose `state_dict` keys are exactly torchvision's."""
    head_prefixes = ('fc',)

    def __init__(self, arch='resnet34', num_classes=1000):
        super().__init__()
        self.arch = arch
        self.block_kind, stage_sizes = ARCHS[arch]
        block = BasicBlock if self.block_kind == 'basic' else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for stage, (planes, size) in enumerate(zip((64, 128, 256, 512), stage_sizes), start=1):
            stage_blocks = []
            for i in range(size):
                stride = 2 if stage > 1 and i == 0 else 1
                stage_blocks.append(block(inplanes, planes, stride))
                inplanes = planes * block.expansion
            setattr(self, f'layer{stage}', nn.Sequential(*stage_blocks))
        self.fc = nn.Linear(inplanes, num_classes)
        self.blocks = [b for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for b in stage]
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def imagenet_weights(self):
        """ImageNet-1k (V1) weights through torchvision's weights API (downloaded and cached once)."""
        import torchvision
        weights = torchvision.models.get_model_weights(self.arch).IMAGENET1K_V1
        try:
            return weights.get_state_dict(progress=True)
        except Exception as e:
            raise UserError(f"could not fetch ImageNet weights for {self.arch} ({e.__class__.__name__}); "
                            "offline, pass a local torchvision state dict with --pretrained FILE") from None

    def stem_conv_bn(self):
        return self.conv1, self.bn1

    def forward_stem(self, x):
        x = fast.channels_last_on_cpu(x)
        return self.maxpool(F.relu(conv_bn(self.conv1, self.bn1, x))).contiguous()  # blocks take NCHW

    def forward_head(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
