"""Teachers, the NetTailor student, complexity, distillation, pruning and task packs (docs/method.md §3-7)."""
import argparse
import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fast
import nettailor
from backbones import create_teacher
from nettailor import NetTailor, count_flops, create_student, distillation_loss, reference_layer, two_pass_loss
from utils import UserError


def tiny_student(max_skip=3, num_classes=5, seed=0, arch='resnet18', task_bn_stats=True):
    torch.manual_seed(seed)
    return create_student(arch, num_classes, max_skip=max_skip, input_size=32, task_bn_stats=task_bn_stats)


def randomize_task_state(student, seed=1):
    """Gates, proxies and BN statistics away from their initial values, so tests see real mixing."""
    g = torch.Generator(student.gate_logits.device).manual_seed(seed)
    with torch.no_grad():
        student.gate_logits.copy_(torch.randn(student.gate_logits.shape, generator=g, device=g.device))
        for proxy_list in student.proxies:
            for m in proxy_list.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0, 0.1, generator=g)
                    m.running_mean.normal_(0, 0.1, generator=g)
                    m.running_var.uniform_(0.5, 1.5, generator=g)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'resnet50'])
def test_teacher_matches_torchvision(arch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(num_classes=7).eval()
    teacher = create_teacher(arch, 7).eval()
    assert list(teacher.state_dict()) == list(reference.state_dict())
    teacher.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, outputs = teacher(x)
        assert torch.allclose(logits, reference(x), atol=1e-5)
    assert len(outputs) == {'resnet18': 8, 'resnet34': 16, 'resnet50': 16}[arch]
    assert all((o >= 0).all() for o in outputs)  # after the block's ReLU


def test_teacher_loads_local_torchvision_file_and_rejects_bad_ones(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / 'r18.pth'
    torch.save(reference.state_dict(), path)
    teacher = create_teacher('resnet18', 3, pretrained=str(path))
    assert torch.equal(teacher.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert teacher.fc.out_features == 3
    with pytest.raises(UserError, match='do not fit resnet34'):
        create_teacher('resnet34', 3, pretrained=str(path))
    with pytest.raises(UserError, match='not found'):
        create_teacher('resnet18', 3, pretrained=str(tmp_path / 'missing.pth'))
    path.write_bytes(path.read_bytes()[:1000])  # torch's reason, of several sentences, cut to its first
    with pytest.raises(UserError, match=r'is unreadable: truncated or not a PyTorch file \(PytorchStreamReader failed '
                                        r'reading zip archive: failed finding central directory\); replace it'):
        create_teacher('resnet18', 3, pretrained=str(path))
    path.write_bytes(b'')  # zero bytes: an exception without a message
    with pytest.raises(UserError, match=r'weights .* is unreadable: truncated or not a PyTorch file \(EOFError'):
        create_teacher('resnet18', 3, pretrained=str(path))
    path.write_text('not a checkpoint\n')
    with pytest.raises(UserError, match='is unreadable: not a PyTorch file; replace it with a good copy, or name '
                                        'another file with --pretrained$'):
        create_teacher('resnet18', 3, pretrained=str(path))
    torch.save({'conv1.weight': argparse.Namespace()}, path)  # a pickled Python object: never unpickled
    with pytest.raises(UserError, match='is unreadable: it holds Python objects besides tensors'):
        create_teacher('resnet18', 3, pretrained=str(path))


def test_resnet34_flops_and_params_in_paper_convention():
    """Convolutions (the stem at its 112 x 112 output) counted as torch's own FLOP counter counts them, BatchNorm
    2 H W C, the classifier not: 3.671 G, 3.67 G at the precision the paper quotes."""
    student = create_student('resnet34', 1000, input_size=224)
    assert round(student.pretrained_flops / 1e9, 2) == 3.67
    teacher = student.backbone.eval()
    x = torch.randn(1, 3, 224, 224)
    ours = count_flops(teacher, lambda: teacher(x), layer_types=(nn.Conv2d, nn.Linear))
    batchnorm_outputs = []
    hooks = [m.register_forward_hook(lambda m, i, out: batchnorm_outputs.append(out.numel()))
             for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(x)
    for hook in hooks:
        hook.remove()
    independent = counter.get_total_flops() // 2  # FlopCounterMode counts 2 per multiply-accumulate
    assert ours == independent
    classifier = teacher.fc.in_features * teacher.fc.out_features
    assert student.pretrained_flops == independent - classifier + 2 * sum(batchnorm_outputs)
    backbone_params = sum(p.numel() for n, p in teacher.named_parameters() if not n.startswith('fc.'))
    assert 21.28e6 <= backbone_params <= 21.30e6
    assert student.stats()['params_universal'] == backbone_params


@pytest.mark.parametrize('task_bn_stats', [True, False])
def test_universal_blocks_frozen_and_task_parameters_trainable(task_bn_stats):
    student = tiny_student(task_bn_stats=task_bn_stats)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(('proxies.', 'gate_logits', 'backbone.fc.')) for n in trainable)
    assert any(n.startswith('proxies.') for n in trainable) and 'gate_logits' in trainable
    student.train()
    # task statistics: the universal BatchNorms normalise with batch statistics while the student trains
    assert student.backbone.layer1[0].bn1.training == student.backbone.bn1.training == task_bn_stats
    assert student.proxies[0][0].training
    student.eval()
    assert not student.backbone.layer1[0].bn1.training and not student.backbone.bn1.training


def universal_bn_statistics(student):
    return {n: b.clone() for n, b in student.backbone.named_buffers()
            if n.endswith(('running_mean', 'running_var')) and not n.startswith('fc.')}


@pytest.mark.parametrize('task_bn_stats', [True, False])
def test_universal_batchnorm_statistics_are_the_tasks_and_travel_in_its_pack(task_bn_stats, tmp_path):
    """docs/method.md §6b: training updates the universal blocks' running statistics (not their weights) on the task's
    data; the pack carries them (the stem's and the kept blocks'), and a fresh student loading it computes
    exactly the trained student's outputs.  With shared statistics nothing of the universal blocks changes."""
    from engine import make_optimizer, param_groups
    student = tiny_student(task_bn_stats=task_bn_stats)
    randomize_task_state(student)
    weights = {n: p.clone() for n, p in student.backbone.named_parameters() if not p.requires_grad}
    statistics = universal_bn_statistics(student)
    args = argparse.Namespace(optimizer='sgd', lr=0.1, momentum=0.9, weight_decay=5e-4, epochs=1, warmup_epochs=0,
                              lr_schedule='step', lr_decay_epochs=1)
    optimizer, _ = make_optimizer(param_groups(student, 5e-4), args, steps_per_epoch=3)
    x, y = 2 + 3 * torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))  # far from the pre-training data
    student.train()
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(student(x)[0], y).backward()
        optimizer.step()
    assert all(torch.equal(p, weights[n]) for n, p in student.backbone.named_parameters() if n in weights)
    updated = universal_bn_statistics(student)
    changed = {n for n in statistics if not torch.equal(statistics[n], updated[n])}
    assert changed == (set(statistics) if task_bn_stats else set())

    student.prune(num_universal=2, proxy_threshold=0.1)
    pruned_blocks = [l for l in range(8) if not student.path_alive[l, 0]]
    pack = student.task_pack()
    in_pack = {n.removeprefix('backbone.') for n in pack['state'] if n.endswith(('running_mean', 'running_var'))}
    in_pack = {n for n in in_pack if n in statistics}
    block_names = [f'layer{1 + l // 2}.{l % 2}.' for l in range(8)]
    if task_bn_stats:
        assert in_pack == {n for n in statistics if not n.startswith(tuple(block_names[l] for l in pruned_blocks))}
        assert {'bn1.running_mean', 'bn1.running_var'} <= in_pack  # the stem's
    else:
        assert not in_pack
    assert pack['meta']['task_bn_stats'] == task_bn_stats

    path = tmp_path / 'pack.pth'
    student.save_task_pack(str(path))
    fresh = tiny_student(task_bn_stats=task_bn_stats)  # the same universal weights, pre-trained statistics
    fresh.load_task_pack(torch.load(path, weights_only=True))
    student.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(student(x)[0], fresh(x)[0])
    with pytest.raises(UserError, match=f'task_bn_stats {task_bn_stats} vs {not task_bn_stats}'):
        tiny_student(task_bn_stats=not task_bn_stats).load_task_pack(pack)


def test_eval_after_training_folds_the_tasks_new_statistics():
    """Training-mode BatchNorm updates its running averages without bumping their version counters: the
    eval forward after an epoch must fold the statistics as they are now, not as the last eval saw them."""
    student = tiny_student()
    randomize_task_state(student)
    x = torch.randn(4, 3, 32, 32)
    student.eval()
    with torch.no_grad():
        student(x)  # the universal blocks and proxies folded as they are
        student.train()
        student(2 + 3 * x)  # a training forward: new running statistics
        student.eval()
        folded = student(x)[0]
        fast.thaw(student.backbone)
        plain = reference_forward(student, x)[0]
    assert torch.allclose(folded, plain, rtol=1e-4, atol=1e-4 * plain.abs().max())


def test_untrained_gates_follow_paper_init():
    student = tiny_student()
    assert torch.all(student.gate_logits[student.path_exists[:, 0].nonzero().flatten(), 0] == 2.0)
    proxies = student.path_exists.clone()
    proxies[:, 0] = False
    assert torch.all(student.gate_logits[proxies] == -2.0)
    assert [len(s) for s in student.proxy_sources] == [1, 2, 3, 3, 3, 3, 3, 3]
    dense = tiny_student(max_skip='dense')
    assert [len(s) for s in dense.proxy_sources] == list(range(1, 9))
    with pytest.raises(UserError, match='max-skip'):
        tiny_student(max_skip=0)


def test_student_with_all_proxies_pruned_is_the_teacher():
    student = tiny_student()
    randomize_task_state(student)
    student.prune(num_universal=0, proxy_threshold=0.99)
    teacher = create_teacher('resnet18', 5)
    teacher.load_state_dict(student.backbone.state_dict())
    student.eval()
    teacher.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        s_logits, s_out = student(x)
        t_logits, t_out = teacher(x)
    assert torch.allclose(s_logits, t_logits, rtol=1e-5, atol=1e-5 * t_logits.abs().max())
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max()) for a, b in zip(s_out, t_out))
    assert student.stats()['proxies_kept'] == 0


