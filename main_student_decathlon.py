"""Visual Decathlon students: main_student.py with decathlon defaults, the summary and the submission.

    python main_student_decathlon.py --task all                  # NetTailor students (needs the teachers)
    python main_student_decathlon.py --task all --prune --n-pruning-universal 4 --thr-pruning-proxy 0.05
    python main_student_decathlon.py --task all --summary         # per-task table + decathlon score
    python main_student_decathlon.py --task all --export deploy    # deploy/<task>/tailored.{pt2,onnx}

Runs go to <model-root>/<task>/student and, with --prune, <model-root>/<task>/pruned; the
teacher is read from <model-root>/<task>/teacher.  --write-submission predicts test_stripped and
writes <run>/submission.json; --summary merges those into <model-root>/results.json, the file
the evaluation server takes.
"""
import argparse
import os
import sys

from torch.utils.data import DataLoader

import main_student
import utils
from dataloaders import loader_options
from decathlon_dataloaders import (DecathlonDataset, decathlon_score, decathlon_transform, read_submission,
                                   submission_entries, write_submission)
from engine import checkpoint_path, load_student, predict, run_status, stale_sources
from main_teacher_decathlon import add_decathlon_args, check_default_weights, run_tasks, task_runs
from utils import UserError
from wide_nettailor import DEFAULT_WEIGHTS


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description='NetTailor decathlon students', add_help=add_help,
                                     formatter_class=utils.HelpFormatter,
                                     parents=[main_student.get_args_parser(add_help=False)],
                                     conflict_handler='resolve')
    add_decathlon_args(parser, 'student')
    parser.add_argument('--backbone', '--arch', default=None,
                        help="the network (default wide_resnet26; with --prune, the full student's)")
    parser.add_argument('--pretrained', default=None,
                        help="universal weights: a state-dict file, 'imagenet' or 'none' (default: the released "
                        "Wide ResNet-26, checkpoints/wide_resnet26.pth.tar; with --prune, the full student's)")
    parser.add_argument('--full-model-dir', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--export', default=None, metavar='OUT_DIR',
                        help="write each task's final run (pruned if finished, else the student) as a plain network "
                        "for deployment: OUT_DIR/<task>/tailored.pt2 and tailored.onnx")
    parser.add_argument('--prune', action='store_true',
                        help='prune <task>/student with --n-pruning-universal / --thr-pruning-proxy and retrain')
    parser.add_argument('--write-submission', action='store_true',
                        help='predict test_stripped and write <run>/submission.json')
    parser.add_argument('--summary', action='store_true', help='print the per-task table and the decathlon score')
    parser.set_defaults(epochs=30, lr_decay_epochs=10)
    return parser


def complete_task_args(args):
    """A task's student run: its teacher and (with --prune) its full student found by convention; for a new
    student, the default network and the universal weights known to be there."""
    task_dir = os.path.dirname(args.model_dir)
    if args.teacher_fn is None:
        args.teacher_fn = checkpoint_path(os.path.join(task_dir, 'teacher'))
    if args.prune and not args.evaluate:
        args.full_model_dir = os.path.join(task_dir, 'student')
    elif not args.evaluate:
        args.backbone = args.backbone or 'wide_resnet26'
        args.pretrained = args.pretrained or DEFAULT_WEIGHTS
        check_default_weights(args)


def train_or_evaluate(args):
    """main_student.main for one task."""
    complete_task_args(args)
    result = main_student.main(args)
    if args.write_submission and utils.is_main_process():
        write_run_submission(args, args.model_dir)
    return result


def write_run_submission(args, run_dir):
    """<run_dir>/submission.json: the run's predictions over its task's test_stripped images."""
    student, checkpoint = load_student(run_dir, utils.resolve_device(args.device), args.pretrained)
    saved = checkpoint['args']  # the run's input size and the mean and std it recorded
    dataset = DecathlonDataset(args.task, 'test_stripped', args.data_dir,
                               decathlon_transform(args.task, False, saved['input_size'], args.data_dir,
                                                   saved.get('mean_std')))
    if dataset.num_classes != student.num_classes:
        raise UserError(f"{dataset.path} lists {dataset.num_classes} {args.task} categories, the model in {run_dir} "
                        f"predicts {student.num_classes}: the annotation files and the run do not belong together")
    loader = DataLoader(dataset, batch_size=args.batch_size, **loader_options(args.workers))
    write_submission(submission_entries(predict(student, loader, next(student.parameters()).device), dataset),
                     os.path.join(run_dir, 'submission.json'))


