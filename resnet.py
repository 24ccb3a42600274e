"""ResNet teachers with torchvision's parameter names, returning logits and every block's output.

`BlockNet` is the layout NetTailor needs from any backbone: a stem, a flat sequence of residual
blocks whose pre-activation sum can be read (`forward_pre_relu`), and a task-specific head.
`wide_resnet.py` reuses it for the Visual Decathlon backbone.
"""
import contextlib
import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError

ARCHS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
}


_fold_frozen_bn = True


@contextlib.contextmanager
def unfolded():
    """Within this context `conv_bn` always calls its two modules (for hooks that count layers)."""
    global _fold_frozen_bn
    before, _fold_frozen_bn = _fold_frozen_bn, False
    try:
        yield
    finally:
        _fold_frozen_bn = before


def conv_bn(conv, bn, x):
    """bn(conv(x)).  When both are frozen (BatchNorm in eval mode, no parameter trained, as NetTailor's
    universal blocks), one convolution with the BatchNorm folded in, refolded only when a tensor changes;
    on the CPU, over maps smaller than its kernel, one matrix product (`dense_conv_matrix`), and 3x3 ones over
    small maps as Winograd F(4x4, 3x3) (`winograd_conv3x3`) where that pays."""
    if not _fold_frozen_bn or bn.training or conv.weight.requires_grad or bn.weight.requires_grad:
        return bn(conv(x))
    sources = fold_bn_sources(conv, bn)
    weight, bias = cached_derivation(conv, '_folded_bn', sources, lambda: fold_bn(conv, bn))
    n, _, h, w = x.shape
    kh, kw = conv.kernel_size
    same_size = conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and kh % 2 and kw % 2 \
        and conv.padding == (kh // 2, kw // 2)
    cpu_same_size = x.device.type == 'cpu' and same_size
    if cpu_same_size and h * w < kh * kw:
        matrix, dense_bias = cached_derivation(
            conv, f'_dense_{h}x{w}', sources, lambda: (dense_conv_matrix(weight, h, w).t(), bias.repeat_interleave(h * w)))
        return torch.addmm(dense_bias, x.flatten(1), matrix).view(n, -1, h, w)
    # Winograd's transforms amplify rounding (bfloat16: 10% error, against 0.3% for the direct convolution)
    precise = x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled('cpu')
    if cpu_same_size and (kh, kw) == (3, 3) and precise and winograd_pays(h, w, conv.in_channels, conv.out_channels):
        filters = cached_derivation(conv, '_winograd', sources, lambda: winograd_filters(weight))
        return winograd_conv3x3(x, filters, bias)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def dense_conv_matrix(weight, h, w):
    """The (C_out*h*w, C_in*h*w) matrix of a stride-1 'same' convolution over h x w maps (NCHW flattening).

    Over maps smaller than the kernel most taps multiply padding: ResNet's 3x3 convolutions on 2x2 maps (64 px
    inputs, last stage) do 2.25x fewer multiply-adds as this matrix, and the input gradient, a matrix product
    too, took 4-5 ms instead of 13-18 ms (32x512x2x2 on 2 CPU cores; oneDNN's is slowest there)."""
    c_out, c_in, kh, kw = weight.shape
    matrix = weight.new_zeros(c_out, h, w, c_in, h, w)
    for y_out in range(h):
        for x_out in range(w):
            for y_in in range(h):
                for x_in in range(w):  # tap (dy, dx) links input (y_in, x_in) to output (y_out, x_out)
                    dy, dx = y_in - y_out + kh // 2, x_in - x_out + kw // 2
                    if 0 <= dy < kh and 0 <= dx < kw:
                        matrix[:, y_out, x_out, :, y_in, x_in] = weight[:, :, dy, dx]
    return matrix.reshape(c_out * h * w, c_in * h * w)


# Winograd F(4x4, 3x3) (Lavin & Gray, CVPR 2016): a 4x4 output tile from a 6x6 input tile in 36 products
# instead of 144.  Y = A^T [(G g G^T) * (B^T d B)] A for filter g and input tile d.
WINOGRAD_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
               (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
              (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
WINOGRAD_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def winograd_pays(h, w, c_in, c_out):
    """Whether `winograd_conv3x3` beats oneDNN's direct 3x3 convolution on the CPU over h x w maps.  Measured (2
    cores, batch 32, forward): 1.3-2.5x faster at 4x4 maps (64-512 channels) and 8x8 ones (128-512), 1.1-1.9x at
    7x7 (128-512); slower or even where the tiles are mostly padding (3x3, 5x5, 6x6 maps) or its dense tile
    transforms, which run memory-bound, outweigh the products saved (8x8 with 64 channels, 14x14 and larger)."""
    tiles = -(-h // 4) * -(-w // 4)
    transforms = 36 * tiles * h * w * (c_in + c_out)
    saved = (9 * h * w - 36 * tiles) * c_in * c_out
    return h * w >= 12 * tiles and transforms < 0.4 * saved


def winograd_filters(weight):
    """The (36, C_in, C_out) Winograd-domain filters G g G^T of a 3x3 `weight` (computed in float64; 4x the
    weight's memory)."""
    g = torch.tensor(WINOGRAD_G, dtype=torch.float64, device=weight.device)
    filters = g @ weight.double() @ g.t()  # (C_out, C_in, 6, 6)
    return filters.flatten(2).permute(2, 1, 0).to(weight.dtype).contiguous()


@functools.lru_cache(maxsize=None)
def winograd_transforms(h, w, dtype, device):
    """(to_tiles, from_tiles): the (36*T, h*w) matrix taking an h x w map, zero-padded by one, to the Winograd
    domain of its T 4x4 output tiles (rows ordered position, tile) and the (h*w, 36*T) one taking it back."""
    def one_axis(size):
        tiles = -(-size // 4)
        bt, at = torch.tensor(WINOGRAD_BT, dtype=torch.float64), torch.tensor(WINOGRAD_AT, dtype=torch.float64)
        to_tiles = torch.zeros(6, tiles, size, dtype=torch.float64)  # input pixel 4t + k - 1 is tap k of tile t
        from_tiles = torch.zeros(size, 6, tiles, dtype=torch.float64)  # output pixel 4t + k is row k of tile t
        for t in range(tiles):
            for k in range(6):
                if 0 <= 4 * t + k - 1 < size:
                    to_tiles[:, t, 4 * t + k - 1] = bt[:, k]
            for k in range(4):
                if 4 * t + k < size:
                    from_tiles[4 * t + k, :, t] = at[k]
        return to_tiles, from_tiles

    (to_h, from_h), (to_w, from_w) = one_axis(h), one_axis(w)
    to_tiles = torch.einsum('aty,bsx->abtsyx', to_h, to_w).reshape(-1, h * w)
    from_tiles = torch.einsum('yat,xbs->yxabts', from_h, from_w).reshape(h * w, -1)
    return to_tiles.to(dtype=dtype, device=device), from_tiles.to(dtype=dtype, device=device)


def winograd_conv3x3(x, filters, bias):
    """F.conv2d(x, weight, bias, padding=1) for `filters = winograd_filters(weight)`, as three matrix products:
    pixels to tiles, one product per Winograd position, tiles to pixels.  Relative error ~1e-5 in float32.
    The result is laid out (h, w, n, c) in memory (NCHW shape): a following one reads it without a copy."""
    n, c, h, w = x.shape
    to_tiles, from_tiles = winograd_transforms(h, w, x.dtype, x.device)
    tiles = to_tiles @ x.permute(2, 3, 0, 1).reshape(h * w, n * c)  # (36*T, n*c)
    products = torch.bmm(tiles.view(36, -1, c), filters)  # (36, T*n, C_out)
    out = torch.addmm(bias.repeat(n), from_tiles, products.view(-1, n * filters.shape[2]))
    return out.view(h, w, n, -1).permute(2, 3, 0, 1)


def fold_bn(conv, bn):
    """(weight, bias) of one convolution equal to conv followed by eval-mode bn."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.running_mean if conv.bias is None else bn.running_mean - conv.bias
    return conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias - shift * scale


def fold_bn_sources(conv, bn):
    """The tensors `fold_bn` reads."""
    convs = (conv.weight,) if conv.bias is None else (conv.weight, conv.bias)
    return convs + (bn.weight, bn.bias, bn.running_mean, bn.running_var)


FOLD_CACHE_PREFIXES = ('_folded', '_dense_', '_winograd')  # the names `cached_derivation` is given here


def forget_folds(module):
    """Drop every cached derivation of `module` and its submodules (BatchNorm running statistics updated in
    training mode do not bump their version counters, so the cache cannot notice them)."""
    for m in module.modules():
        for name in [name for name in m.__dict__ if name.startswith(FOLD_CACHE_PREFIXES)]:
            del m.__dict__[name]


def cached_derivation(owner, name, sources, derive):
    """derive() (run without autograd), cached on `owner` as `name` while the `sources` tensors keep their
    storage and in-place version (load_state_dict, .to() and optimizer steps all change one of them)."""
    key = tuple((t.data_ptr(), t._version) for t in sources)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = key, derive()
        owner.__dict__[name] = cached
    return cached[1]


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

    Subclasses define `forward_stem`, `blocks` (list of modules with `forward_pre_relu`),
    `forward_head`, `head_prefixes` (names of the task-specific head modules), `block_kind`
    ('basic' or 'bottleneck': which proxy NetTailor attaches) and `arch` (a name).
    """
    gated_after_relu = False  # NetTailor's gate scales the block's sum before its final ReLU (METHOD 3)

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
        if arch not in ARCHS:
            raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}, wide_resnet26")
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

    def forward_stem(self, x):
        """On the CPU the stem runs channels-last (its 7x7 convolution and max-pool took 17 ms instead of 29 ms
        for 32x3x64x64; PyTorch's NCHW max-pool is the slow part) and hands the blocks an NCHW tensor."""
        if x.device.type == 'cpu':
            x = x.contiguous(memory_format=torch.channels_last)
        return self.maxpool(F.relu(conv_bn(self.conv1, self.bn1, x))).contiguous()

    def forward_head(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def read_state_dict(path, what='pre-trained weights'):
    """Load a state dict from a local file (plain, or wrapped under 'state_dict' / 'model')."""
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated or not a torch file
        raise UserError(f"cannot read {what} from {path}: {str(e).splitlines()[0]}") from None
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state


def load_backbone_weights(model, pretrained):
    """Fill everything but the final classifier from `pretrained` ('imagenet' or a local file)."""
    if pretrained is None:
        return model
    if pretrained == 'imagenet':
        if not hasattr(model, 'imagenet_weights'):
            raise UserError(f"torchvision has no ImageNet weights for {model.arch}; pass its weights file "
                            "with --pretrained (checkpoints/download_models.py fetches the released one)")
        state = model.imagenet_weights()
    else:
        state = read_state_dict(pretrained)
    classifier = model.head_prefixes[-1] + '.'
    own = model.state_dict()
    state = {k.removeprefix('module.'): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    expected = [k for k in own if not k.startswith(classifier)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in expected if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        problem = (f"missing {missing[:3]}" if missing else
                   f"unexpected {unexpected[:3]}" if unexpected else f"wrong shape for {wrong_shape[:3]}")
        raise UserError(f"pre-trained weights {pretrained} do not fit {model.arch}: {problem}")
    model.load_state_dict(state, strict=False)
    return model


def create_teacher(arch, num_classes, pretrained=None):
    """A teacher network for `num_classes`: a ResNet here, or 'wide_resnet26' (wide_resnet.py).

    `pretrained` is None (random), 'imagenet' (torchvision's weights) or a local state-dict file."""
    if arch == 'wide_resnet26':
        from wide_resnet import WideResNet  # imports this module: load it only when asked for
        model = WideResNet(num_classes)
    else:
        model = ResNet(arch, num_classes)
    return load_backbone_weights(model, pretrained)
