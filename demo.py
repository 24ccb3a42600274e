"""The released demos' three stages (teacher, student, prune + retrain) and their final table.

demo_svhn.py, demo_flowers.py, demo_voc12.py and demo_synthetic.py call `run_demo` with a recipe
(docs/method.md §8): each stage runs main_teacher.main / main_student.main with the recipe's
flags; a stage whose run is finished with the same settings is skipped (one trained otherwise is
refused) unless --force; a failed stage stops the demo.
A recipe's `n_pruning_universal` is one k (the released demos) or several, tried as docs/method.md §2 step 5 says.
"""
import argparse
import os
import sys
import time

import main_student
import main_teacher
import utils
from backbones import ARCHS, num_blocks
from engine import checkpoint_path, finished_run_differences, load_student, run_status, trained_settings

# docs/method.md §2 step 5: the leanest pruning whose accuracy is within this many points of the teacher
ACCURACY_TOLERANCE = 0.5
RECIPES = {  # docs/method.md §8: ResNet34, 224 px, SGD momentum 0.9, weight decay 5e-4
    'svhn': dict(teacher=dict(batch_size=64, epochs=20, lr=0.01, lr_decay_epochs=8),
                 student=dict(batch_size=32, epochs=20, lr=0.1, lr_decay_epochs=8),
                 prune=dict(n_pruning_universal=11, thr_pruning_proxy=0.075),
                 retrain=dict(batch_size=32, epochs=20, lr=0.01, lr_decay_epochs=8)),
    'flowers': dict(teacher=dict(batch_size=64, epochs=50, lr=0.01, lr_decay_epochs=20),
                    student=dict(batch_size=32, epochs=50, lr=0.1, lr_decay_epochs=20),
                    prune=dict(n_pruning_universal=7, thr_pruning_proxy=0.04),
                    retrain=dict(batch_size=32, epochs=60, lr=0.01, lr_decay_epochs=20)),
    'voc12': dict(teacher=dict(batch_size=64, epochs=50, lr=0.01, lr_decay_epochs=20),
                  student=dict(batch_size=32, epochs=50, lr=0.1, lr_decay_epochs=20),
                  prune=dict(n_pruning_universal=3, thr_pruning_proxy=0.1),
                  retrain=dict(batch_size=32, epochs=60, lr=0.01, lr_decay_epochs=20)),
}


def get_args_parser(task, model_root=None, arch='resnet34', input_size=224, pretrained='imagenet'):
    parser = argparse.ArgumentParser(description=f'NetTailor demo on {task}: teacher, student, prune + retrain',
                                     formatter_class=utils.HelpFormatter, conflict_handler='resolve')
    parser.add_argument('--data-dir', default='data')
    parser.add_argument('--model-root', default=model_root or os.path.join('checkpoints', task),
                        help='runs go to <model-root>/{teacher,student,pruned} (pruned-k<N> when several k are tried)')
    parser.add_argument('--arch', default=arch, choices=ARCHS, help='the network of every stage')
    parser.add_argument('--pretrained', default=pretrained, help="'imagenet' or a local state-dict file")
    parser.add_argument('--input-size', type=int, default=input_size)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--amp', action='store_true', help='mixed-precision training in every stage (main_teacher.py)')
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true', help='rerun stages whose runs are finished')
    return parser


def stage_args(parser_fn, task, model_dir, demo_args, flags):
    """The argument namespace a stage's script would get on the command line, plus the recipe's flags."""
    args = parser_fn().parse_args(['--task', task, '--model-dir', model_dir])
    for name in ('data_dir', 'pretrained', 'input_size', 'device', 'amp', 'workers', 'seed', 'force'):
        setattr(args, name, getattr(demo_args, name))
    for name, value in flags.items():
        setattr(args, name, value)
    return args


def run_stage(name, script, task, model_dir, demo_args, flags, logger):
    """Run `script` (main_teacher or main_student) with the recipe's `flags` into `model_dir`, unless a finished run
    there was trained with the same settings (then it is reused; --force reruns it).  A finished run trained
    otherwise is refused, not passed off as this recipe's; an interrupted one is resumed."""
    args = stage_args(script.get_args_parser, task, model_dir, demo_args, flags)
    status = run_status(model_dir)
    if status == 'unfinished' and not args.force:  # --resume refuses it if trained otherwise
        logger.info(f"[{name}] unfinished run in {model_dir}: resumed (--force starts it again)")
        args.resume = True
    if status == 'finished' and not args.force:
        differences = finished_run_differences(model_dir, trained_settings(args))
        if differences:
            raise utils.UserError(f"{model_dir} holds a finished run trained with {'; '.join(differences)}: pass "
                                  "--force to replace it or another --model-root")
        logger.info(f"[{name}] finished run in {model_dir}: skipped (--force reruns it)")
        return
    logger.info(f"[{name}] -> {model_dir}")
    start = time.time()
    script.main(args)
    logger.info(f"[{name}] done in {time.time() - start:.0f} s")


