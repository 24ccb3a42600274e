"""The training scripts as a user runs them: teacher, student, prune + retrain, evaluate, bad input, resume."""
import argparse
import copy
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import onnxruntime
import pytest
import torch
import torchvision

import utils
from engine import teacher_fingerprint
from utils import UserError

from scripts import run_script
from test_dataloaders import write_flowers, write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--task', 'synth-digits', '--input-size', '32', '--workers', '0', '--train-limit', '96',
        '--test-limit', '64', '--batch-size', '32', '--device', 'cpu']


def run(script, *args, expect_ok=True):
    result = run_script(script, *args)
    if expect_ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A 'pre-trained' ResNet18 in torchvision's format (seeded random weights) shared by all stages."""
    root = tmp_path_factory.mktemp('pipeline')
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith('fc.')}
    torch.save(state, root / 'backbone.pth')
    return root


@pytest.fixture(scope='module')
def pipeline(workdir):
    """Teacher, student, prune + retrain through the real scripts; returns the run directories."""
    common = TINY + ['--pretrained', workdir / 'backbone.pth']
    teacher, student, pruned = workdir / 'teacher', workdir / 'student', workdir / 'pruned'
    run('main_teacher.py', *common, '--arch', 'resnet18', '--model-dir', teacher, '--epochs', 2,
        '--lr', 0.01, '--lr-decay-epochs', 1, '--log2file')
    run('main_student.py', *common, '--backbone', 'resnet18', '--teacher-fn', teacher / 'checkpoint.pth',
        '--model-dir', student, '--epochs', 2, '--lr', 0.01, '--teacher-coeff', 2, '--amp')  # bfloat16 on the CPU
    assert TINY[:4] == ['--task', 'synth-digits', '--input-size', '32']
    run('main_student.py', *TINY[4:], '--model-dir', pruned,  # the full student's task, crop size, backbone, teacher
        '--full-model-dir', student, '--n-pruning-universal', 3,
        '--thr-pruning-proxy', 0.01, '--epochs', 1, '--lr', 0.01)
    return teacher, student, pruned


def test_pipeline_run_directories(pipeline):
    teacher, student, pruned = pipeline
    for run_dir, epochs in ((teacher, 2), (student, 2), (pruned, 1)):
        assert {'checkpoint.pth', 'args.json', 'metrics.jsonl'} <= set(os.listdir(run_dir))
        records = [json.loads(line) for line in open(run_dir / 'metrics.jsonl')]
        assert [r['epoch'] for r in records] == list(range(epochs))
        assert all({'loss', 'train_acc', 'test_acc', 'lr', 'epoch_time'} <= set(r) for r in records)
    assert 'teacher top-1 accuracy' in open(teacher / 'log.txt').read()
    student_args = json.load(open(student / 'args.json'))
    assert student_args['complexity_coeff'] == 0.3 and student_args['amp']
    retrain_args = json.load(open(pruned / 'args.json'))
    assert retrain_args['complexity_coeff'] == 0.0 and retrain_args['teacher_coeff'] == 2  # gamma1 0, gamma2 kept
    assert {'complexity', 'omega', 'ce'} <= set(json.loads(open(student / 'metrics.jsonl').readline()))
    assert not student_args['shared_bn_stats'] and student_args['classifier_init'] == 'teacher'
    assert not retrain_args['shared_bn_stats'] and retrain_args['classifier_init'] == 'teacher'  # the full student's
    assert retrain_args['thr_pruning_proxy'] == 0.01 and student_args['thr_pruning_proxy'] == 0.05  # as recorded before
    checkpoint = torch.load(student / 'checkpoint.pth', weights_only=True)
    state = checkpoint['model']['state']
    statistics = ('running_mean', 'running_var', 'num_batches_tracked')
    assert checkpoint['finished'] and checkpoint['model']['meta']['task_bn_stats']
    assert not any(k.startswith('backbone.layer') and not k.endswith(statistics) for k in state)  # no weights
    assert 'backbone.layer4.1.bn2.running_var' in state  # the task's own statistics (docs/method.md §6b)
    assert checkpoint['scaler'] == {}  # bfloat16 needs no gradient scaling
    for run_dir in (student, pruned):  # each student run draws the architecture it ends with
        assert (run_dir / 'architecture.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    umask = os.umask(0)
    os.umask(umask)
    for name in ('checkpoint.pth', 'args.json', 'metrics.jsonl', 'architecture.png'):  # written atomically,
        assert stat.S_IMODE(os.stat(student / name).st_mode) == 0o666 & ~umask, name  # with open()'s mode


def test_evaluate_prints_accuracy_and_tailored_architecture(pipeline):
    teacher, student, pruned = pipeline
    out = run('main_teacher.py', *TINY, '--model-dir', teacher, '--evaluate').stdout
    assert 'top-1 accuracy' in out
    full = run('main_student.py', *TINY, '--model-dir', student, '--evaluate').stdout
    tailored = run('main_student.py', *TINY, '--model-dir', pruned, '--evaluate').stdout
    assert 'universal blocks kept 8/8' in full
    kept = int(tailored.split('universal blocks kept ')[1].split('/')[0])
    assert kept <= 5
    gflops = [float(text.split(' GFLOPs')[0].rsplit(' ', 1)[1]) for text in (full, tailored)]
    assert gflops[1] < gflops[0]
    accuracy = float(tailored.split('top-1 accuracy ')[1].split('%')[0])
    recorded = json.loads(open(pruned / 'metrics.jsonl').read().splitlines()[-1])['test_acc']
    assert accuracy == pytest.approx(recorded, abs=0.005)  # printed with two decimals


def test_export_writes_the_tailored_network_of_a_run(pipeline, tmp_path):
    from engine import load_student
    pruned = pipeline[2]
    out = run('main_student.py', '--model-dir', pruned, '--export', tmp_path / 'deploy').stdout
    assert f"written to {tmp_path / 'deploy' / 'tailored.pt2'} and {tmp_path / 'deploy' / 'tailored.onnx'}" in out
    assert 'universal blocks kept' in out
    program = torch.export.load(str(tmp_path / 'deploy' / 'tailored.pt2')).module()
    student, _ = load_student(pruned, 'cpu')
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = student.eval()(x)[0]
    assert (program(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    result = run('main_student.py', '--model-dir', tmp_path / 'nothing', '--export', tmp_path / 'out',
                 expect_ok=False)
    assert_one_line_error(result, 'checkpoint.pth')
    assert not (tmp_path / 'out').exists()
    assert_one_line_error(run('main_student.py', '--model-dir', pruned, expect_ok=False), '--task is required')
    import main_student
    for flags, message in ((['--export', tmp_path / 'out', '--n-pruning-universal', 4],  # exported unpruned
                            '--export takes the run in --model-dir as it is: prune it first'),
                           (['--evaluate', '--full-model-dir', pipeline[1]], '--evaluate takes the run in --model-dir'),
                           (['--export', tmp_path / 'out', '--thr-pruning-proxy', 0.5], '--export takes the run in'),
                           (['--evaluate', '--thr-pruning-proxy', 0], '--evaluate takes the run in --model-dir'),
                           (['--export', tmp_path / 'out', '--input-size', 64],  # exported at the run's 32
                            f'{pruned} was trained with --input-size 32, not 64: drop those flags (--export rebuilds'),
                           (['--export', tmp_path / 'out', '--task', 'synth-shapes'],
                            f'{pruned} was trained with --task synth-digits, not synth-shapes: drop those flags'),
                           (['--export', ''], '--export needs the folder to write to')):
        with pytest.raises(UserError, match=f'^{re.escape(message)}'):
            main_student.main(main_student.get_args_parser().parse_args(['--model-dir', str(pruned), *map(str, flags)]))
    assert not (tmp_path / 'out').exists()


def test_loaded_teacher_is_frozen_and_computes_the_trained_network(pipeline):
    import fast
    from engine import load_teacher
    from backbones import create_teacher
    path = pipeline[0] / 'checkpoint.pth'
    teacher, checkpoint = load_teacher(path, 'cpu', 10, 'resnet18', 'synth-digits')
    from_run_dir, _ = load_teacher(pipeline[0], 'cpu')  # --teacher-fn may name the run directory
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), from_run_dir.state_dict().values()))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    plain = create_teacher('resnet18', 10).eval()  # trainable weights: every layer run as defined
    plain.load_state_dict(checkpoint['model'])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        (logits, outputs), (plain_logits, plain_outputs) = teacher(x), plain(x)
    assert torch.allclose(logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(outputs, plain_outputs))
    assert fast.is_folded(teacher.blocks[0].conv1)  # it runs folded


def test_finished_run_is_not_overwritten(pipeline, workdir):
    teacher = pipeline[0]
    before = (teacher / 'checkpoint.pth').read_bytes()
    result = run('main_teacher.py', *TINY, '--arch', 'resnet18', '--model-dir', teacher, '--epochs', 1,
                 '--pretrained', workdir / 'backbone.pth', expect_ok=False)
    assert_one_line_error(result, 'already holds a finished run', '--force')
    assert (teacher / 'checkpoint.pth').read_bytes() == before


def test_a_forced_run_leaves_nothing_of_the_run_it_overwrites(workdir, tmp_path):
    args = [*TINY, '--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--model-dir', tmp_path / 'run',
            '--epochs', 1, '--train-limit', 32]
    run('main_teacher.py', *args)
    (tmp_path / 'run' / 'submission.json').write_text('[]')  # a decathlon run's predictions (--write-submission)
    result = run('main_teacher.py', *args, '--force', '--lr', 1e40, expect_ok=False)  # diverges in its first epoch
    assert_one_line_error(result, 'training diverged')
    assert sorted(os.listdir(tmp_path / 'run')) == ['.lock', 'args.json']  # no finished run beside the new flags
    result = run('main_teacher.py', '--model-dir', tmp_path / 'run', '--evaluate', '--device', 'cpu', expect_ok=False)
    assert_one_line_error(result, 'teacher checkpoint not found')


def test_a_run_written_while_another_starts_is_not_overwritten(pipeline, tmp_path):
    """Two jobs on one run directory: the second read it empty, and by the time it held the lock the first had
    finished there; the second deleted that finished run without --force.  Under the lock it reads it again."""
    import engine
    import main_teacher
    args = main_teacher.get_args_parser().parse_args([*map(str, TINY), '--model-dir', str(tmp_path / 'run')])
    assert engine.check_run_dir(args) is None  # empty when this job read it
    os.makedirs(tmp_path / 'run')
    shutil.copy(pipeline[0] / 'checkpoint.pth', tmp_path / 'run' / 'checkpoint.pth')  # then another job finished
    with pytest.raises(UserError, match=f"^{tmp_path / 'run'} already holds a finished run; pass --force"):
        engine.prepare_run_dir(args)
    assert torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['finished']
    assert not (tmp_path / 'run' / 'args.json').exists()


