"""Many runs at once, on a SLURM cluster through submitit (or as local processes): a decathlon stage or a k sweep
as a job array, one of the scripts' runs per job, then their summary.

    # every decathlon task's student, one job each, 4 GPUs per job (the processes of one run, as torchrun's)
    python submit.py --partition gpu --gpus-per-job 4 --timeout-min 720 decathlon --stage student -- --epochs 30
    python submit.py --partition gpu decathlon --stage pruned -- --n-pruning-universal 4 --thr-pruning-proxy 0.05
    # prune + retrain one trained student for several k (runs <model-root>/pruned-k<k>)
    python submit.py --partition gpu sweep --full-model-dir checkpoints/svhn/student --k 9 11 13 -- \
        --thr-pruning-proxy 0.075   # task, teacher and network: the student's
    # the same on this machine, each job a local process
    python submit.py --local --gpus-per-job 0 sweep ...

Flags after `--` go to every run's script (main_*_decathlon.py, main_student.py).  Before anything is submitted,
each job is checked as its script would check it (its flags and values, its device and CUDA graphs against the
job's GPUs and processes, the runs it needs: a decathlon task's teacher and student, the universal weights and
blocks left to prune), so that no job is submitted only to fail.  Finished runs are not submitted again (one
trained otherwise, with another value of any setting its script trains with, given or by default, or by another
count of processes, is refused), nor is a run whose job of an earlier submission is still queued or running
(refused; <log-dir>/submitted.json records the jobs); a job preempted or reaching its time limit is requeued and
continues its run with --resume (submitit's checkpointing); once every job has ended the summary is printed (the
decathlon table and score, or the sweep's table).  Job logs go to --log-dir.
"""
import argparse
import importlib
import json
import os
import sys

import demo
import main_student
import main_student_decathlon
import main_teacher_decathlon
import utils
from dataloaders import task_classes
from backbones import check_input_size, create_teacher
from engine import (check_args, check_data, check_run_dir, checkpoint_path, finished_run_differences, load_student,
                    load_teacher, run_status, trained_settings)
from main_teacher_decathlon import task_runs
from utils import UserError

REPO = os.path.dirname(os.path.abspath(__file__))


class Job:
    """One run of `script` (a module with get_args_parser() and main(args)) with `argv`, writing `run_dir`.

    submitit calls it in the job; on preemption or time-out it calls `checkpoint`, which requeues the same job,
    and the next call resumes the run from its last checkpoint.  A job given several tasks runs them as the
    processes of one run (torch.distributed's environment exported as torchrun would)."""

    def __init__(self, script, argv, run_dir):
        self.script, self.argv, self.run_dir = script, list(argv), run_dir

    def __call__(self):
        import submitit
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if run_status(self.run_dir) == 'finished':  # requeued after its last checkpoint
            return None
        argv = self.current_argv()
        module = importlib.import_module(self.script)
        args = module.get_args_parser().parse_args(argv)
        try:
            module.main(args)
        except UserError as error:  # the job fails with the one line the script would print
            raise RuntimeError(f"{self.script} {' '.join(argv)}: {utils.user_error_line(error)}") from None
        return self.run_dir

    def current_argv(self):
        """The job's flags as it runs now: with --resume once its run has a checkpoint to continue."""
        return self.argv + (['--resume'] if run_status(self.run_dir) == 'unfinished' else [])

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self)


