"""Wide ResNet-26, the Visual Decathlon backbone (docs/method.md §10), as a `resnet.BlockNet`.

A 3x3 stem with 32 channels, three stages of four basic blocks (64, 128, 256 channels), each stage
starting with stride 2, shortcuts that average-pool 2x2 and zero-pad the new channels, and a final
BatchNorm before pooling, with no ReLU after it (what the released weights expect).  Parameter names
follow the released universal weights file (`conv1`, `bn1`, `layers.<i>.{conv1,bn1,conv2,bn2}`,
`ends_bn`, `linear`), so it loads as it is.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from resnet import BlockNet, conv_bn

STAGE_CHANNELS = (64, 128, 256)
BLOCKS_PER_STAGE = 4


class WideBasicBlock(nn.Module):
    """Two 3x3 convolutions; the shortcut halves the resolution and zero-pads channels when needed."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.reshape_shortcut = stride != 1 or in_channels != out_channels
        self.extra_channels = out_channels - in_channels

    def conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def forward_pre_relu(self, x):
        out = conv_bn(self.conv2, self.bn2, F.relu(conv_bn(self.conv1, self.bn1, x)))
        shortcut = x
        if self.reshape_shortcut:
            shortcut = F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 0, self.extra_channels))
        return out + shortcut

    def forward(self, x):
        return F.relu(self.forward_pre_relu(x))


class WideResNet(BlockNet):
    arch = 'wide_resnet26'
    block_kind = 'basic'
    head_prefixes = ('ends_bn', 'linear')
    gated_after_relu = True  # as the released Wide ResNet student, which the released task checkpoints expect

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks, in_channels = [], 32
        for channels in STAGE_CHANNELS:
            for i in range(BLOCKS_PER_STAGE):
                blocks.append(WideBasicBlock(in_channels, channels, 2 if i == 0 else 1))
                in_channels = channels
        self.layers = nn.Sequential(*blocks)
        self.ends_bn = nn.BatchNorm2d(in_channels)
        self.linear = nn.Linear(in_channels, num_classes)
        self.blocks = list(self.layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def stem_conv_bn(self):
        return self.conv1, self.bn1

    def forward_stem(self, x):
        return F.relu(conv_bn(self.conv1, self.bn1, x))

    def forward_head(self, x):
        x = fast.apply_bn(self.ends_bn, x)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