def test_unfinished_runs_are_marked_and_not_pruned(pipeline, tmp_path):
    teacher, student, _ = pipeline
    checkpoint = torch.load(student / 'checkpoint.pth', weights_only=True)
    checkpoint.update(finished=False, epoch=0)  # as if stopped after its first epoch of two
    os.makedirs(tmp_path / 'unfinished')
    torch.save(checkpoint, tmp_path / 'unfinished' / 'checkpoint.pth')
    out = run('main_student.py', '--model-dir', tmp_path / 'unfinished', '--evaluate', '--workers', 0,
              '--device', 'cpu').stdout
    assert out.strip().endswith('on synth-digits (at most 64 images: --test-limit 64) (unfinished run: 1 of 2 epochs)')
    out = run('main_student.py', '--model-dir', tmp_path / 'unfinished', '--export', tmp_path / 'deploy').stdout
    assert out.strip().endswith('(unfinished run: 1 of 2 epochs)')
    result = run('main_student.py', '--model-dir', tmp_path / 'unfinished', '--export', tmp_path / 'deploy2',
                 '--evaluate', expect_ok=False)
    assert_one_line_error(result, '--evaluate and --export are separate commands')
    retrain = ['--n-pruning-universal', 1, '--model-dir', tmp_path / 'pruned', '--device', 'cpu']
    result = run('main_student.py', '--full-model-dir', tmp_path / 'unfinished', *retrain, expect_ok=False)
    assert_one_line_error(result, 'is an unfinished run (1 of 2 epochs): finish it with --resume before pruning it')
    result = run('main_student.py', '--full-model-dir', teacher, *retrain, expect_ok=False)
    assert_one_line_error(result, 'is not a student checkpoint', "--full-model-dir takes a trained student's run")
    result = run('main_student.py', '--full-model-dir', tmp_path / 'moved', *retrain, expect_ok=False)
    assert_one_line_error(result, f"--full-model-dir {tmp_path / 'moved'} holds no trained student "
                          f"({tmp_path / 'moved' / 'checkpoint.pth'} not found): name the run directory of the student "
                          "to prune (where it is now, if it moved)")
    assert not (tmp_path / 'pruned').exists()


def test_a_student_is_rebuilt_on_its_own_universal_weights_wherever_they_are(pipeline, workdir, tmp_path):
    """The universal weights come from a file the checkpoint names: a replaced file is caught, not used; a moved
    one is named with --pretrained (--evaluate, --export, retraining), its contents checked."""
    student = pipeline[1]
    checkpoint = torch.load(student / 'checkpoint.pth', weights_only=True)
    weights = torch.load(workdir / 'backbone.pth', weights_only=True)
    checkpoint['args']['pretrained'] = str(tmp_path / 'backbone.pth')
    os.makedirs(tmp_path / 'run')
    torch.save(checkpoint, tmp_path / 'run' / 'checkpoint.pth')
    evaluate = ['main_student.py', '--model-dir', tmp_path / 'run', '--evaluate', '--workers', 0, '--device', 'cpu']
    torch.save(weights, tmp_path / 'backbone.pth')  # a copy of the same weights: fine
    recorded = json.loads(open(student / 'metrics.jsonl').read().splitlines()[-1])['test_acc']
    out = run(*evaluate).stdout
    assert float(out.split('top-1 accuracy ')[1].split('%')[0]) == pytest.approx(recorded, abs=0.005)
    weights['layer3.1.conv2.weight'][0, 0, 0, 0] += 1e-3
    torch.save(weights, tmp_path / 'backbone.pth')
    result = run(*evaluate, expect_ok=False)
    assert_one_line_error(result, f"the universal weights {tmp_path / 'backbone.pth'} are not those",
                          'was trained on (another file, or changed since): give it the file it was trained on')
    os.remove(tmp_path / 'backbone.pth')  # moved: workdir/backbone.pth holds the same weights
    result = run(*evaluate, expect_ok=False)
    assert_one_line_error(result, f"the universal weights {tmp_path / 'backbone.pth'} that {tmp_path / 'run'} was "
                          'trained on are missing: put them back, or pass --pretrained with the file where it is now')
    prune = ['--full-model-dir', tmp_path / 'run', '--n-pruning-universal', 1, '--model-dir', tmp_path / 'pruned',
             '--thr-pruning-proxy', 0, *TINY[4:], '--epochs', 1, '--lr', 0.01]
    result = run('main_student.py', *prune, expect_ok=False)  # it said: --pretrained ...: no such file
    assert_one_line_error(result, f"the universal weights {tmp_path / 'backbone.pth'} that {tmp_path / 'run'} was "
                          'trained on are missing: put them back, or pass --pretrained with the file where it is now')
    moved = ['--pretrained', workdir / 'backbone.pth']
    out = run(*evaluate, *moved).stdout
    assert float(out.split('top-1 accuracy ')[1].split('%')[0]) == pytest.approx(recorded, abs=0.005)
    run('main_student.py', '--model-dir', tmp_path / 'run', '--export', tmp_path / 'deploy', *moved)
    assert sorted(os.listdir(tmp_path / 'deploy')) == ['tailored.onnx', 'tailored.pt2']
    exported = (tmp_path / 'deploy' / 'tailored.pt2').read_bytes()
    (tmp_path / 'deploy' / 'tailored.pt2').write_bytes(b'an earlier export')
    result = run('main_student.py', '--model-dir', tmp_path / 'run', '--export', tmp_path / 'deploy', *moved,
                 expect_ok=False)  # it replaced it silently
    assert_one_line_error(result, f"--export {tmp_path / 'deploy'} already holds tailored.pt2: pass --force to "
                          "replace it, or export elsewhere")
    assert (tmp_path / 'deploy' / 'tailored.pt2').read_bytes() == b'an earlier export'
    run('main_student.py', '--model-dir', tmp_path / 'run', '--export', tmp_path / 'deploy', *moved, '--force')
    assert len((tmp_path / 'deploy' / 'tailored.pt2').read_bytes()) == len(exported)
    run('main_student.py', *prune, *moved)
    assert json.load(open(tmp_path / 'pruned' / 'args.json'))['pretrained'] == str(workdir / 'backbone.pth')


def test_evaluating_a_run_on_data_it_cannot_find_names_the_data_dir_it_was_trained_with(workdir, tmp_path):
    write_image_folder(tmp_path / 'images', splits={'train': {'cat': 4, 'dog': 4}, 'val': {'cat': 2, 'dog': 2}})
    run('main_teacher.py', '--task', 'folder:pets', '--data-dir', tmp_path / 'images', '--input-size', 32,
        '--workers', 0, '--batch-size', 4, '--device', 'cpu', '--arch', 'resnet18', '--pretrained',
        workdir / 'backbone.pth', '--epochs', 1, '--model-dir', tmp_path / 'run')
    result = run('main_teacher.py', '--model-dir', tmp_path / 'run', '--evaluate', '--device', 'cpu', expect_ok=False)
    assert_one_line_error(result, 'folder:pets: data/pets/val is missing; put the images in',
                          f"(the run was trained with --data-dir {tmp_path / 'images'})")


