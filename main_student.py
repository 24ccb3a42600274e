"""Stages 2-4 of NetTailor: train the student, then prune it and retrain what is left.

    # student: frozen universal blocks + proxies + gates, L = CE + gamma1 E[C] + gamma2 Omega
    python main_student.py --task svhn --backbone resnet34 --teacher-fn checkpoints/svhn/teacher/checkpoint.pth \
        --model-dir checkpoints/svhn/student
    # prune the k weakest universal blocks and proxies below a threshold, retrain (gamma1 = 0; the task, teacher
    # and network settings are the full student's)
    python main_student.py --full-model-dir checkpoints/svhn/student --n-pruning-universal 11 \
        --thr-pruning-proxy 0.075 --model-dir checkpoints/svhn/pruned
    python main_student.py --model-dir checkpoints/svhn/pruned --evaluate
    # the tailored network alone, for deployment: tailored.pt2 (torch.export) and tailored.onnx
    python main_student.py --model-dir checkpoints/svhn/pruned --export deploy/svhn

Checkpoints hold the task pack (proxies, gates, classifier, pruning mask and the universal blocks'
BatchNorm statistics learned on the task), never the universal weights: those come from
--pretrained, as the args.json of the run records.  Every run also draws
the architecture it ends with, gates included, in <model-dir>/architecture.png (figures.py).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import utils
from backbones import num_blocks
from deploy import export, exported_paths, preprocessing_steps
from figures import save_architecture
from engine import (MixedPrecision, TrainStep, attach_run_state, build_loaders, check_args, check_decathlon_kind,
                    check_recorded_settings, check_run_dir, check_source, checkpoint_path, epochs_done, evaluate,
                    evaluation_loader, fit, load_student, load_teacher, make_optimizer, missing_weights, param_groups,
                    prepare_run_dir, run_evaluation_transform, run_kind, run_state, student_fingerprint, subset_note,
                    take_recorded_data, teacher_fingerprint, unfinished_note, universal_fingerprint, use_cuda_graph)
from main_teacher import get_args_parser as teacher_args_parser
from nettailor import create_student, distillation_loss, format_stats, parse_max_skip
from utils import UserError


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description='NetTailor student: tailor a pre-trained network to a task',
                                     formatter_class=utils.HelpFormatter,
                                     parents=[teacher_args_parser(add_help=False)], add_help=add_help,
                                     conflict_handler='resolve')
    parser.add_argument('--task', default=None, help='dataset: svhn, flowers, voc12, a synth-* task, or '
                        'folder:<name>, your images in <data-dir>/<name>/{train,val}/<class>/<image> (needed '
                        "to train; --evaluate and --export take the run's, retraining that of --full-model-dir)")
    parser.add_argument('--input-size', type=int, default=None, help="training/test crop size (default 224; when "
                        "retraining, that of --full-model-dir; --evaluate takes the run's)")
    parser.add_argument('--backbone', '--arch', default=None, help='resnet18, resnet34, resnet50, wide_resnet26 '
                        '(default resnet34; when retraining, that of --full-model-dir)')
    parser.add_argument('--teacher-fn', default=None, help="the teacher's checkpoint.pth or run directory (needed when "
                        "--teacher-coeff > 0; when retraining, that of --full-model-dir)")
    parser.add_argument('--max-skip', default=None, help="proxies per layer from the k most recent nodes, or 'dense' "
                        "(default 3; when retraining, that of --full-model-dir)")
    parser.add_argument('--complexity-coeff', type=float, default=None,
                        help='gamma1 (default 0.3; 0 when retraining with --full-model-dir)')
    parser.add_argument('--teacher-coeff', type=float, default=None,
                        help="gamma2 (default 10; when retraining, the --full-model-dir run's)")
    parser.add_argument('--batch-size', type=int, default=32, help='images per training step')
    parser.add_argument('--lr', type=float, default=None, help='default 0.1; 0.01 when retraining (--full-model-dir)')
    parser.add_argument('--weight-decay', type=float, default=5e-4, help='weight decay (never on gates)')
    parser.add_argument('--pretrained', default=None,
                        help="universal weights: 'imagenet' (default), a local state-dict file or 'none'; "
                        "when retraining, --evaluate and --export, those the run recorded (given: where they are "
                        "now, checked against the fingerprint the run recorded)")
    parser.add_argument('--full-model-dir', default=None, help='a trained student to prune and retrain')
    parser.add_argument('--n-pruning-universal', type=int, default=0, help='universal blocks to remove')
    parser.add_argument('--thr-pruning-proxy', type=float, default=None,
                        help='with --full-model-dir: remove proxies gated below this (default 0.05)')
    parser.add_argument('--shared-bn-stats', action='store_true', default=None,
                        help="keep the universal blocks' pre-trained BatchNorm statistics (shared by all tasks) "
                        "instead of the task's own, which the released code learns on the target data; "
                        "when retraining, that of --full-model-dir")
    parser.add_argument('--classifier-init', default=None, choices=['teacher', 'fresh'],
                        help="the student's classifier starts as the teacher's (default whenever --teacher-fn is "
                        "given, with --teacher-coeff 0 too) or fresh, as in the released code (with the Wide "
                        "ResNet, its final BatchNorm too; docs/differences.md; the default without a teacher); "
                        "when retraining, that of --full-model-dir (the retrained network keeps its classifier)")
    parser.add_argument('--export', default=None, metavar='OUT_DIR',
                        help='write the trained student in --model-dir as a plain network for deployment: '
                        'OUT_DIR/tailored.pt2 (torch.export) and OUT_DIR/tailored.onnx (deploy.py; an earlier '
                        'export there only with --force)')
    parser.add_argument('--force', action='store_true', help='overwrite a run directory holding a run (with '
                        '--export, an earlier export)')
    return parser


def check_student_args(args):
    """Complete and check a student's training settings (retraining: from the full student).  Returns the teacher
    fingerprint the full student recorded when retraining takes its teacher, else None."""
    full_args, full = {}, {}
    if args.full_model_dir:
        if not os.path.isfile(checkpoint_path(args.full_model_dir)):
            raise UserError(f"--full-model-dir {args.full_model_dir} holds no trained student "
                            f"({checkpoint_path(args.full_model_dir)} not found): name the run directory of the "
                            "student to prune (where it is now, if it moved)")
        full = utils.load_checkpoint(checkpoint_path(args.full_model_dir), 'student checkpoint')
        if run_kind(full) != 'student':
            raise UserError(f"{checkpoint_path(args.full_model_dir)} is not a student checkpoint written by "
                            "main_student.py: --full-model-dir takes a trained student's run directory")
        if not full.get('finished'):
            raise UserError(f"{args.full_model_dir} is an unfinished run ({epochs_done(full)}): finish it with "
                            "--resume before pruning it")
        full_args = full['args']
        check_decathlon_kind(full_args, args, f"the student in {args.full_model_dir}",
                             f"prune it with main_student_decathlon.py --task {full_args['task']} --prune"
                             if full_args.get('decathlon') else "prune it with main_student.py --full-model-dir")
        if args.pretrained is None:  # else where its universal weights are now (load_student checks them)
            args.pretrained = full_args['pretrained'] or 'none'
            if args.pretrained not in ('none', 'imagenet') and not os.path.isfile(args.pretrained):
                raise missing_weights(args.pretrained, args.full_model_dir)
    if args.pretrained is None:
        args.pretrained = 'imagenet'

    def from_full_student(name, default, must_match=False):
        """A setting not given takes the full student's (or `default`); one the pruned network is built from must
        be the full student's."""
        given, recorded = getattr(args, name), full_args.get(name, default)
        if must_match and full_args and given is not None and str(given) != str(recorded):
            flag = '--' + name.replace('_', '-')
            raise UserError(f"{args.full_model_dir} was trained with {flag} {recorded}, not {given}: drop {flag}")
        setattr(args, name, recorded if given is None else given)

    from_full_student('task', None, must_match=True)  # a student is pruned and retrained on its own task
    take_recorded_data(args, full_args)  # and its data (build_loaders checks)
    if not args.task:
        raise UserError("--task is required to train a student (--evaluate and --export take the run's)")
    from_full_student('input_size', 224)
    if full_args:
        full_shared = full_args.get('shared_bn_stats', True)  # runs from before task statistics shared them
        if args.shared_bn_stats is not None and args.shared_bn_stats != full_shared:
            kind = 'shared' if full_shared else 'task-specific'
            raise UserError(f"{args.full_model_dir} was trained with {kind} BatchNorm statistics: "
                            "drop --shared-bn-stats")
        args.shared_bn_stats = full_shared
    args.shared_bn_stats = bool(args.shared_bn_stats)
    from_full_student('teacher_coeff', 10.0)
    inherited_teacher = full.get('teacher_sha256') if args.teacher_fn is None else None
    from_full_student('teacher_fn', None)
    if args.teacher_fn:
        args.teacher_fn = os.path.abspath(args.teacher_fn)  # recorded so that retraining finds it from anywhere
    from_full_student('max_skip', '3', must_match=True)
    from_full_student('backbone', 'resnet34', must_match=True)
    from_full_student('classifier_init', None, must_match=True)  # a retrained network keeps its classifier
    args.arch = args.backbone
    if args.complexity_coeff is None:
        args.complexity_coeff = 0.0 if args.full_model_dir else 0.3
    if args.lr is None:
        args.lr = 0.01 if args.full_model_dir else 0.1
    check_args(args)
    for name in ('complexity_coeff', 'teacher_coeff', 'n_pruning_universal'):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    if args.thr_pruning_proxy is not None and not 0 <= args.thr_pruning_proxy < 1:
        raise UserError(f"--thr-pruning-proxy must be in [0, 1), got {args.thr_pruning_proxy}")
    for flag, given in (('--n-pruning-universal', args.n_pruning_universal > 0),
                        ('--thr-pruning-proxy', args.thr_pruning_proxy is not None)):
        if given and not args.full_model_dir:  # a student trained from the teacher would ignore it
            raise UserError(f"{flag} prunes a trained student: pass it with --full-model-dir")
    if args.thr_pruning_proxy is None:
        args.thr_pruning_proxy = 0.05
    if args.max_skip != 'dense':
        args.max_skip = parse_max_skip(args.max_skip, num_blocks(args.backbone))
    if args.teacher_coeff > 0 and not args.teacher_fn:
        raise UserError("--teacher-coeff > 0 needs the teacher's checkpoint: pass --teacher-fn "
                        "(or --teacher-coeff 0 to train without distillation)")
    if args.classifier_init == 'teacher' and not (args.teacher_fn or args.full_model_dir):
        raise UserError("--classifier-init teacher starts the classifier from the teacher's: pass --teacher-fn")
    if args.classifier_init is None:  # (when retraining, a full student that recorded none)
        args.classifier_init = 'teacher' if args.teacher_fn else 'fresh'
    return inherited_teacher