def run_demo(task, recipe, demo_args):
    """Teacher, student, prune + retrain on `task`, then the final comparison table (returned as a dict)."""
    logger = utils.setup_logging()
    root = demo_args.model_root
    teacher_dir, student_dir, pruned_dir = (os.path.join(root, name) for name in ('teacher', 'student', 'pruned'))
    candidates = recipe['prune']['n_pruning_universal']
    candidates = [candidates] if isinstance(candidates, int) else sorted(candidates, reverse=True)
    if max(candidates) > num_blocks(demo_args.arch):  # found after training two networks, otherwise
        raise utils.UserError(f"the {task} recipe prunes {max(candidates)} universal blocks, and {demo_args.arch} "
                              f"has {num_blocks(demo_args.arch)}: pass a deeper --arch, or run the stages with "
                              "main_*.py")
    run_stage('teacher', main_teacher, task, teacher_dir, demo_args, dict(arch=demo_args.arch, **recipe['teacher']),
              logger)
    run_stage('student', main_student, task, student_dir, demo_args,
              dict(backbone=demo_args.arch, teacher_fn=checkpoint_path(teacher_dir), **recipe['student']), logger)
    # docs/method.md §2 step 5: the most blocks removed first, until a retrained network is within ACCURACY_TOLERANCE
    # points of the teacher; if none is, the most accurate one
    good_enough = utils.load_checkpoint(checkpoint_path(teacher_dir))['accuracy'] - ACCURACY_TOLERANCE
    accuracies = {}
    for k in candidates:
        run_dir = pruned_dir if len(candidates) == 1 else f'{pruned_dir}-k{k}'
        prune_and_retrain(task, recipe, demo_args, teacher_dir, student_dir, run_dir, k, logger)
        accuracies[run_dir] = utils.load_checkpoint(checkpoint_path(run_dir))['accuracy']
        logger.info(f"pruning {k} universal blocks: {accuracies[run_dir]:.2f}% after retraining "
                    f"({'within' if accuracies[run_dir] >= good_enough else 'not within'} "
                    f"{ACCURACY_TOLERANCE} points of the teacher)")
        if accuracies[run_dir] >= good_enough:
            return final_table(teacher_dir, run_dir)
    return final_table(teacher_dir, max(accuracies, key=accuracies.get))


def prune_and_retrain(task, recipe, demo_args, teacher_dir, student_dir, run_dir, num_universal, logger):
    """Prune `num_universal` universal blocks (and the recipe's proxies) of the student, retrain into `run_dir`."""
    flags = dict(recipe['prune'], n_pruning_universal=num_universal, **recipe['retrain'])
    # pretrained None: the universal weights the full student was trained on
    run_stage(f'prune {num_universal} universal blocks + retrain', main_student, task, run_dir, demo_args,
              dict(backbone=demo_args.arch, teacher_fn=checkpoint_path(teacher_dir), full_model_dir=student_dir,
                   pretrained=None, **flags), logger)


def run_row(run_dir, name, **extra):
    """What the tables of several runs (experiments.py, submit.py) hold of one trained student."""
    student, checkpoint = load_student(run_dir, 'cpu')
    stats = student.stats()
    params = stats['params_universal'] + stats['params_task']
    return dict(name=name, run_dir=run_dir, accuracy=checkpoint['accuracy'], params=params,
                params_removed=1 - params / stats['params_full'], flops=stats['flops'],
                flops_removed=1 - stats['flops'] / stats['flops_full'],
                blocks_removed=stats['universal_blocks_total'] - stats['universal_blocks_kept'],
                blocks_total=stats['universal_blocks_total'], **extra)


def final_table(teacher_dir, pruned_dir):
    """Teacher vs tailored network: accuracy, parameters, FLOPs (paper convention), blocks removed."""
    teacher_acc = utils.load_checkpoint(checkpoint_path(teacher_dir))['accuracy']
    student, checkpoint = load_student(pruned_dir, 'cpu')
    stats = student.stats()
    teacher_params = stats['params_full']
    tailored_params = stats['params_universal'] + stats['params_task']
    blocks = stats['universal_blocks_total']
    removed = blocks - stats['universal_blocks_kept']
    rows = [
        ('', 'teacher', 'NetTailor'),
        ('top-1 accuracy (%)', f"{teacher_acc:.2f}", f"{checkpoint['accuracy']:.2f}"),
        ('universal params (M)', f"{teacher_params / 1e6:.2f}", f"{stats['params_universal'] / 1e6:.2f}"),
        ('task-specific params (M)', f"{teacher_params / 1e6:.2f}", f"{stats['params_task'] / 1e6:.2f}"),
        ('total params (M)', f"{teacher_params / 1e6:.2f}", f"{tailored_params / 1e6:.2f}"),
        ('GFLOPs per image', f"{stats['flops_full'] / 1e9:.3f}", f"{stats['flops'] / 1e9:.3f}"),
        ('universal blocks', f"{blocks}", f"{stats['universal_blocks_kept']} ({removed} removed)"),
        ('proxies kept', '-', f"{stats['proxies_kept']}/{stats['proxies_total']}"),
    ]
    table = '\n'.join(f"{a:<26}{b:>12}{c:>22}" for a, b, c in rows)
    summary = (f"NetTailor removes {100 * (1 - tailored_params / teacher_params):.1f}% of the parameters and "
               f"{100 * (1 - stats['flops'] / stats['flops_full']):.1f}% of the FLOPs; accuracy "
               f"{checkpoint['accuracy'] - teacher_acc:+.2f} points vs the teacher. The teacher's parameters are all "
               "task-specific (a fine-tuned copy per task); FLOPs in the paper's convention (1 multiply-add = 1).")
    print(f"{table}\n{summary}\nThe tailored network: {os.path.join(pruned_dir, 'architecture.png')}")
    return {'teacher_acc': teacher_acc, 'student_acc': checkpoint['accuracy'], 'stats': stats,
            'params_removed': 1 - tailored_params / teacher_params,
            'flops_removed': 1 - stats['flops'] / stats['flops_full'],
            'table': table}


def demo_main(task, argv=None):
    """Entry point of demo_<task>.py."""
    parser = get_args_parser(task)
    utils.run_cli(lambda args: run_demo(task, RECIPES[task], args), parser, sys.argv[1:] if argv is None else argv)
