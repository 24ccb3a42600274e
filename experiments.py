"""The paper's experiments as commands: each writes a table (<root>/<experiment>.json, and printed) and a figure
(<root>/<experiment>.png), and picks the leanest network within --tolerance points of the teacher.

    python experiments.py ksweep --task svhn --k 7 9 11 13         # accuracy against k (paper section 4, Fig. 6)
    python experiments.py teacher --task svhn --k 7 9 11 13        # with and without the teacher (Fig. 6)
    python experiments.py max-skip --task svhn --k 9 11 --max-skip 1 2 3 dense   # proxy reach (Table 1)
    python experiments.py backbone --task svhn --k 4 6 8 --archs resnet18 resnet34 resnet50   # depth (Fig. 5)
    python experiments.py difficulty                               # offline: easy, medium and hard tasks

Every run is a stage of demo.py (teacher, student, prune + retrain), with the demos' recipes (demo.RECIPES;
the synthetic tasks: demo_synthetic.RECIPE, on the offline source backbone), under --model-root; a finished
run is reused.  --smoke shortens every stage to one epoch on a few images, to check the plumbing (the offline
source backbone, shared with the demo, is pre-trained in full when it is not cached yet).
"""
import argparse
import copy
import json
import math
import os
import sys
import time

from matplotlib.figure import Figure

import backbones
import demo
import demo_synthetic
import main_student
import main_teacher
import utils
from engine import checkpoint_path, load_student, run_status
from figures import plot_architecture, save_figure
from nettailor import parse_max_skip
from synthetic import SYNTHETIC_TASKS
from utils import UserError

DIFFICULTY_TASKS = ('synth-digits', 'synth-textures', 'synth-shapes')  # easy, medium, hard
DIFFICULTY_K = (6, 5, 4, 3, 2, 1)  # universal blocks to remove, tried from the leanest
# The tolerance is measured from the teacher, so teacher and student need budgets that let each learn the task:
# with the demo's (3 and 5 epochs) the teacher reached 40 % and 22 % on the medium and hard tasks and every
# student beat it by 15 points whatever k; with a 10-epoch teacher (96.2 % on digits) no 5-epoch student came
# within 7 points.  Here every stage trains longer, the teacher and the student alike.
DIFFICULTY_EPOCHS = dict(teacher=dict(epochs=8, lr_decay_epochs=6), student=dict(epochs=8, lr_decay_epochs=6),
                         retrain=dict(epochs=3, lr_decay_epochs=2))
SMOKE = dict(epochs=1, lr_decay_epochs=1, train_limit=64, test_limit=32, batch_size=16)


def select_leanest(rows, teacher_acc, tolerance):
    """The row of the leanest network (most parameters removed; then the more accurate, then the fewer FLOPs)
    whose accuracy is within `tolerance` points of `teacher_acc`, or None when no row is."""
    within = [row for row in rows if row['accuracy'] >= teacher_acc - tolerance]
    if not within:
        return None
    return max(within, key=lambda row: (round(row['params_removed'], 9), row['accuracy'], -row['flops']))


def describe_selection(selected, rows, teacher_acc, tolerance):
    if selected is not None:
        return (f"leanest within {tolerance} points of the teacher ({teacher_acc:.2f}%): {selected['name']}, "
                f"{selected['accuracy']:.2f}%, {100 * selected['params_removed']:.1f}% of the parameters and "
                f"{100 * selected['flops_removed']:.1f}% of the FLOPs removed")
    best = max(rows, key=lambda row: row['accuracy'])
    return (f"no network within {tolerance} points of the teacher ({teacher_acc:.2f}%); the most accurate is "
            f"{best['name']} at {best['accuracy']:.2f}%: retrain longer or prune less")


