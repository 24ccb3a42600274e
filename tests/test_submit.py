"""submit.py with submitit's local executor: two runs of a k sweep as parallel jobs, one of them preempted and
requeued, which resumes its run; finished runs are not submitted again, and refused when trained otherwise."""
import glob
import os
import signal
import json
import time

import pytest
import torch

import submit
from engine import checkpoint_path
from utils import UserError

from test_distributed import descendants
from test_pipeline import TINY, run, workdir  # noqa: F401  (a module-scoped fixture)


def test_sweep_jobs_run_in_parallel_and_a_preempted_one_resumes(workdir, tmp_path, monkeypatch, capsys):  # noqa: F811
    common = [*TINY, '--pretrained', workdir / 'backbone.pth', '--backbone', 'resnet18', '--teacher-coeff', 0]
    run('main_student.py', *common, '--model-dir', tmp_path / 'student', '--epochs', 1, '--lr', 0.01)
    args = submit.get_args_parser().parse_args(
        ['--local', '--gpus-per-job', '0', '--cpus-per-task', '1', '--timeout-min', '10', '--log-dir',
         str(tmp_path / 'jobs'), '--no-wait', 'sweep', '--full-model-dir', str(tmp_path / 'student'), '--k', '1', '2'])
    flags = [str(flag) for flag in common] + ['--epochs', '4', '--lr', '0.01', '--thr-pruning-proxy', '0']
    jobs = submit.main(args, flags)
    assert len(jobs) == 2
    preempted = tmp_path / 'pruned-k2'
    deadline = time.time() + 240
    while time.time() < deadline and not os.path.exists(checkpoint_path(preempted)) and not jobs[1].done():
        time.sleep(0.05)
    assert not any(job.done() for job in jobs)  # both running at once
    for pid in descendants(jobs[1]._process.pid):  # the job's task: what SLURM signals before preempting it
        with open(f'/proc/{pid}/cmdline') as f:
            if 'submitit.core._submit' in f.read():
                os.kill(pid, signal.SIGUSR2)
    for job in jobs:
        assert job.result() is not None
    logs = ''.join(open(path).read() for path in glob.glob(str(tmp_path / 'jobs' / f'{jobs[1].job_id}_*.out')))
    assert 'resuming from epoch' in logs
    for k in (1, 2):
        records = [json.loads(line) for line in open(tmp_path / f'pruned-k{k}' / 'metrics.jsonl')]
        assert [r['epoch'] for r in records] == [0, 1, 2, 3]
        checkpoint = torch.load(tmp_path / f'pruned-k{k}' / 'checkpoint.pth', weights_only=False)
        assert checkpoint['finished'] and checkpoint['args']['n_pruning_universal'] == k

    args.no_wait = False  # everything finished: nothing submitted, the summary only
    table = submit.main(args, flags)
    out = capsys.readouterr().out
    assert out.count('finished, not submitted again') == 2
    assert 'pruned-k1' in table and 'pruned-k2' in table and ' 7/8 ' in table and ' 6/8 ' in table

    submitted = os.listdir(tmp_path / 'jobs')  # the same sweep with another recipe: refused, nothing submitted
    with pytest.raises(UserError, match=r"pruned-k1 holds a finished run trained with --epochs 4, not 5; "
                                        r"--thr-pruning-proxy 0.0, not 0.5: move it away"):
        submit.main(args, flags + ['--thr-pruning-proxy=0.5', '--epochs', '5'])
    assert os.listdir(tmp_path / 'jobs') == submitted


def test_failed_jobs_are_reported_in_one_line(tmp_path):
    args = submit.get_args_parser().parse_args(
        ['--local', '--gpus-per-job', '0', '--timeout-min', '5', '--log-dir', str(tmp_path / 'jobs'), 'sweep',
         '--full-model-dir', str(tmp_path / 'student'), '--k', '3'])
    with pytest.raises(UserError, match=r"--full-model-dir .*student holds no finished student: train it first"):
        submit.main(args, ['--device', 'cpu'])  # refused before anything is submitted
    os.makedirs(tmp_path / 'student')
    torch.save({'finished': True}, checkpoint_path(tmp_path / 'student'))  # finished, but not a student's
    with pytest.raises(UserError, match=r"main_student.py does not take --bogus-flag"):
        submit.main(args, ['--device', 'cpu', '--bogus-flag'])
    assert not os.path.exists(tmp_path / 'jobs')
    with pytest.raises(UserError, match=r"1 of 1 jobs failed: .*pruned-k3 .*not a student checkpoint"):
        submit.main(args, ['--device', 'cpu'])  # a failure inside the job


def test_a_job_with_two_processes_runs_them_as_one_run(workdir, tmp_path):  # noqa: F811
    common = [*TINY, '--pretrained', workdir / 'backbone.pth', '--backbone', 'resnet18', '--teacher-coeff', 0]
    run('main_student.py', *common, '--model-dir', tmp_path / 'student', '--epochs', 1, '--lr', 0.01)
    args = submit.get_args_parser().parse_args(
        ['--local', '--gpus-per-job', '0', '--processes-per-job', '2', '--timeout-min', '10', '--log-dir',
         str(tmp_path / 'jobs'), 'sweep', '--full-model-dir', str(tmp_path / 'student'), '--k', '1'])
    flags = [str(flag) for flag in common] + ['--epochs', '2', '--lr', '0.01', '--thr-pruning-proxy', '0',
                                              '--batch-size', '16']
    table = submit.main(args, flags)
    assert 'pruned-k1' in table
    logs = ''.join(open(path).read() for path in glob.glob(str(tmp_path / 'jobs' / '*_0_log.out')))
    assert 'device cpu, 2 processes' in logs
    records = [json.loads(line) for line in open(tmp_path / 'pruned-k1' / 'metrics.jsonl')]
    assert [r['epoch'] for r in records] == [0, 1]  # one process wrote them
