"""fast.py: every faster path equals the plain layers it stands for (float64 where exactness is the point)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from backbones import create_teacher
from nettailor import Proxy, count_flops


def randomize_batchnorms(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in network.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.2)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 1.5 + 0.5)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50', 'wide_resnet26'])
def test_frozen_network_computes_the_plain_one(float64, arch):
    torch.manual_seed(0)
    network = create_teacher(arch, 4).eval()
    randomize_batchnorms(network)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain_logits, plain_outputs = network(x)
        fast.freeze(network)
        calls = []
        network.blocks[1].bn1.register_forward_hook(lambda *args: calls.append(1))
        logits, outputs = network(x)
    assert not calls  # folded: the BatchNorm module never ran
    assert torch.allclose(logits, plain_logits, rtol=1e-12, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(outputs, plain_outputs))
    assert not any(k.startswith('folded') or '.folded' in k for k in network.state_dict())  # never checkpointed
    with pytest.raises(ValueError, match='thaw'):
        count_flops(network, lambda: network(x))
    fast.thaw(network)
    with torch.no_grad():
        network(x)
    assert calls  # the pair runs as its two modules again
    assert count_flops(network, lambda: network(x)) > 0


def test_freezing_again_updates_the_folded_tensors_in_place():
    """A CUDA graph captured on the folded tensors (engine.TrainStep) stays valid when a mode change refolds."""
    torch.manual_seed(0)
    network = create_teacher('resnet18', 4).eval()
    fast.freeze(network)
    conv = network.blocks[2].conv2
    before = conv.folded_weight.data_ptr(), conv.folded_bias.data_ptr()
    randomize_batchnorms(network, seed=3)
    fast.freeze(network)
    assert (conv.folded_weight.data_ptr(), conv.folded_bias.data_ptr()) == before
    weight, bias = fast.fold_bn(conv, network.blocks[2].bn2)
    assert torch.equal(conv.folded_weight, weight) and torch.equal(conv.folded_bias, bias)
    network.double()  # another dtype: folded afresh
    fast.freeze(network)
    assert conv.folded_weight.dtype == torch.float64


def test_fold_bn_with_a_conv_bias(float64):
    conv, bn = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4).eval()
    randomize_batchnorms(bn)
    x = torch.randn(2, 3, 8, 8)
    weight, bias = fast.fold_bn(conv, bn)
    assert torch.allclose(F.conv2d(x, weight, bias), bn(conv(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('size', [4, 8, 16])
def test_pointwise_conv_equals_conv2d(float64, size):
    x = torch.randn(3, 6, size, size, requires_grad=True)
    weight = torch.randn(5, 6, 1, 1, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    grad = torch.randn(3, 5, size, size)
    for b in (None, bias):
        ours = fast.pointwise_conv(x, weight, b)
        expected = F.conv2d(x, weight, b)
        assert torch.allclose(ours, expected)
        inputs = [x, weight] + ([b] if b is not None else [])
        assert all(torch.allclose(a, e) for a, e in zip(torch.autograd.grad(ours, inputs, grad),
                                                         torch.autograd.grad(expected, inputs, grad)))


@pytest.mark.parametrize('hidden', [None, 16])
@pytest.mark.parametrize('size', [2, 4, 8, 16])
@pytest.mark.parametrize('training', [True, False])
def test_gated_proxy_equals_gate_times_the_proxy(float64, hidden, size, training):
    """Its gate folded into the last BatchNorm, (pixel, channel) matrices on small maps: same values, same
    gradients, same running statistics as gate * proxy(x)."""
    torch.manual_seed(0)
    proxy, reference = Proxy(6, 10, 1, hidden), Proxy(6, 10, 1, hidden)
    randomize_batchnorms(proxy)
    reference.load_state_dict(proxy.state_dict())
    proxy.train(training), reference.train(training)
    x = torch.randn(4, 6, size, size, requires_grad=True)
    gate = torch.tensor(0.7, requires_grad=True)
    ours, expected = fast.gated_proxy(proxy, x, gate), gate * reference(x)
    assert torch.allclose(ours, expected)
    grad = torch.randn_like(expected)
    mine = torch.autograd.grad(ours, [x, gate, *proxy.parameters()], grad)
    theirs = torch.autograd.grad(expected, [x, gate, *reference.parameters()], grad)
    assert all(torch.allclose(a, b) for a, b in zip(mine, theirs))
    statistics = zip(proxy.state_dict().values(), reference.state_dict().values())
    assert all(torch.allclose(a, b, rtol=1e-12) for a, b in statistics)


def test_folded_proxies_equal_the_sum_of_gated_proxies(float64):
    torch.manual_seed(0)
    proxies = [Proxy(c, 8, 1).eval() for c in (4, 6, 8)]
    for proxy in proxies:
        randomize_batchnorms(proxy, seed=len(proxies))
    inputs = [torch.randn(2, c, 5, 5) for c in (4, 6, 8)]
    gates = torch.tensor([0.2, 0.5, 0.3])
    weight, bias = fast.fold_proxies(proxies, gates)
    expected = sum(g * proxy(x) for g, proxy, x in zip(gates, proxies, inputs))
    assert torch.allclose(F.conv2d(torch.cat(inputs, dim=1), weight, bias), expected)


def test_channels_last_pooling_equals_max_pool():
    proxy = Proxy(4, 8, stride=2)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    pooled = proxy.pool(fast.channels_last_on_cpu(x))
    assert torch.equal(pooled, F.max_pool2d(x, 3, 2, 1))
    assert pooled.is_contiguous(memory_format=torch.channels_last) == (x.device.type == 'cpu')
    grad = torch.randn_like(pooled)
    found, = torch.autograd.grad(pooled, x, grad)
    expected, = torch.autograd.grad(F.max_pool2d(x, 3, 2, 1), x, grad)
    assert torch.equal(found, expected)
    assert found.is_contiguous()  # in the node's own layout: what receives it runs on one layout