def test_ctrl_c_is_one_line_that_points_to_resume(workdir, tmp_path):
    """Ctrl-C at a terminal.  The script starts with SIGINT's default action whatever this process has: started in
    the background of a non-interactive shell, it inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'main_teacher.py'), *map(str, TINY), '--arch',
                                'resnet18', '--pretrained', str(workdir / 'backbone.pth'), '--epochs', '50',
                                '--model-dir', str(tmp_path / 'run')], cwd=REPO, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / 'run' / 'metrics.jsonl').exists() and time.time() < deadline:  # training, epoch 1 on
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == ('error: interrupted; a training run continues from its last '
                                               'finished epoch with --resume (one stopped in its first epoch: run '
                                               'it again)')
    assert 'Traceback' not in stderr


def test_momentum_is_sgds_and_checking_the_flags_twice_holds():
    """--momentum with Adam was ignored; a namespace checked a second time (its default then set) passes."""
    import main_teacher
    from engine import check_args
    args = main_teacher.get_args_parser().parse_args([*TINY, '--model-dir', 'run', '--optimizer', 'adam'])
    check_args(args)
    check_args(args)
    assert args.momentum == 0.9  # recorded as every run records it
    args = main_teacher.get_args_parser().parse_args([*TINY, '--model-dir', 'run', '--optimizer', 'adamw',
                                                      '--momentum', '0.95'])
    with pytest.raises(UserError, match="^--momentum is SGD's: adamw takes none"):
        check_args(args)


def test_ctrl_c_in_a_command_without_resume_says_to_run_it_again(capsys):
    """The demos, experiments.py and benchmark.py have no --resume, which the message named."""
    def interrupted(args):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_:
        utils.run_cli(interrupted, argparse.ArgumentParser(), [])
    assert exit_.value.code == 130
    assert capsys.readouterr().err == ("error: interrupted; run the command again (the demos and experiments.py keep "
                                       "their finished runs and resume the one interrupted)\n")


@pytest.mark.parametrize('script, flags, message', [
    ('main_teacher.py', ['--lr', '0'], '--lr must be positive'),
    ('main_teacher.py', ['--device', 'meta'], "invalid --device 'meta'; use auto, cpu or cuda[:N]"),
    ('main_student.py', ['--teacher-coeff', '0', '--device', 'mps'], "invalid --device 'mps'; use auto, cpu or"),
    ('main_teacher.py', ['--epochs', '-1'], '--epochs must be positive'),
    ('main_teacher.py', ['--warmup-epochs', '-1'], '--warmup-epochs must be non-negative'),
    ('main_teacher.py', ['--warmup-epochs', '2', '--epochs', '2'],
     '--warmup-epochs 2.0 must be shorter than --epochs 2: the learning rate would never reach --lr'),
    ('main_student.py', ['--teacher-coeff', '0', '--thr-pruning-proxy', '0'],
     '--thr-pruning-proxy prunes a trained student: pass it with --full-model-dir'),
    ('main_student.py', ['--teacher-coeff', '0', '--classifier-init', 'teacher'],
     "--classifier-init teacher starts the classifier from the teacher's: pass --teacher-fn"),
    ('main_student.py', ['--max-skip', '0'], "--max-skip must be an integer in [1, 8] or 'dense', got '0'"),
    ('main_student.py', ['--thr-pruning-proxy', '1.0'], '--thr-pruning-proxy must be in [0, 1)'),
    ('main_student.py', ['--max-skip', '12'], '--max-skip must be an integer in [1, 8]'),
    ('main_teacher.py', ['--cuda-graph'], '--cuda-graph needs a CUDA device, not cpu'),
    ('main_student.py', ['--teacher-coeff', '0', '--cuda-graph'], '--cuda-graph needs a CUDA device, not cpu'),
    ('main_teacher.py', ['--lr', 'nan'], '--lr must be a finite number, got nan'),
    ('main_teacher.py', ['--warmup-epochs', 'inf'], '--warmup-epochs must be a finite number, got inf'),
    ('main_student.py', ['--teacher-coeff', 'nan'], '--teacher-coeff must be a finite number, got nan'),
    ('main_teacher.py', ['--seed', '-1'], '--seed must be in [0, 2**32), got -1'),
    ('main_teacher.py', ['--batch-size', '1'], '--batch-size must be at least 2'),
    ('main_teacher.py', ['--optimizer', 'adam', '--momentum', '0.5'],  # it was ignored
     "--momentum is SGD's: adam takes none (its moment estimates decay at fixed rates); drop it, or pass --optimizer"),
])
def test_invalid_flags(tmp_path, script, flags, message):
    arch = ['--arch', 'resnet18'] if script == 'main_teacher.py' else ['--backbone', 'resnet18']
    result = run(script, *TINY, *arch, '--pretrained', 'none', '--model-dir', tmp_path / 'run', *flags,
                 expect_ok=False)
    assert_one_line_error(result, message)
    assert not (tmp_path / 'run' / 'checkpoint.pth').exists()


def test_pruning_more_universal_blocks_than_exist(pipeline, tmp_path):
    teacher, student, _ = pipeline
    result = run('main_student.py', *TINY, '--backbone', 'resnet18', '--teacher-fn', teacher / 'checkpoint.pth',
                 '--full-model-dir', student, '--n-pruning-universal', 9, '--model-dir', tmp_path / 'run',
                 expect_ok=False)  # the universal weights are those the full student was trained on
    assert_one_line_error(result, 'cannot prune 9 universal blocks: 8 are left')
    assert not (tmp_path / 'run').exists()
    recorded = json.load(open(student / 'args.json'))['pretrained']
    prune = ['--full-model-dir', student, '--n-pruning-universal', 9, '--model-dir', tmp_path / 'run']
    result = run('main_student.py', *prune, '--pretrained', os.path.relpath(recorded, REPO), expect_ok=False)
    assert_one_line_error(result, 'cannot prune 9')  # the same file, named relative to another folder
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / 'other.pth')
    result = run('main_student.py', *prune, '--pretrained', tmp_path / 'other.pth', expect_ok=False)
    assert_one_line_error(result, f"the universal weights {tmp_path / 'other.pth'} are not those",
                          'was trained on (another file, or changed since)')
    result = run('main_student.py', *prune, '--pretrained', 'none', expect_ok=False)
    assert_one_line_error(result, f'was trained on the universal weights {recorded}, which it does not hold')
    assert not (tmp_path / 'run').exists()


def test_teacher_checkpoint_missing_mismatched_or_truncated(pipeline, workdir, tmp_path):
    teacher = pipeline[0]
    student_args = ['--backbone', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--model-dir',
                    tmp_path / 'run', '--epochs', 1]
    result = run('main_student.py', *TINY, *student_args, '--teacher-fn', tmp_path / 'nope.pth', expect_ok=False)
    assert_one_line_error(result, 'teacher checkpoint not found', 'nope.pth')
    other_task = [a if a != 'synth-digits' else 'synth-textures' for a in TINY]
    result = run('main_student.py', *other_task, *student_args, '--teacher-fn', teacher / 'checkpoint.pth',
                 expect_ok=False)
    assert_one_line_error(result, 'predicts 10 classes', 'this task has 20', '--teacher-fn')
    result = run('main_student.py', *TINY, *[a if a != 'resnet18' else 'resnet34' for a in student_args],
                 '--teacher-fn', teacher / 'checkpoint.pth', expect_ok=False)
    assert_one_line_error(result, 'is a resnet18', 'needs a resnet34')
    checkpoint = torch.load(teacher / 'checkpoint.pth', weights_only=True)
    checkpoint['args']['task'] = 'synth-other-digits'  # another task with as many classes
    torch.save(checkpoint, tmp_path / 'other.pth')
    result = run('main_student.py', *TINY, *student_args, '--teacher-fn', tmp_path / 'other.pth', expect_ok=False)
    assert_one_line_error(result, 'was trained on synth-other-digits', "the student's task is synth-digits")
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes((teacher / 'checkpoint.pth').read_bytes()[:5000])
    result = run('main_student.py', *TINY, *student_args, '--teacher-fn', truncated, expect_ok=False)
    assert_one_line_error(result, f'teacher checkpoint {truncated} is unreadable: truncated or not a PyTorch file (',
                          '); restore it, or train its run again with --force')
    assert not (tmp_path / 'run' / 'checkpoint.pth').exists()


def test_missing_dataset_and_corrupt_image(tmp_path):
    common = ['--arch', 'resnet18', '--pretrained', 'none', '--input-size', '32', '--epochs', 1]
    result = run('main_teacher.py', '--task', 'svhn', '--data-dir', tmp_path / 'empty', '--model-dir',
                 tmp_path / 'run', *common, '--workers', 0, expect_ok=False)
    assert_one_line_error(result, 'SVHN not found', 'python data/prepare_data.py --task svhn')
    base = write_flowers(tmp_path / 'data')
    broken = os.path.join(base, 'jpg', 'image_00002.jpg')
    with open(broken, 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 not really a jpeg')
    for workers in (0, 2):
        result = run('main_teacher.py', '--task', 'flowers', '--data-dir', tmp_path / 'data', '--model-dir',
                     tmp_path / f'run{workers}', *common, '--workers', workers, expect_ok=False)
        assert_one_line_error(result, 'corrupt image file', broken)


def test_your_own_images_teacher_student_and_evaluation(workdir, tmp_path):
    """--task folder:<name>: a teacher, a student distilled from it and its evaluation through the scripts."""
    write_image_folder(tmp_path / 'data')
    common = ['--task', 'folder:pets', '--data-dir', tmp_path / 'data', '--input-size', 32, '--workers', 0,
              '--batch-size', 6, '--device', 'cpu', '--pretrained', workdir / 'backbone.pth', '--epochs', 1]
    run('main_teacher.py', *common, '--arch', 'resnet18', '--model-dir', tmp_path / 'teacher')
    run('main_student.py', *common, '--backbone', 'resnet18', '--teacher-fn', tmp_path / 'teacher',
        '--model-dir', tmp_path / 'student')
    out = run('main_student.py', '--model-dir', tmp_path / 'student', '--evaluate', '--data-dir', tmp_path / 'data',
              '--workers', 0).stdout
    assert f"student {tmp_path / 'student'}: top-1 accuracy" in out and 'on folder:pets' in out
    assert torch.load(tmp_path / 'student' / 'checkpoint.pth', weights_only=False)['model']['meta']['num_classes'] == 3
    run('main_student.py', '--model-dir', tmp_path / 'student', '--export', tmp_path / 'deploy')
    extra = {'classes.json': '', 'preprocessing.json': ''}  # the network names its classes, logit i the i-th,
    torch.export.load(str(tmp_path / 'deploy' / 'tailored.pt2'), extra_files=extra)  # and its input's preprocessing
    onnx_meta = onnxruntime.InferenceSession(str(tmp_path / 'deploy' / 'tailored.onnx')).get_modelmeta()
    assert json.loads(extra['classes.json']) == json.loads(onnx_meta.custom_metadata_map['classes']) == [
        'cat', 'dog', 'eel']
    assert json.loads(extra['preprocessing.json']) == json.loads(onnx_meta.custom_metadata_map['preprocessing']) == [
        {'resize_shorter_side': 36}, {'center_crop': [32, 32]}, {'divide': 255},
        {'normalize': {'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}}]
    result = run('main_teacher.py', *common, '--arch', 'resnet18', '--model-dir', tmp_path / 'other', '--task',
                 'folder:other', expect_ok=False)
    assert_one_line_error(result, f"folder:other: {tmp_path / 'data' / 'other' / 'train'} is missing; put the images")
    assert not (tmp_path / 'other').exists()

    # evaluation reads the val images alone (it read and needed train/ too), among the network's classes
    shutil.copytree(tmp_path / 'data' / 'pets' / 'val', tmp_path / 'val_only' / 'pets' / 'val')
    shutil.copytree(tmp_path / 'data' / 'pets' / 'val' / 'dog', tmp_path / 'val_only' / 'pets' / 'val' / 'ant')
    for script, run_dir in (('main_teacher.py', 'teacher'), ('main_student.py', 'student')):
        evaluate = [script, '--model-dir', tmp_path / run_dir, '--evaluate', '--data-dir', tmp_path / 'val_only',
                    '--workers', 0]
        result = run(*evaluate, expect_ok=False)
        assert_one_line_error(result, f"the folder:pets classes in {tmp_path / 'val_only'} are not those the network "
                              "was trained on (new 'ant'): pass the --data-dir it was trained on")
        shutil.rmtree(tmp_path / 'val_only' / 'pets' / 'val' / 'ant')
        recorded = json.loads(open(tmp_path / run_dir / 'metrics.jsonl').read().splitlines()[-1])['test_acc']
        out = run(*evaluate).stdout
        assert float(out.split('top-1 accuracy ')[1].split('%')[0]) == pytest.approx(recorded, abs=0.005)
        shutil.copytree(tmp_path / 'data' / 'pets' / 'val' / 'dog', tmp_path / 'val_only' / 'pets' / 'val' / 'ant')

    # data whose class folders differ from those a network was trained on are refused, not renumbered
    write_image_folder(tmp_path / 'renamed', splits={'train': {'cat': 4, 'dog': 4, 'lynx': 4}, 'val': {'cat': 2}})
    renamed = ['--data-dir', tmp_path / 'renamed']
    refusal = (f"the folder:pets classes in {tmp_path / 'renamed'} are not those {{}} was trained on (lacking "
               "'eel'; new 'lynx'): {}")
    data_dir = 'pass the --data-dir it was trained on'
    teacher = tmp_path / 'teacher' / 'checkpoint.pth'
    result = run('main_student.py', *common, *renamed, '--backbone', 'resnet18', '--teacher-fn', teacher,
                 '--model-dir', tmp_path / 'student2', expect_ok=False)
    assert_one_line_error(result, refusal.format(f'teacher {teacher}', 'wrong --teacher-fn or --data-dir?'))
    result = run('main_student.py', '--full-model-dir', tmp_path / 'student', *renamed, '--model-dir',
                 tmp_path / 'pruned', '--n-pruning-universal', 1, '--epochs', 1, '--workers', 0, '--device', 'cpu',
                 expect_ok=False)
    assert_one_line_error(result, refusal.format('the network', data_dir))
    result = run('main_teacher.py', *common, *renamed, '--arch', 'resnet18', '--model-dir', tmp_path / 'teacher',
                 '--resume', '--epochs', 2, expect_ok=False)
    assert 'already finished' in result.stderr  # the check below needs an unfinished run
    checkpoint = torch.load(teacher, weights_only=False)
    checkpoint['finished'] = False  # as if interrupted
    torch.save(checkpoint, teacher)
    result = run('main_teacher.py', *common[:-2], *renamed, '--arch', 'resnet18', '--model-dir', tmp_path / 'teacher',
                 '--resume', '--epochs', 2, expect_ok=False)
    assert_one_line_error(result, refusal.format('the network', data_dir))
    assert not any((tmp_path / name).exists() for name in ('student2', 'pruned'))
    del checkpoint['args']['classes']  # a run that recorded none: its class count is still checked, in one line
    torch.save(checkpoint, teacher)
    result = run('main_teacher.py', *common[:-2], '--data-dir', tmp_path / 'three', '--arch', 'resnet18',
                 '--model-dir', tmp_path / 'teacher', '--resume', '--epochs', 2, expect_ok=False)
    assert result.returncode != 0 and 'missing' in result.stderr
    write_image_folder(tmp_path / 'two', splits={'train': {'cat': 4, 'dog': 4}, 'val': {'cat': 2}})
    result = run('main_teacher.py', *common[:-2], '--data-dir', tmp_path / 'two', '--arch', 'resnet18',
                 '--model-dir', tmp_path / 'teacher', '--resume', '--epochs', 2, expect_ok=False)
    assert_one_line_error(result, f"--resume: the run in {tmp_path / 'teacher'} predicts 3 classes, the folder:pets "
                          f"data in {tmp_path / 'two'} has 2: pass the --data-dir it was trained on")
    checkpoint['finished'] = True  # the teacher as it was: a student distils from a finished one only
    torch.save(checkpoint, teacher)
    student = torch.load(tmp_path / 'student' / 'checkpoint.pth', weights_only=False)
    student['finished'] = False  # resumed on its own data: the recorded classes match
    torch.save(student, tmp_path / 'student' / 'checkpoint.pth')
    run('main_student.py', *common[:-2], '--backbone', 'resnet18', '--teacher-fn', tmp_path / 'teacher',
        '--model-dir', tmp_path / 'student', '--resume', '--epochs', 2)


def kill_after_first_epoch(script, args, model_dir):
    """Start `script` and SIGKILL it as soon as its first checkpoint exists."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args),
                                '--model-dir', str(model_dir)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = model_dir / 'checkpoint.pth'
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert torch.load(checkpoint, weights_only=True)['epoch'] == 0, 'the run was not interrupted after epoch 0'


