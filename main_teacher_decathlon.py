"""Visual Decathlon teachers: main_teacher.py with decathlon defaults, for one task or all.

    python main_teacher_decathlon.py --task all                       # every task found under --data-dir
    python main_teacher_decathlon.py --task svhn --evaluate

Runs go to <model-root>/<task>/teacher.  Defaults: Wide ResNet-26 with the released universal
weights (checkpoints/wide_resnet26.pth.tar), the decathlon loaders and per-task crops (72 px for
aircraft, cifar100, daimlerpedcls, gtsrb and dtd, 64 px for the others), training on --train-splits
(train) and evaluation on val.  --export-backbone writes the trained network as a universal weights
file (how the offline miniature gets its own).
"""
import argparse
import copy
import os
import sys

import main_teacher
import utils
from engine import checkpoint_path, load_teacher, run_status
from decathlon_dataloaders import DECATHLON_TASKS, SPLITS, DecathlonDataset, available_tasks, check_task, crop_size
from utils import UserError
from wide_nettailor import DEFAULT_WEIGHTS


def add_decathlon_args(parser, stage):
    """Flags shared by the decathlon scripts; `stage` names the run folder under <model-root>/<task>."""
    parser.add_argument('--task', required=True, help=f"a decathlon task ({', '.join(DECATHLON_TASKS)}) or 'all'")
    parser.add_argument('--model-root', default='checkpoints/decathlon', help='runs go to <model-root>/<task>/')
    parser.add_argument('--model-dir', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--train-splits', default='train', help="comma-separated: 'train' or 'train,val'")
    parser.add_argument('--input-size', type=int, default=None, help="crop size (default: the task's, "
                        'decathlon_dataloaders.PREPROCESSING: 72 or 64 px)')
    parser.add_argument('--evaluate', action='store_true', help="only evaluate the task's run (of every task's, with "
                        "--task all)")
    parser.set_defaults(decathlon=True, eval_split='val', stage=stage)


def check_default_weights(args):
    """The released universal weights, when they are the ones to train from, must have been downloaded: for a new
    run, one --force replaces, or one --resume continues that was trained from them.  A run already there is
    otherwise refused, or compared with the flags given, first (by check_run_dir or submit.py), in one line."""
    if args.pretrained != DEFAULT_WEIGHTS or os.path.isfile(DEFAULT_WEIGHTS):
        return
    run = checkpoint_path(args.model_dir)
    if os.path.isfile(run) and not args.force and (
            not args.resume or utils.load_checkpoint(run).get('args', {}).get('pretrained') != DEFAULT_WEIGHTS):
        return
    raise UserError(f"the released Wide ResNet-26 weights are missing ({DEFAULT_WEIGHTS}): run "
                    "`python checkpoints/download_models.py`, or pass --pretrained")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description='NetTailor decathlon teachers', add_help=add_help,
                                     formatter_class=utils.HelpFormatter,
                                     parents=[main_teacher.get_args_parser(add_help=False)],
                                     conflict_handler='resolve')
    add_decathlon_args(parser, 'teacher')
    parser.add_argument('--pretrained', default=DEFAULT_WEIGHTS,
                        help="a state-dict file, 'imagenet' or 'none' (default: the released Wide ResNet-26, "
                        "checkpoints/wide_resnet26.pth.tar, which checkpoints/download_models.py fetches)")
    parser.add_argument('--arch', default=None, help="the network (default wide_resnet26; --evaluate takes the run's)")
    parser.add_argument('--export-backbone', default=None,
                        help='after training, write the network as a universal weights file here (one --task; '
                        'an existing file only with --force)')
    parser.set_defaults(epochs=30, lr_decay_epochs=10)
    return parser