def set_stage(args):
    """The run a student command trains or evaluates: <task>/pruned with --prune, else <task>/student."""
    args.stage = 'pruned' if args.prune else 'student'


def final_run(task_dir):
    """The pruned run when finished, else the full student."""
    for stage in ('pruned', 'student'):
        if run_status(os.path.join(task_dir, stage)) == 'finished':
            return os.path.join(task_dir, stage)
    return None


def required_final_run(task, task_dir):
    """`final_run`, or a one-line refusal that says what to do."""
    run_dir = final_run(task_dir)
    if run_dir is None and run_status(os.path.join(task_dir, 'student')) == 'unfinished':
        raise UserError(f"the {task} student in {task_dir} is unfinished: finish it with --task {task} --resume "
                        "and the flags it was started with (its args.json)")
    if run_dir is None:
        raise UserError(f"no finished student for {task} in {task_dir}; train it first")
    stale = stale_sources(utils.load_checkpoint(checkpoint_path(run_dir)))
    if stale:
        stage = '--prune ' if os.path.basename(run_dir) == 'pruned' else ''
        raise UserError(f"the {task} run {run_dir} was trained from {stale[0]}: train it again (--task {task} "
                        f"{stage}--force and its flags)")
    return run_dir


def accuracy_text(checkpoint):
    """A run's recorded accuracy for the summary table, starred when measured on a --test-limit subset."""
    return f"{checkpoint['accuracy']:.2f}{'*' if checkpoint['args'].get('test_limit') else ''}"


def summary(args, tasks=None):
    """Per-task table (teacher and NetTailor accuracy on val, task parameters, FLOPs, blocks) and the score, over
    --task's tasks (`tasks`: those of them only)."""
    rows, accuracies, submissions, subsets = [], {}, [], set()
    for task_args in task_runs(args):
        if tasks is not None and task_args.task not in tasks:
            continue
        task_dir = os.path.dirname(task_args.model_dir)
        run_dir = required_final_run(task_args.task, task_dir)
        student, checkpoint = load_student(run_dir, 'cpu', args.pretrained)  # given: where the weights are now
        stats = student.stats()
        teacher_path = checkpoint_path(os.path.join(task_dir, 'teacher'))
        teacher = utils.load_checkpoint(teacher_path) if os.path.exists(teacher_path) else None
        accuracies[task_args.task] = checkpoint['accuracy']
        rows.append((task_args.task, teacher and accuracy_text(teacher), accuracy_text(checkpoint), stats,
                     os.path.basename(run_dir)))
        subsets |= {run['args']['test_limit'] for run in (teacher, checkpoint) if run and run['args'].get('test_limit')}
        submission = os.path.join(run_dir, 'submission.json')
        if args.write_submission and not os.path.exists(submission):
            write_run_submission(task_args, run_dir)
        submissions.append(submission if os.path.exists(submission) else None)
    total, points = decathlon_score(accuracies)
    lines = [f"{'task':<14} {'teacher':>7} {'NetTailor':>9} {'task params':>11} {'GFLOPs':>7} "
             f"{'universal':>9} {'proxies':>7} {'score':>6}  run"]
    for task, teacher_acc, accuracy, stats, stage in rows:
        lines.append(f"{task:<14} {teacher_acc or '-':>7} {accuracy:>9} {stats['params_task'] / 1e6:10.2f}M "
                     f"{stats['flops'] / 1e9:7.3f} "
                     f"{stats['universal_blocks_kept']:>4}/{stats['universal_blocks_total']:<4} "
                     f"{stats['proxies_kept']:>7} {points[task]:6.0f}  {stage}")
    mean_params = sum(r[3]['params_task'] for r in rows) / len(rows)
    mean_flops = sum(r[3]['flops'] for r in rows) / len(rows)
    lines.append(f"mean accuracy {sum(accuracies.values()) / len(rows):.2f}, decathlon score {total:.0f} "
                 f"over {len(rows)} task(s) (val accuracies; test labels are held by the server), "
                 f"{mean_params / 1e6:.2f} M task parameters and {mean_flops / 1e9:.3f} GFLOPs per task on average")
    if subsets:
        lines.append(f"* measured on at most {' or '.join(map(str, sorted(subsets)))} val images (the run's "
                     "--test-limit): a quick run's accuracy, not comparable to the paper's, nor is the score")
    results = os.path.join(args.model_root, 'results.json')
    if all(submissions):
        write_submission([entry for path in submissions for entry in read_submission(path)], results)
        lines.append(f"submission for the evaluation server: {results}")
    else:
        lacking = [row[0] for row, path in zip(rows, submissions) if path is None]
        lines.append(f"{results} not written: {', '.join(lacking)} "
                     f"{'lacks its' if len(lacking) == 1 else 'lack their'} submission.json (--write-submission)"
                     + ("; the one there is an earlier summary's" if os.path.exists(results) else ''))
    print('\n'.join(lines))
    return {'score': total, 'points': points, 'accuracies': accuracies, 'table': '\n'.join(lines)}