def test_resume_after_kill_matches_uninterrupted_run(workdir, tmp_path):
    args = TINY + ['--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--epochs', 3, '--lr', 0.01,
                   '--lr-schedule', 'cosine', '--warmup-epochs', 0.5, '--train-limit', 160, '--seed', 5]
    run('main_teacher.py', *args, '--model-dir', tmp_path / 'straight')
    interrupted = tmp_path / 'interrupted'
    kill_after_first_epoch('main_teacher.py', args, interrupted)
    with open(interrupted / 'metrics.jsonl', 'a') as f:  # and a line torn by a failed write (a full disk)
        f.write('{"loss": 2.3, "epo')
    run('main_teacher.py', *args, '--model-dir', interrupted, '--resume')
    straight = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)
    resumed = torch.load(interrupted / 'checkpoint.pth', weights_only=True)
    assert resumed['finished'] and resumed['epoch'] == 2
    for key, value in straight['model'].items():
        assert torch.equal(value, resumed['model'][key]), key
    assert [json.loads(line)['epoch'] for line in open(interrupted / 'metrics.jsonl')] == [0, 1, 2]


def test_resume_with_loader_processes_matches_uninterrupted_run(workdir, tmp_path):
    """Image files read by --workers processes, kept from epoch to epoch, which crop and flip each image from its
    own seed: a run resumed after its first epoch ends where an uninterrupted one does."""
    write_image_folder(tmp_path / 'data', splits={'train': {'cat': 6, 'dog': 6, 'eel': 6},
                                                  'val': {'cat': 2, 'dog': 2, 'eel': 2}})
    common = ['--task', 'folder:pets', '--data-dir', tmp_path / 'data', '--input-size', 32, '--workers', 2,
              '--batch-size', 6, '--device', 'cpu', '--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth',
              '--lr', 0.01, '--seed', 3]
    run('main_teacher.py', *common, '--epochs', 3, '--model-dir', tmp_path / 'straight')
    run('main_teacher.py', *common, '--epochs', 1, '--model-dir', tmp_path / 'resumed')
    checkpoint = torch.load(tmp_path / 'resumed' / 'checkpoint.pth', weights_only=False)
    checkpoint['finished'] = False  # as if killed after its first epoch (the step schedule ignores --epochs)
    torch.save(checkpoint, tmp_path / 'resumed' / 'checkpoint.pth')
    run('main_teacher.py', *common, '--epochs', 3, '--model-dir', tmp_path / 'resumed', '--resume')
    straight = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)['model']
    resumed = torch.load(tmp_path / 'resumed' / 'checkpoint.pth', weights_only=True)['model']
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_resume_with_more_epochs_follows_the_longer_cosine_schedule(workdir, tmp_path):
    """--epochs grown on --resume: the resumed epochs follow the schedule of the new length from their first step
    (the optimizer held the old schedule's last learning rate, 0 for a cosine, for that step)."""
    args = [*TINY, '--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--lr', 0.01, '--lr-schedule',
            'cosine', '--model-dir', tmp_path / 'run']
    run('main_teacher.py', *args, '--epochs', 1)
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=False)
    checkpoint['finished'] = False
    torch.save(checkpoint, tmp_path / 'run' / 'checkpoint.pth')
    run('main_teacher.py', *args, '--epochs', 3, '--resume')
    lrs = [json.loads(line)['lr'] for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert lrs[0] == 0.01 and lrs[1:] == pytest.approx([0.01 * 0.75, 0.01 * 0.25])  # cos decay at 1/3 and 2/3


def test_student_resume_restores_the_tasks_batchnorm_statistics(pipeline, workdir, tmp_path):
    """A killed student run, resumed, ends bit-exact where an uninterrupted one does, the universal blocks'
    task statistics included."""
    args = TINY + ['--backbone', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--epochs', 2, '--lr', 0.01,
                   '--teacher-fn', pipeline[0] / 'checkpoint.pth', '--teacher-coeff', 1, '--train-limit', 160]
    run('main_student.py', *args, '--model-dir', tmp_path / 'straight')
    interrupted = tmp_path / 'interrupted'
    kill_after_first_epoch('main_student.py', args, interrupted)
    run('main_student.py', *args, '--model-dir', interrupted, '--resume')
    straight = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)['model']['state']
    resumed = torch.load(interrupted / 'checkpoint.pth', weights_only=True)['model']['state']
    assert straight.keys() == resumed.keys() and 'backbone.layer2.0.downsample.1.running_mean' in straight
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_retraining_keeps_the_full_students_task_statistics_mode_and_backbone(pipeline, tmp_path):
    teacher, student, pruned = pipeline
    recorded = json.load(open(pruned / 'args.json'))  # inherited, not the defaults
    assert (recorded['task'], recorded['input_size'], recorded['backbone']) == ('synth-digits', 32, 'resnet18')
    assert (recorded['teacher_fn'], recorded['teacher_coeff']) == (str(teacher / 'checkpoint.pth'), 2)
    result = run('main_student.py', *TINY[2:], '--task', 'synth-shapes', '--teacher-fn', teacher / 'checkpoint.pth',
                 '--full-model-dir', student, '--n-pruning-universal', 1, '--model-dir', tmp_path / 'run',
                 expect_ok=False)
    assert_one_line_error(result, 'was trained with --task synth-digits, not synth-shapes', 'drop --task')
    result = run('main_student.py', *TINY, '--backbone', 'resnet34', '--teacher-fn', teacher / 'checkpoint.pth',
                 '--full-model-dir', student, '--n-pruning-universal', 1, '--model-dir', tmp_path / 'run',
                 expect_ok=False)
    assert_one_line_error(result, 'was trained with --backbone resnet18, not resnet34', 'drop --backbone')
    result = run('main_student.py', *TINY, '--max-skip', 'dense', '--full-model-dir', student,
                 '--n-pruning-universal', 1, '--model-dir', tmp_path / 'run', expect_ok=False)
    assert_one_line_error(result, 'was trained with --max-skip 3, not dense', 'drop --max-skip')
    result = run('main_student.py', *TINY, '--classifier-init', 'fresh', '--full-model-dir', student,
                 '--n-pruning-universal', 1, '--model-dir', tmp_path / 'run', expect_ok=False)
    assert_one_line_error(result, 'was trained with --classifier-init teacher, not fresh', 'drop --classifier-init')
    result = run('main_student.py', *TINY, '--backbone', 'resnet18', '--teacher-fn', teacher / 'checkpoint.pth',
                 '--full-model-dir', student, '--n-pruning-universal', 1, '--shared-bn-stats',
                 '--model-dir', tmp_path / 'run', expect_ok=False)
    assert_one_line_error(result, 'trained with task-specific BatchNorm statistics', 'drop --shared-bn-stats')
    assert not (tmp_path / 'run').exists()


def test_retraining_reads_the_universal_weights_once(pipeline, workdir, tmp_path, monkeypatch):
    """A pruned student takes its universal weights from the full student it prunes: it read the weights file a
    second time, into a network whose weights it then replaced."""
    import backbones
    import main_student
    reads, load = [], backbones.load_backbone_weights

    def counted(model, pretrained):
        reads.append(pretrained)
        return load(model, pretrained)
    monkeypatch.setattr(backbones, 'load_backbone_weights', counted)
    main_student.main(main_student.get_args_parser().parse_args(list(map(str, [
        *TINY[4:], '--full-model-dir', pipeline[1], '--n-pruning-universal', 3, '--thr-pruning-proxy', 0.01,
        '--epochs', 1, '--model-dir', tmp_path / 'run']))))
    assert [read for read in reads if read is not None] == [str(workdir / 'backbone.pth')]
    assert json.load(open(tmp_path / 'run' / 'args.json'))['pretrained'] == str(workdir / 'backbone.pth')