def reference_forward(student, x):
    """(logits, nodes 1..L) with `nettailor.reference_layer`: the plain modules, no folding, no pooling cache."""
    with torch.no_grad():
        gates = student.gates()
        nodes = [student.backbone.forward_stem(x)]
        for l in range(len(student._alive_paths)):
            nodes.append(reference_layer(student, l, nodes, gates) if student._alive_paths[l] else None)
        return student.backbone.forward_head(nodes[-1]), nodes[1:]


def test_eval_forward_with_folded_proxies_equals_plain_modules():
    student = tiny_student()
    randomize_task_state(student)
    student.prune(num_universal=2, proxy_threshold=0.1)
    student.eval()
    x = torch.randn(3, 3, 32, 32)

    def check():
        with torch.no_grad():
            logits, outputs = student(x)
        expected_logits, nodes = reference_forward(student, x)
        assert torch.allclose(logits, expected_logits, rtol=1e-5, atol=1e-5 * expected_logits.abs().max())
        assert all((a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max())
                   for a, b in zip(outputs, nodes))

    check()
    assert all('folded_weight' in proxies._buffers for l, proxies in enumerate(student.proxies)
               if len(student._alive_paths[l]) > 1)  # folded when the student entered eval mode
    with torch.no_grad():  # changed gates and proxy statistics: entering eval mode again refolds them
        student.gate_logits.add_(torch.randn(student.gate_logits.shape))
        for m in student.proxies.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.mul_(2.0)
    student.train().eval()
    check()
    logits, _ = student(x)  # with autograd the folded weights carry gradients to gates and proxies
    logits.sum().backward()
    assert student.gate_logits.grad.abs().sum() > 0
    alive = [proxy for l, proxies in enumerate(student.proxies) for j, proxy in enumerate(proxies)
             if student.path_alive[l, j + 1]]
    assert alive and all(p.grad is not None for proxy in alive for p in proxy.parameters())


