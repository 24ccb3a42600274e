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

Flags after `--` go to every run's script (main_*_decathlon.py, main_student.py).  Finished runs are not
submitted again (one trained with other values of the flags given is refused, before anything is submitted); a
job preempted or reaching its time limit is requeued and continues its run with --resume (submitit's
checkpointing); once every job has ended the summary is printed (the decathlon table and score, or the sweep's
table).  Job logs go to --log-dir.
"""
import argparse
import importlib
import os
import sys

import demo
import utils
from engine import checkpoint_path, finished_run_differences, run_status
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
        state = run_status(self.run_dir)
        if state == 'finished':  # requeued after its last checkpoint
            return None
        module = importlib.import_module(self.script)
        argv = self.argv + (['--resume'] if state == 'unfinished' else [])
        args = module.get_args_parser().parse_args(argv)
        try:
            module.main(args)
        except UserError as error:  # the job fails with the one line the script would print
            raise RuntimeError(f"{self.script} {' '.join(argv)}: {utils.user_error_line(error)}") from None
        return self.run_dir

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self)


def decathlon_jobs(args, script_flags):
    """One job per decathlon task found under --data-dir for --stage (teacher, student or pruned)."""
    from decathlon_dataloaders import available_tasks
    tasks = args.tasks or available_tasks(args.data_dir)
    if not tasks:
        raise UserError(f"no decathlon task found under {args.data_dir}/decathlon-1.0; run "
                        "`python data/download_decathlon.py` or `python data/make_synthetic_decathlon.py`")
    script = 'main_teacher_decathlon' if args.stage == 'teacher' else 'main_student_decathlon'
    stage_flags = ['--prune'] if args.stage == 'pruned' else []
    return [Job(script, ['--task', task, '--model-root', args.model_root, '--data-dir', args.data_dir, *stage_flags,
                         *script_flags], os.path.join(args.model_root, task, args.stage)) for task in tasks]


def sweep_jobs(args, script_flags):
    """One job per k: the student in --full-model-dir with k universal blocks pruned, retrained."""
    if run_status(args.full_model_dir) != 'finished':
        raise UserError(f"--full-model-dir {args.full_model_dir} holds no finished student: train it first "
                        "(main_student.py)")
    root = args.model_root or os.path.dirname(os.path.abspath(args.full_model_dir))
    return [Job('main_student', [*script_flags, '--full-model-dir', args.full_model_dir, '--n-pruning-universal',
                                 str(k), '--model-dir', os.path.join(root, f'pruned-k{k}')],
                os.path.join(root, f'pruned-k{k}')) for k in args.k]


def check_flags(job):
    """Flags the job's script does not take are refused here, before anything is submitted."""
    _, unknown = importlib.import_module(job.script).get_args_parser().parse_known_args(job.argv)
    if unknown:
        raise UserError(f"{job.script}.py does not take {' '.join(unknown)} (python {job.script}.py --help lists "
                        "its flags)")


def trained_otherwise(job):
    """How the finished run of `job` was trained otherwise than the flags the job passes (see demo.run_stage)."""
    parser = importlib.import_module(job.script).get_args_parser()
    unset = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args(job.argv))))  # argparse fills no defaults in
    given = vars(parser.parse_args(job.argv, unset))
    return finished_run_differences(job.run_dir, {key: value for key, value in given.items() if value is not None})


def summary(args, jobs):
    """The decathlon table and score, or one line per run: accuracy, universal blocks, parameters, FLOPs."""
    if args.command == 'decathlon' and args.stage != 'teacher':
        import main_student_decathlon
        summary_args = main_student_decathlon.get_args_parser().parse_args(
            ['--task', 'all', '--model-root', args.model_root, '--data-dir', args.data_dir, '--summary'])
        return main_student_decathlon.summary(summary_args)['table']
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


def make_executor(args):
    import submitit
    executor = submitit.AutoExecutor(folder=args.log_dir, cluster='local' if args.local else None)
    tasks = args.processes_per_job or max(args.gpus_per_job, 1)
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


def main(args, script_flags):
    """Submit the jobs whose runs are not finished, wait for all, print the summary; returns it (or the jobs)."""
    if args.gpus_per_job < 0 or args.timeout_min <= 0 or (args.processes_per_job or 1) < 1:
        raise UserError("--gpus-per-job must be non-negative, --processes-per-job and --timeout-min positive")
    jobs = decathlon_jobs(args, script_flags) if args.command == 'decathlon' else sweep_jobs(args, script_flags)
    pending = [job for job in jobs if run_status(job.run_dir) != 'finished']
    for job in jobs:
        check_flags(job)
        differences = trained_otherwise(job) if job not in pending else None
        if differences:
            raise UserError(f"{job.run_dir} holds a finished run trained with {'; '.join(differences)}: "
                            "move it away or pass another --model-root")
    for job in jobs:
        if job not in pending:
            print(f"{job.run_dir}: finished, not submitted again")
    submitted = []
    if pending:
        executor = make_executor(args)
        with executor.batch():  # one job array
            submitted = [executor.submit(job) for job in pending]
    for job, handle in zip(pending, submitted):
        print(f"job {handle.job_id}: {job.script} -> {job.run_dir}")
    if args.no_wait:
        return submitted
    failures = []
    for job, handle in zip(pending, submitted):
        try:
            handle.results()  # one per process of the job
        except Exception as error:  # submitit's text of the job's failure, its traceback included
            lines = str(error).splitlines()
            reason = next((line.split('Error: ', 1)[1] for line in reversed(lines) if 'Error: ' in line), lines[0])
            failures.append(f"{job.run_dir} (job {handle.job_id}, log in {args.log_dir}): {reason}")
    if failures:
        raise UserError(f"{len(failures)} of {len(submitted)} jobs failed: " + '; '.join(failures))
    return summary(args, jobs)


if __name__ == '__main__':
    argv = sys.argv[1:]
    split = argv.index('--') if '--' in argv else len(argv)
    utils.run_cli(lambda args: main(args, argv[split + 1:]), get_args_parser(), argv[:split])
