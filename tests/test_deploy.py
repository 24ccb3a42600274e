"""deploy.py: the tailored network computes what the student computes, holds only what it runs, and its exported
files run without this repository."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deploy
from nettailor import create_student
from utils import UserError

from test_models import randomize_task_state


def trained_looking_student(arch, prune, task_bn_stats=True):
    torch.manual_seed(0)
    student = create_student(arch, 7, max_skip=3, input_size=64 if arch == 'wide_resnet26' else 32,
                             task_bn_stats=task_bn_stats)
    randomize_task_state(student, seed=5)
    if prune:
        student.prune(num_universal=prune, proxy_threshold=0.3)
    return student.eval()


CASES = [('resnet18', 0, True), ('resnet18', 3, True), ('resnet18', 2, False), ('resnet50', 4, True),
         ('wide_resnet26', 5, True)]


@pytest.mark.parametrize('arch, prune, task_bn_stats', CASES)
def test_tailored_network_equals_the_student_in_eval_mode(float64, arch, prune, task_bn_stats):
    student = trained_looking_student(arch, prune, task_bn_stats)
    network = deploy.TailoredNetwork(student).eval()
    x = torch.randn(3, 3, student.input_size, student.input_size)
    with torch.no_grad():
        expected, got = student(x)[0], network(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12 * expected.abs().max())  # float64: exact but rounding
    student32, network32 = student.float(), network.float()
    with torch.no_grad():
        expected, got = student32.eval()(x.float())[0], network32(x.float())
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_tailored_network_takes_the_students_dtype():
    """A float64 student under the float32 default: its tailored network holds float64 only, not float32 copies
    that round its weights."""
    student = trained_looking_student('resnet18', 3).double().eval()  # eval(): its folds again, now in float64
    network = deploy.TailoredNetwork(student)
    assert {tensor.dtype for tensor in [*network.parameters(), *network.buffers()] if tensor.is_floating_point()} == {
        torch.float64}
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = student(x)[0]
        assert torch.allclose(network(x), expected, rtol=0, atol=1e-12 * expected.abs().max())


@pytest.mark.parametrize('arch, prune, task_bn_stats', CASES)
def test_tailored_network_holds_only_the_surviving_paths(arch, prune, task_bn_stats):
    student = trained_looking_student(arch, prune, task_bn_stats)
    network = deploy.TailoredNetwork(student)
    batch_norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batch_norms) == (1 if arch == 'wide_resnet26' else 0)  # only the Wide ResNet head's, not folded
    stats = student.stats()
    assert sum(layer.block is not None for layer in network.layers if layer) == stats['universal_blocks_kept']
    assert sum(len(layer.sources) for layer in network.layers if layer) == stats['proxies_kept']
    for l, layer in enumerate(network.layers):
        if layer is not None and layer.sources:
            convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d) and m not in
                     (list(layer.block.modules()) if layer.block is not None else [])]
            # one convolution for all the layer's proxies, gates folded in (bottleneck: one more per proxy)
            assert len(convs) == (1 if student.backbone.block_kind == 'basic' else 1 + len(layer.sources))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(network) < count(student.backbone) + count(student.proxies)
    assert not any(p.requires_grad for p in network.parameters())


RUN_EXPORTED = """
import sys, torch, onnxruntime
try:
    import nettailor
except ImportError:
    pass
else:
    raise SystemExit('the repository is importable: the test would prove nothing')
images, expected = torch.load('io.pt')
program = torch.export.load('out/tailored.pt2').module()
session = onnxruntime.InferenceSession('out/tailored.onnx', providers=['CPUExecutionProvider'])
assert [(v.name, v.shape) for v in (*session.get_inputs(), *session.get_outputs())] == [
    ('images', ['batch', 3, 32, 32]), ('logits', ['batch', expected.shape[1]])], 'inputs and outputs, by name'
errors = {}
for batch in (1, len(images)):
    x = images[:batch]
    scale = expected[:batch].abs().max()
    errors[f'pt2 {batch}'] = float((program(x) - expected[:batch]).abs().max() / scale)
    (logits,) = session.run(['logits'], {'images': x.numpy()})
    errors[f'onnx {batch}'] = float((torch.from_numpy(logits) - expected[:batch]).abs().max() / scale)