def export_tasks(args):
    """--export OUT_DIR: each task's final run (pruned if finished, else the full student) to OUT_DIR/<task>,
    every task's run found and loaded, and its folder checked (an earlier export there only with --force), before
    any is exported."""
    utils.require_folder(args.export, '--export')
    runs = []
    for task_args in task_runs(args):
        task_dir = os.path.dirname(task_args.model_dir)
        task_args.model_dir = required_final_run(task_args.task, task_dir)
        if run_status(os.path.join(task_dir, 'pruned')) == 'unfinished':
            print(f"{task_args.task}: the pruned run in {task_dir} is unfinished (finish it with --prune --resume); "
                  "exporting the full student")
        task_args.export = os.path.join(args.export, task_args.task)
        main_student.check_export_dir(task_args.export, args.force)
        try:
            runs.append((task_args, main_student.load_export(task_args)))
        except UserError as error:
            raise UserError(f"{task_args.task}: {utils.user_error_line(error)}") from None  # which task failed
    return {task_args.task: main_student.export_run(task_args, loaded) for task_args, loaded in runs}


def check_command(args):
    """The command's flags together: one of --summary, --export, --evaluate or training (--prune: the pruned
    run), each with the flags that apply to it.  Returns the command's flag (None: training)."""
    commands = [flag for flag, given in (('--summary', args.summary), ('--export', args.export is not None),
                                         ('--evaluate', args.evaluate)) if given]
    if len(commands) > 1:
        raise UserError(f"{' and '.join(commands)} are separate commands: pass one of them")
    if commands[:1] in (['--summary'], ['--export']) and args.prune:
        raise UserError(f"--prune does not apply to {commands[0]}: it takes each task's final run (the pruned one "
                        "when finished)")
    if args.export is not None and args.write_submission:
        raise UserError("--write-submission does not apply to --export: pass it with --summary or --evaluate")
    if args.full_model_dir:
        raise UserError("a decathlon student is pruned from <model-root>/<task>/student: pass --prune, "
                        "not --full-model-dir")
    pruning = [flag for flag, given in (('--n-pruning-universal', args.n_pruning_universal > 0),
                                        ('--thr-pruning-proxy', args.thr_pruning_proxy is not None)) if given]
    if pruning and args.evaluate:  # with --prune, <task>/pruned
        raise UserError(f"--evaluate takes the task's run as it is: drop {pruning[0]} (prune with --prune and the "
                        "pruning flags first, then --evaluate it with --prune)")
    if pruning and commands:
        raise UserError(f"{commands[0]} takes each task's final run as it is: drop {pruning[0]}")
    if pruning and not args.prune:  # main_student.py's hint would name --full-model-dir, refused here
        raise UserError(f"{pruning[0]} prunes a trained student: pass it with --prune (submit.py: --stage pruned)")
    return commands[0] if commands else None


def main(args):
    command = check_command(args)
    if command in ('--summary', '--export'):
        utils.require_one_process(command)
    if args.summary:
        return summary(args)
    if args.export is not None:
        return export_tasks(args)
    set_stage(args)
    return run_tasks(args, train_or_evaluate)


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser(), sys.argv[1:])