def test_shared_statistics_and_fresh_classifier_on_request(pipeline, workdir, tmp_path):
    teacher = pipeline[0]
    run('main_student.py', *TINY, '--backbone', 'resnet18', '--pretrained', workdir / 'backbone.pth',
        '--teacher-fn', teacher / 'checkpoint.pth', '--model-dir', tmp_path / 'shared', '--epochs', 1,
        '--shared-bn-stats', '--classifier-init', 'fresh', '--lr', '1e-9')
    saved = json.load(open(tmp_path / 'shared' / 'args.json'))
    assert saved['shared_bn_stats'] and saved['classifier_init'] == 'fresh'
    pack = torch.load(tmp_path / 'shared' / 'checkpoint.pth', weights_only=True)['model']
    assert not pack['meta']['task_bn_stats'] and not any(k.startswith('backbone.layer') for k in pack['state'])
    teacher_fc = torch.load(teacher / 'checkpoint.pth', weights_only=True)['model']['fc.weight']
    assert not torch.allclose(pack['state']['backbone.fc.weight'], teacher_fc, atol=1e-3)  # fresh, barely trained
    out = run('main_student.py', *TINY, '--model-dir', tmp_path / 'shared', '--evaluate').stdout
    recorded = json.loads(open(tmp_path / 'shared' / 'metrics.jsonl').read().splitlines()[-1])['test_acc']
    assert float(out.split('top-1 accuracy ')[1].split('%')[0]) == pytest.approx(recorded, abs=0.005)


def test_a_student_without_distillation_still_starts_from_the_teachers_classifier(pipeline, workdir, tmp_path):
    """gamma2 0 with a teacher (the teacher ablation's other arm): the classifier starts as the teacher's, so
    that distillation is the only difference; without a teacher it starts fresh, and the run records so."""
    teacher = pipeline[0]
    common = [*TINY, '--backbone', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--epochs', 1,
              '--teacher-coeff', 0, '--lr', '1e-9']
    run('main_student.py', *common, '--teacher-fn', teacher / 'checkpoint.pth', '--model-dir', tmp_path / 'with')
    run('main_student.py', *common, '--model-dir', tmp_path / 'without')
    teacher_fc = torch.load(teacher / 'checkpoint.pth', weights_only=True)['model']['fc.weight']
    for name, from_teacher in (('with', True), ('without', False)):
        fc = torch.load(tmp_path / name / 'checkpoint.pth', weights_only=True)['model']['state']['backbone.fc.weight']
        assert torch.allclose(fc, teacher_fc, atol=1e-6) == from_teacher, name  # barely trained
        recorded = json.load(open(tmp_path / name / 'args.json'))['classifier_init']
        assert recorded == ('teacher' if from_teacher else 'fresh'), name
    # the teacher it starts from is recorded: trained again, it makes the run stale (engine.stale_sources)
    teacher_sha256 = teacher_fingerprint(torch.load(teacher / 'checkpoint.pth', weights_only=False))
    assert [torch.load(tmp_path / name / 'checkpoint.pth', weights_only=False)['teacher_sha256']
            for name in ('with', 'without')] == [teacher_sha256, None]
    result = run('main_student.py', *common, '--teacher-fn', tmp_path / 'missing', '--model-dir', tmp_path / 'bad',
                 expect_ok=False)
    assert_one_line_error(result, f"teacher checkpoint not found: {tmp_path / 'missing'}")
    unfinished = torch.load(teacher / 'checkpoint.pth', weights_only=False)  # interrupted: it used to be taken
    unfinished['finished'] = False
    torch.save(unfinished, tmp_path / 'unfinished.pth')
    result = run('main_student.py', *common, '--teacher-fn', tmp_path / 'unfinished.pth', '--model-dir',
                 tmp_path / 'bad', expect_ok=False)
    assert_one_line_error(result, f"teacher {tmp_path / 'unfinished.pth'} is an unfinished run (", " epochs): "
                          "finish it with --resume first")
    assert not (tmp_path / 'bad').exists()


def test_a_replaced_teacher_is_refused_by_resume_and_by_retraining_that_takes_it(pipeline, workdir, tmp_path):
    """A student records the fingerprint of the teacher it imitates: resumed, or pruned and retrained with the
    teacher it names, on a teacher file replaced since (retrained with --force, say), it would silently imitate
    another network."""
    teacher = tmp_path / 'teacher' / 'checkpoint.pth'
    os.makedirs(teacher.parent)
    shutil.copy(pipeline[0] / 'checkpoint.pth', teacher)
    common = [*TINY, '--lr', 0.01, '--teacher-coeff', 1]
    run('main_student.py', *common, '--backbone', 'resnet18', '--pretrained', workdir / 'backbone.pth',
        '--teacher-fn', teacher, '--epochs', 1, '--model-dir', tmp_path / 'student')
    checkpoint = torch.load(tmp_path / 'student' / 'checkpoint.pth', weights_only=False)
    original = torch.load(teacher, weights_only=False)
    replaced = copy.deepcopy(original)
    replaced['model']['layer4.1.conv2.weight'][0, 0, 0, 0] += 1e-3
    torch.save(replaced, teacher)
    retrain = ['--full-model-dir', tmp_path / 'student', '--n-pruning-universal', 1, '--thr-pruning-proxy', 0,
               '--epochs', 1, '--model-dir', tmp_path / 'pruned', *common]
    result = run('main_student.py', *retrain, expect_ok=False)
    assert_one_line_error(result, f"the teacher {teacher} is not the one the student in {tmp_path / 'student'} was "
                          f"trained with (replaced since): pass --teacher-fn {teacher} to retrain with it as it is now")
    assert not (tmp_path / 'pruned').exists()
    run('main_student.py', *retrain, '--teacher-fn', teacher)  # named: the user's choice
    pruned = torch.load(tmp_path / 'pruned' / 'checkpoint.pth', weights_only=False)
    pruned['finished'] = False  # interrupted; its full student trained again since (here: one gate moved)
    torch.save(pruned, tmp_path / 'pruned' / 'checkpoint.pth')
    trained_again = copy.deepcopy(checkpoint)
    trained_again['model']['state']['gate_logits'][1, 0] += 1e-3
    torch.save(trained_again, tmp_path / 'student' / 'checkpoint.pth')
    result = run('main_student.py', *retrain, '--teacher-fn', teacher, '--epochs', 2, '--resume', expect_ok=False)
    assert_one_line_error(result, f"the full student {tmp_path / 'student'} is not the one {tmp_path / 'pruned'} was "
                          "trained with (replaced since): put it back, or start the run again with --force")
    checkpoint['finished'] = False  # as if interrupted after epoch 1 of 2
    torch.save(checkpoint, tmp_path / 'student' / 'checkpoint.pth')
    args_before = (tmp_path / 'student' / 'args.json').read_bytes()
    resume = [*common, '--backbone', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--teacher-fn', teacher,
              '--epochs', 2, '--model-dir', tmp_path / 'student', '--resume']
    result = run('main_student.py', *resume, expect_ok=False)
    assert_one_line_error(result, f"the teacher {teacher} is not the one {tmp_path / 'student'} was trained with "
                          "(replaced since): put it back, or start the run again with --force")
    assert (tmp_path / 'student' / 'args.json').read_bytes() == args_before
    torch.save(original, teacher)
    run('main_student.py', *resume)
    assert torch.load(tmp_path / 'student' / 'checkpoint.pth', weights_only=True)['finished']


def test_resume_takes_moved_weights_where_they_are_now(pipeline, workdir, tmp_path):
    """A run records where its weights are (--pretrained, --teacher-fn); moved since, --resume takes them where they
    are now (it refused, naming the old place), the fingerprints the run recorded checking that they are the same,
    before args.json records the new place.  While the recorded files are still there, another is refused."""
    before, after = tmp_path / 'before', tmp_path / 'after'
    os.makedirs(before)
    shutil.copy(workdir / 'backbone.pth', before / 'backbone.pth')
    shutil.copy(pipeline[0] / 'checkpoint.pth', before / 'teacher.pth')
    common = [*TINY, '--backbone', 'resnet18', '--lr', 0.01, '--teacher-coeff', 1, '--model-dir', tmp_path / 'student']
    run('main_student.py', *common, '--pretrained', before / 'backbone.pth', '--teacher-fn', before / 'teacher.pth',
        '--epochs', 1)
    checkpoint = torch.load(tmp_path / 'student' / 'checkpoint.pth', weights_only=False)
    checkpoint['finished'] = False  # as if interrupted after epoch 1 of 2
    torch.save(checkpoint, tmp_path / 'student' / 'checkpoint.pth')
    args_before = (tmp_path / 'student' / 'args.json').read_bytes()

    def resume(backbone, teacher, expect_ok=False):
        return run('main_student.py', *common, '--pretrained', backbone, '--teacher-fn', teacher, '--epochs', 2,
                   '--resume', expect_ok=expect_ok)
    result = resume(before / 'backbone.pth', pipeline[0] / 'checkpoint.pth')  # a copy, but the recorded one is there
    assert_one_line_error(result, f"was trained with --teacher-fn {before / 'teacher.pth'}, not "
                          f"{pipeline[0] / 'checkpoint.pth'}; resume it with its own flags")
    os.rename(before, after)
    teacher = torch.load(after / 'teacher.pth', weights_only=False)
    teacher['model']['layer4.1.conv2.weight'][0, 0, 0, 0] += 1e-3
    torch.save(teacher, tmp_path / 'other_teacher.pth')
    result = resume(after / 'backbone.pth', tmp_path / 'other_teacher.pth')
    assert_one_line_error(result, f"the teacher {tmp_path / 'other_teacher.pth'} is not the one {tmp_path / 'student'} "
                          "was trained with")
    backbone = torch.load(after / 'backbone.pth', weights_only=True)
    backbone['layer3.0.conv1.weight'][0, 0, 0, 0] += 1e-3
    torch.save(backbone, tmp_path / 'other_backbone.pth')
    result = resume(tmp_path / 'other_backbone.pth', after / 'teacher.pth')
    assert_one_line_error(result, f"the universal weights {tmp_path / 'other_backbone.pth'} are not those")
    assert (tmp_path / 'student' / 'args.json').read_bytes() == args_before
    resume(after / 'backbone.pth', after / 'teacher.pth', expect_ok=True)
    recorded = json.load(open(tmp_path / 'student' / 'args.json'))
    assert (recorded['pretrained'], recorded['teacher_fn']) == (str(after / 'backbone.pth'), str(after / 'teacher.pth'))
    assert torch.load(tmp_path / 'student' / 'checkpoint.pth', weights_only=True)['epoch'] == 1