# what --evaluate and --export rebuild as the run recorded it (--pretrained names where its universal weights are)
STUDENT_RUN_SETTINGS = ('input_size', 'backbone', 'max_skip', 'shared_bn_stats')


def check_export_dir(out_dir, force):
    """--export OUT_DIR: a folder that can be written, holding no earlier export unless --force replaces it."""
    utils.require_folder(out_dir, '--export')
    existing = [path for path in exported_paths(out_dir) if os.path.exists(path)]
    if existing and not force:
        raise UserError(f"--export {out_dir} already holds {os.path.basename(existing[0])}: pass --force to replace "
                        "it, or export elsewhere")


def export_run(args, loaded=None):
    """--export: the student in --model-dir as deploy.py's tailored network, in two files; `loaded`: what
    `load_export(args)` returned."""
    student, checkpoint, metadata = loaded or load_export(args)
    paths = export(student, args.export, metadata)
    stats = student.stats()
    print(format_stats(stats))
    print(f"tailored network of {args.model_dir} ({stats['flops'] / stats['flops_full']:.2f} of the full "
          f"network's FLOPs) written to {paths[0]} and {paths[1]}{unfinished_note(checkpoint)}")
    return {'paths': paths, 'stats': stats}


def load_export(args):
    """(student, checkpoint, metadata) of the run --export writes, its recorded settings checked."""
    student, checkpoint = load_student(args.model_dir, torch.device('cpu'), args.pretrained)
    saved = checkpoint['args']
    check_recorded_settings(args, saved, ('task', *STUDENT_RUN_SETTINGS), '--export')
    metadata = {'preprocessing': preprocessing_steps(run_evaluation_transform(saved))}
    if saved.get('classes') is not None:
        metadata['classes'] = saved['classes']
    return student, checkpoint, metadata


