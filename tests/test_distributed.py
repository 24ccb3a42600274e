"""Several processes (torchrun, gloo on the CPU): half the batch on each of two processes trains what one process
with the whole batch trains, one process writes the run directory, and a killed run resumes exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import utils
from backbones import create_teacher
from engine import MixedPrecision, TrainStep
from nettailor import create_student, distillation_loss

from scripts import run_script
from test_pipeline import REPO, TINY, workdir  # noqa: F401  (a module-scoped fixture)


def join_group(rank, world, rendezvous):
    """Meet through a file, not a TCP port: a port found free could be taken by the other pytest worker."""
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world)
    torch.set_num_threads(1)


def synced_batch_norm_worker(rank, world, rendezvous, results):
    join_group(rank, world, rendezvous)
    torch.manual_seed(0)
    for shape in [(8, 4, 5, 5), (12, 4)]:  # NCHW maps, and proxies' (pixel, channel) matrices
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        weight = torch.rand(4, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(*shape, dtype=torch.float64)
        stats = [torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
        whole = F.batch_norm(x, *stats, weight, bias, True, 0.1, 1e-5)
        (whole * grad).sum().backward()
        expected_grads = x.grad.clone(), weight.grad.clone()
        weight.grad = None
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        mine = x.detach()[share].requires_grad_()
        synced_stats = [torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
        out = utils.synced_batch_norm(mine, *synced_stats, weight, bias, 0.1, 1e-5)
        (out * grad[share]).sum().backward()
        weight_grad = utils.all_reduce_sum(weight.grad.clone())  # what each process's share contributes, summed
        results[f'{rank} {shape}'] = max(float((out - whole[share]).abs().max()),
                                         float((mine.grad - expected_grads[0][share]).abs().max()),
                                         float((weight_grad - expected_grads[1]).abs().max()),
                                         *(float((a - b).abs().max()) for a, b in zip(synced_stats, stats)))
    dist.destroy_process_group()


def test_synced_batch_norm_is_the_whole_batchs(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(synced_batch_norm_worker, args=(2, tmp_path / 'rendezvous', results), nprocs=2)
    assert len(results) == 4 and max(results.values()) < 1e-12, dict(results)


def training_worker(rank, world, rendezvous, kind, path):
    """Three float64 steps of a teacher or a student (the one-pass distillation), this process's share of
    each batch of 8, through engine.TrainStep; rank 0 saves the state."""
    torch.set_default_dtype(torch.float64)
    if world > 1:
        join_group(rank, world, rendezvous)
    torch.manual_seed(0)
    teacher = create_teacher('resnet18', 10)
    if kind == 'teacher':
        model = teacher.train()
        loss_fn = lambda x, y: (F.cross_entropy(model(x)[0], y), {})  # noqa: E731
    else:
        teacher.eval().requires_grad_(False)
        model = create_student('resnet18', 10, 3, input_size=32).train()

        def loss_fn(x, y):
            logits, outputs = model(x, distill=True)
            with torch.no_grad():
                teacher_logits, teacher_outputs = teacher(x)
            omega = distillation_loss(logits, outputs, teacher_logits, teacher_outputs)
            return F.cross_entropy(logits, y) + 0.3 * model.expected_complexity() + 10 * omega, {}
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(model, loss_fn, optimizer, MixedPrecision(torch.device('cpu'), False))
    generator = torch.Generator().manual_seed(1)
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        step(x[share], y[share])
    if rank == 0:
        torch.save((initial, model.state_dict()), path)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize('kind', ['teacher', 'student'])
def test_two_processes_with_half_the_batch_train_like_one_with_all(tmp_path, kind):
    default = torch.get_default_dtype()
    try:
        training_worker(0, 1, None, kind, tmp_path / 'one.pt')
    finally:
        torch.set_default_dtype(default)
    mp.spawn(training_worker, args=(2, tmp_path / 'rendezvous', kind, tmp_path / 'two.pt'), nprocs=2)
    (initial, one), (_, two) = torch.load(tmp_path / 'one.pt'), torch.load(tmp_path / 'two.pt')
    assert one.keys() == two.keys()
    assert max(float((one[name] - initial[name]).abs().max()) for name in one if one[name].is_floating_point()) > 1e-3
    for name in one:
        if one[name].is_floating_point():
            error = (one[name] - two[name]).abs().max() / one[name].abs().max().clamp(min=1e-12)
            assert error < 1e-10, (name, float(error))  # float64: the same arithmetic up to rounding
        else:
            assert torch.equal(one[name], two[name]), name


def torchrun(nproc, script, *args, threads=1):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}',
               os.path.join(REPO, script), *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': str(threads)}, start_new_session=True)


def descendants(pid):
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children = []
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            children.append(int(entry))
    return [p for child in children for p in (child, *descendants(child))]


def finished(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, out + err
    return out


def task_state(run_dir):
    model = torch.load(run_dir / 'checkpoint.pth', weights_only=False)['model']
    return model['state'] if 'state' in model else model


def distance(a, b):
    """The norm, over every floating-point tensor of two states, of their difference."""
    return float(sum((a[name] - b[name]).double().square().sum() for name in a if a[name].is_floating_point()) ** 0.5)


def test_torchrun_teacher_and_student_match_one_process_with_the_whole_batch(workdir, tmp_path):  # noqa: F811
    """float32 through the scripts: two processes land as close to one process as float rounding alone moves it
    (the one-process run on 2 threads instead of 1); test_two_processes_* shows the arithmetic exact."""
    common = [*TINY[:TINY.index('--batch-size')], '--device', 'cpu', '--pretrained', workdir / 'backbone.pth',
              '--epochs', 2, '--lr', 0.01, '--lr-decay-epochs', 1, '--log2file']
    runs = {'1': (1, 1), '1 on 2 threads': (1, 2), '2': (2, 1)}  # name: (processes, threads)
    for kind, script, flags in (('teacher', 'main_teacher.py', ['--arch', 'resnet18']),
                                ('student', 'main_student.py', ['--backbone', 'resnet18', '--teacher-fn',
                                                                tmp_path / 'teacher 1' / 'checkpoint.pth'])):
        for name, (nproc, threads) in runs.items():
            argv = [*common, *flags, '--batch-size', 32 // nproc, '--model-dir', tmp_path / f'{kind} {name}']
            if nproc == 1:  # as a user runs one process: no torchrun
                result = run_script(script, *argv, env={**os.environ, 'OMP_NUM_THREADS': str(threads)})
                assert result.returncode == 0, result.stderr
                out = result.stdout
            else:
                out = finished(torchrun(nproc, script, *argv, threads=threads))
            assert out.count('top-1 accuracy') == 1  # one process logs
        one, rounded, two = (task_state(tmp_path / f'{kind} {name}') for name in runs)
        assert one.keys() == two.keys()
        for name in one:
            if not one[name].is_floating_point():
                assert torch.equal(one[name], two[name]), (kind, name)  # num_batches_tracked
        norm = distance(one, {name: torch.zeros_like(t) for name, t in one.items()})
        assert distance(one, two) <= 10 * distance(one, rounded) and distance(one, two) <= 1e-2 * norm, kind
        records = [json.loads(line) for line in open(tmp_path / f'{kind} 2' / 'metrics.jsonl')]
        assert [r['epoch'] for r in records] == [0, 1]  # written once, by one process
        assert len(open(tmp_path / f'{kind} 2' / 'log.txt').read().splitlines()) == \
            len(open(tmp_path / f'{kind} 1' / 'log.txt').read().splitlines())
        first = json.loads(open(tmp_path / f'{kind} 1' / 'metrics.jsonl').readline())
        assert records[0]['loss'] == pytest.approx(first['loss'], rel=1e-4)  # averaged over the processes
        assert records[0]['train_acc'] == pytest.approx(first['train_acc'])  # counted over both
        out = finished(torchrun(2, script, '--model-dir', tmp_path / f'{kind} 2', '--evaluate', '--device', 'cpu',
                                '--workers', 0))
        assert out.count('top-1 accuracy') == 1  # one process prints: the accuracy over both shares
        accuracy = float(out.split('top-1 accuracy ')[1].split('%')[0])
        assert accuracy == pytest.approx(records[-1]['test_acc'], abs=0.005)


def test_print_once_prints_from_rank_zero_before_the_processes_join_their_group(monkeypatch, capsys):
    """The decathlon --task all's 'skipped' lines, printed before the group is joined, came once per process."""
    for rank, printed in (('1', ''), ('0', 'skipped\n')):
        monkeypatch.setenv('RANK', rank)
        utils.print_once('skipped')
        assert capsys.readouterr().out == printed