def test_demo_runner_skips_finished_stages_and_prints_the_table(workdir, tmp_path, capsys):
    import demo
    tiny = dict(batch_size=32, epochs=1, lr=0.01, lr_decay_epochs=1, train_limit=64, test_limit=32)
    recipe = dict(teacher=tiny, student=tiny, prune=dict(n_pruning_universal=2, thr_pruning_proxy=0.0), retrain=tiny)
    args = demo.get_args_parser('synth-digits', model_root=str(tmp_path), arch='resnet18', input_size=32,
                                pretrained=str(workdir / 'backbone.pth')).parse_args(['--workers', '0',
                                                                                     '--device', 'cpu'])
    table = demo.run_demo('synth-digits', recipe, args)
    assert table['stats']['universal_blocks_kept'] == 6 and 0 < table['flops_removed'] < 1
    out = capsys.readouterr().out
    assert 'universal blocks' in out and f"The tailored network: {tmp_path / 'pruned' / 'architecture.png'}" in out
    before = (tmp_path / 'teacher' / 'checkpoint.pth').read_bytes()
    again = demo.run_demo('synth-digits', recipe, args)  # every stage finished: skipped, same table
    assert again['student_acc'] == table['student_acc']
    assert (tmp_path / 'teacher' / 'checkpoint.pth').read_bytes() == before
    # a rerun with other settings does not pass the old runs off as its own, nor replaces them
    pruned_before = (tmp_path / 'pruned' / 'checkpoint.pth').read_bytes()
    other = dict(recipe, prune=dict(recipe['prune'], thr_pruning_proxy=0.5))
    with pytest.raises(UserError, match=r'pruned holds a finished run trained with --thr-pruning-proxy 0.0, not 0.5: '
                                        r'pass --force'):
        demo.run_demo('synth-digits', other, args)
    assert (tmp_path / 'pruned' / 'checkpoint.pth').read_bytes() == pruned_before
    args.arch, args.seed = 'resnet34', 1
    with pytest.raises(UserError, match='teacher holds a finished run trained with --arch resnet18, not resnet34; '
                                        '--seed 0, not 1: pass --force'):
        demo.run_demo('synth-digits', recipe, args)
    args.arch, args.seed, args.model_root = 'resnet18', 0, str(tmp_path / 'deeper')
    deeper = dict(recipe, prune=dict(recipe['prune'], n_pruning_universal=[4, 9]))  # resnet18 has 8 blocks
    with pytest.raises(UserError, match=r'^the synth-digits recipe prunes 9 universal blocks, and resnet18 has 8: '
                                        r'pass a deeper --arch, or run the stages with main_\*.py$'):
        demo.run_demo('synth-digits', deeper, args)
    assert not (tmp_path / 'deeper').exists()  # refused before the teacher and the student train (it was after)
    args.model_root = str(tmp_path)  # the teacher trained again (--force) under a finished student: refused
    teacher = torch.load(tmp_path / 'teacher' / 'checkpoint.pth', weights_only=False)
    teacher['model']['fc.bias'] += 1
    torch.save(teacher, tmp_path / 'teacher' / 'checkpoint.pth')
    with pytest.raises(UserError, match=re.escape(f"student holds a finished run trained with an earlier "
                                                  f"{tmp_path / 'teacher' / 'checkpoint.pth'} (trained again since): "
                                                  "pass --force")):
        demo.run_demo('synth-digits', recipe, args)


def test_an_interrupted_demo_stage_is_resumed_when_run_again(workdir, tmp_path):
    """The demos and experiments.py rerun as they were started: a stage interrupted after its first epoch goes on
    from there (it was refused, and their --force would have rerun every finished stage as well)."""
    import demo
    import main_teacher
    args = demo.get_args_parser('synth-digits', model_root=str(tmp_path), arch='resnet18', input_size=32,
                                pretrained=str(workdir / 'backbone.pth')).parse_args(['--workers', '0',
                                                                                     '--device', 'cpu'])
    flags = dict(arch='resnet18', batch_size=32, epochs=1, lr=0.01, lr_decay_epochs=1, train_limit=64, test_limit=32)
    logger = utils.setup_logging()
    demo.run_stage('teacher', main_teacher, 'synth-digits', str(tmp_path / 'teacher'), args, flags, logger)
    checkpoint = torch.load(tmp_path / 'teacher' / 'checkpoint.pth', weights_only=False)
    checkpoint['finished'] = False  # as if interrupted after epoch 1 of 2
    torch.save(checkpoint, tmp_path / 'teacher' / 'checkpoint.pth')
    demo.run_stage('teacher', main_teacher, 'synth-digits', str(tmp_path / 'teacher'), args, dict(flags, epochs=2),
                   logger)
    resumed = torch.load(tmp_path / 'teacher' / 'checkpoint.pth', weights_only=True)
    assert resumed['finished'] and resumed['epoch'] == 1
    assert [json.loads(line)['epoch'] for line in open(tmp_path / 'teacher' / 'metrics.jsonl')] == [0, 1]


@pytest.mark.parametrize('tolerance', [1000.0, -1000.0])
def test_demo_tries_pruning_levels_until_one_is_within_tolerance(workdir, tmp_path, monkeypatch, tolerance):
    """docs/method.md §2 step 5: k = 2 first; kept if within the tolerance of the teacher, else k = 1 too, then
    the best."""
    import demo
    monkeypatch.setattr(demo, 'ACCURACY_TOLERANCE', tolerance)
    tiny = dict(batch_size=32, epochs=1, lr=0.01, lr_decay_epochs=1, train_limit=64, test_limit=32)
    recipe = dict(teacher=tiny, student=tiny, prune=dict(n_pruning_universal=(1, 2), thr_pruning_proxy=0.0),
                  retrain=tiny)
    args = demo.get_args_parser('synth-digits', model_root=str(tmp_path), arch='resnet18', input_size=32,
                                pretrained=str(workdir / 'backbone.pth')).parse_args(['--workers', '0',
                                                                                     '--device', 'cpu'])
    table = demo.run_demo('synth-digits', recipe, args)
    runs = {k: tmp_path / f'pruned-k{k}' for k in (1, 2)}
    if tolerance > 0:
        assert (runs[2] / 'checkpoint.pth').exists() and not runs[1].exists()
        assert table['stats']['universal_blocks_kept'] == 6
    else:
        accuracies = {k: torch.load(run / 'checkpoint.pth', weights_only=False)['accuracy'] for k, run in runs.items()}
        best = max((2, 1), key=accuracies.get)  # on a tie the leaner network
        assert table['student_acc'] == accuracies[best]
        assert table['stats']['universal_blocks_kept'] == 8 - best


