"""submit.py with submitit's local executor: two runs of a k sweep as parallel jobs, one of them preempted and
requeued, which resumes its run; finished runs are not submitted again, and refused when trained otherwise; bad
flags, missing runs and anything a job's script would refuse are refused before anything is submitted."""
import glob
import os
import signal
import json
import time

import pytest
import torch
import torchvision

import submit
from engine import checkpoint_path
from utils import UserError

from test_dataloaders import write_image_folder
from test_distributed import descendants
from test_pipeline import TINY, assert_one_line_error, run, workdir  # noqa: F401  (a module-scoped fixture)


def student_flags(workdir):  # noqa: F811
    return [*TINY, '--pretrained', workdir / 'backbone.pth', '--backbone', 'resnet18', '--teacher-coeff', 0]


@pytest.fixture(scope='module')
def student(workdir):  # noqa: F811
    """A trained tiny student, shared: the tests prune it into runs of their own (--model-root)."""
    run('main_student.py', *student_flags(workdir), '--model-dir', workdir / 'student', '--epochs', 1, '--lr', 0.01)
    return workdir / 'student'


def refused(tmp_path, argv, flags, match):
    """submit.main with --local --no-wait refuses `argv` -- `flags` with `match`, nothing submitted or written."""
    before = sorted(tmp_path.rglob('*'))
    args = submit.get_args_parser().parse_args(['--local', '--no-wait', '--log-dir', str(tmp_path / 'jobs'),
                                                *map(str, argv)])
    with pytest.raises(UserError, match=match):
        submit.main(args, list(map(str, flags)))
    assert sorted(tmp_path.rglob('*')) == before  # no job folder, no run directory


def not_a_student(path):
    """A finished run that is not a student's (a teacher's fields)."""
    os.makedirs(path)
    torch.save({'finished': True, 'args': {'task': 'synth-digits'}, 'model': {}, 'num_classes': 10},
               checkpoint_path(path))
    return path


def test_sweep_jobs_run_in_parallel_and_a_preempted_one_resumes(workdir, student, tmp_path, capsys):  # noqa: F811
    common = student_flags(workdir)
    args = submit.get_args_parser().parse_args(
        ['--local', '--gpus-per-job', '0', '--cpus-per-task', '1', '--timeout-min', '10', '--log-dir',
         str(tmp_path / 'jobs'), '--no-wait', 'sweep', '--full-model-dir', str(student), '--k', '1', '2',
         '--model-root', str(tmp_path)])
    recipe = ['--lr', '0.01', '--thr-pruning-proxy', '0']
    flags = [str(flag) for flag in common] + ['--epochs', '4', *recipe]
    jobs = submit.main(args, flags)
    assert len(jobs) == 2
    recorded = json.load(open(tmp_path / 'jobs' / 'submitted.json'))
    assert recorded == {str(tmp_path / f'pruned-k{k}'): {'job_id': job.job_id, 'cluster': 'local'}
                        for k, job in zip((1, 2), jobs)}
    with pytest.raises(UserError, match=rf"^{tmp_path / 'pruned-k1'} is being trained by job {jobs[0].job_id} of an "
                                        rf"earlier submission \(RUNNING\): wait for it, or cancel it \(kill "):
        submit.main(args, flags)  # submitted again while its jobs run: refused, not submitted twice
    assert json.load(open(tmp_path / 'jobs' / 'submitted.json')) == recorded
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
    with pytest.raises(UserError, match=r"pruned-k1 holds a finished run trained with --epochs 4, not 20: move it "):
        submit.main(args, [str(flag) for flag in common] + recipe)  # --epochs: main_student.py's default
    assert os.listdir(tmp_path / 'jobs') == submitted