def decathlon_jobs(args, script_flags):
    """One job per decathlon task for --stage (teacher, student or pruned): --tasks, or every task found under
    --data-dir; a task unknown or without data there is refused."""
    from decathlon_dataloaders import available_tasks, check_task
    available = available_tasks(args.data_dir)
    tasks = args.tasks or available
    for task in tasks:
        check_task(task)
    missing = [task for task in tasks if task not in available]
    if not tasks or missing:
        raise UserError(f"{f'no data for {missing[0]}' if missing else 'no decathlon task found'} under "
                        f"{args.data_dir}/decathlon-1.0; run `python data/download_decathlon.py` or "
                        "`python data/make_synthetic_decathlon.py`")
    script = 'main_teacher_decathlon' if args.stage == 'teacher' else 'main_student_decathlon'
    stage_flags = ['--prune'] if args.stage == 'pruned' else []
    jobs = [make_job(script, ['--task', task, '--model-root', args.model_root, '--data-dir', args.data_dir,
                              *stage_flags], script_flags, os.path.join(args.model_root, task, args.stage),
                     JOB_SETTINGS['decathlon']) for task in tasks]
    if len(jobs) > 1 and given_settings(script, jobs[0].argv).get('export_backbone'):
        raise UserError("flags after --: --export-backbone writes one task's network, and every job would write it: "
                        "submit that task alone (--tasks TASK)")
    return jobs


def sweep_jobs(args, script_flags):
    """One job per k: the student in --full-model-dir with k universal blocks pruned, retrained."""
    if min(args.k) < 1:
        raise UserError(f"every --k must be at least 1, got {min(args.k)}: a sweep prunes universal blocks (to "
                        "retrain with proxies pruned only, run main_student.py --n-pruning-universal 0)")
    if run_status(args.full_model_dir) != 'finished':
        raise UserError(f"--full-model-dir {args.full_model_dir} holds no finished student: train it first "
                        "(main_student.py)")
    root = args.model_root or os.path.dirname(os.path.abspath(args.full_model_dir))
    return [make_job('main_student', ['--full-model-dir', args.full_model_dir, '--n-pruning-universal', str(k),
                                      '--model-dir', os.path.join(root, f'pruned-k{k}')], script_flags,
                     os.path.join(root, f'pruned-k{k}'), JOB_SETTINGS['sweep']) for k in args.k]


# the scripts' settings submit.py gives each job (from its own flags: --tasks, --stage, --k, ...)
JOB_SETTINGS = {'decathlon': ('task', 'model_root', 'data_dir', 'model_dir', 'prune', 'full_model_dir'),
                'sweep': ('full_model_dir', 'n_pruning_universal', 'model_dir')}


def make_job(script, job_flags, script_flags, run_dir, owned):
    """A Job of `script` with `job_flags` (what submit.py sets) followed by `script_flags` (the flags after --),
    which must not change the `owned` settings."""
    argv = [*job_flags, *script_flags]
    ours, combined = given_settings(script, job_flags), given_settings(script, argv)
    for name in owned:
        if ours.get(name) != combined.get(name):
            raise UserError(f"flags after -- must not set --{name.replace('_', '-')}: submit.py sets it for each "
                            "job from its own flags (python submit.py --help)")
    return Job(script, argv, run_dir)


def parse_script_flags(script, argv, namespace=None):
    """(args, flags it does not take): `argv` parsed by `script`'s parser; a value it cannot parse is refused in
    one line, not with its usage."""
    parser = importlib.import_module(script).get_args_parser()

    def refuse(message):
        raise UserError(f"flags after --: {message} (python {script}.py --help lists its flags)")
    parser.error = refuse
    return parser.parse_known_args(argv, namespace)