@pytest.mark.parametrize('fused', [True, False])
def test_eval_after_optimizer_steps_computes_the_new_weights(fused):
    """Entering eval mode folds the proxies and the task's statistics as they are after the steps (fused
    optimizers update weights without bumping their version counters, which once fooled a cache here)."""
    student = tiny_student()
    randomize_task_state(student)
    x = torch.randn(3, 3, 32, 32)
    student.eval()
    with torch.no_grad():
        before = student(x)[0]
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5, momentum=0.9,
                                fused=fused)
    student.train()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(student(x)[0], torch.tensor([0, 1, 2])).backward()
        optimizer.step()
    student.eval()
    with torch.no_grad():
        after = student(x)[0]
    fast.thaw(student.backbone)
    expected = reference_forward(student, x)[0]
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
@pytest.mark.parametrize('task_bn_stats', [True, False])
def test_one_pass_distillation_equals_two_pass_reference(float64, arch, task_bn_stats):
    """In float64 (bottleneck proxies' 1x1 last maps at 32x32 leave BatchNorm 4 values a channel, which makes
    float32 gradients of a random network too ill-conditioned to compare), with the universal BatchNorms on
    batch statistics (the task's) or on the pre-trained ones."""
    student = tiny_student(arch=arch, task_bn_stats=task_bn_stats)
    randomize_task_state(student)
    teacher = create_teacher(arch, 5).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    with torch.no_grad():
        t_logits, t_outputs = teacher(x)
    student.train()

    reference = copy.deepcopy(student)
    ref_loss = two_pass_loss(reference, t_logits, t_outputs, x, y, 0.3, 10.0)
    ref_loss.backward()

    logits, local = student(x, distill=True)
    loss = (F.cross_entropy(logits, y) + 0.3 * student.expected_complexity()
            + 10.0 * distillation_loss(logits, local, t_logits, t_outputs))
    loss.backward()

    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    ref_params = dict(reference.named_parameters())
    checked = 0
    for name, p in student.named_parameters():
        if p.requires_grad:
            ref_grad = ref_params[name].grad
            assert (p.grad - ref_grad).abs().max() <= 1e-9 * ref_grad.abs().max(), name
            checked += 1
    assert checked > 20
    # one pass updates each BatchNorm's running statistics once, as one training forward does
    fresh = tiny_student(arch=arch, task_bn_stats=task_bn_stats)
    randomize_task_state(fresh)
    fresh.train()
    fresh(x)
    for bn_name in ('proxies.2.0.body.1', 'backbone.bn1'):
        mine, theirs = dict(student.named_modules())[bn_name], dict(fresh.named_modules())[bn_name]
        assert torch.allclose(mine.running_mean, theirs.running_mean, rtol=1e-12)


