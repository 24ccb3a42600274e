"""Faster, exact equivalents of the layers NetTailor runs frozen. Nothing here changes what is computed.

The models (resnet.py, wide_resnet.py, nettailor.py) are written as plain PyTorch modules; they reach
this module through two seams only:

* `freeze(network)` / `thaw(network)` fold each convolution + BatchNorm pair of a network whose layers
  are frozen (the teacher while the student trains, the universal blocks whenever their BatchNorms are in
  eval mode) into one convolution, and `frozen_conv_bn` runs such a folded pair; `resnet.conv_bn` calls
  it instead of `bn(conv(x))` once a pair is folded.
* `fold_proxies` turns a layer's proxies, BatchNorms and gates included, into one 1x1 convolution for
  evaluation (NetTailor folds them when it enters eval mode), and `gated_proxy` runs a proxy in training
  with its gate folded into its last BatchNorm.

Folds are computed at those explicit points, never guessed from tensor versions: a network whose
weights or statistics change after `freeze` must be frozen again (NetTailor does it whenever its
mode changes and when a task pack is attached), which updates the folded tensors in place. Folded
tensors are non-persistent buffers, so `.to()` moves them and checkpoints never hold them.

On the CPU, where it measured faster on both the AVX2 and the AVX-512 machines this project runs on
(docs/performance.md): the ResNet stem and the proxies' max-pooling run channels-last, 1x1 convolutions
on maps of 8x8 or more run as batched matrix products, and proxies on smaller maps as (pixel, channel)
matrices; deploy.py's tailored network uses the first two as well.  Graphs traced by torch.export keep
the plain layers. Tests: tests/test_fast.py (each path equals the plain layers, in float64 where exactness
is the point).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils


# ----- frozen convolution + BatchNorm pairs -----
def fold_bn(conv, bn):
    """(weight, bias) of one convolution equal to conv followed by eval-mode bn."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.running_mean if conv.bias is None else bn.running_mean - conv.bias
    return conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias - shift * scale


@torch.no_grad()
def freeze(network):
    """Fold every (conv, bn) pair of `network.conv_bn_pairs()`, as they are now.  Folding a folded pair again
    writes into its folded tensors, so that a CUDA graph captured on them (engine.TrainStep) stays valid."""
    for conv, bn in network.conv_bn_pairs():
        for name, value in zip(('folded_weight', 'folded_bias'), fold_bn(conv, bn)):
            folded = conv._buffers.get(name)
            if folded is not None and (folded.shape, folded.dtype, folded.device) == (value.shape, value.dtype,
                                                                                        value.device):
                folded.copy_(value)
            else:
                conv.register_buffer(name, value.detach().clone(), persistent=False)


def thaw(network):
    """Undo `freeze`: the pairs run as their two modules again."""
    for conv, _ in network.conv_bn_pairs():
        conv._buffers.pop('folded_weight', None)
        conv._buffers.pop('folded_bias', None)


def is_folded(conv):
    return 'folded_weight' in conv._buffers


def frozen_conv_bn(conv, x):
    """bn(conv(x)) of a folded pair: one convolution."""
    return F.conv2d(x, conv.folded_weight, conv.folded_bias, conv.stride, conv.padding, conv.dilation, conv.groups)


# ----- memory layouts -----
def eager_on_cpu(x):
    """Whether x is on the CPU, outside torch.export: exported graphs (deploy.py) keep the plain layers, whose
    kernels each runtime chooses for itself."""
    return x.device.type == 'cpu' and not torch.compiler.is_exporting()


def channels_last_on_cpu(x):
    """x in channels-last layout on the CPU, where PyTorch's max-pool (and the stem's 7x7 convolution) run
    several times faster that way; unchanged elsewhere.  Its gradient flows back in x's own layout, so that
    the operations that receive it do not run on mixed layouts (slower)."""
    return _ChannelsLast.apply(x) if eager_on_cpu(x) else x


class _ChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.nchw = x.is_contiguous()
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous() if ctx.nchw else grad


# ----- proxies -----
def pointwise_conv(x, weight, bias=None):
    """F.conv2d(x, weight, bias) for a 1x1 `weight`; on the CPU, over maps of 8x8 or more, as a batched matrix
    product (oneDNN's NCHW 1x1 kernels are slower there)."""
    n, c, h, w = x.shape
    if not eager_on_cpu(x) or h * w < 64:
        return F.conv2d(x, weight, bias)
    out_c = weight.shape[0]
    weight = weight.view(out_c, c).expand(n, out_c, c)
    x = x.reshape(n, c, h * w)
    if bias is None:
        return torch.bmm(weight, x).view(n, out_c, h, w)
    return torch.baddbmm(bias.view(1, out_c, 1).expand(n, out_c, h * w), weight, x).view(n, out_c, h, w)


def apply_bn(bn, x):
    """bn(x), the module called as such (count_flops hooks it), except in training under torchrun with several
    processes: then `batch_norm`, on the statistics of the whole batch across processes."""
    return batch_norm(bn, x) if bn.training and utils.world_size() > 1 else bn(x)


def batch_norm(bn, x, scale=None):
    """`bn(x)` with its affine parameters multiplied by `scale` (a gate folded in for free).  In training under
    torchrun with several processes its statistics are the whole batch's, across processes
    (utils.synced_batch_norm)."""
    weight, bias = bn.weight, bn.bias
    if scale is not None:
        weight, bias = weight * scale, bias * scale
    if bn.training:
        bn.num_batches_tracked.add_(1)
        if utils.world_size() > 1:
            return utils.synced_batch_norm(x, bn.running_mean, bn.running_var, weight, bias, bn.momentum, bn.eps)
    return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, bn.training, bn.momentum, bn.eps)


def gated_proxy(proxy, pooled, gate):
    """gate * proxy.body(pooled), the gate folded into the last BatchNorm.  On the CPU maps under 8x8 run as
    (pixel, channel) matrices, faster there than the NCHW kernels."""
    n, c, h, w = pooled.shape
    as_matrix = eager_on_cpu(pooled) and h * w < 64
    x = pooled.permute(0, 2, 3, 1).reshape(n * h * w, c) if as_matrix else pooled
    *layers, last_bn = proxy.body
    for m in layers:
        if isinstance(m, nn.Conv2d):
            x = x @ m.weight.flatten(1).t() if as_matrix else pointwise_conv(x, m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            x = batch_norm(m, x)
        else:
            x = m(x)
    x = batch_norm(last_bn, x, scale=gate)
    return x.view(n, h, w, -1).permute(0, 3, 1, 2) if as_matrix else x


def fold_proxies(proxies, gates):
    """(weight, bias) of one 1x1 convolution over the channel-stacked inputs of `proxies` (single-conv proxies,
    BatchNorms in eval mode) equal to sum_j gates[j] * proxies[j](input_j)."""
    weights, biases = [], []
    for proxy, gate in zip(proxies, gates):
        weight, bias = fold_bn(*proxy.body)
        weights.append(gate * weight)
        biases.append(gate * bias)
    return torch.cat(weights, dim=1), sum(biases)