def check_job(job, processes, gpus):
    """Refuse, before anything is submitted, a job that would fail or pass a run off as another: flags its script
    does not take, cannot parse or would not train with; a finished run trained otherwise than the job would train
    it (every setting its script would train with, given or by default, as demo.run_stage compares) or by another
    count of processes; for a run to train by `processes` processes on `gpus` GPUs, whatever its script would
    refuse (`check_device`, `check_script_args`)."""
    args, unknown = parse_script_flags(job.script, job.current_argv())
    if unknown:
        raise UserError(f"{job.script}.py does not take {' '.join(unknown)} (python {job.script}.py --help lists "
                        "its flags)")
    for name in ('evaluate', 'export', 'summary'):
        if getattr(args, name, None) not in (None, False):  # --export '' included
            raise UserError(f"flags after --: --{name} trains no run, and submit.py submits runs to train: run "
                            f"python {job.script}.py --{name} directly")
    if args.force:  # a requeued job continues its run with --resume, which --force contradicts
        raise UserError("flags after --: submit.py does not take --force (a job resumes its run when requeued, and a "
                        "finished run is kept): move the old runs away or pass another --model-root")
    parsed, args = args, completed_args(job, args)
    if run_status(job.run_dir) != 'finished':
        if job.script == 'main_teacher_decathlon' and parsed.export_backbone:
            main_teacher_decathlon.check_export_backbone(parsed)
        args.processes = processes  # what check_run_dir records, and compares for a job to resume
        check_device(args, processes, gpus)
        default_teacher = job.script == 'main_student_decathlon' and parsed.teacher_fn is None
        check_script_args(job, args, default_teacher)
        return
    differences = finished_run_differences(job.run_dir, trained_settings(args), processes)
    if differences:
        raise UserError(f"{job.run_dir} holds a finished run trained with {'; '.join(differences)}: "
                        "move it away or pass another --model-root")


def check_device(args, processes, gpus):
    """A job's --device and --cuda-graph as its script takes them, on the `gpus` GPUs the job gets ('auto': CUDA
    with any) and with `processes` processes."""
    device = utils.parse_device(args.device)
    if device is not None and device.type == 'cuda' and not gpus:
        raise UserError(f"flags after --: --device {args.device} needs a GPU, and the jobs get none "
                        "(--gpus-per-job 0): drop it, or pass --gpus-per-job")
    if args.cuda_graph and (device.type == 'cpu' if device is not None else not gpus):
        raise UserError("flags after --: --cuda-graph needs a CUDA device, and the jobs run on CPUs: drop it, or "
                        "pass --gpus-per-job (and no --device cpu)")
    if args.cuda_graph and processes > 1:
        raise UserError(f"flags after --: --cuda-graph runs one process, and each job runs {processes} "
                        "(--processes-per-job, or one per GPU): drop it")


def completed_args(job, args):
    """The job's parsed `args` as its script completes them before training: a decathlon script's run of its task
    (its stage, run directory and crop size; its network, universal weights, teacher and the student it prunes,
    by complete_task_args); main_student.py's as parsed."""
    if job.script == 'main_teacher_decathlon':
        [args] = task_runs(args)
        main_teacher_decathlon.complete_task_args(args)
    elif job.script == 'main_student_decathlon':
        main_student_decathlon.check_command(args)
        main_student_decathlon.set_stage(args)
        [args] = task_runs(args)
        main_student_decathlon.complete_task_args(args)
    return args


def check_script_args(job, args, default_teacher):
    """What the job's script refuses before it writes anything, refused here on the job's `completed_args` (writing
    nothing): engine.check_args or main_student.check_student_args; what a student needs (a folder task's class
    folders, as the student it prunes recorded them; the universal blocks left to prune; the teacher it distils
    from, of its backbone and task, a decathlon task's own when `default_teacher`); engine.check_run_dir."""
    if job.script == 'main_teacher_decathlon':
        check_args(args)
        check_input_size(create_teacher(args.arch, 1), args.input_size)
        check_run_dir(args)
        return
    if job.script == 'main_student_decathlon' and args.prune:
        require_finished(args, args.full_model_dir, 'to prune')
    main_student.check_student_args(args)
    check_data(vars(args), {'classes': task_classes(args.task, args.data_dir)}, args)  # a folder task's data
    distill = args.teacher_coeff > 0
    if distill or args.classifier_init == 'teacher' and not args.full_model_dir:  # as main_student.main loads it
        if default_teacher:
            require_finished(args, os.path.dirname(args.teacher_fn),
                             'to distil from' if distill else 'to start its classifier from',
                             ', or pass --teacher-coeff 0 --classifier-init fresh after --')
        load_teacher(args.teacher_fn, 'cpu', arch=args.backbone, task=args.task)
    if args.full_model_dir:  # on the universal weights the job names, checked as the job checks them
        full, _ = load_student(args.full_model_dir, 'cpu', args.pretrained or 'none')
        left = int(full.path_alive[:, 0].sum())
        if args.n_pruning_universal > left:
            raise UserError(f"cannot prune {args.n_pruning_universal} universal blocks of the student in "
                            f"{args.full_model_dir}: it has {left} left; prune at most {left}")
        full.prune(args.n_pruning_universal, args.thr_pruning_proxy)  # refuses one that disconnects the network
    check_input_size(create_teacher(args.backbone, 1), args.input_size)
    check_run_dir(args)