class Experiment:
    """The runs of one task under one root: its teacher, students and pruned networks, with the task's recipe."""

    def __init__(self, args, task, root, arch):
        self.args, self.task, self.root, self.arch = args, task, root, arch
        synthetic = task in SYNTHETIC_TASKS
        self.recipe = copy.deepcopy(demo_synthetic.RECIPE if synthetic else demo.RECIPES[task])
        if args.smoke:  # gates barely move in one short epoch: keep every proxy, or pruning may disconnect
            for stage in ('teacher', 'student', 'retrain'):
                self.recipe[stage].update(SMOKE)
            self.recipe['prune']['thr_pruning_proxy'] = 0.0
        self.stage_args = copy.copy(args)
        self.stage_args.arch = arch
        self.stage_args.input_size = args.input_size or (demo_synthetic.INPUT_SIZE if synthetic else 224)
        self.needs_source = synthetic  # provided once, when first needed (`provide_source`)
        if synthetic:
            self.stage_args.pretrained = demo_synthetic.source_weights_path(args.source_root, arch)
        self.logger = utils.setup_logging()
        self.teacher_dir = os.path.join(root, 'teacher')

    def prepare(self, run_dir):
        """Before the stage into `run_dir`: the offline source backbone, when that stage is to train.  A finished
        run there is reused or refused (demo.run_stage) before minutes of pre-training."""
        if self.args.force or run_status(run_dir) != 'finished':
            self.provide_source()

    def provide_source(self):
        """The offline source backbone (synthetic tasks), pre-trained unless cached, once: a stage trains on it, a
        table row rebuilds a finished student on it (a deleted file is re-exported from its source run)."""
        if self.needs_source:
            source_weights(self.args, self.arch)
            self.needs_source = False

    def teacher(self):
        flags = dict(arch=self.arch, **self.recipe['teacher'])
        self.prepare(self.teacher_dir)
        demo.run_stage('teacher', main_teacher, self.task, self.teacher_dir, self.stage_args, flags, self.logger)
        return utils.load_checkpoint(checkpoint_path(self.teacher_dir))['accuracy']

    def student(self, name='student', **flags):
        """A trained student in <root>/<name>, the recipe's flags updated with `flags`."""
        run_dir = os.path.join(self.root, name)
        stage_flags = dict(backbone=self.arch, teacher_fn=checkpoint_path(self.teacher_dir),
                           **dict(self.recipe['student'], **flags))
        self.prepare(run_dir)
        demo.run_stage(name, main_student, self.task, run_dir, self.stage_args, stage_flags, self.logger)
        return run_dir

    def pruned(self, student_dir, k):
        """The student pruned by k universal blocks and retrained: a table row.  Its run is <root>/pruned-k<k> for
        <root>/student (as demo.py's and submit.py's sweeps name them, so that each reuses the others' runs), else
        <student_dir>-k<k>."""
        name = os.path.basename(student_dir)
        run_dir = os.path.join(self.root, f'pruned-k{k}') if name == 'student' else f'{student_dir}-k{k}'
        self.prepare(run_dir)
        demo.prune_and_retrain(self.task, self.recipe, self.stage_args, self.teacher_dir, student_dir, run_dir, k,
                               self.logger)
        self.provide_source()
        result = demo.run_row(run_dir, f'{name} k={k}', k=k)
        self.logger.info(f"{result['name']}: {result['accuracy']:.2f}% after retraining")
        return result

    def sweep(self, student_dir, ks):
        return [self.pruned(student_dir, k) for k in sorted(ks)]


def source_weights(args, arch):
    """The offline universal backbone of `arch`: pre-trained on synth-source once, cached under --source-root
    (the offline demo's cache)."""
    source_args = copy.copy(args)
    source_args.model_root, source_args.force = args.source_root, False  # shared with the demo and other roots
    return demo_synthetic.pretrain_source(source_args, utils.setup_logging(), arch)