def test_distillation_targets_reach_only_their_own_layer():
    student = tiny_student()
    randomize_task_state(student)
    student.train()
    _, local = student(torch.randn(2, 3, 32, 32), distill=True)
    local[5].sum().backward()
    for l, proxy_list in enumerate(student.proxies):
        grads = [p.grad for p in proxy_list.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert bool(grads) == (l == 5), l


def hand_expected_complexity(student):
    """Section 5 written out with loops, from the gates and path costs."""
    a = student.gates().detach()
    alive, cost, source = student.path_alive, student.path_cost, student.path_source
    num_layers, num_paths = a.shape
    paths = [(l, j) for l in range(num_layers) for j in range(num_paths) if alive[l, j]]

    def excluded_in(node):
        if node == 0:
            return 0.0
        prob = 1.0
        for (l, j) in paths:
            if l + 1 == node:
                prob *= 1 - float(a[l, j])
        return prob

    def excluded_out(node):
        if node == num_layers:
            return 0.0
        prob = 1.0
        for (l, j) in paths:
            if int(source[l, j]) == node:
                prob *= 1 - float(a[l, j])
        return prob

    return sum(float(cost[l, j]) * (float(a[l, j]) - excluded_in(int(source[l, j])) - excluded_out(l + 1))
               for (l, j) in paths)


def test_expected_complexity_matches_hand_computation():
    student = tiny_student()
    randomize_task_state(student, seed=3)
    assert student.expected_complexity().item() == pytest.approx(hand_expected_complexity(student), rel=1e-5)
    student.prune(num_universal=2, proxy_threshold=0.2)
    assert student.expected_complexity().item() == pytest.approx(hand_expected_complexity(student), rel=1e-5)
    # universal blocks cost about 20x a proxy (ResNet18 basic blocks)
    ratio = student.path_flops[1, 0] / student.path_flops[1, 2]
    assert 10 < ratio < 40


def autograd_nodes(tensor):
    """Names of the backward functions of every node in `tensor`'s autograd graph."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize('max_skip', [1, 3, 'dense'])
def test_expected_complexity_backward_reads_nothing_on_the_host(max_skip):
    """torch.prod's backward counts its input's zeros on the host and advanced indexing's backward may sort:
    neither can be captured in a CUDA graph, so E[C] must use neither (engine.TrainStep captures it)."""
    student = tiny_student(max_skip=max_skip)
    randomize_task_state(student, seed=4)
    complexity = student.expected_complexity()
    names = autograd_nodes(complexity)
    assert 'IndexSelectBackward0' in names and 'SoftmaxBackward0' in names
    assert not {name for name in names if name.startswith(('Prod', 'Index')) and name != 'IndexSelectBackward0'}
    assert complexity.item() == pytest.approx(hand_expected_complexity(student), rel=1e-5)


def test_expected_complexity_gradient_favours_proxies():
    student = tiny_student()
    student.expected_complexity().backward()
    grad = student.gate_logits.grad
    for l in range(grad.shape[0]):
        proxies = grad[l, 1:][student.path_exists[l, 1:]]
        # gradient descent lowers the universal logit relative to every proxy logit of the layer
        assert (grad[l, 0] > proxies).all(), l


def set_gates(student, universal, proxies):
    """Logits: `universal[l]` for each universal block, `proxies[(l, source)]` for listed proxies, else -9."""
    with torch.no_grad():
        student.gate_logits.fill_(-9.0)
        for l, value in enumerate(universal):
            student.gate_logits[l, 0] = value
        for (l, source), value in proxies.items():
            student.gate_logits[l, 1 + student.proxy_sources[l].index(source)] = value


def proxy_alive(student, l, source):
    return bool(student.path_alive[l, 1 + student.proxy_sources[l].index(source)])


def test_pruning_input_exclusion():
    student = tiny_student()  # 8 layers; layer l (0-based) produces node l+1
    # layer 2: weakest universal gate (0.18), its proxies at 0.27 fall under the threshold
    set_gates(student, [5, 5, 0, 5, 5, 5, 5, 5],
              {(2, 0): 0.5, (2, 1): 0.5, (2, 2): 0.5, (3, 2): 5.0, (4, 3): 5.0})
    student.prune(num_universal=1, proxy_threshold=0.3)
    alive = student.path_alive
    assert not alive[2].any()                             # node 3 lost every incoming path
    assert not alive[3, 0] and not proxy_alive(student, 4, 3)  # so what leaves node 3 goes, gate 0.5 or not
    assert not (student.path_source[alive] == 3).any()
    assert proxy_alive(student, 3, 2) and alive[4, 0]
    gates = student.gates()  # renormalised over the survivors
    assert gates[3].sum().item() == pytest.approx(1.0) and gates[3, 0] == 0
    assert gates[3, 1 + student.proxy_sources[3].index(2)].item() == pytest.approx(1.0)
    assert torch.allclose(gates.sum(1)[alive.any(1)], torch.ones(int(alive.any(1).sum())))


def test_pruning_output_exclusion_cascades_to_a_fixed_point():
    student = tiny_student(max_skip='dense')
    # layer 2's universal block (the weakest) goes; layer 2 is then fed from node 0 only, so
    # node 2 feeds nothing -> layer 1 dies; then node 1 feeds nothing -> layer 0 dies too
    set_gates(student, [5, 5, 0, 5, 5, 5, 5, 5], {(2, 0): 2.0})
    student.prune(num_universal=1, proxy_threshold=0.3)
    alive = student.path_alive
    assert not alive[2, 0] and proxy_alive(student, 2, 0)
    assert not alive[1].any() and not alive[0].any()
    assert all(alive[l, 0] for l in range(3, 8))
    assert student.stats()['universal_blocks_kept'] == 5


def test_pruning_refuses_disconnection_and_leaves_model_unchanged():
    student = tiny_student()
    before = student.path_alive.clone()
    with pytest.raises(UserError, match='no path'):
        student.prune(num_universal=8, proxy_threshold=0.5)
    assert torch.equal(student.path_alive, before)
    with pytest.raises(UserError, match='cannot prune 9'):
        student.prune(num_universal=9, proxy_threshold=0.1)
    with pytest.raises(UserError, match=r'\[0, 1\)'):
        student.prune(num_universal=1, proxy_threshold=1.0)


def test_pruned_blocks_are_never_executed_and_flops_fall(monkeypatch):
    student = tiny_student()
    randomize_task_state(student)
    full = student.stats()
    student.prune(num_universal=3, proxy_threshold=0.1)
    pruned = student.stats()
    assert pruned['flops'] < full['flops'] and pruned['params_universal'] < full['params_universal']
    calls = []

    def record(obj, method, tag):
        original = getattr(obj, method)
        setattr(obj, method, lambda *args, **kw: (calls.append(tag), original(*args, **kw))[1])

    for l, block in enumerate(student.backbone.blocks):
        record(block, 'forward_pre_relu', ('u', l))
    tags = {id(proxy): ('p', l, j) for l, proxy_list in enumerate(student.proxies)
            for j, proxy in enumerate(proxy_list)}
    gated_proxy = fast.gated_proxy
    monkeypatch.setattr(fast, 'gated_proxy', lambda proxy, *args: (calls.append(tags[id(proxy)]),
                                                                     gated_proxy(proxy, *args))[1])
    expected_universal = {('u', l) for l in range(8) if student.path_alive[l, 0]}
    expected_proxies = {('p', l, j - 1) for l in range(8) for j in range(1, student.path_alive.shape[1])
                        if student.path_alive[l, j]}
    calls.clear()
    student.train()
    student(torch.randn(2, 3, 32, 32))
    assert set(calls) == expected_universal | expected_proxies and len(calls) == len(set(calls))
    calls.clear()
    student.eval()  # each layer's surviving proxies, folded into one convolution over their stacked inputs
    with torch.no_grad():
        student(torch.randn(2, 3, 32, 32))
    assert set(calls) == expected_universal and len(calls) == len(expected_universal)
    for l, layer in enumerate(student.proxies):
        kept = [proxy for j, proxy in enumerate(layer) if student.path_alive[l, j + 1]]
        assert ('folded_weight' in layer._buffers) == bool(kept)
        if kept:
            assert layer.folded_weight.shape[1] == sum(proxy.body[0].in_channels for proxy in kept)
    assert pruned['universal_blocks_kept'] == int(student.path_alive[:, 0].sum()) <= 5


def test_task_pack_round_trip_holds_no_universal_tensor(tmp_path):
    student = tiny_student()
    randomize_task_state(student)
    with torch.no_grad():
        student.backbone.fc.weight.normal_()
    student.prune(num_universal=2, proxy_threshold=0.15)
    path = tmp_path / 'task.pth'
    student.save_task_pack(str(path))

    fresh = tiny_student(seed=7)
    fresh.backbone.load_state_dict(
        {k: v for k, v in student.backbone.state_dict().items() if not k.startswith('fc.')}, strict=False)
    pack = torch.load(path, weights_only=True)
    universal_weights = {f'backbone.{k}' for k, p in student.backbone.named_parameters() if not k.startswith('fc.')}
    assert not universal_weights & set(pack['state'])
    statistics = ('running_mean', 'running_var', 'num_batches_tracked')  # the task's own (docs/method.md §6b)
    assert all(k.startswith(('proxies.', 'gate_logits', 'path_alive', 'backbone.fc.')) or k.endswith(statistics)
               for k in pack['state'])
    pruned_proxy = [(l, j) for l in range(8) for j in range(1, len(student.proxy_sources[l]) + 1)
                    if not student.path_alive[l, j]][0]
    assert not any(k.startswith(f'proxies.{pruned_proxy[0]}.{pruned_proxy[1] - 1}.') for k in pack['state'])
    fresh.load_task_pack(pack)
    student.eval()
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(x)[0], fresh(x)[0])
    assert fresh.stats()['flops'] == student.stats()['flops']


def test_task_pack_for_another_student_is_refused():
    pack = tiny_student().task_pack()
    with pytest.raises(UserError, match='num_classes 5 vs 6'):
        tiny_student(num_classes=6).load_task_pack(pack)
    with pytest.raises(UserError, match='max_skip 3 vs 2'):
        tiny_student(max_skip=2).load_task_pack(pack)
    other = create_student('resnet34', 5, input_size=32)
    with pytest.raises(UserError, match="arch 'resnet18' vs 'resnet34'"):
        other.load_task_pack(pack)
    with pytest.raises(UserError, match='not a NetTailor task pack'):
        other.load_task_pack({'state_dict': {}})



def test_task_pack_that_does_not_fit_or_cannot_run_is_refused_before_anything_changes():
    """Used to fail later (a size-mismatch traceback, a crash inside the forward pass on a dead node) or to
    overwrite the shared universal weights silently."""
    source = tiny_student(seed=3)
    randomize_task_state(source)
    source.prune(num_universal=1, proxy_threshold=0.0)
    good = source.task_pack()

    def broken(change):
        pack = {'meta': dict(good['meta']), 'state': {k: v.clone() for k, v in good['state'].items()}}
        change(pack['state'])
        return pack

    def kill_layer(layer):
        def change(state):
            state['path_alive'][layer] = False
        return change

    cases = {
        "does not fit this student: it lacks backbone.fc.bias$": lambda state: state.pop('backbone.fc.bias'),
        r"does not fit this student: backbone.layer1.0.conv1.weight is not task-specific state$":
            lambda state: state.update({'backbone.layer1.0.conv1.weight': torch.zeros(64, 64, 3, 3)}),
        r"does not fit this student: backbone.fc.weight has shape \(5, 7\), here \(5, 512\)$":
            lambda state: state.update({'backbone.fc.weight': torch.zeros(5, 7)}),
        r"has no pruning mask \(path_alive\) for this student's paths \(8, 4\)$":
            lambda state: state.update({'path_alive': torch.ones(8, 4, dtype=torch.bool)}),  # paths that do not exist
        "prunes every path of layer 7: no network to run$": kill_layer(7),
        "keeps path 0 of layer 4, which reads the output of layer 3, whose paths are all pruned": kill_layer(3),
        r"holds non-finite values \(gate_logits\): the run that wrote it diverged, or the file is damaged$":
            lambda state: state['gate_logits'].fill_(float('nan')),
    }
    student = tiny_student(seed=4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    for message, change in cases.items():
        with pytest.raises(UserError, match='^pack.pth ' + message):
            student.load_task_pack(broken(change), 'pack.pth')
        assert all(torch.equal(before[k], v) for k, v in student.state_dict().items()), message
    student.load_task_pack(good, 'pack.pth')  # the intact pack still attaches
    assert torch.equal(student.path_alive, source.path_alive)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU (pytest --device cuda)')
def test_a_pack_read_to_the_cpu_attaches_to_a_student_on_the_gpu():
    """As on --resume and in the decathlon notebook: checkpoints are read to the CPU, the student may be on CUDA."""
    source = tiny_student(seed=3).cpu()
    randomize_task_state(source)
    source.prune(num_universal=2, proxy_threshold=0.1)
    student = tiny_student(seed=3).cuda()
    student.load_task_pack(source.task_pack())
    x = torch.randn(2, 3, 32, 32, device='cpu')
    with torch.no_grad():
        expected, got = source.eval()(x)[0], student.eval()(x.cuda())[0].cpu()
    assert torch.equal(student.path_alive.cpu(), source.path_alive)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())

def test_proxies_start_as_released():
    """Task-specific convolutions ~ N(0, 0.01), BatchNorm weight 1 and bias 0, gates +2 / -2."""
    student = create_student('resnet50', 4, input_size=32)
    weights = torch.cat([m.weight.detach().flatten() for m in student.proxies.modules() if isinstance(m, nn.Conv2d)])
    assert weights.numel() > 10 ** 5 and abs(weights.mean()) < 1e-3 and weights.std() == pytest.approx(0.01, rel=0.02)
    norms = [m for m in student.proxies.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)


def test_bottleneck_proxies_have_the_released_width():
    """Hidden width max(C_out / 32, 16): ResNet50 with max_skip 3 at 224 px has 3.35 M proxy parameters and
    0.60 GFLOPs of proxies (paper convention)."""
    student = create_student('resnet50', 1000, input_size=224)
    for l, block in enumerate(student.backbone.blocks):
        for proxy in student.proxies[l]:
            convs = [m for m in proxy.body if isinstance(m, nn.Conv2d)]
            assert [c.out_channels for c in convs] == [max(block.conv3.out_channels // 32, 16),
                                                       block.conv3.out_channels]
    proxies = student.path_exists.clone()
    proxies[:, 0] = False
    assert round(int(student.path_params[proxies].sum()) / 1e6, 2) == 3.35
    assert round(float(student.path_flops[proxies].sum()) / 1e9, 2) == 0.60


def test_bottleneck_student_uses_two_layer_proxies():
    student = create_student('resnet50', 4, input_size=32)
    proxy = student.proxies[4][0]
    convs = [m for m in proxy.body if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    student.eval()
    with torch.no_grad():
        logits, _ = student(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4)
    assert isinstance(student, NetTailor) and nettailor.format_stats(student.stats()).count('\n') > 40


def test_cuda_graph_capture_refuses_a_batch_off_the_gpu_before_touching_the_model():
    """TrainStep(cuda_graph=True) and CapturedForward given CPU batches failed inside torch.cuda with an error
    that named neither them nor the fix (the scripts refuse --cuda-graph without CUDA; these are the library's)."""
    from engine import CapturedForward, MixedPrecision, TrainStep
    model = torch.nn.Linear(4, 2)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, lambda x, y: (F.cross_entropy(model(x), y), {}), optimizer,
                     MixedPrecision(torch.device('cpu'), False), cuda_graph=True)
    x, y = torch.randn(3, 4, device='cpu'), torch.zeros(3, dtype=torch.long, device='cpu')
    message = 'captures a CUDA graph: its batches must be on a CUDA device, not cpu'
    with pytest.raises(ValueError, match=re.escape(f'TrainStep(cuda_graph=True) {message}')):
        step(x, y)
    with pytest.raises(ValueError, match=re.escape(f'CapturedForward {message}')):
        CapturedForward(model)(x)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    assert model.weight.grad is None


def test_one_pass_step_under_autocast_trains_like_float32():
    """--amp: the split-gradient step under torch.autocast (bfloat16 on the CPU, float16 on CUDA) reaches every
    task parameter with gradients that point where float32's do."""
    from engine import MixedPrecision
    student = tiny_student()
    randomize_task_state(student)
    teacher = create_teacher('resnet18', 5).eval()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    with torch.no_grad():
        t_logits, t_outputs = teacher(x)

    def gradients(model, amp):
        model.train()
        with MixedPrecision(x.device, amp).autocast():
            logits, local = model(x, distill=True)
            loss = (F.cross_entropy(logits, y) + 0.3 * model.expected_complexity()
                    + 10.0 * distillation_loss(logits, local, t_logits, t_outputs))
        loss.backward()
        return logits.dtype, loss, [p.grad for p in model.parameters() if p.requires_grad]

    dtype32, loss32, grads32 = gradients(copy.deepcopy(student), False)
    dtype16, loss16, grads16 = gradients(student, True)
    assert dtype32 == torch.float32 and dtype16 == (torch.float16 if x.is_cuda else torch.bfloat16)
    assert torch.allclose(loss16, loss32, rtol=0.05)
    assert all(g is not None and torch.isfinite(g).all() for g in grads16)
    # bfloat16 keeps 8 bits of mantissa: each parameter's gradient within ~35 degrees of float32's (0.90-1.0
    # measured), all of them together within ~25 (0.92; 0.98 with shared statistics: the universal BatchNorms
    # on batch statistics add bfloat16 rounding to every layer's backward)
    assert all(F.cosine_similarity(a.flatten().float(), b.flatten(), dim=0) > 0.8 for a, b in zip(grads16, grads32))
    flat32, flat16 = torch.cat([g.flatten() for g in grads32]), torch.cat([g.flatten().float() for g in grads16])
    assert F.cosine_similarity(flat16, flat32, dim=0) > 0.9