def task_runs(args):
    """One argument namespace per task, with its run directory and crop size resolved; --task all is every task
    of --data-dir (for --export, every task with runs under --model-root)."""
    if args.model_dir is not None:
        raise UserError("decathlon runs go to <model-root>/<task>/<stage>: pass --model-root, not --model-dir")
    if args.train_splits not in ('train', 'train,val'):  # val alone, or twice, would inflate the val accuracy
        raise UserError(f"--train-splits takes 'train' or 'train,val', got {args.train_splits!r}")
    if args.task != 'all':
        check_task(args.task)  # a misspelt task is no missing run
    if args.task != 'all':
        tasks = [args.task]
    elif getattr(args, 'export', None) is not None:  # the runs there, without the data
        tasks = [task for task in DECATHLON_TASKS if os.path.isdir(os.path.join(args.model_root, task))]
        if not tasks:
            raise UserError(f"no decathlon task's runs under --model-root {args.model_root}: train them first")
    else:
        tasks = available_tasks(args.data_dir)
    if not tasks:
        raise UserError(f"no decathlon task found under {args.data_dir}/decathlon-1.0; run "
                        "`python data/download_decathlon.py` or `python data/make_synthetic_decathlon.py`")
    for task in tasks:
        task_args = copy.copy(args)
        task_args.task = task
        task_args.train_splits = tuple(args.train_splits.split(','))
        # a pruned student keeps its full student's crop, an evaluated or exported run its own
        if not (getattr(args, 'prune', False) or args.evaluate or getattr(args, 'export', None) is not None):
            task_args.input_size = crop_size(task, args.input_size)
        task_args.model_dir = os.path.join(args.model_root, task, args.stage)
        yield task_args


def run_tasks(args, main):
    """`main` on every task; a dict task -> its result.  With --task all, finished runs are skipped
    (--force reruns them), --resume continues the interrupted one and starts those not begun, and the images of
    every task to run are checked before the first one starts; a single task's submission images too (its
    loaders check the others)."""
    runs = []
    for task_args in task_runs(args):
        status = run_status(task_args.model_dir)
        if args.task == 'all' and not (args.force or args.evaluate) and status == 'finished':
            utils.print_once(f"{task_args.task}: finished run in {task_args.model_dir}, skipped (--force reruns it)")
            continue
        if args.task == 'all' and args.resume and status is None:
            task_args.resume = False
        runs.append(task_args)
    for task_args in runs:
        for split in splits_read(task_args):
            if args.task == 'all' or split == 'test_stripped':
                DecathlonDataset(task_args.task, split, args.data_dir)  # refuses missing images
    results = {}
    for task_args in runs:
        try:
            results[task_args.task] = main(task_args)
        except UserError as error:
            if args.task != 'all':
                raise
            raise UserError(f"{task_args.task}: {utils.user_error_line(error)}") from None  # which task failed
    return results


def splits_read(args):
    """The decathlon splits a task's run reads: its training splits unless it only evaluates, the evaluation
    split, and test_stripped for a submission."""
    read = {args.eval_split} | (set() if args.evaluate else set(args.train_splits))
    submission = getattr(args, 'write_submission', False)  # main_student_decathlon.py's flag
    return [split for split in SPLITS if split in read or split == 'test_stripped' and submission]


def complete_task_args(args):
    """A task's teacher to train: the default network, and the universal weights known to be there."""
    if not args.evaluate:
        args.arch = args.arch or 'wide_resnet26'
        check_default_weights(args)


def train_or_evaluate(args):
    """main_teacher.main for one task."""
    complete_task_args(args)
    return main_teacher.main(args)


def check_export_backbone(args):
    """--export-backbone FILE: one task's run, written to a file that can be written, other than the run's own
    checkpoint and, unless --force replaces it, not there yet.  Returns the run's checkpoint file."""
    if args.task == 'all':
        raise UserError("--export-backbone writes one task's network: pass a single --task")
    utils.require_file_path(args.export_backbone, '--export-backbone')
    run = checkpoint_path(next(task_runs(args)).model_dir)
    if os.path.realpath(args.export_backbone) == os.path.realpath(run):
        raise UserError(f"--export-backbone {args.export_backbone} is the run's own checkpoint: name another file")
    if os.path.exists(args.export_backbone) and not args.force:
        raise UserError(f"--export-backbone {args.export_backbone} exists: pass --force to replace it, or name "
                        "another file")
    return run


def main(args):
    run = check_export_backbone(args) if args.export_backbone else None
    results = run_tasks(args, train_or_evaluate)
    if args.export_backbone and utils.is_main_process():
        model, _ = load_teacher(run, 'cpu')
        with utils.writing(f'--export-backbone {args.export_backbone}'):
            utils.atomic_save({'state_dict': model.state_dict()}, args.export_backbone)
        print(f"universal weights written to {args.export_backbone}")
    return results


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser(), sys.argv[1:])