def report(name, root, curves, teacher_accs, tolerance, x='k', xlabel='universal blocks removed (k)'):
    """Print and write the table (<root>/<name>.json) and the figure (<root>/<name>.png) of `curves` (a label -> its
    rows, each held to the teacher accuracy teacher_accs[label]), the leanest within `tolerance` marked per
    curve.  With one teacher the figure shows accuracy and the teacher's line; with several, each curve's
    points against its own teacher."""
    one_teacher = len(set(teacher_accs.values())) == 1
    figure = Figure(figsize=(5.5, 3.8), layout='constrained')
    ax = figure.add_subplot()
    lines = [f"{'run':<34} {'accuracy':>8} {'blocks removed':>14} {'params removed':>14} {'FLOPs removed':>13}"]
    summary = {}
    for label, rows in curves.items():
        teacher_acc = teacher_accs[label]
        selected = select_leanest(rows, teacher_acc, tolerance)
        for r in rows:
            lines.append(f"{r['name']:<34} {r['accuracy']:8.2f} {r['blocks_removed']:>8}/{r['blocks_total']:<5} "
                         f"{100 * r['params_removed']:13.1f}% {100 * r['flops_removed']:12.1f}%"
                         f"{'  <- selected' if r is selected else ''}")
        lines.append(f"  {label}: {describe_selection(selected, rows, teacher_acc, tolerance)}")
        summary[label] = dict(teacher_acc=teacher_acc, rows=rows, selected=selected)
        offset = 0 if one_teacher else teacher_acc
        points = sorted((r[x], r['accuracy'] - offset) for r in rows)
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], 'o-', label=label)
        if selected is not None:
            ax.plot(selected[x], selected['accuracy'] - offset, '*', color=line.get_color(), markersize=14,
                    markeredgecolor='black', zorder=5)
    reference = next(iter(teacher_accs.values())) if one_teacher else 0.0
    ax.axhline(reference, color='black', linestyle='--', lw=1,
               label=f'teacher ({reference:.2f}%)' if one_teacher else 'each one\'s teacher')
    ax.axhspan(reference - tolerance, reference, color='grey', alpha=0.15, lw=0, label=f'within {tolerance} points')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('top-1 accuracy (%)' if one_teacher else 'accuracy - its teacher\'s (points)')
    ax.set_title(f"{name} on {os.path.basename(os.path.normpath(root))} (star: the leanest within the tolerance)",
                 fontsize=9)
    ax.legend(fontsize=7)
    print('\n'.join(lines))
    result = dict(experiment=name, tolerance=tolerance, curves=summary, table='\n'.join(lines))
    utils.atomic_write_text(json.dumps(result, indent=1) + '\n', os.path.join(root, f'{name}.json'))
    save_figure(figure, os.path.join(root, f'{name}.png'))
    return result


def ksweep(args):
    experiment = Experiment(args, args.task, args.model_root, args.arch)
    teacher_acc = experiment.teacher()
    rows = experiment.sweep(experiment.student(), args.k)
    return report('ksweep', args.model_root, {'NetTailor': rows}, {'NetTailor': teacher_acc}, args.tolerance)


def teacher_ablation(args):
    experiment = Experiment(args, args.task, args.model_root, args.arch)
    teacher_acc = experiment.teacher()
    gamma2 = experiment.recipe['student'].get('teacher_coeff', 10.0)
    curves = {f'with the teacher (gamma2 {gamma2:g})': experiment.sweep(experiment.student(), args.k),
              'without (gamma2 0)': experiment.sweep(experiment.student('student-no-teacher', teacher_coeff=0.0),
                                                     args.k)}
    return report('teacher', args.model_root, curves, dict.fromkeys(curves, teacher_acc), args.tolerance)


def max_skip_ablation(args):
    experiment = Experiment(args, args.task, args.model_root, args.arch)
    teacher_acc = experiment.teacher()
    curves = {f'max_skip {value}': experiment.sweep(experiment.student(f'student-skip{value}', max_skip=value), args.k)
              for value in args.max_skip}
    return report('max-skip', args.model_root, curves, dict.fromkeys(curves, teacher_acc), args.tolerance,
                  'params_removed', 'parameters removed (fraction of the teacher\'s)')


def backbone_ablation(args):
    """One teacher per backbone (<root>/<arch>/...), each network held to its own teacher."""
    curves, teacher_accs = {}, {}
    for arch in args.archs:
        experiment = Experiment(args, args.task, os.path.join(args.model_root, arch), arch)
        teacher_accs[arch] = experiment.teacher()
        curves[arch] = experiment.sweep(experiment.student(), args.k)
    return report('backbone', args.model_root, curves, teacher_accs, args.tolerance, 'params_removed',
                  'parameters removed (fraction of the teacher\'s)')