def test_failed_jobs_are_reported_in_one_line(student, tmp_path):
    args = submit.get_args_parser().parse_args(
        ['--local', '--gpus-per-job', '0', '--cpus-per-task', '1', '--timeout-min', '5', '--log-dir',
         str(tmp_path / 'jobs'), 'sweep', '--full-model-dir', str(tmp_path / 'none'), '--k', '1'])
    with pytest.raises(UserError, match=r"--full-model-dir .*none holds no finished student: train it first"):
        submit.main(args, ['--device', 'cpu'])  # refused before anything is submitted
    args.full_model_dir, args.model_root = str(student), str(tmp_path)
    with pytest.raises(UserError, match=r"main_student.py does not take --bogus-flag"):
        submit.main(args, ['--device', 'cpu', '--bogus-flag'])
    assert not os.path.exists(tmp_path / 'jobs')
    with pytest.raises(UserError, match=r"1 of 1 jobs failed: .*pruned-k1 .*batch of one"):
        submit.main(args, ['--device', 'cpu', '--workers', '0', '--train-limit', '1', '--thr-pruning-proxy', '0'])
        # a failure inside the job


def test_a_killed_jobs_failure_keeps_submitits_whole_first_sentence():
    killed = RuntimeError('Job 6903 (task: 0) with path /jobs/6903_0_result.pkl\nhas not produced any output (state: '
                          'FAILED)\nNo output/error stream produced ! Check: /jobs/6903_0_log.out')
    assert submit.failure_reason(killed) == ('Job 6903 (task: 0) with path /jobs/6903_0_result.pkl has not produced '
                                             'any output (state: FAILED)')
    raised = RuntimeError('Traceback (most recent call last):\n  ...\nRuntimeError: main_student --k 1: --lr must be '
                          'positive, got 0.0\n')
    assert submit.failure_reason(raised) == 'main_student --k 1: --lr must be positive, got 0.0'


def test_submit_flags_are_checked(tmp_path):
    sweep = ['sweep', '--full-model-dir', tmp_path / 'none', '--k', 1]
    refused(tmp_path, ['--cpus-per-task', 0, *sweep], [], r"^--cpus-per-task must be positive, got 0$")
    refused(tmp_path, ['--array-parallelism', 0, *sweep], [], r"^--array-parallelism must be positive, got 0$")
    refused(tmp_path, ['--timeout-min', 0, *sweep], [], r"^--timeout-min must be positive, got 0$")
    refused(tmp_path, ['--gpus-per-job', -1, *sweep], [], r"^--gpus-per-job must be non-negative, got -1$")
    for flag in ('--partition', '--account'):
        refused(tmp_path, [flag, 'x', *sweep], [], rf"^{flag} is a SLURM setting, which --local jobs .* do not use: "
                rf"drop {flag} or --local$")
    (tmp_path / 'afile').write_text('')  # submitit's traceback, after every job had been checked
    refused(tmp_path, ['--log-dir', tmp_path / 'afile' / 'jobs', *sweep], [],
            rf"^--log-dir {tmp_path / 'afile' / 'jobs'} lies under {tmp_path / 'afile'}, which is a file$")


def test_decathlon_tasks_are_checked(tmp_path):
    data = tmp_path / 'data'
    os.makedirs(data / 'decathlon-1.0' / 'annotations')
    open(data / 'decathlon-1.0' / 'annotations' / 'svhn_train.json', 'w').close()  # svhn's data, as found
    decathlon = ['decathlon', '--stage', 'teacher', '--data-dir', data, '--model-root', tmp_path / 'models', '--tasks']
    refused(tmp_path, [*decathlon, 'foo', 'bar'], [], r"^unknown decathlon task 'foo'; valid tasks: imagenet12, ")
    refused(tmp_path, [*decathlon, 'svhn', 'dtd'], [], r"^no data for dtd under .*data/decathlon-1.0; run `python "
            r"data/download_decathlon.py`")
    refused(tmp_path, [*decathlon, 'svhn', 'svhn'], [], r"^--tasks repeats a value: two jobs would write "
            r".*models/svhn/teacher; give each value once$")
    refused(tmp_path, [*decathlon, 'svhn'], ['--pretrained', 'none', '--lr', 0], r"^--lr must be positive, got 0.0$")
    refused(tmp_path, [*decathlon, 'svhn'], ['--task', 'dtd'], r"^flags after -- must not set --task: submit.py sets "
            r"it for each job")  # every job used to train dtd


