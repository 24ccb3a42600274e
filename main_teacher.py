"""Stage 1 of NetTailor: fine-tune a pre-trained network (all layers) on the target task.

    python main_teacher.py --task svhn --arch resnet34 --model-dir checkpoints/svhn/teacher
    python main_teacher.py --model-dir checkpoints/svhn/teacher --evaluate

The run directory holds checkpoint.pth (the last epoch; `finished` once done), args.json,
metrics.jsonl (one JSON line per epoch) and, with --log2file, log.txt (engine.py).
"""
import argparse
import sys

import torch.nn.functional as F

import utils
from backbones import check_input_size, create_teacher
from engine import (SGD_MOMENTUM, MixedPrecision, TrainStep, build_loaders, check_args, check_run_dir, checkpoint_path,
                    evaluate, evaluation_loader, fit, load_teacher, make_optimizer, prepare_run_dir, subset_note,
                    unfinished_note, use_cuda_graph)
from utils import UserError


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description='NetTailor teacher: fine-tune a pre-trained network',
                                     formatter_class=utils.HelpFormatter, add_help=add_help)
    parser.add_argument('--task', default=None, help='dataset: svhn, flowers, voc12, a synth-* task, or '
                        'folder:<name>, your images in <data-dir>/<name>/{train,val}/<class>/<image> (needed '
                        "to train; --evaluate takes the run's)")
    parser.add_argument('--arch', default=None, help="resnet18, resnet34, resnet50, wide_resnet26 (default resnet34; "
                        "--evaluate takes the run's)")
    parser.add_argument('--model-dir', required=True, help='run directory (checkpoints, logs, metrics)')
    parser.add_argument('--data-dir', default='data', help='where the datasets live')
    parser.add_argument('--pretrained', default='imagenet',
                        help="'imagenet' (torchvision's weights), a local state-dict file, or 'none'")
    parser.add_argument('--input-size', type=int, default=None,
                        help="training/test crop size (default 224; --evaluate takes the run's)")
    parser.add_argument('--train-limit', type=int, default=None,
                        help="use only N training images (quick runs): each class's first ones")
    parser.add_argument('--test-limit', type=int, default=None, help="use only N test images: each class's first ones")
    parser.add_argument('--epochs', type=int, default=20, help='training epochs')
    parser.add_argument('--batch-size', type=int, default=64, help='images per training step')
    parser.add_argument('--lr', type=float, default=0.01, help='initial learning rate')
    parser.add_argument('--lr-decay-epochs', type=int, default=8, help="lr x0.1 every this many epochs ('step')")
    parser.add_argument('--lr-schedule', default='step', choices=['step', 'cosine'],
                        help="step (the paper's) or cosine (to 0 over the run); both stepped every iteration")
    parser.add_argument('--warmup-epochs', type=float, default=0.0, help='linear lr warm-up from 0 (may be a fraction)')
    parser.add_argument('--optimizer', default='sgd', choices=['sgd', 'adam', 'adamw'],
                        help="sgd (the paper's), adam or adamw (handy when training from scratch)")
    parser.add_argument('--momentum', type=float, default=None, help=f'SGD momentum (default {SGD_MOMENTUM})')
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--cuda-graph', action=argparse.BooleanOptionalAction, default=None,
                        help='replay the training step and evaluation from CUDA graphs (default: on with a CUDA '
                        'device; see engine.TrainStep)')
    parser.add_argument('--amp', action='store_true', help='mixed-precision training (torch.autocast): float16 '
                        'with gradient scaling on CUDA, bfloat16 on the CPU (fast only on CPUs with bfloat16 units)')
    parser.add_argument('--workers', type=int, default=4, help='data loading processes')
    parser.add_argument('--device', default='auto', help='auto (CUDA when present), cpu, cuda, cuda:N')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--evaluate', action='store_true', help='only evaluate the run in --model-dir')
    parser.add_argument('--resume', action='store_true', help='continue an interrupted run from its last epoch')
    parser.add_argument('--force', action='store_true', help='overwrite a run directory holding a run')
    parser.add_argument('--log2file', action='store_true', help='also log to <model-dir>/log.txt')
    return parser


def main(args):
    check_args(args)
    device = utils.init_distributed(args.device)
    args.cuda_graph = use_cuda_graph(args, device)
    if args.evaluate:
        model, checkpoint = load_teacher(checkpoint_path(args.model_dir), device, unfinished=True)
        loader = evaluation_loader(args, checkpoint, checkpoint['num_classes'], ('arch', 'input_size'))
        accuracy = evaluate(model, loader, device, cuda_graph=args.cuda_graph)
        utils.print_once(f"teacher {args.model_dir}: top-1 accuracy {accuracy:.2f}% on {args.task}"
                         f"{subset_note(args.test_limit)}{unfinished_note(checkpoint)}")
        return {'accuracy': accuracy}

    if not args.task:
        raise UserError("--task is required to train a teacher (--evaluate takes the run's)")
    args.arch = args.arch or 'resnet34'
    args.input_size = args.input_size or 224
    existing = check_run_dir(args)
    utils.seed_everything(args.seed)
    train_loader, test_loader, num_classes = build_loaders(args)
    if args.resume and existing['num_classes'] != num_classes:
        raise UserError(f"--resume: the run in {args.model_dir} predicts {existing['num_classes']} classes, the "
                        f"{args.task} data in {args.data_dir} has {num_classes}: pass the --data-dir it was trained on")
    model = create_teacher(args.arch, num_classes, args.pretrained)
    check_input_size(model, args.input_size)
    model.to(device)
    resume_from = prepare_run_dir(args)
    if resume_from is not None:
        model.load_state_dict(resume_from['model'])
    logger = utils.setup_logging(args.model_dir, args.log2file)
    logger.info(f"teacher {args.arch} on {args.task} ({num_classes} classes), "
                f"device {device}{utils.processes_text()}")
    optimizer, scheduler = make_optimizer(model.parameters(), args, len(train_loader))
    precision = MixedPrecision(device, args.amp)

    def loss_fn(images, labels):
        logits, _ = model(images)
        return F.cross_entropy(logits, labels), {'correct': (logits.argmax(1) == labels).sum()}

    train_step = TrainStep(model, loss_fn, optimizer, precision, args.cuda_graph)
    accuracy = fit(args, model, optimizer, scheduler, train_loader, test_loader, device, train_step,
                   model.state_dict, resume_from, logger, precision, extra_checkpoint={'num_classes': num_classes})
    logger.info(f"teacher top-1 accuracy {accuracy:.2f}%")
    return {'accuracy': accuracy}


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser(), sys.argv[1:])