def require_finished(args, run_dir, purpose, alternative=''):
    """A run a decathlon job needs (<model-root>/<task>/<stage>), refused unless finished, with its command."""
    stage = os.path.basename(run_dir)
    if run_status(run_dir) != 'finished':
        raise UserError(f"{args.task}: no finished {stage} in {run_dir} {purpose}: train it first (python submit.py "
                        f"decathlon --stage {stage} --tasks {args.task} --model-root {args.model_root} --data-dir "
                        f"{args.data_dir}){alternative}")


def given_settings(script, argv):
    """The settings `argv` gives `script` explicitly (not its defaults)."""
    args, _ = parse_script_flags(script, argv)
    unset = argparse.Namespace(**dict.fromkeys(vars(args)))  # argparse fills no defaults in
    return {key: value for key, value in vars(parse_script_flags(script, argv, unset)[0]).items() if value is not None}


def summary(args, jobs):
    """The decathlon table and score, or one line per run: accuracy, universal blocks, parameters, FLOPs."""
    if args.command == 'decathlon' and args.stage != 'teacher':
        import main_student_decathlon
        summary_args = main_student_decathlon.get_args_parser().parse_args(
            ['--task', 'all', '--model-root', args.model_root, '--data-dir', args.data_dir, '--summary'])
        tasks = {os.path.basename(os.path.dirname(job.run_dir)) for job in jobs}
        return main_student_decathlon.summary(summary_args, tasks)['table']
    lines = [f"{'run':<40} {'accuracy':>8} {'universal':>9} {'params (M)':>10} {'GFLOPs':>7}"]
    for job in jobs:
        if args.command == 'decathlon':  # teachers
            lines.append(f"{job.run_dir:<40} {utils.load_checkpoint(checkpoint_path(job.run_dir))['accuracy']:8.2f}")
            continue
        row = demo.run_row(job.run_dir, job.run_dir)
        lines.append(f"{job.run_dir:<40} {row['accuracy']:8.2f} "
                     f"{row['blocks_total'] - row['blocks_removed']:>4}/{row['blocks_total']:<4} "
                     f"{row['params'] / 1e6:10.2f} {row['flops'] / 1e9:7.3f}")
    table = '\n'.join(lines)
    print(table)
    return table


# sacct's states of a job still queued or running
ACTIVE_SLURM_STATES = {'PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING', 'SUSPENDED', 'REQUEUED', 'REQUEUE_HOLD',
                       'REQUEUE_FED', 'RESIZING', 'SIGNALING', 'STAGE_OUT'}


def submissions_path(args):
    """<log-dir>/submitted.json: the job each run was last submitted as (run directory -> job id and cluster)."""
    return os.path.join(args.log_dir, 'submitted.json')


def earlier_submissions(args):
    try:
        with open(submissions_path(args)) as f:
            submissions = json.load(f)
    except (OSError, ValueError):  # none yet (or unreadable: as if none)
        return {}
    if not isinstance(submissions, dict):
        return {}
    return {run: job for run, job in submissions.items() if isinstance(job, dict) and {'job_id', 'cluster'} <= set(job)}