print(errors)
"""


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_exported_files_run_without_this_repository(tmp_path, arch):
    student = trained_looking_student(arch, prune=3)
    pt2, onnx_path = deploy.export(student, str(tmp_path / 'out'))
    assert (pt2, onnx_path) == (str(tmp_path / 'out' / 'tailored.pt2'), str(tmp_path / 'out' / 'tailored.onnx'))
    assert sorted(os.listdir(tmp_path / 'out')) == ['tailored.onnx', 'tailored.pt2']  # no temporary file left
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.save((images.cpu(), student.eval()(images)[0].cpu()), tmp_path / 'io.pt')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', RUN_EXPORTED], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    errors = eval(result.stdout.strip().splitlines()[-1])
    assert set(errors) == {'pt2 1', 'pt2 5', 'onnx 1', 'onnx 5'}
    assert all(error <= 1e-5 for error in errors.values()), errors


def test_a_failed_export_leaves_the_previous_pair_untouched(tmp_path, monkeypatch):
    """Both files are new or neither: a failure while writing the ONNX file used to leave a new .pt2 beside an
    old .onnx (or alone); a folder in the way is refused before the (slow) export.  The temporary files of an
    export that was killed are removed by the next."""
    student = trained_looking_student('resnet18', prune=3)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'tailored.pt2').write_bytes(b'old pt2')
    (out / 'tailored.onnx').write_bytes(b'old onnx')
    (out / '.tmp-killed.pt2').write_bytes(b'half')
    (out / '.tmp-killed.onnx').write_bytes(b'half')

    def disk_full(self, path, *args, **kwargs):
        with open(path, 'wb') as f:
            f.write(b'half')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch.onnx.ONNXProgram, 'save', disk_full)
    with pytest.raises(UserError, match=f'^cannot write --export {out}: No space left on device$'):
        deploy.export(student, str(out))
    assert sorted(os.listdir(out)) == ['tailored.onnx', 'tailored.pt2']  # no temporary file left either
    assert (out / 'tailored.pt2').read_bytes() == b'old pt2' and (out / 'tailored.onnx').read_bytes() == b'old onnx'
    monkeypatch.undo()

    (out / 'tailored.onnx').unlink()
    (out / 'tailored.onnx').mkdir()
    with pytest.raises(UserError, match=f'^--export {out}: {out / "tailored.onnx"} is a folder; remove it'):
        deploy.export(student, str(out))
    with pytest.raises(UserError, match=f'^--export {out / "tailored.pt2"} is a file: name a folder$'):
        deploy.export(student, str(out / 'tailored.pt2'))
    assert (out / 'tailored.pt2').read_bytes() == b'old pt2'


EXPORT_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from test_deploy import trained_looking_student
import deploy
from utils import UserError
student = trained_looking_student('resnet18', prune=3)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as one on a full disk does
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
try:
    deploy.export(student, sys.argv[1])
except UserError as error:
    print(error)
"""


def test_a_write_failing_inside_pytorch_is_a_one_line_error(tmp_path):
    """A real failed write (here past a file-size limit; a full disk alike) inside torch.export.save's archive
    writer aborted the process (exit 134) with a C++ trace: the archive is made in memory, then written."""
    out = tmp_path / 'out'
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests)]))
    result = subprocess.run([sys.executable, '-c', EXPORT_UNDER_A_FILE_SIZE_LIMIT, str(out)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert (result.returncode, result.stdout) == (0, f'cannot write --export {out}: File too large\n'), result.stderr
    assert os.listdir(out) == []


def apply_preprocessing(steps, image):
    """The steps of `deploy.preprocessing_steps` done by hand on a uint8 3 x H x W image, as a deployment would."""
    x = image
    for step in steps:
        (name, value), = step.items()
        if name in ('resize', 'resize_shorter_side'):
            height, width = x.shape[-2:]
            if name == 'resize_shorter_side':  # the longer side scaled alike, truncated (torchvision's rule)
                value = ([value, int(value * width / height)] if height <= width
                         else [int(value * height / width), value])
            resized = F.interpolate(x[None].float(), size=value, mode='bilinear', antialias=True,
                                    align_corners=False)[0]
            x = resized.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else resized
        elif name == 'center_crop':
            top, left = (round((size - crop) / 2) for size, crop in zip(x.shape[-2:], value))
            x = x[:, top:top + value[0], left:left + value[1]]
        elif name == 'divide':
            x = x.float() / value
        else:
            mean, std = (torch.tensor(value[key]).view(3, 1, 1) for key in ('mean', 'std'))
            x = (x - mean) / std
    return x


@pytest.mark.parametrize('task, input_size', [('svhn', 32), ('flowers', 40), ('voc12', 32), ('folder:pets', 48),
                                              ('synth-digits', 40), ('decathlon svhn', 32), ('decathlon dtd', 72),
                                              ('decathlon aircraft', 64)])
def test_exported_preprocessing_reproduces_the_evaluation_transform(task, input_size):
    """The preprocessing a tailored network carries, done by hand, gives the input its run was evaluated on."""
    from dataloaders import evaluation_transform
    from decathlon_dataloaders import decathlon_transform
    if task.startswith('decathlon '):
        transform = decathlon_transform(task.split()[1], False, input_size)
    else:
        transform = evaluation_transform(task, input_size)
    steps = json.loads(json.dumps(deploy.preprocessing_steps(transform)))  # as read back from the files
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 50, 61), dtype=torch.uint8)  # neither square nor at the input size
    expected = transform(image)
    assert expected.shape == (3, input_size, input_size)
    by_hand = apply_preprocessing(steps, image)
    assert by_hand.shape == expected.shape
    assert (by_hand - expected).abs().max() < 0.02  # at most one 8-bit level of resampling rounding