def difficulty(args):
    """The full method on tasks of graded difficulty, one recipe and tolerance: per task the leanest network
    within the tolerance (k tried from the largest down), then one figure of the three."""
    start = time.time()
    results = {}
    for task in DIFFICULTY_TASKS:
        experiment = Experiment(args, task, os.path.join(args.model_root, task), demo_synthetic.ARCH)
        if not args.smoke:
            for stage, epochs in DIFFICULTY_EPOCHS.items():
                experiment.recipe[stage].update(epochs)
        teacher_acc = experiment.teacher()
        student_dir = experiment.student()
        rows = []
        for k in args.k:
            rows.append(experiment.pruned(student_dir, k))
            if select_leanest(rows, teacher_acc, args.tolerance) is not None:
                break
        results[task] = dict(teacher_acc=teacher_acc, rows=rows,
                             selected=select_leanest(rows, teacher_acc, args.tolerance))
    lines = [f"{'task':<16} {'teacher':>7} {'tailored':>8} {'blocks removed':>14} {'params removed':>14} "
             f"{'FLOPs removed':>13}"]
    for task, result in results.items():
        chosen = result['selected'] or max(result['rows'], key=lambda r: r['accuracy'])
        note = '' if result['selected'] else '  (none within the tolerance: the most accurate)'
        lines.append(f"{task:<16} {result['teacher_acc']:7.2f} {chosen['accuracy']:8.2f} "
                     f"{chosen['blocks_removed']:>8}/{chosen['blocks_total']:<5} "
                     f"{100 * chosen['params_removed']:13.1f}% {100 * chosen['flops_removed']:12.1f}%{note}")
        result['chosen'] = chosen
    lines.append(f"tolerance {args.tolerance} points; {time.time() - start:.0f} s")
    print('\n'.join(lines))
    figure = Figure(figsize=(8, 3 * len(results)), layout='constrained')
    for ax, (task, result) in zip(figure.subplots(len(results), 1), results.items()):
        plot_architecture(load_student(result['chosen']['run_dir'], 'cpu')[0].stats(), ax=ax,
                          name=f"{task} ({result['chosen']['accuracy']:.2f}%, teacher {result['teacher_acc']:.2f}%)")
    save_figure(figure, os.path.join(args.model_root, 'difficulty.png'))
    output = dict(results=results, table='\n'.join(lines), seconds=time.time() - start)
    utils.atomic_write_text(json.dumps(output, indent=1) + '\n', os.path.join(args.model_root, 'difficulty.json'))
    return output


COMMANDS = {'ksweep': ksweep, 'teacher': teacher_ablation, 'max-skip': max_skip_ablation,
            'backbone': backbone_ablation, 'difficulty': difficulty}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument('command', choices=COMMANDS)
    parser.add_argument('--task', default=None, help='svhn, flowers, voc12 or a synth-* task (default: synth-digits; '
                        'difficulty runs its own three)')
    parser.add_argument('--model-root', default=None, help='runs, tables and figures go here (default: '
                        'checkpoints/experiments/<task>, or checkpoints/experiments/difficulty)')
    parser.add_argument('--k', type=int, nargs='+', default=None,
                        help=f'universal blocks to remove, one run each (difficulty: tried from the largest down, '
                        f'default {DIFFICULTY_K})')
    parser.add_argument('--tolerance', type=float, default=demo.ACCURACY_TOLERANCE,
                        help='the leanest network within this many points of the teacher is selected')
    parser.add_argument('--arch', default=None, help='default: resnet34 (real tasks), resnet18 (synthetic); '
                        'not for backbone (--archs) or difficulty')
    parser.add_argument('--archs', nargs='+', default=None,
                        help='the backbone ablation\'s architectures (default: resnet18 resnet34 resnet50)')
    parser.add_argument('--max-skip', nargs='+', default=None,
                        help='the max-skip ablation\'s values (default: 1 2 3 dense)')
    parser.add_argument('--data-dir', default='data')
    parser.add_argument('--pretrained', default=None,
                        help="universal weights of the real tasks: 'imagenet' (default) or a state-dict file")
    parser.add_argument('--source-root', default=os.path.join('checkpoints', 'synthetic'),
                        help="the offline source backbones' cache (the demo's)")
    parser.add_argument('--input-size', type=int, default=None, help='default: 224 (real tasks), 32 (synthetic)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true', help='rerun finished runs under --model-root (not the '
                        'shared offline source backbone: demo_synthetic.py --force retrains that one)')
    parser.add_argument('--smoke', action='store_true', help='every stage one epoch on a few images (tests)')
    return parser