def active_state(args, submission):
    """The state of the job of an earlier `submission` while it is queued or running, else None."""
    if submission['cluster'] == 'local':  # the job id is its process's
        try:
            with open(f"/proc/{submission['job_id']}/cmdline", 'rb') as f:
                return 'RUNNING' if b'submitit' in f.read() else None
        except OSError:
            return None
    import submitit
    state = submitit.SlurmJob(args.log_dir, submission['job_id']).get_info(mode='force').get('State', '')
    state = (state.split() or [''])[0]  # 'CANCELLED by 1234'
    return state if state in ACTIVE_SLURM_STATES else None


def check_not_running(args, jobs):
    """No job of an earlier submission (with this --log-dir) may still be queued or running for a run of `jobs`:
    submitted again, two jobs would train it, the later failing on the run's lock or finding it finished."""
    submissions = earlier_submissions(args)
    for job in jobs:
        submission = submissions.get(os.path.abspath(job.run_dir))
        state = submission and active_state(args, submission)
        if state:
            cancel = 'kill' if submission['cluster'] == 'local' else 'scancel'
            raise UserError(f"{job.run_dir} is being trained by job {submission['job_id']} of an earlier "
                            f"submission ({state}): wait for it, or cancel it ({cancel} {submission['job_id']})")


def record_submissions(args, jobs, handles):
    """The jobs just submitted, for `check_not_running` in the next submission."""
    submissions = earlier_submissions(args)
    for job, handle in zip(jobs, handles):
        submissions[os.path.abspath(job.run_dir)] = {'job_id': handle.job_id,
                                                     'cluster': 'local' if args.local else 'slurm'}
    try:
        utils.atomic_write_json(submissions, submissions_path(args))
    except OSError as error:  # the jobs run all the same
        print(f"warning: cannot record the jobs in {submissions_path(args)} ({error.strerror or error}): submitted "
              "again before they end, their runs would get a second job", file=sys.stderr)


def job_processes(args):
    """The processes of each job (torchrun's --nproc-per-node): --processes-per-job, else one per GPU, or one."""
    return args.processes_per_job or max(args.gpus_per_job, 1)


def make_executor(args):
    import submitit
    try:
        executor = submitit.AutoExecutor(folder=args.log_dir, cluster='local' if args.local else 'slurm')
    except RuntimeError as error:  # no srun: not a SLURM cluster (without --local it used to run the jobs here)
        raise UserError(f"no SLURM here ({utils.error_reason(error)}): pass --local to run the jobs on this "
                        "machine") from None
    tasks = job_processes(args)
    setup = [f'export PYTHONPATH={REPO}:$PYTHONPATH']  # the jobs import this repository's modules
    parameters = dict(timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_job, tasks_per_node=tasks,
                      cpus_per_task=args.cpus_per_task, nodes=1, name=f'nettailor-{args.command}',
                      local_setup=setup, slurm_setup=setup, slurm_array_parallelism=args.array_parallelism)
    if args.partition:
        parameters['slurm_partition'] = args.partition
    if args.account:
        parameters['slurm_account'] = args.account
    executor.update_parameters(**parameters)
    return executor


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument('--local', action='store_true', help='run the jobs as local processes instead of SLURM jobs')
    parser.add_argument('--partition', default=None, help='SLURM partition')
    parser.add_argument('--account', default=None, help='SLURM account')
    parser.add_argument('--gpus-per-job', type=int, default=1, help='GPUs per run; 0 for CPU jobs')
    parser.add_argument('--processes-per-job', type=int, default=None,
                        help="the run's processes (torchrun's --nproc-per-node; default: one per GPU, or one)")
    parser.add_argument('--cpus-per-task', type=int, default=10, help='CPU cores per process (data loading)')
    parser.add_argument('--timeout-min', type=int, default=1440, help="each job's time limit; a job reaching it "
                        'is requeued and resumes')
    parser.add_argument('--array-parallelism', type=int, default=32, help='jobs of the array running at once')
    parser.add_argument('--log-dir', default='checkpoints/submitit', help="submitit's job folder (logs, pickles)")
    parser.add_argument('--no-wait', action='store_true', help='submit and return, without the summary')
    commands = parser.add_subparsers(dest='command', required=True)
    decathlon = commands.add_parser('decathlon', help='one decathlon stage, one job per task')
    decathlon.add_argument('--stage', required=True, choices=['teacher', 'student', 'pruned'])
    decathlon.add_argument('--tasks', nargs='+', default=None, help='default: every task under --data-dir')
    decathlon.add_argument('--model-root', default='checkpoints/decathlon')
    decathlon.add_argument('--data-dir', default='data')
    sweep = commands.add_parser('sweep', help='prune and retrain one trained student for several k')
    sweep.add_argument('--full-model-dir', required=True, help='the trained student')
    sweep.add_argument('--k', type=int, nargs='+', required=True, help='universal blocks to remove, one run each')
    sweep.add_argument('--model-root', default=None, help="runs go to <model-root>/pruned-k<k> (default: "
                       "the student's parent folder)")
    return parser