def test_decathlon_stages_need_their_runs(tmp_path):
    data = tmp_path / 'data'
    os.makedirs(data / 'decathlon-1.0' / 'annotations')
    open(data / 'decathlon-1.0' / 'annotations' / 'svhn_train.json', 'w').close()
    decathlon = ['decathlon', '--tasks', 'svhn', '--data-dir', data, '--model-root', tmp_path / 'models', '--stage']
    refused(tmp_path, [*decathlon, 'pruned'], [], r"^svhn: no finished student in .*models/svhn/student to prune: "
            r"train it first \(python submit.py decathlon --stage student --tasks svhn --model-root .*models "
            r"--data-dir .*data\)$")
    student = [*decathlon, 'student']
    refused(tmp_path, student, ['--pretrained', 'none'], r"^svhn: no finished teacher in .*models/svhn/teacher to "
            r"distil from: train it first \(python submit.py decathlon --stage teacher --tasks svhn .*\), or pass "
            r"--teacher-coeff 0 --classifier-init fresh after --$")
    # without distillation the student's classifier still starts from the teacher's (the job used to fail then)
    refused(tmp_path, student, ['--pretrained', 'none', '--teacher-coeff', 0], r"^svhn: no finished teacher in "
            r".*models/svhn/teacher to start its classifier from: train it first \(python submit.py decathlon")
    os.makedirs(tmp_path / 'models' / 'svhn' / 'student')  # an unfinished run of other flags, which the job
    torch.save({'finished': False, 'args': {}, 'epoch': 0},  # would resume: refused once the teacher is not needed
               checkpoint_path(tmp_path / 'models' / 'svhn' / 'student'))
    refused(tmp_path, student, ['--pretrained', 'none', '--teacher-fn', tmp_path / 'elsewhere.pth'],
            r"^teacher checkpoint not found: .*elsewhere.pth$")  # the job used to fail once it ran
    without_teacher = ['--pretrained', 'none', '--teacher-coeff', 0, '--classifier-init', 'fresh']
    refused(tmp_path, student, without_teacher, r"^--resume: the run in .*models/svhn/student was trained with --")
    refused(tmp_path, student, [*without_teacher, '--epochs', -1], r"^--epochs must be positive, got -1$")


def test_without_slurm_and_without_local_nothing_runs_here(student, tmp_path):
    """submitit falls back to local processes when it finds no SLURM: the jobs ran on the login machine, their
    --partition ignored."""
    args = submit.get_args_parser().parse_args(['--no-wait', '--partition', 'gpu', '--log-dir', str(tmp_path / 'jobs'),
                                                'sweep', '--full-model-dir', str(student), '--model-root',
                                                str(tmp_path / 'runs'), '--k', '1'])
    with pytest.raises(UserError, match=r'^no SLURM here \(Could not detect "srun".*\): pass --local to run the jobs '
                                        r'on this machine$'):
        submit.main(args, ['--thr-pruning-proxy', '0'])
    assert not (tmp_path / 'runs').exists()


def test_a_slurm_job_still_queued_is_not_submitted_again(student, tmp_path, monkeypatch):
    """The job a run was submitted as is asked of SLURM (submitit calls sacct; a stand-in here): while it is queued
    or running the run is not submitted again; once it has ended (or cannot be asked of) it is."""
    log_dir, run_dir = tmp_path / 'jobs', tmp_path / 'runs' / 'pruned-k1'
    os.makedirs(log_dir)
    (log_dir / 'submitted.json').write_text(json.dumps({str(run_dir): {'job_id': '4242_0', 'cluster': 'slurm'}}))
    sacct = tmp_path / 'bin' / 'sacct'
    os.makedirs(sacct.parent)
    monkeypatch.setenv('PATH', f"{sacct.parent}{os.pathsep}{os.environ['PATH']}")
    args = submit.get_args_parser().parse_args(['--no-wait', '--log-dir', str(log_dir), 'sweep', '--full-model-dir',
                                                str(student), '--model-root', str(tmp_path / 'runs'), '--k', '1'])
    for state, refused in (('PENDING', True), ('RUNNING', True), ('COMPLETED', False), ('CANCELLED by 7', False)):
        sacct.write_text(f"#!/bin/sh\nprintf 'JobID|State|NodeList\\n4242_0|{state}|\\n'\n")
        sacct.chmod(0o755)
        if refused:
            match = (rf"^{run_dir} is being trained by job 4242_0 of an earlier submission \({state}\): wait for it, "
                     r"or cancel it \(scancel 4242_0\)$")
        else:  # past the check: submitted, which needs SLURM
            match = r'^no SLURM here'
        with pytest.raises(UserError, match=match):
            submit.main(args, ['--thr-pruning-proxy', '0'])
    sacct.unlink()  # no sacct, or an unreadable record: as before the jobs were recorded
    for record in (None, '[1, 2]', '{"x": 3}', '{'):
        if record is not None:
            (log_dir / 'submitted.json').write_text(record)
        with pytest.raises(UserError, match=r'^no SLURM here'):
            submit.main(args, ['--thr-pruning-proxy', '0'])