def test_lr_schedules_step_every_iteration():
    from argparse import Namespace
    from engine import make_optimizer

    def lrs(**overrides):
        args = Namespace(optimizer='sgd', lr=0.1, momentum=0.9, weight_decay=0.0, epochs=4, lr_decay_epochs=2,
                         lr_schedule='step', warmup_epochs=0.0)
        vars(args).update(overrides)
        optimizer, scheduler = make_optimizer([torch.nn.Parameter(torch.zeros(1))], args, steps_per_epoch=5)
        seen = []
        for _ in range(20):
            seen.append(optimizer.param_groups[0]['lr'])
            optimizer.step()
            scheduler.step()
        return seen

    assert lrs() == pytest.approx([0.1] * 10 + [0.01] * 10)  # x0.1 every 2 epochs, as the paper's StepLR
    cosine = lrs(lr_schedule='cosine', warmup_epochs=1.0)
    assert cosine[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # linear warm-up over one epoch
    assert cosine[5] == pytest.approx(0.1) and all(a > b for a, b in zip(cosine[5:], cosine[6:]))
    assert cosine[-1] < 0.002


def test_offline_demo_pretrains_and_caches_its_backbone(tmp_path, monkeypatch):
    """demo_synthetic.py end to end on tiny recipes: source pre-training exported as a torchvision-format
    backbone file, the target stages on top of it, and the cached backbone reused by a second run."""
    import demo_synthetic
    tiny = dict(batch_size=32, epochs=1, lr=0.01, lr_decay_epochs=1, train_limit=64, test_limit=32)
    monkeypatch.setattr(demo_synthetic, 'SOURCE_RECIPE', dict(tiny, optimizer='adam', lr=1e-3))
    monkeypatch.setattr(demo_synthetic, 'RECIPE', dict(teacher=tiny, student=dict(tiny, teacher_coeff=0.1),
                                                       prune=dict(n_pruning_universal=1, thr_pruning_proxy=0.0),
                                                       retrain=tiny))
    args = demo_synthetic.get_args_parser().parse_args(['--model-root', str(tmp_path), '--device', 'cpu'])
    table = demo_synthetic.main(args)
    backbone = torch.load(tmp_path / 'resnet18_synth-source.pth', weights_only=True)
    assert set(backbone) == {k for k in torchvision.models.resnet18().state_dict() if not k.startswith('fc.')}
    assert json.load(open(tmp_path / 'synth-digits' / 'student' / 'args.json'))['pretrained'] == \
        str(tmp_path / 'resnet18_synth-source.pth')
    assert table['stats']['universal_blocks_kept'] == 7
    again = demo_synthetic.main(demo_synthetic.get_args_parser().parse_args(['--model-root', str(tmp_path)]))
    assert again['student_acc'] == table['student_acc']  # nothing retrained: same backbone, runs skipped
    assert torch.equal(torch.load(tmp_path / 'resnet18_synth-source.pth', weights_only=True)['conv1.weight'],
                       backbone['conv1.weight'])


def test_divergence_is_caught_before_anything_is_saved(workdir, tmp_path):
    """One step at lr 1e40 makes every weight non-finite, its loss still finite: refused, nothing saved."""
    result = run('main_teacher.py', *TINY, '--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth',
                 '--model-dir', tmp_path / 'run', '--epochs', 1, '--train-limit', 32, '--lr', 1e40, expect_ok=False)
    assert_one_line_error(result, 'training diverged at epoch 0, step 0 (its last)', 'became non-finite', 'lower --lr')
    assert not (tmp_path / 'run' / 'checkpoint.pth').exists()


def test_non_finite_checkpoints_are_refused_with_their_file(pipeline, workdir, tmp_path):
    teacher, student, _ = pipeline
    checkpoint = torch.load(teacher / 'checkpoint.pth', weights_only=True)
    checkpoint['model']['layer2.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    torch.save(checkpoint, tmp_path / 'nan_teacher.pth')
    result = run('main_student.py', *TINY, '--backbone', 'resnet18', '--pretrained', workdir / 'backbone.pth',
                 '--teacher-fn', tmp_path / 'nan_teacher.pth', '--model-dir', tmp_path / 'run', expect_ok=False)
    assert_one_line_error(result, str(tmp_path / 'nan_teacher.pth'), 'non-finite', 'layer2.0.conv1.weight')
    assert not (tmp_path / 'run' / 'checkpoint.pth').exists()
    (tmp_path / 'nan_student').mkdir()
    checkpoint = torch.load(student / 'checkpoint.pth', weights_only=True)
    checkpoint['model']['state']['gate_logits'][3, 1] = float('inf')
    torch.save(checkpoint, tmp_path / 'nan_student' / 'checkpoint.pth')
    result = run('main_student.py', *TINY, '--model-dir', tmp_path / 'nan_student', '--evaluate', expect_ok=False)
    assert_one_line_error(result, 'non-finite', 'gate_logits')


def test_evaluate_rebuilds_the_run_as_recorded(pipeline):
    """The run's own task, input size and network; a flag given unlike the run's is refused, not ignored (the
    accuracy printed would not be that of the network the flags describe)."""
    import main_student
    import main_teacher
    teacher, student, _ = pipeline
    at_224 = [a if a != '32' else '224' for a in TINY]
    result = run('main_student.py', *at_224, '--model-dir', student, '--evaluate', expect_ok=False)
    assert_one_line_error(result, f'{student} was trained with --input-size 32, not 224: drop those flags')
    for script, run_dir, flags, setting in (
            (main_student, student, ['--max-skip', 'dense'], '--max-skip 3, not dense'),
            (main_student, student, ['--backbone', 'resnet34'], '--backbone resnet18, not resnet34'),
            (main_student, student, ['--shared-bn-stats'], '--shared-bn-stats False, not True'),
            (main_teacher, teacher, ['--arch', 'resnet34'], '--arch resnet18, not resnet34')):
        args = script.get_args_parser().parse_args([*TINY, *flags, '--model-dir', str(run_dir), '--evaluate'])
        with pytest.raises(UserError, match=f'^{run_dir} was trained with {setting}: drop those flags'):
            script.main(args)
    args = main_student.get_args_parser().parse_args([*TINY, '--pretrained', 'other.pth', '--model-dir', str(student),
                                                      '--evaluate'])  # where the run's weights are now: not there
    with pytest.raises(UserError, match=f"^--pretrained {re.escape(os.path.abspath('other.pth'))}: no such file$"):
        main_student.main(args)
    other_task = [a if a != 'synth-digits' else 'synth-textures' for a in TINY]
    no_task = ['--workers', '0', '--device', 'cpu']  # no --task, --input-size or --test-limit: the run's own
    for script, run_dir in (('main_student.py', student), ('main_teacher.py', teacher)):
        result = run(script, *other_task, '--model-dir', run_dir, '--evaluate', expect_ok=False)
        assert_one_line_error(result, 'was trained on synth-digits, not synth-textures', '--task synth-digits')
        recorded = json.loads(open(run_dir / 'metrics.jsonl').read().splitlines()[-1])['test_acc']
        out = run(script, *no_task, '--model-dir', run_dir, '--evaluate').stdout
        assert 'on synth-digits (at most 64 images: --test-limit 64)' in out  # the run's subset, said so
        assert float(out.split('top-1 accuracy ')[1].split('%')[0]) == pytest.approx(recorded, abs=0.005)
        result = run(script, *no_task, '--model-dir', run_dir.parent / f'untrained_{script}', expect_ok=False)
        assert_one_line_error(result, '--task is required to train')
        assert not (run_dir.parent / f'untrained_{script}').exists()


def test_student_on_random_universal_weights_can_be_rebuilt(tmp_path):
    """--pretrained none: the universal weights are drawn at random, so the checkpoint must hold them."""
    run('main_student.py', *TINY, '--backbone', 'resnet18', '--pretrained', 'none', '--teacher-coeff', 0,
        '--model-dir', tmp_path / 'student', '--epochs', 1, '--lr', 0.01)
    recorded = json.loads(open(tmp_path / 'student' / 'metrics.jsonl').read())['test_acc']
    out = run('main_student.py', *TINY, '--model-dir', tmp_path / 'student', '--evaluate').stdout
    assert float(out.split('top-1 accuracy ')[1].split('%')[0]) == pytest.approx(recorded, abs=0.005)
    run('main_student.py', *TINY, '--backbone', 'resnet18', '--teacher-coeff', 0, '--full-model-dir',
        tmp_path / 'student', '--n-pruning-universal', 1, '--thr-pruning-proxy', 0, '--model-dir', tmp_path / 'pruned',
        '--epochs', 1)
    full = torch.load(tmp_path / 'student' / 'checkpoint.pth', weights_only=True)['model']['universal']
    pruned = torch.load(tmp_path / 'pruned' / 'checkpoint.pth', weights_only=True)['model']['universal']
    assert torch.equal(full['layer3.0.conv1.weight'], pruned['layer3.0.conv1.weight'])  # retrained on the same


def test_resume_refuses_another_run_and_nothing_to_do(pipeline, workdir, tmp_path):
    args = TINY + ['--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--epochs', 3, '--lr', 0.01]
    run_dir = tmp_path / 'run'
    kill_after_first_epoch('main_teacher.py', args, run_dir)
    before = (run_dir / 'args.json').read_text()
    result = run('main_teacher.py', *[a if a != 'resnet18' else 'resnet34' for a in args], '--model-dir', run_dir,
                 '--resume', expect_ok=False)
    assert_one_line_error(result, '--resume', '--arch resnet18, not resnet34')
    for flag, value, recorded in (('--lr', 0.5, 0.01), ('--optimizer', 'adam', 'sgd'), ('--batch-size', 16, 32)):
        result = run('main_teacher.py', *args, flag, value, '--model-dir', run_dir, '--resume', expect_ok=False)
        assert_one_line_error(result, f'--resume: the run in {run_dir} was trained with {flag} {recorded}, not '
                              f'{value}; resume it with its own flags')
    result = run('main_teacher.py', *args[:-4], '--epochs', 1, '--lr', 0.01, '--model-dir', run_dir, '--resume',
                 expect_ok=False)
    assert_one_line_error(result, 'already went through epoch 1', '--epochs above 1')
    assert (run_dir / 'args.json').read_text() == before


def test_unwritable_model_dir_is_one_line(workdir, tmp_path):
    (tmp_path / 'a_file').write_text('x')
    for model_dir in (tmp_path / 'a_file', tmp_path / 'a_file' / 'run'):
        result = run('main_teacher.py', *TINY, '--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth',
                     '--model-dir', model_dir, '--epochs', 1, expect_ok=False)
        assert_one_line_error(result, 'cannot write the run directory', str(model_dir))
    assert (tmp_path / 'a_file').read_text() == 'x'


def test_smaller_faults_and_flags(pipeline, workdir, tmp_path):
    teacher = pipeline[0]
    # a checkpoint holding arbitrary Python objects: refused without advising weights_only=False as a fix
    torch.save({'model': argparse.Namespace(x=1), 'args': {}, 'num_classes': 10}, tmp_path / 'pickled.pth')
    result = run('main_student.py', *TINY, '--backbone', 'resnet18', '--pretrained', workdir / 'backbone.pth',
                 '--teacher-fn', tmp_path / 'pickled.pth', '--model-dir', tmp_path / 'run', expect_ok=False)
    assert_one_line_error(result, 'not loaded for safety', 'never load a file you do not trust')
    # a stale temporary file of a killed save is cleaned; a relative --pretrained is recorded absolute
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / '.tmp-killed.pth').write_bytes(b'half')
    relative = os.path.relpath(workdir / 'backbone.pth', REPO)
    run('main_teacher.py', *TINY, '--arch', 'resnet18', '--pretrained', relative, '--model-dir', tmp_path / 'run',
        '--epochs', 1, '--train-limit', 32)
    assert not (tmp_path / 'run' / '.tmp-killed.pth').exists()
    assert json.load(open(tmp_path / 'run' / 'args.json'))['pretrained'] == str(workdir / 'backbone.pth')
    # flags that would be ignored are refused
    result = run('main_student.py', *TINY, '--backbone', 'resnet18', '--teacher-fn', teacher / 'checkpoint.pth',
                 '--n-pruning-universal', 2, '--model-dir', tmp_path / 'student', expect_ok=False)
    assert_one_line_error(result, '--n-pruning-universal prunes a trained student', '--full-model-dir')
    result = run('demo_synthetic.py', '--pretrained', workdir / 'backbone.pth', '--model-root', tmp_path / 'demo',
                 expect_ok=False)
    assert_one_line_error(result, 'pre-trains its own universal backbone', '--pretrained')
    result = run('demo_synthetic.py', '--input-size', 0, '--model-root', tmp_path / 'demo', expect_ok=False)
    assert_one_line_error(result, 'resnet18 cannot take 0x0 inputs: choose another --input-size')  # before pre-training
    assert not (tmp_path / 'demo').exists()
    # the teacher's --arch names the student's backbone too, rather than being ignored
    import main_student
    args = main_student.get_args_parser().parse_args(['--task', 'synth-digits', '--model-dir', str(tmp_path / 's'),
                                                      '--arch', 'resnet18', '--teacher-coeff', '0'])
    main_student.check_student_args(args)
    assert args.backbone == args.arch == 'resnet18'
    # --help shows the defaults
    assert '(default: 20)' in run('main_teacher.py', '--help').stdout
    assert 'images per training step (default: 32)' in run('main_student.py', '--help').stdout


def test_awkward_sizes_and_a_full_disk(workdir, tmp_path, monkeypatch):
    # a last training batch of one image is dropped, as every incomplete one
    run('main_teacher.py', *TINY, '--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--model-dir',
        tmp_path / 'odd', '--epochs', 1, '--train-limit', 33)
    result = run('main_teacher.py', *[a if a != '32' else '33' for a in TINY], '--arch', 'wide_resnet26',
                 '--pretrained', 'none', '--model-dir', tmp_path / 'wide', '--epochs', 1, expect_ok=False)
    assert_one_line_error(result, 'wide_resnet26 cannot take 33x33 inputs', '--input-size')
    assert not (tmp_path / 'wide').exists()
    # no space left while saving epoch 1: one line, and epoch 0's checkpoint is still there
    import main_teacher
    import utils
    args = main_teacher.get_args_parser().parse_args(
        [str(a) for a in TINY] + ['--arch', 'resnet18', '--pretrained', str(workdir / 'backbone.pth'),
                                  '--model-dir', str(tmp_path / 'full'), '--epochs', '2'])
    saves = []
    atomic_save = utils.atomic_save

    def save_once(obj, path):
        if saves:
            raise OSError(28, 'No space left on device')
        saves.append(path)
        atomic_save(obj, path)

    monkeypatch.setattr(utils, 'atomic_save', save_once)
    with pytest.raises(UserError, match=f"^cannot save epoch 1 in {tmp_path / 'full'}: No space left on device; "
                                        "the previous checkpoint, if any, is kept$"):
        main_teacher.main(args)
    assert torch.load(tmp_path / 'full' / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    monkeypatch.undo()
    # the same while appending epoch 1's metrics (a traceback, before)
    write = utils.MetricsLog.write

    def write_once(self, **record):
        if record['epoch'] == 1:
            raise OSError(28, 'No space left on device')
        write(self, **record)

    monkeypatch.setattr(utils.MetricsLog, 'write', write_once)
    args.force = True
    with pytest.raises(UserError, match=f"^cannot save epoch 1 in {tmp_path / 'full'}: No space left on device; "):
        main_teacher.main(args)
    assert torch.load(tmp_path / 'full' / 'checkpoint.pth', weights_only=True)['epoch'] == 0


def test_one_process_at_a_time_writes_a_run_directory(workdir, tmp_path):
    args = TINY + ['--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--epochs', 500]
    first = subprocess.Popen([sys.executable, os.path.join(REPO, 'main_teacher.py'), *map(str, args),
                              '--model-dir', str(tmp_path / 'run')], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / 'run' / 'metrics.jsonl').exists() and time.time() < deadline:  # an epoch done
        time.sleep(0.02)
    second = run('main_teacher.py', *args, '--model-dir', tmp_path / 'run', '--force', expect_ok=False)
    still_running = first.poll() is None
    first.kill()
    first.wait()
    assert still_running, 'the first run ended before the second one started'
    assert_one_line_error(second, 'another process is writing', str(tmp_path / 'run'))
    epochs = [json.loads(line)['epoch'] for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert epochs == list(range(len(epochs)))  # the first run's lines only


def test_a_run_never_overwrites_the_checkpoints_it_reads(pipeline, workdir, tmp_path):
    """--force overwrites a run directory's checkpoint: not when that checkpoint is the full student, the teacher or
    the weights the new run starts from."""
    teacher, student, _ = pipeline
    kept = {path: path.read_bytes() for path in (teacher / 'checkpoint.pth', student / 'checkpoint.pth')}
    for script, flags in (('main_student.py', ['--full-model-dir', student, '--n-pruning-universal', 1,
                                               '--model-dir', student]),
                          ('main_student.py', ['--backbone', 'resnet18', '--pretrained', workdir / 'backbone.pth',
                                               '--teacher-fn', teacher, '--model-dir', teacher]),
                          ('main_teacher.py', ['--arch', 'resnet18', '--pretrained', teacher / 'checkpoint.pth',
                                               '--model-dir', teacher])):
        result = run(script, *TINY, *flags, '--force', expect_ok=False)
        assert_one_line_error(result, f"is the checkpoint of --model-dir {flags[-1]}", 'another --model-dir')
    assert all(path.read_bytes() == data for path, data in kept.items())


def test_unreadable_or_foreign_checkpoints_are_refused_in_one_line_and_force_replaces_them(pipeline, workdir,
                                                                                           tmp_path):
    common = [*TINY, '--arch', 'resnet18', '--pretrained', workdir / 'backbone.pth', '--epochs', 1]
    for name, write in (('empty', lambda path: path.write_bytes(b'')), ('list', lambda path: torch.save([1], path))):
        os.makedirs(tmp_path / name)
        write(tmp_path / name / 'checkpoint.pth')
        result = run('main_teacher.py', *common, '--model-dir', tmp_path / name, expect_ok=False)
        assert_one_line_error(result, str(tmp_path / name / 'checkpoint.pth'), 'pass --force to start a new run')
        result = run('main_student.py', *TINY, '--model-dir', tmp_path / name, '--evaluate', expect_ok=False)
        assert_one_line_error(result, str(tmp_path / name / 'checkpoint.pth'), {
            'empty': 'is unreadable: truncated or not a PyTorch file (EOFError); restore it, or train its run again '
                     'with --force',
            'list': "is not a student checkpoint written by main_student.py: name a student's run directory"}[name])
    run('main_teacher.py', *common, '--model-dir', tmp_path / 'empty', '--force')
    assert torch.load(tmp_path / 'empty' / 'checkpoint.pth', weights_only=True)['finished']

    unfinished = tmp_path / 'unfinished student'  # resumed by the other script: said so, before anything else
    shutil.copytree(pipeline[1], unfinished)
    checkpoint = torch.load(unfinished / 'checkpoint.pth', weights_only=True)
    checkpoint['finished'] = False
    torch.save(checkpoint, unfinished / 'checkpoint.pth')
    result = run('main_teacher.py', *common, '--model-dir', unfinished, '--resume', '--epochs', 3, expect_ok=False)
    assert_one_line_error(result, "is a student's: resume it with main_student.py")
    teacher, student = pipeline[0], pipeline[1]  # evaluated or exported by the other script: said so
    result = run('main_teacher.py', '--model-dir', student, '--evaluate', expect_ok=False)
    assert_one_line_error(result, f"{student / 'checkpoint.pth'} is not a teacher checkpoint written by "
                          "main_teacher.py but a student's")
    for command in (['--evaluate'], ['--export', tmp_path / 'out']):
        result = run('main_student.py', '--model-dir', teacher, *command, expect_ok=False)
        assert_one_line_error(result, f"{teacher / 'checkpoint.pth'} is not a student checkpoint written by "
                              "main_student.py but a teacher's (main_teacher.py --evaluate)")


def test_a_student_on_random_universal_weights_refuses_other_weights(workdir, tmp_path):
    """It holds the random weights it was trained on: another --pretrained file cannot rebuild or retrain it."""
    run('main_student.py', *TINY, '--backbone', 'resnet18', '--pretrained', 'none', '--teacher-coeff', 0,
        '--epochs', 1, '--model-dir', tmp_path / 'random')
    for flags in (['--model-dir', tmp_path / 'random', '--evaluate'],
                  ['--full-model-dir', tmp_path / 'random', '--n-pruning-universal', 1, '--model-dir', tmp_path / 'x']):
        result = run('main_student.py', *TINY, *flags, '--pretrained', workdir / 'backbone.pth', expect_ok=False)
        assert_one_line_error(result, 'was trained on random universal weights, which it holds: drop --pretrained')
    assert not (tmp_path / 'x').exists()


def test_a_failed_torch_save_is_an_oserror_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """PyTorch reports a short write (a full disk) as a RuntimeError, which the scripts' one-line errors for
    OSErrors would not catch."""
    path = tmp_path / 'checkpoint.pth'
    utils.atomic_save({'epoch': 1}, path)

    def short_write(obj, f):
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 32\nmore lines')
    monkeypatch.setattr(torch, 'save', short_write)
    with pytest.raises(OSError, match=r'^the write failed; is the disk full\? \(\[enforce fail.* vs 32\)$'):
        utils.atomic_save({'epoch': 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['checkpoint.pth'] and torch.load(path)['epoch'] == 1


def test_a_folder_the_system_says_cannot_be_written_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(os, 'access', lambda path, mode: os.path.realpath(path) != os.path.realpath(tmp_path))
    for check, path, flag in ((utils.require_file_path, tmp_path / 'new' / 'w.pth', '--export-backbone'),
                              (utils.require_folder, tmp_path / 'out', '--export')):
        with pytest.raises(UserError, match=f'^{flag} {path}: {tmp_path} cannot be written; choose a folder you '):
            check(str(path), flag)


def test_pre_trained_weights_with_non_finite_values_are_refused_before_training(workdir, tmp_path):
    """Training on them used to end in "training diverged ... lower --lr", which points at the wrong cause."""
    state = torch.load(workdir / 'backbone.pth', weights_only=True)
    state['layer1.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    torch.save(state, tmp_path / 'nan.pth')
    result = run('main_teacher.py', *TINY, '--arch', 'resnet18', '--pretrained', tmp_path / 'nan.pth', '--model-dir',
                 tmp_path / 'run', expect_ok=False)
    assert_one_line_error(result, f"pre-trained weights {tmp_path / 'nan.pth'} holds non-finite values "
                                  "(layer1.0.conv1.weight): name another weights file")
    assert not (tmp_path / 'run').exists()
    state = torch.load(workdir / 'backbone.pth', weights_only=True)
    state['layer4.1.bn2.weight'] *= 1e38  # finite, but the logits overflow
    torch.save(state, tmp_path / 'huge.pth')
    result = run('main_teacher.py', *TINY, '--arch', 'resnet18', '--pretrained', tmp_path / 'huge.pth', '--model-dir',
                 tmp_path / 'run', expect_ok=False)  # it said: training diverged ...; lower --lr
    assert_one_line_error(result, 'the loss is nan on the first batch, before any update: the network the run starts '
                          'from (its weights) or the data give it, not --lr')


def test_classes_spelt_in_other_unicode_characters_are_named_so():
    """Folders named with composed accents at training, decomposed ones (as macOS writes them) at evaluation: the
    refusal listed the same class as lacking and new, and said no more."""
    from engine import check_data
    args = argparse.Namespace(task='folder:pets', data_dir='copy')
    with pytest.raises(UserError, match="^the folder:pets classes in copy are not those the network was trained on "
                                        r"\(lacking 'caf\u00e9'; new 'cafe\u0301': the same names in other Unicode "
                                        "characters, as one system writes accents composed and another decomposed; "
                                        r"rename the folders\): pass the --data-dir it was trained on$"):
        check_data({'classes': ['caf\u00e9', 'dog']}, {'classes': ['cafe\u0301', 'dog']}, args)
    with pytest.raises(UserError, match=r"\(new 'cafe\u0301': the same names in other Unicode characters"):
        check_data({'classes': ['caf\u00e9', 'dog']}, {'classes': ['caf\u00e9', 'dog', 'cafe\u0301']}, args)  # val
    with pytest.raises(UserError, match=r"\(lacking 'cat'; new 'cow'\): pass"):  # another class: no such hint
        check_data({'classes': ['cat', 'dog']}, {'classes': ['cow', 'dog']}, args)