def test_one_process_commands_are_refused_under_torchrun(tmp_path):
    """--export and the decathlon --summary would run whole in every process, each writing the same files: under
    torchrun with several processes (its environment here) they are refused before anything runs."""
    env = {**os.environ, 'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '2'}
    decathlon, out = ['--task', 'all', '--model-root', tmp_path], tmp_path / 'out'
    for script, flags, command in (('main_student.py', ['--model-dir', tmp_path / 'run', '--export', out], '--export'),
                                   ('main_student_decathlon.py', [*decathlon, '--summary'], '--summary'),
                                   ('main_student_decathlon.py', [*decathlon, '--export', out], '--export')):
        result = run_script(script, *flags, env=env)
        assert (result.returncode, result.stderr) == (1, f"error: {command} runs in one process: run it without "
                                                      "torchrun\n"), script
    assert os.listdir(tmp_path) == []


def test_torchrun_run_killed_and_resumed_ends_where_an_uninterrupted_one_does(workdir, tmp_path):  # noqa: F811
    args = [*TINY[:TINY.index('--batch-size')], '--device', 'cpu', '--pretrained', workdir / 'backbone.pth',
            '--arch', 'resnet18', '--epochs', 3, '--lr', 0.01, '--batch-size', 16]
    finished(torchrun(2, 'main_teacher.py', *args, '--model-dir', tmp_path / 'whole'))
    process = torchrun(2, 'main_teacher.py', *args, '--model-dir', tmp_path / 'killed')
    checkpoint = tmp_path / 'killed' / 'checkpoint.pth'
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    for pid in [*descendants(process.pid), process.pid]:  # both workers and torchrun, at once
        os.kill(pid, signal.SIGKILL)
    process.communicate()
    assert torch.load(checkpoint, weights_only=False)['epoch'] < 2
    result = run_script('main_teacher.py', *args, '--model-dir', tmp_path / 'killed', '--resume')  # one process
    assert result.returncode == 1 and result.stderr.strip() == (  # --batch-size is per process: not the same run
        f"error: --resume: the run in {tmp_path / 'killed'} was trained by 2 process(es), not 1: resume it with "
        "torchrun --nproc-per-node 2 (submit.py: --processes-per-job 2)")
    finished(torchrun(2, 'main_teacher.py', *args, '--model-dir', tmp_path / 'killed', '--resume'))
    whole, resumed = task_state(tmp_path / 'whole'), task_state(tmp_path / 'killed')
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    records = [json.loads(line) for line in open(tmp_path / 'killed' / 'metrics.jsonl')]
    assert [r['epoch'] for r in records] == [0, 1, 2]
