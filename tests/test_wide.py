"""Wide ResNet-26 (the decathlon backbone) and the NetTailor student built on it."""
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import fast
import wide_nettailor
from backbones import create_teacher
from nettailor import student_on_universal
from utils import UserError
from wide_nettailor import pack_from_released

from scripts import run_script

RELEASED_KEY = re.compile(r'^(conv1\.weight|bn1\.\w+'
                          r'|layers\.([0-9]|1[01])\.(conv1\.weight|bn1\.\w+|conv2\.weight|bn2\.\w+)'
                          r'|ends_bn\.\w+|linear\.(weight|bias))$')


def released_weights_file(path, num_classes=1000, seed=0):
    """A file laid out like the released checkpoints/wide_resnet26.pth.tar: {'state_dict': ...}, random tensors."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {k: v for k, v in create_teacher('wide_resnet26', num_classes).state_dict().items()}
    state = {}
    for key, value in shapes.items():
        if key.endswith('num_batches_tracked'):
            state[key] = torch.tensor(100, device='cpu')
        elif key.endswith('running_var'):
            state[key] = torch.rand(value.shape, generator=generator, device='cpu') + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=generator, device='cpu') * 0.1
    torch.save({'state_dict': state, 'epoch': 60}, path)
    return state


def test_parameter_names_follow_released_file():
    keys = list(create_teacher('wide_resnet26', 10).state_dict())
    assert all(RELEASED_KEY.match(k) for k in keys), [k for k in keys if not RELEASED_KEY.match(k)]
    assert {k.split('.')[1] for k in keys if k.startswith('layers.')} == {str(i) for i in range(12)}


def test_released_layout_loads_and_replaces_the_classifier(tmp_path):
    path = tmp_path / 'wide_resnet26.pth.tar'
    state = released_weights_file(path)
    teacher = create_teacher('wide_resnet26', 7, pretrained=str(path))
    own = teacher.state_dict()
    assert all(torch.equal(own[k].cpu(), v) for k, v in state.items() if not k.startswith('linear.'))
    assert teacher.linear.out_features == 7
    x = torch.randn(2, 3, 64, 64)
    logits, outputs = teacher.eval()(x)
    assert logits.shape == (2, 7) and len(outputs) == 12
    assert [o.shape[1:] for o in outputs[3::4]] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    with pytest.raises(UserError, match='torchvision has no ImageNet weights'):
        create_teacher('wide_resnet26', 7, pretrained='imagenet')


def released_forward(state, x):
    """The released Wide ResNet-26 written out from its weights file: conv-bn-relu stem, 12 blocks
    relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut), shortcut = 2x2 average pool + zero channels where the
    shape changes, then linear(avgpool(ends_bn(x))) with no ReLU after ends_bn."""
    def bn(x, name):
        return F.batch_norm(x, state[f'{name}.running_mean'], state[f'{name}.running_var'], state[f'{name}.weight'],
                            state[f'{name}.bias'], False, 0.0, 1e-5)

    x = F.relu(bn(F.conv2d(x, state['conv1.weight'], padding=1), 'bn1'))
    for i in range(12):
        p = f'layers.{i}'
        stride = 2 if i % 4 == 0 else 1
        out = F.relu(bn(F.conv2d(x, state[f'{p}.conv1.weight'], stride=stride, padding=1), f'{p}.bn1'))
        out = bn(F.conv2d(out, state[f'{p}.conv2.weight'], padding=1), f'{p}.bn2')
        shortcut = x
        if stride == 2 or out.shape[1] != x.shape[1]:
            shortcut = F.avg_pool2d(x, 2)
            shortcut = torch.cat([shortcut, shortcut.new_zeros(shortcut.shape[0], out.shape[1] - x.shape[1],
                                                                *shortcut.shape[2:])], dim=1)
        x = F.relu(out + shortcut)
    x = bn(x, 'ends_bn').mean(dim=(2, 3))
    return F.linear(x, state['linear.weight'], state['linear.bias'])


def test_released_weights_give_the_released_networks_logits(tmp_path, float64):
    path = tmp_path / 'wide_resnet26.pth.tar'
    state = {k: v.double() if v.is_floating_point() else v for k, v in released_weights_file(path).items()}
    torch.save({'state_dict': state}, path)
    network = create_teacher('wide_resnet26', 1000)
    network.load_state_dict(torch.load(path, weights_only=True)['state_dict'])
    x = torch.randn(2, 3, 64, 64)
    network.eval()
    with torch.no_grad():
        assert torch.allclose(network(x)[0], released_forward(state, x), rtol=1e-10, atol=1e-12)


def test_wide_student_with_all_proxies_pruned_is_the_teacher(tmp_path):
    path = tmp_path / 'wide_resnet26.pth.tar'
    released_weights_file(path)
    torch.manual_seed(0)
    student = wide_nettailor.create_student(5, max_skip=3, pretrained=str(path), input_size=64)
    teacher = create_teacher('wide_resnet26', 5, pretrained=str(path))
    teacher.linear.load_state_dict(student.backbone.linear.state_dict())
    with torch.no_grad():
        student.gate_logits.normal_()
    student.prune(0, 0.999)
    assert student.stats()['proxies_kept'] == 0
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(student.eval()(x)[0], teacher.eval()(x)[0], atol=1e-5)
    # task-specific: proxies, gates, final BN and classifier; the final BN keeps its own statistics
    assert {n.split('.')[0] if not n.startswith('backbone.') else n.split('.')[1]
            for n, p in student.named_parameters() if p.requires_grad} == {'gate_logits', 'proxies', 'ends_bn',
                                                                            'linear'}
    assert 'backbone.ends_bn.running_mean' in student.task_pack()['state']


def test_wide_student_trains_and_prunes_at_72px():
    student = wide_nettailor.create_student(4, input_size=72)
    student.train()
    logits, local = student(torch.randn(4, 3, 72, 72), distill=True)
    assert logits.shape == (4, 4) and local[-1].shape == (4, 256, 9, 9)
    student.prune(4, 0.0)
    assert student.stats()['universal_blocks_kept'] == 8


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'released_fixture')


def released_fixture_universal(path):
    """The fixture's universal weights (int8 with exact power-of-two scales) as the released
    wide_resnet26.pth.tar lays them out: {'state_dict': {key: float32 tensor}}."""
    compact = torch.load(os.path.join(FIXTURE, 'universal_int8.pt'), weights_only=True)
    state = {key: value if torch.is_tensor(value) else value[2] + value[0].float() * value[1]
             for key, value in compact.items()}
    torch.save({'state_dict': state}, path)
    return state


def released_fixture_student(tmp_path, pack):
    universal_file = tmp_path / 'wide_resnet26.pth.tar'
    state = released_fixture_universal(universal_file)
    universal = create_teacher('wide_resnet26', state['linear.weight'].shape[0], pretrained=str(universal_file))
    return student_on_universal(universal.eval(), pack, input_size=64).eval()


def test_converted_released_checkpoint_computes_the_released_logits(tmp_path):
    """The fixture's task checkpoint (made by the released code: some paths pruned, per-task statistics),
    converted and attached to the released universal weights, gives the released student's logits."""
    checkpoint = torch.load(os.path.join(FIXTURE, 'task', 'checkpoint.pth.tar'), weights_only=True)
    student = released_fixture_student(tmp_path, pack_from_released(checkpoint))
    expected = torch.load(os.path.join(FIXTURE, 'expected.pt'), weights_only=True)
    with torch.no_grad():
        logits = student(expected['input'])[0]
        assert torch.allclose(logits, expected['logits'], rtol=1e-5, atol=1e-5 * expected['logits'].abs().max())
        fast.thaw(student.backbone)  # the plain universal modules too, not only the folded eval path
        plain = student(expected['input'])[0]
        assert torch.allclose(plain, expected['logits'], rtol=1e-5, atol=1e-5 * expected['logits'].abs().max())
    stats = student.stats()
    flags = checkpoint['keep_flags']
    assert stats['universal_blocks_kept'] == sum(row[0] for row in flags) == 10
    assert stats['proxies_kept'] == sum(sum(row[1:]) for row in flags) == 30
    # the released proxy k reads the k-th nearest earlier node; here proxies run oldest source first
    assert student.proxy_sources[5] == [3, 4, 5] and not student.path_alive[5, 2]  # released layer 5, proxy 1