FLAG_COMMANDS = {'task': ('ksweep', 'teacher', 'max-skip', 'backbone'), 'arch': ('ksweep', 'teacher', 'max-skip'),
                 'archs': ('backbone',), 'max_skip': ('max-skip',)}


def check_distinct(flag, given, values):
    """`flag`'s `values` (what each of the `given` texts means) name each setting once: a repeat would train and
    draw the same runs twice."""
    seen = {}
    for text, value in zip(given, values):
        if value in seen:
            raise UserError(f"{flag} names one setting twice ({seen[value]} and {text}): give each once")
        seen[value] = text


def complete_args(args):
    """Fill in the command's defaults; refuse, before anything trains, flags the command would ignore and settings
    a later stage would refuse."""
    for name, commands in FLAG_COMMANDS.items():
        if getattr(args, name) is not None and args.command not in commands:
            raise UserError(f"--{name.replace('_', '-')} does not apply to {args.command}: it is for "
                            f"{', '.join(commands)}")
    if args.k is None and args.command != 'difficulty':
        raise UserError("--k is required: the numbers of universal blocks to remove, e.g. --k 7 9 11 13")
    args.k = sorted(args.k or DIFFICULTY_K, reverse=True)
    if args.k[-1] < 1:
        raise UserError(f"every --k must be at least 1, got {args.k[-1]}")
    if not 0 <= args.tolerance < math.inf:
        raise UserError(f"--tolerance must be a non-negative number, got {args.tolerance}")
    if args.input_size is not None and args.input_size <= 0:
        raise UserError(f"--input-size must be positive, got {args.input_size}")
    if args.command != 'difficulty':
        args.task = args.task or 'synth-digits'
        targets = [*demo.RECIPES, *(task for task in SYNTHETIC_TASKS if task != 'synth-source')]
        if args.task not in targets:  # synth-source trains the universal blocks: no target task
            raise UserError(f"no recipe for task {args.task!r}: choose {', '.join(targets)}")
        args.arch = args.arch or (demo_synthetic.ARCH if args.task in SYNTHETIC_TASKS else 'resnet34')
    if args.pretrained is not None and (args.command == 'difficulty' or args.task in SYNTHETIC_TASKS):
        raise UserError("--pretrained is for the real tasks: the synthetic ones use the offline source backbone "
                        "(--source-root)")
    args.pretrained = args.pretrained or 'imagenet'
    archs = {'backbone': args.archs or ['resnet18', 'resnet34', 'resnet50'],
             'difficulty': [demo_synthetic.ARCH]}.get(args.command, [args.arch])
    for arch in archs:
        if arch not in backbones.ARCHS:
            raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(backbones.ARCHS)}")
        if args.k[0] > backbones.num_blocks(arch):
            raise UserError(f"--k {args.k[0]} is more universal blocks than {arch} has "
                            f"({backbones.num_blocks(arch)})")
        if args.pretrained not in ('imagenet', 'none'):  # a file fits one network: found after training another
            backbones.create_teacher(arch, 1, args.pretrained)
    args.archs = archs
    args.max_skip = args.max_skip or ['1', '2', '3', 'dense']
    for value in args.max_skip:
        for arch in archs:
            parse_max_skip(value, backbones.num_blocks(arch))
    max_skips = [parse_max_skip(value, backbones.num_blocks(archs[0])) for value in args.max_skip]
    for flag, given, values in (('--k', args.k, args.k), ('--archs', archs, archs),
                                ('--max-skip', args.max_skip, max_skips)):
        check_distinct(flag, given, values)
    if args.model_root is None:
        name = 'difficulty' if args.command == 'difficulty' else args.task
        args.model_root = os.path.join('checkpoints', 'experiments', name)


def main(args):
    complete_args(args)
    return COMMANDS[args.command](args)


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser(), sys.argv[1:])