def check_submit_flags(args):
    """submit.py's own flags: counts that must be positive (--gpus-per-job non-negative), no SLURM settings with
    --local, a --log-dir that can be written."""
    utils.require_folder(args.log_dir, '--log-dir')
    for name in ('processes_per_job', 'cpus_per_task', 'timeout_min', 'array_parallelism'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.gpus_per_job < 0:
        raise UserError(f"--gpus-per-job must be non-negative, got {args.gpus_per_job}")
    for name in ('partition', 'account'):
        if args.local and getattr(args, name):
            raise UserError(f"--{name} is a SLURM setting, which --local jobs (processes on this machine) do not "
                            f"use: drop --{name} or --local")


def main(args, script_flags):
    """Submit the jobs whose runs are not finished, wait for all, print the summary; returns it (or the jobs)."""
    check_submit_flags(args)
    jobs = decathlon_jobs(args, script_flags) if args.command == 'decathlon' else sweep_jobs(args, script_flags)
    run_dirs = [job.run_dir for job in jobs]
    for i, job in enumerate(jobs):
        if job.run_dir in run_dirs[:i]:
            raise UserError(f"{'--tasks' if args.command == 'decathlon' else '--k'} repeats a value: two jobs would "
                            f"write {job.run_dir}; give each value once")
    pending = [job for job in jobs if run_status(job.run_dir) != 'finished']
    check_not_running(args, pending)
    for job in jobs:
        check_job(job, job_processes(args), args.gpus_per_job)
    for job in jobs:
        if job not in pending:
            print(f"{job.run_dir}: finished, not submitted again")
    submitted = []
    if pending:
        executor = make_executor(args)
        with executor.batch():  # one job array
            submitted = [executor.submit(job) for job in pending]
        record_submissions(args, pending, submitted)
    for job, handle in zip(pending, submitted):
        print(f"job {handle.job_id}: {job.script} -> {job.run_dir}")
    if args.no_wait:
        return submitted
    failures = []
    for job, handle in zip(pending, submitted):
        try:
            handle.results()  # one per process of the job
        except Exception as error:  # submitit's text of the job's failure, its traceback included
            failures.append(f"{job.run_dir} (job {handle.job_id}, log in {args.log_dir}): {failure_reason(error)}")
    if failures:
        raise UserError(f"{len(failures)} of {len(submitted)} jobs failed: " + '; '.join(failures))
    return summary(args, jobs)


def failure_reason(error):
    """One line of submitit's text of a failed job: the job's own error (its last '...Error: ' line), or else
    submitit's first sentence (a job killed before it raised one: 'Job N (task: 0) with path P has not produced
    any output (state: S)')."""
    lines = str(error).splitlines() or [type(error).__name__]
    own = next((line.split('Error: ', 1)[1] for line in reversed(lines) if 'Error: ' in line), None)
    return own or ' '.join(' '.join(lines[:2]).split())


if __name__ == '__main__':
    argv = sys.argv[1:]
    split = argv.index('--') if '--' in argv else len(argv)
    utils.run_cli(lambda args: main(args, argv[split + 1:]), get_args_parser(), argv[:split])
