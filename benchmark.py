"""Speed of NetTailor against a plain teacher forward pass, measured in one run.

Times, on the same batch and machine, interleaved round by round (so machine noise hits all alike;
ratios are the median of each round's ratio):
  teacher forward (eval)         the unit every other time is divided by: a plain forward (trainable weights)
  frozen teacher forward         the same with its weights frozen and folded (fast.freeze), as main_student.py runs
                                 the teacher and NetTailor its universal blocks in eval mode
  teacher train step             a fine-tuning step of the teacher (stage 1): forward, CE, backward, SGD step
  student train step             frozen teacher forward + student forward + CE, E[C] and Omega + backward + SGD step
                                 (the universal BatchNorms on batch statistics: the task's own, as released)
  shared-statistics train step   the same step with the universal blocks' pre-trained statistics (--shared-bn-stats)
  two-pass train step            the same step with the straightforward distillation (every layer re-run)
  proxy-free train step          the one-pass step of a student whose proxies are all pruned: the floor
                                 (teacher forward, universal forward, universal input gradients)
  student eval forward           un-pruned student
  pruned eval forward            after removing --prune-universal universal blocks

    python benchmark.py                      # ResNet34, max_skip 3, batch 32, 64x64, CPU
    python benchmark.py --input-size 224 --device cuda
    python benchmark.py --plain layout       # the same with a fast.py path replaced by the plain layers
    python benchmark.py --demo               # wall time of the offline demo, cache empty
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from engine import MixedPrecision, fused_available
from nettailor import create_student, distillation_loss, two_pass_loss
import fast
from backbones import create_teacher
from utils import UserError, resolve_device, run_cli


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--arch', default='resnet34')
    parser.add_argument('--max-skip', default='3')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--input-size', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=10, help='timed rounds (after 2 warm-up rounds)')
    parser.add_argument('--prune-universal', type=int, default=8)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--channels-last', action='store_true', help='NHWC memory format for models and inputs')
    parser.add_argument('--amp', action='store_true',
                        help='every case under torch.autocast, steps through a GradScaler (as main_*.py --amp)')
    parser.add_argument('--demo', action='store_true',
                        help='instead, time demo_synthetic.py end to end with an empty cache (a temporary folder)')
    parser.add_argument('--plain', action='append', default=[], choices=sorted(PLAIN_PATHS),
                        help="run this fast.py path as the plain layers it stands for (repeatable), to measure "
                        "what it is worth")
    parser.add_argument('--json', default=None, help='also write the results to this file')
    return parser


def plain_gated_proxy(proxy, pooled, gate):
    return gate * proxy.body(pooled)


PLAIN_PATHS = {  # fast.py's paths and the plain equivalents that --plain puts in their place
    'folding': ('freeze', lambda network: None),
    'layout': ('channels_last_on_cpu', lambda x: x),
    'pointwise': ('pointwise_conv', lambda x, weight, bias=None: F.conv2d(x, weight, bias)),
    'proxy-matrices': ('gated_proxy', plain_gated_proxy),
}


def two_pass_step(student, teacher, optimizer, x, y, precision):
    """The released code's formulation: each layer recomputed on detached inputs."""
    with precision.autocast():
        with torch.no_grad():
            t_logits, t_outputs = teacher(x)
        loss = two_pass_loss(student, t_logits, t_outputs, x, y, 0.3, 10.0)
    precision.backward_and_step(loss, optimizer)


def fine_tuning_step(model, optimizer, x, y, precision):
    """A teacher's training step (stage 1), for comparison."""
    with precision.autocast():
        loss = F.cross_entropy(model(x)[0], y)
    precision.backward_and_step(loss, optimizer)


def one_pass_step(student, teacher, optimizer, x, y, precision):
    with precision.autocast():
        with torch.no_grad():
            t_logits, t_outputs = teacher(x)
        logits, local = student(x, distill=True)
        loss = (F.cross_entropy(logits, y) + 0.3 * student.expected_complexity()
                + 10.0 * distillation_loss(logits, local, t_logits, t_outputs))
    precision.backward_and_step(loss, optimizer)


def time_demo():
    """Wall time of the whole offline demo, source pre-training included, in a fresh folder."""
    import tempfile
    import demo_synthetic
    with tempfile.TemporaryDirectory() as folder:
        demo_args = demo_synthetic.get_args_parser().parse_args(['--model-root', folder])
        start = time.perf_counter()
        table = demo_synthetic.main(demo_args)
        seconds = time.perf_counter() - start
    print(f"offline demo: {seconds:.0f} s wall time ({torch.get_num_threads()} threads), "
          f"{100 * table['params_removed']:.1f}% params and {100 * table['flops_removed']:.1f}% FLOPs removed, "
          f"accuracy {table['student_acc'] - table['teacher_acc']:+.2f} points vs the teacher")
    return {'demo_seconds': seconds, 'params_removed': table['params_removed'],
            'flops_removed': table['flops_removed'], 'teacher_acc': table['teacher_acc'],
            'student_acc': table['student_acc']}


def main(args):
    for name in ('repeats', 'batch_size', 'input_size', 'threads'):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.demo:
        results = time_demo()
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(results, f, indent=1)
        return results
    device = resolve_device(args.device)
    originals = {name: getattr(fast, name) for name, _ in (PLAIN_PATHS[path] for path in args.plain)}
    for path in args.plain:
        setattr(fast, *PLAIN_PATHS[path])
    try:
        return measure(args, device)
    finally:
        for name, function in originals.items():
            setattr(fast, name, function)