def evaluate_run(args):
    """--evaluate: the student in --model-dir, rebuilt as its run recorded it, on its task's test data."""
    pretrained = args.pretrained  # as given: check_args reads 'none' as None
    check_args(args)
    device = utils.init_distributed(args.device)
    args.cuda_graph = use_cuda_graph(args, device)
    student, checkpoint = load_student(args.model_dir, device, pretrained)
    loader = evaluation_loader(args, checkpoint, student.num_classes, STUDENT_RUN_SETTINGS)
    accuracy = evaluate(student, loader, device, cuda_graph=args.cuda_graph)
    stats = student.stats()
    utils.print_once(format_stats(stats), f"student {args.model_dir}: top-1 accuracy {accuracy:.2f}% on {args.task}"
                     f"{subset_note(args.test_limit)}{unfinished_note(checkpoint)}")
    return {'accuracy': accuracy, 'stats': stats}


def main(args):
    if args.export is not None and args.evaluate:
        raise UserError("--evaluate and --export are separate commands: pass one of them")
    if args.export is not None:
        utils.require_one_process('--export')
        check_export_dir(args.export, args.force)
    if (args.export or args.evaluate) and (args.full_model_dir or args.n_pruning_universal
                                           or args.thr_pruning_proxy is not None):
        raise UserError(f"{'--export' if args.export else '--evaluate'} takes the run in --model-dir as it is: "
                        "prune it first (--full-model-dir RUN --n-pruning-universal K --model-dir NEW), then pass NEW")
    if args.export:
        return export_run(args)
    if args.evaluate:
        return evaluate_run(args)
    full_students_teacher = check_student_args(args)
    device = utils.init_distributed(args.device)
    args.cuda_graph = use_cuda_graph(args, device)
    existing = check_run_dir(args)
    utils.seed_everything(args.seed)
    train_loader, test_loader, num_classes = build_loaders(args)
    distill = args.teacher_coeff > 0
    teacher_classifier = args.classifier_init == 'teacher' and not args.full_model_dir
    teacher = None
    if distill or teacher_classifier:  # also without distillation (gamma2 0), for a like-for-like ablation
        teacher, teacher_checkpoint = load_teacher(args.teacher_fn, device, num_classes, args.backbone, args.task, args)
    teacher_sha256 = teacher_fingerprint(teacher_checkpoint) if teacher is not None else None  # recorded
    resumed = existing if args.resume else {}
    if teacher is not None:
        check_source('teacher', args.teacher_fn, teacher_sha256, full_students_teacher,
                     f"the student in {args.full_model_dir}",
                     f"pass --teacher-fn {args.teacher_fn} to retrain with it as it is now")
        check_source('teacher', args.teacher_fn, teacher_sha256, resumed.get('teacher_sha256'), args.model_dir,
                     "put it back, or start the run again with --force")
    full_sha256 = None
    if args.full_model_dir:  # first: its universal weights may have moved (--pretrained names where)
        full, full_checkpoint = load_student(args.full_model_dir, torch.device('cpu'), args.pretrained or 'none')
        full_sha256 = student_fingerprint(full_checkpoint)  # recorded with the run
        check_source('full student', args.full_model_dir, full_sha256, resumed.get('full_sha256'), args.model_dir,
                     "put it back, or start the run again with --force")
    student = create_student(args.backbone, num_classes, args.max_skip,
                             None if args.full_model_dir else args.pretrained,  # a retrain: the full student's
                             args.input_size, task_bn_stats=not args.shared_bn_stats)
    if args.full_model_dir:
        student.backbone.load_state_dict(full.backbone.state_dict())  # the universal weights it was trained on
        student.load_task_pack(full.task_pack(), source=f"the student in {args.full_model_dir}")
        student.prune(args.n_pruning_universal, args.thr_pruning_proxy)
    elif teacher_classifier:
        for mine, theirs in zip(student.head_modules(), (getattr(teacher, n) for n in teacher.head_prefixes)):
            mine.load_state_dict(theirs.state_dict())
    else:  # a fresh head, as released: the Wide ResNet's final BatchNorm too, not the universal weights' one
        for module in student.head_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()
    if args.resume:  # checked before args.json records where the weights are now (attached again below)
        attach_run_state(student, existing['model'], checkpoint_path(args.model_dir), args.pretrained)
    teacher = teacher if distill else None
    universal_sha256 = universal_fingerprint(student)  # once: the universal weights stay frozen
    student.to(device)
    resume_from = prepare_run_dir(args)
    if resume_from is not None:
        attach_run_state(student, resume_from['model'], checkpoint_path(args.model_dir), args.pretrained)
    logger = utils.setup_logging(args.model_dir, args.log2file)
    logger.info(f"student {args.backbone} (max_skip {args.max_skip}) on {args.task} ({num_classes} classes), "
                f"gamma1 {args.complexity_coeff}, gamma2 {args.teacher_coeff}, "
                f"{'shared' if args.shared_bn_stats else 'task-specific'} BatchNorm statistics, "
                f"device {device}{utils.processes_text()}")
    if args.full_model_dir:
        logger.info(f"pruned {args.full_model_dir}: {args.n_pruning_universal} universal blocks, "
                    f"proxies below {args.thr_pruning_proxy}\n{format_stats(student.stats())}")
    optimizer, scheduler = make_optimizer(param_groups(student, args.weight_decay), args, len(train_loader))
    precision = MixedPrecision(device, args.amp)

    def loss_fn(images, labels):
        logits, outputs = student(images, distill=distill)
        ce = F.cross_entropy(logits, labels)
        loss, metrics = ce, {'ce': ce, 'correct': (logits.argmax(1) == labels).sum()}
        if args.complexity_coeff > 0:
            metrics['complexity'] = student.expected_complexity()
            loss = loss + args.complexity_coeff * metrics['complexity']
        if distill:
            with torch.no_grad():
                teacher_logits, teacher_outputs = teacher(images)
            metrics['omega'] = distillation_loss(logits, outputs, teacher_logits, teacher_outputs)
            loss = loss + args.teacher_coeff * metrics['omega']
        return loss, metrics

    train_step = TrainStep(student, loss_fn, optimizer, precision, args.cuda_graph)
    accuracy = fit(args, student, optimizer, scheduler, train_loader, test_loader, device, train_step,
                   lambda: run_state(student, args.pretrained, universal_sha256), resume_from, logger, precision,
                   extra_checkpoint={'teacher_sha256': teacher_sha256, 'full_sha256': full_sha256})
    stats = student.stats()
    figure = os.path.join(args.model_dir, 'architecture.png')
    if utils.is_main_process():
        save_architecture(stats, figure)
    logger.info(f"{format_stats(stats)}\nstudent top-1 accuracy {accuracy:.2f}%; "
                f"tailored architecture drawn in {figure}")
    return {'accuracy': accuracy, 'stats': stats}


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser(), sys.argv[1:])