def test_sweep_k_and_full_model_dir_are_checked(student, tmp_path):
    sweep = ['sweep', '--full-model-dir', student, '--model-root', tmp_path / 'runs', '--k']
    for k in (0, -2):
        refused(tmp_path, [*sweep, 3, k], [], rf"^every --k must be at least 1, got {k}: a sweep prunes universal "
                r"blocks \(to retrain with proxies pruned only, run main_student.py --n-pruning-universal 0\)$")
    refused(tmp_path, [*sweep, 2, 3, 2], [], r"^--k repeats a value: two jobs would write .*runs/pruned-k2; give "
            r"each value once$")
    refused(tmp_path, [*sweep, 2, 9], ['--thr-pruning-proxy', 0], r"^cannot prune 9 universal blocks of the "
            r"student in .*student: it has 8 left; prune at most 8$")
    teacher = not_a_student(tmp_path / 'teacher')
    refused(tmp_path, ['sweep', '--full-model-dir', teacher, '--k', 1], [], r"teacher/checkpoint.pth is not a student "
            r"checkpoint written by main_student.py: --full-model-dir takes a trained student's run directory$")


def test_script_checks_refuse_jobs_before_submitting(student, tmp_path):
    sweep = ['sweep', '--full-model-dir', student, '--model-root', tmp_path / 'runs', '--k', 1]
    refused(tmp_path, sweep, ['--epochs', -1], r"^--epochs must be positive, got -1$")
    refused(tmp_path, sweep, ['--thr-pruning-proxy', 1], r"^--thr-pruning-proxy must be in \[0, 1\), got 1.0$")
    refused(tmp_path, sweep, ['--thr-pruning-proxy', 0.9], r"^pruning 1 universal blocks and proxies below 0.9 leaves "
            r"no path from the input to the classifier; prune less$")  # found by the job once it ran
    refused(tmp_path, sweep, ['--backbone', 'resnet34'], r"was trained with --backbone resnet18, not resnet34: drop "
            r"--backbone$")
    refused(tmp_path, sweep, ['--device', 'tpu'], r"^invalid --device 'tpu'; use auto, cpu or cuda\[:N\]$")
    cpu_jobs = ['--gpus-per-job', 0, *sweep]
    refused(tmp_path, cpu_jobs, ['--device', 'cuda'], r"^flags after --: --device cuda needs a GPU, and the jobs get "
            r"none \(--gpus-per-job 0\): drop it, or pass --gpus-per-job$")
    for argv, flags in ((cpu_jobs, ['--cuda-graph']), (sweep, ['--cuda-graph', '--device', 'cpu'])):
        refused(tmp_path, argv, flags, r"^flags after --: --cuda-graph needs a CUDA device, and the jobs run on CPUs")
    refused(tmp_path, ['--processes-per-job', 2, *sweep], ['--cuda-graph'], r"^flags after --: --cuda-graph runs "
            r"one process, and each job runs 2 \(--processes-per-job, or one per GPU\): drop it$")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / 'other.pth')
    refused(tmp_path, sweep, ['--pretrained', tmp_path / 'other.pth'], r"^the universal weights .*other.pth are not "
            r"those .*student.* was trained on")
    refused(tmp_path, sweep, ['--evaluate'], r"^flags after --: --evaluate trains no run, and submit.py submits runs "
            r"to train: run python main_student.py --evaluate directly$")
    refused(tmp_path, sweep, ['--force'], r"^flags after --: submit.py does not take --force \(a job resumes its run "
            r"when requeued, and a finished run is kept\): move the old runs away or pass another --model-root$")
    for flags in (['--model-dir', tmp_path / 'x'], ['--n-pruning-universal', 2], ['--model-d', tmp_path / 'x']):
        refused(tmp_path, sweep, flags, r"^flags after -- must not set --(model-dir|n-pruning-universal): submit.py "
                r"sets it for each job from its own flags \(python submit.py --help\)$")
    unfinished = torch.load(checkpoint_path(student), weights_only=False)  # an unfinished run of other flags: the
    unfinished['finished'] = False  # job would resume it
    os.makedirs(tmp_path / 'runs' / 'pruned-k1')
    torch.save(unfinished, checkpoint_path(tmp_path / 'runs' / 'pruned-k1'))
    refused(tmp_path, sweep, ['--thr-pruning-proxy', 0], r"^--resume: the run in .*pruned-k1 was trained with --")
    distilled = torch.load(checkpoint_path(student), weights_only=False)  # a student whose teacher has moved:
    distilled['args'].update(teacher_coeff=2.0, teacher_fn=str(tmp_path / 'moved' / 'checkpoint.pth'))
    os.makedirs(tmp_path / 'distilled')  # its retraining distils from it too
    torch.save(distilled, checkpoint_path(tmp_path / 'distilled'))
    refused(tmp_path, ['sweep', '--full-model-dir', tmp_path / 'distilled', '--model-root', tmp_path / 'runs',
                       '--k', 1], [], r"^teacher checkpoint not found: .*moved/checkpoint.pth$")
    folder = torch.load(checkpoint_path(student), weights_only=False)  # a student of your own images
    folder['args'].update(task='folder:pets', classes=['cat', 'dog', 'eel'])
    os.makedirs(tmp_path / 'pets-student')
    torch.save(folder, checkpoint_path(tmp_path / 'pets-student'))
    pets_sweep = ['sweep', '--full-model-dir', tmp_path / 'pets-student', '--model-root', tmp_path / 'runs', '--k', 1]
    refused(tmp_path, pets_sweep, ['--data-dir', tmp_path / 'nowhere'], r"^folder:pets: .*nowhere/pets/train is "
            r"missing; put the images in")  # the jobs used to fail once they ran
    write_image_folder(tmp_path / 'renamed', splits={'train': {'cat': 1, 'dog': 1, 'lynx': 1}})
    refused(tmp_path, pets_sweep, ['--data-dir', tmp_path / 'renamed'], r"^the folder:pets classes in .*renamed are "
            r"not those the network was trained on \(lacking 'eel'; new 'lynx'\)")