def measure(args, device):
    """Every case, interleaved round by round; printed, and returned as a dict."""
    torch.manual_seed(0)
    num_classes = 10
    teacher = create_teacher(args.arch, num_classes).to(device).eval()
    frozen_teacher = create_teacher(args.arch, num_classes).eval().requires_grad_(False)  # as load_teacher
    fast.freeze(frozen_teacher)
    frozen_teacher.to(device)
    student = create_student(args.arch, num_classes, args.max_skip, input_size=args.input_size).to(device)
    shared = create_student(args.arch, num_classes, args.max_skip, input_size=args.input_size,
                            task_bn_stats=False).to(device)
    unpruned = create_student(args.arch, num_classes, args.max_skip, input_size=args.input_size).to(device).eval()
    pruned = create_student(args.arch, num_classes, args.max_skip, input_size=args.input_size).to(device)
    pruned.prune(args.prune_universal, 0.0)
    pruned.eval()
    proxy_free = create_student(args.arch, num_classes, args.max_skip, input_size=args.input_size).to(device)
    proxy_free.prune(0, 0.999)
    fine_tuned = create_teacher(args.arch, num_classes).to(device)
    fused = fused_available(fine_tuned.parameters())  # as engine.make_optimizer
    fine_tuning_optimizer = torch.optim.SGD(fine_tuned.parameters(), lr=1e-3, momentum=0.9, fused=fused)
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                                fused=fused)
    shared_optimizer = torch.optim.SGD([p for p in shared.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                                       fused=fused)
    proxy_free_optimizer = torch.optim.SGD([p for p in proxy_free.parameters() if p.requires_grad], lr=1e-3,
                                           momentum=0.9, fused=fused)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    if args.channels_last:
        for model in (teacher, frozen_teacher, fine_tuned, student, shared, unpruned, pruned, proxy_free):
            model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (args.batch_size,), device=device)

    precision = MixedPrecision(device, args.amp)

    def eval_forward(model):
        with torch.no_grad(), precision.autocast():
            model(x)

    cases = {
        'teacher forward': lambda: eval_forward(teacher),
        'frozen teacher forward': lambda: eval_forward(frozen_teacher),
        'teacher train step': lambda: fine_tuning_step(fine_tuned, fine_tuning_optimizer, x, y, precision),
        'student train step': lambda: one_pass_step(student.train(), frozen_teacher, optimizer, x, y, precision),
        'shared-statistics train step': lambda: one_pass_step(shared.train(), frozen_teacher, shared_optimizer, x, y,
                                                               precision),
        'two-pass train step': lambda: two_pass_step(student.train(), frozen_teacher, optimizer, x, y, precision),
        'proxy-free train step': lambda: one_pass_step(proxy_free, frozen_teacher, proxy_free_optimizer, x, y,
                                                         precision),
        'student eval forward': lambda: eval_forward(unpruned),
        'pruned eval forward': lambda: eval_forward(pruned),
    }
    times = {name: [] for name in cases}
    for round_index in range(args.repeats + 2):
        for name, fn in cases.items():
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if round_index >= 2:
                times[name].append(time.perf_counter() - start)

    unit = times['teacher forward']
    stats_full, stats_pruned = student.stats(), pruned.stats()
    results = {
        'config': {'arch': args.arch, 'max_skip': args.max_skip, 'batch_size': args.batch_size,
                   'input_size': args.input_size, 'device': str(device), 'threads': torch.get_num_threads(),
                   'channels_last': args.channels_last, 'amp': args.amp, 'plain': args.plain,
                   'repeats': args.repeats, 'prune_universal': args.prune_universal},
        'median_seconds': {name: statistics.median(t) for name, t in times.items()},
        # each round's time over the same round's teacher forward, then the median: paired, so that the
        # host's slow drifts (shared machines) cancel
        'ratio_to_teacher_forward': {name: statistics.median(a / b for a, b in zip(t, unit))
                                     for name, t in times.items()},
        'pruned_flops_ratio': stats_pruned['flops'] / stats_full['flops_full'],
    }
    print(f"{args.arch}, max_skip {args.max_skip}, batch {args.batch_size}, {args.input_size}x{args.input_size}, "
          f"{device} ({torch.get_num_threads()} threads{', amp' if args.amp else ''}), median of {args.repeats} "
          f"interleaved rounds (ratios: median of each round's ratio)")
    for name in cases:
        print(f"  {name:<28} {results['median_seconds'][name] * 1e3:9.1f} ms  "
              f"{results['ratio_to_teacher_forward'][name]:5.2f} x teacher forward")
    paired = statistics.median(a / b for a, b in zip(times['student train step'], times['two-pass train step']))
    print(f"  one-pass / two-pass train step: {paired:.2f}")
    frozen = statistics.median(a / b for a, b in zip(times['student train step'], times['frozen teacher forward']))
    print(f"  student train step / frozen teacher forward: {frozen:.2f}")
    print(f"  pruned network: {results['pruned_flops_ratio']:.2f} of the teacher's FLOPs "
          f"({stats_pruned['universal_blocks_kept']}/{stats_pruned['universal_blocks_total']} universal blocks)")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    run_cli(main, get_args_parser(), sys.argv[1:])