def test_convert_released_command_converts_a_file_or_a_folder_of_tasks(tmp_path):
    released = tmp_path / 'decathlon_models'
    for task in ('svhn', 'gtsrb'):
        (released / task).mkdir(parents=True)
        shutil.copy(os.path.join(FIXTURE, 'task', 'checkpoint.pth.tar'), released / task / 'checkpoint.pth.tar')
    command = os.path.join('checkpoints', 'convert_released.py')
    result = run_script(command, released, '--out', tmp_path / 'packs')
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / 'packs')) == ['gtsrb.pth', 'svhn.pth']
    assert 'svhn' in result.stdout and '10/12 universal blocks kept' in result.stdout
    result = run_script(command, released / 'svhn' / 'checkpoint.pth.tar', '--out', tmp_path / 'one.pth')
    assert result.returncode == 0, result.stderr
    pack = torch.load(tmp_path / 'one.pth', weights_only=True)
    expected = torch.load(os.path.join(FIXTURE, 'expected.pt'), weights_only=True)
    with torch.no_grad():
        logits = released_fixture_student(tmp_path, pack)(expected['input'])[0]
    assert torch.allclose(logits, expected['logits'], rtol=1e-5, atol=1e-5 * expected['logits'].abs().max())

    disconnected = torch.load(released / 'svhn' / 'checkpoint.pth.tar', weights_only=True)
    disconnected['keep_flags'][11] = [False] * len(disconnected['keep_flags'][11])
    diverged = torch.load(released / 'svhn' / 'checkpoint.pth.tar', weights_only=True)
    diverged['state_dict']['classifier.weight'][0, 0] = float('nan')
    bad = {'a teacher checkpoint': {'model': {}, 'args': {}},
           'a truncated one': None,
           'one pruned to nothing': disconnected,  # converted fine, then crashed inside the forward pass
           'one with NaN weights': diverged}
    for what, content in bad.items():
        path = tmp_path / 'bad.pth.tar'
        if content is None:
            path.write_bytes((released / 'svhn' / 'checkpoint.pth.tar').read_bytes()[:4000])
        else:
            torch.save(content, path)
        result = run_script(command, path, '--out', tmp_path / 'bad.pth')
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith('error: '), (what, result.stderr)
        assert str(path) in lines[0] and not (tmp_path / 'bad.pth').exists()
    for source, out, message in ((released / 'svhn' / 'checkpoint.pth.tar', tmp_path / 'packs', 'names a folder'),
                                 (released, tmp_path / 'one.pth', 'is a file')):
        result = run_script(command, source, '--out', out)
        assert result.returncode == 1 and result.stderr.strip().splitlines() == [
            f"error: --out {out} {message}: name " + ('the file to write' if message == 'names a folder' else
                                                      'a folder')]