def test_a_script_flag_it_cannot_parse_is_one_line(tmp_path):
    result = run('submit.py', '--local', '--no-wait', '--log-dir', tmp_path / 'jobs', 'sweep', '--full-model-dir',
                 not_a_student(tmp_path / 'teacher'), '--k', 1, '--', '--epochs', 'abc', expect_ok=False)
    assert_one_line_error(result, "error: flags after --: argument --epochs: invalid int value: 'abc' (python "
                          "main_student.py --help lists its flags)")
    assert not os.path.exists(tmp_path / 'jobs')


def test_a_job_with_two_processes_runs_them_as_one_run(workdir, student, tmp_path):  # noqa: F811
    common = student_flags(workdir)
    args = submit.get_args_parser().parse_args(
        ['--local', '--gpus-per-job', '0', '--processes-per-job', '2', '--timeout-min', '10', '--log-dir',
         str(tmp_path / 'jobs'), 'sweep', '--full-model-dir', str(student), '--k', '1', '--model-root', str(tmp_path)])
    flags = [str(flag) for flag in common] + ['--epochs', '2', '--lr', '0.01', '--thr-pruning-proxy', '0',
                                              '--batch-size', '16']
    table = submit.main(args, flags)
    assert 'pruned-k1' in table
    logs = ''.join(open(path).read() for path in glob.glob(str(tmp_path / 'jobs' / '*_0_log.out')))
    assert 'device cpu, 2 processes' in logs
    records = [json.loads(line) for line in open(tmp_path / 'pruned-k1' / 'metrics.jsonl')]
    assert [r['epoch'] for r in records] == [0, 1]  # one process wrote them
    refused(tmp_path, ['sweep', '--full-model-dir', student, '--k', 1, '--model-root', tmp_path], flags,
            r"^.*pruned-k1 holds a finished run trained with 2 process\(es\), not 1: move it away")  # twice the batch