def test_released_files_without_batchnorm_counters_give_the_same_logits(tmp_path):
    """Files written before PyTorch 0.4.1 hold no BatchNorm num_batches_tracked (evaluation never reads it)."""
    def without_counters(state):
        return {key: value for key, value in state.items() if not key.endswith('num_batches_tracked')}
    checkpoint = torch.load(os.path.join(FIXTURE, 'task', 'checkpoint.pth.tar'), weights_only=True)
    checkpoint['state_dict'] = without_counters(checkpoint['state_dict'])
    universal_file = tmp_path / 'wide_resnet26.pth.tar'
    state = without_counters(released_fixture_universal(universal_file))
    torch.save({'state_dict': state}, universal_file)
    universal = create_teacher('wide_resnet26', state['linear.weight'].shape[0], pretrained=str(universal_file))
    student = student_on_universal(universal.eval(), pack_from_released(checkpoint), input_size=64).eval()
    expected = torch.load(os.path.join(FIXTURE, 'expected.pt'), weights_only=True)
    with torch.no_grad():
        logits = student(expected['input'])[0]
    assert torch.allclose(logits, expected['logits'], rtol=1e-5, atol=1e-5 * expected['logits'].abs().max())


def test_incomplete_released_checkpoint_is_refused(tmp_path):
    checkpoint = torch.load(os.path.join(FIXTURE, 'task', 'checkpoint.pth.tar'), weights_only=True)
    del checkpoint['state_dict']['layers.4.proxies.2.bn.running_var']
    with pytest.raises(UserError, match='lacks layers.4.proxies.2.bn.running_var'):
        pack_from_released(checkpoint, 'x.pth.tar')
    checkpoint = torch.load(os.path.join(FIXTURE, 'task', 'checkpoint.pth.tar'), weights_only=True)
    checkpoint['state_dict']['layers.0.main.conv1.weight'] = torch.zeros(1)
    with pytest.raises(UserError, match='holds tensors a released task checkpoint does not: layers.0.main.conv1'):
        pack_from_released(checkpoint, 'x.pth.tar')
    checkpoint['keep_flags'] = checkpoint['keep_flags'][:-1]
    with pytest.raises(UserError, match='keep_flags do not describe a Wide ResNet-26 student'):
        pack_from_released(checkpoint, 'x.pth.tar')
    path = tmp_path / 'x.pth.tar'  # a converted file is checked by attaching it to a student
    checkpoint = torch.load(os.path.join(FIXTURE, 'task', 'checkpoint.pth.tar'), weights_only=True)
    checkpoint['keep_flags'][5] = [False] * len(checkpoint['keep_flags'][5])
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match=f'^{path} keeps path 0 of layer 6, which reads the output of layer 5, '
                                        r'whose paths are all pruned: a path that never runs, which this '
                                        r'implementation does not represent \(docs/differences.md\)$'):
        wide_nettailor.load_released_pack(str(path))
    checkpoint = torch.load(os.path.join(FIXTURE, 'task', 'checkpoint.pth.tar'), weights_only=True)
    checkpoint['state_dict']['layers.2.proxies.0.conv.weight'] = torch.zeros(3, 3, 1, 1)
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match=rf'^{path} does not fit this student: proxies.2.2.body.0.weight has shape '
                                        r'\(3, 3, 1, 1\), here \(64, 64, 1, 1\)$'):
        wide_nettailor.load_released_pack(str(path))
    path.write_bytes(path.read_bytes()[:5000])  # a download cut short
    with pytest.raises(UserError, match=rf'^released task checkpoint {path} is unreadable: truncated or not a '
                                        r'PyTorch file \(.*\); remove it and fetch it again: python '
                                        r'checkpoints/download_models.py$'):
        wide_nettailor.load_released_pack(str(path))


def test_fresh_classifier_of_a_wide_student_has_a_fresh_final_batchnorm(tmp_path):
    """--classifier-init fresh (and no teacher) as released: the final BatchNorm, task-specific, starts at weight 1
    and bias 0, not as the universal weights' one (which the student's other head option takes from the teacher)."""
    universal = released_weights_file(tmp_path / 'wide_resnet26.pth.tar')
    result = run_script('main_student.py', '--task', 'synth-digits', '--input-size', 32, '--workers', 0,
                        '--train-limit', 32, '--test-limit', 16, '--batch-size', 16, '--device', 'cpu',
                        '--backbone', 'wide_resnet26', '--pretrained', tmp_path / 'wide_resnet26.pth.tar',
                        '--teacher-coeff', 0, '--epochs', 1, '--lr', 1e-9, '--model-dir', tmp_path / 'run')
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['model']['state']
    assert torch.allclose(state['backbone.ends_bn.weight'], torch.ones(256), atol=1e-6)  # barely trained
    assert torch.allclose(state['backbone.ends_bn.bias'], torch.zeros(256), atol=1e-6)
    assert not torch.allclose(universal['ends_bn.weight'], torch.ones(256), atol=0.1)
