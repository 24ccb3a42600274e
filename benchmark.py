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
  split-free train step          the one-pass step with Omega's layer terms flowing end to end (forward with
                                 distill=False; not the method): what the per-layer gradient split costs
  proxy-free train step          the one-pass step of a student whose proxies are all pruned: the floor
                                 (teacher forward, universal forward, universal input gradients)
  student eval forward           un-pruned student
  pruned eval forward            after removing --prune-universal universal blocks
On CUDA every train step and eval forward is measured again replayed from CUDA graphs (', CUDA graph'), as
main_*.py run them there by default (engine.TrainStep, engine.CapturedForward).

    python benchmark.py                      # ResNet34, max_skip 3, batch 32, 64x64, CPU
    python benchmark.py --input-size 224 --device cuda
    python benchmark.py --paths              # what each fast.py path is worth, in one interleaved run
    python benchmark.py --demo               # wall time of the offline demo, cache empty
    python benchmark.py --latency            # deployment latency, teacher vs exported tailored network

--latency instead times, at batch 1 and 64, the teacher (frozen) and the tailored network of the reference
configuration (the student with --prune-universal blocks removed, as deploy.py exports it): on the CPU in
PyTorch and in onnxruntime (the exported ONNX files), on CUDA eager and replayed from CUDA graphs; the
latency ratio is printed beside the FLOPs ratio.

--paths instead times the student train step and eval forward with every fast.py path, and again with each
path replaced by the plain layers it stands for (the model built and run that way), interleaved round by round:
what each path is worth on this machine, as the ratio of the time without it to the time with every path.
"""
import argparse
import contextlib
import functools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from engine import CapturedForward, MixedPrecision, TrainStep, frozen_teacher, fused_available
from nettailor import create_student, distillation_loss, two_pass_loss
import deploy
import fast
from backbones import ARCHS, create_teacher, num_blocks
from utils import (HelpFormatter, UserError, atomic_write_json, require_file_path, resolve_device, run_cli,
                   writing)


DEFAULT_RUN = 'the default run'
MODE_FLAGS = {  # flag: (its default, the modes that use it); the other modes refuse it when given
    'arch': ('resnet34', (DEFAULT_RUN, '--paths', '--latency')),
    'max_skip': ('3', (DEFAULT_RUN, '--paths', '--latency')),
    'batch_size': (32, (DEFAULT_RUN, '--paths')),
    'input_size': (64, (DEFAULT_RUN, '--paths', '--latency')),
    'repeats': (10, (DEFAULT_RUN, '--paths', '--latency')),
    'prune_universal': ('half the universal blocks', (DEFAULT_RUN, '--latency')),
    'device': ('cpu', (DEFAULT_RUN, '--paths', '--latency')),
    'channels_last': (False, (DEFAULT_RUN, '--paths')),
    'amp': (False, (DEFAULT_RUN, '--paths')),
}


def get_args_parser():
    def default(name):
        return f'default: {MODE_FLAGS[name][0]}'
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('--arch', default=None, help=default('arch'))
    parser.add_argument('--max-skip', default=None, help=default('max_skip'))
    parser.add_argument('--batch-size', type=int, default=None, help=default('batch_size'))
    parser.add_argument('--input-size', type=int, default=None, help=default('input_size'))
    parser.add_argument('--repeats', type=int, default=None,
                        help=f"timed rounds (after 2 warm-up rounds; {default('repeats')})")
    parser.add_argument('--prune-universal', type=int, default=None, help=default('prune_universal'))
    parser.add_argument('--device', default=None, help=default('device'))
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--channels-last', action='store_true', default=None,
                        help='NHWC memory format for models and inputs')
    parser.add_argument('--amp', action='store_true', default=None,
                        help='every case under torch.autocast, steps through a GradScaler (as main_*.py --amp)')
    parser.add_argument('--demo', action='store_true',
                        help='instead, time demo_synthetic.py end to end with an empty cache (a temporary folder)')
    parser.add_argument('--latency', action='store_true',
                        help='instead, latency of the teacher and the exported tailored network at batch 1 and 64')
    parser.add_argument('--paths', action='store_true',
                        help="instead, what each fast.py path is worth: the student's train step and eval forward "
                        "with it and with the plain layers it stands for, interleaved")
    parser.add_argument('--json', default=None, help='also write the results to this file')
    return parser


def complete_args(args):
    """Fill in the mode's defaults; refuse, before anything runs, flags the mode would ignore and values that
    cannot work."""
    modes = [flag for flag in ('--demo', '--latency', '--paths') if getattr(args, flag[2:])]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are separate measurements: pass one of them per run")
    mode = modes[0] if modes else DEFAULT_RUN
    for name, (default, used_by) in MODE_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif mode not in used_by:
            raise UserError(f"--{name.replace('_', '-')} does not apply to {mode}: it is for {', '.join(used_by)}")
    for name in ('repeats', 'batch_size', 'input_size', 'threads'):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch_size == 1:  # every mode that uses --batch-size times a training step
        raise UserError("--batch-size must be at least 2: BatchNorm cannot train on a batch of one")
    if args.arch not in ARCHS:
        raise UserError(f"unknown architecture '{args.arch}'; choose one of {', '.join(ARCHS)}")
    blocks = num_blocks(args.arch)
    if args.prune_universal == MODE_FLAGS['prune_universal'][0]:
        args.prune_universal = blocks // 2  # 8 of ResNet34's 16
    elif not 0 <= args.prune_universal <= blocks:
        raise UserError(f"--prune-universal must be in [0, {blocks}] ({args.arch} has {blocks} universal blocks), "
                        f"got {args.prune_universal}")
    if args.json:
        require_file_path(args.json, '--json')


def plain_gated_proxy(proxy, pooled, gate):
    return gate * proxy.body(pooled)


PLAIN_PATHS = {  # fast.py's paths and the plain equivalents that --paths puts in their place
    'folding': ('freeze', lambda network: None),
    'layout': ('channels_last_on_cpu', lambda x: x),
    'pointwise': ('pointwise_conv', lambda x, weight, bias=None: F.conv2d(x, weight, bias)),
    'proxy-matrices': ('gated_proxy', plain_gated_proxy),
}


@contextlib.contextmanager
def plain_path(path):
    """Inside the block, fast.py's `path` (a PLAIN_PATHS key; None: none) is the plain layers it stands for."""
    if path is None:
        yield
        return
    name, plain = PLAIN_PATHS[path]
    original = getattr(fast, name)
    setattr(fast, name, plain)
    try:
        yield
    finally:
        setattr(fast, name, original)


def distillation_losses(student, teacher, two_pass=False, split=True):
    """The student's loss function (main_student.py's, gamma1 0.3 and gamma2 10): one pass or the released two;
    without `split`, the layer terms' gradients flow end to end (for timing only)."""
    def loss_fn(x, y):
        with torch.no_grad():
            t_logits, t_outputs = teacher(x)
        if two_pass:  # the released code's formulation: each layer recomputed on detached inputs
            return two_pass_loss(student, t_logits, t_outputs, x, y, 0.3, 10.0), {}
        logits, local = student(x, distill=split)
        return (F.cross_entropy(logits, y) + 0.3 * student.expected_complexity()
                + 10.0 * distillation_loss(logits, local, t_logits, t_outputs)), {}
    return loss_fn


def fine_tuning_loss(model):
    """A teacher's loss in fine-tuning (stage 1), for comparison."""
    return lambda x, y: (F.cross_entropy(model(x)[0], y), {})


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
    complete_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.demo:
        results = time_demo()
        save_json(args, results)
        return results
    device = resolve_device(args.device)
    if args.latency:
        return measure_latency(args, device)
    return measure_paths(args, device) if args.paths else measure(args, device)


def interleaved(functions, rounds, device):
    """Each function's times (seconds) over `rounds` rounds, all functions once per round, after 2 warm-up
    rounds: machine noise hits them alike."""
    times = {name: [] for name in functions}
    for round_index in range(rounds + 2):
        for name, fn in functions.items():
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if round_index >= 2:
                times[name].append(time.perf_counter() - start)
    return times


class Setup:
    """What every case of a run shares: the batch, the precision, and builders of its models and steps."""

    def __init__(self, args, device, num_classes=10):
        torch.manual_seed(0)
        self.args, self.device, self.num_classes = args, device, num_classes
        self.precision = MixedPrecision(device, args.amp)
        self.x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
        self.y = torch.randint(0, num_classes, (args.batch_size,), device=device)
        if args.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)

    def on_device(self, model):
        layout = torch.channels_last if self.args.channels_last else torch.preserve_format
        return model.to(self.device, memory_format=layout)

    def student(self, task_bn_stats=True, prune=None):
        model = create_student(self.args.arch, self.num_classes, self.args.max_skip, input_size=self.args.input_size,
                               task_bn_stats=task_bn_stats)
        if prune:
            model.prune(*prune)
        return self.on_device(model)

    def frozen_teacher(self):
        return self.on_device(frozen_teacher(create_teacher(self.args.arch, self.num_classes)))

    def train_step(self, model, loss_fn, cuda_graph):
        """One TrainStep of `model` on the batch (SGD with momentum, as main_*.py), as a function of nothing."""
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=fused_available(params))
        step = TrainStep(model.train(), loss_fn, optimizer, self.precision, cuda_graph)
        return lambda: step(self.x, self.y)

    def eval_forward(self, model, cuda_graph=False):
        """`model`'s eval forward on the batch, as a function of nothing."""
        model.eval()
        forward = CapturedForward(model) if cuda_graph else model

        def run():
            with torch.no_grad(), self.precision.autocast():
                forward(self.x)
        return run


def measure(args, device):
    """Every case, interleaved round by round; printed, and returned as a dict."""
    setup = Setup(args, device)
    student, train_step, eval_forward = setup.student, setup.train_step, setup.eval_forward
    teacher = setup.on_device(create_teacher(args.arch, setup.num_classes).eval())
    frozen = setup.frozen_teacher()
    unit_student = student()
    cases = {'teacher forward': eval_forward(teacher), 'frozen teacher forward': eval_forward(frozen)}
    graph_modes = [False, True] if device.type == 'cuda' else [False]
    for graphed in graph_modes:  # on CUDA, each case again replayed from CUDA graphs (main_*.py's default there)
        suffix = ', CUDA graph' if graphed else ''
        fine_tuned = setup.on_device(create_teacher(args.arch, setup.num_classes))
        one_pass = unit_student if not graphed else student()
        proxy_free = student(prune=(0, 0.999))
        shared = student(task_bn_stats=False)
        split_free = student()
        cases.update({
            f'teacher train step{suffix}': train_step(fine_tuned, fine_tuning_loss(fine_tuned), graphed),
            f'student train step{suffix}': train_step(one_pass, distillation_losses(one_pass, frozen), graphed),
            f'shared-statistics train step{suffix}': train_step(shared, distillation_losses(shared, frozen), graphed),
            f'proxy-free train step{suffix}': train_step(proxy_free, distillation_losses(proxy_free, frozen),
                                                         graphed),
            f'split-free train step{suffix}': train_step(split_free,
                                                         distillation_losses(split_free, frozen, split=False), graphed),
            f'student eval forward{suffix}': eval_forward(student(), graphed),
            f'pruned eval forward{suffix}': eval_forward(student(prune=(args.prune_universal, 0.0)), graphed),
        })
    two_pass = student()
    cases['two-pass train step'] = train_step(two_pass, distillation_losses(two_pass, frozen, True), False)
    times = interleaved(cases, args.repeats, device)
    unit = times['teacher forward']
    stats_full = unit_student.stats()
    stats_pruned = student(prune=(args.prune_universal, 0.0)).stats()
    results = {
        'config': {'arch': args.arch, 'max_skip': args.max_skip, 'batch_size': args.batch_size,
                   'input_size': args.input_size, 'device': str(device), 'threads': torch.get_num_threads(),
                   'channels_last': args.channels_last, 'amp': args.amp,
                   'repeats': args.repeats, 'prune_universal': args.prune_universal},
        'median_seconds': {name: statistics.median(t) for name, t in times.items()},
        # each round's time over the same round's teacher forward, then the median: paired, so that the
        # host's slow drifts (shared machines) cancel
        'ratio_to_teacher_forward': {name: statistics.median(a / b for a, b in zip(t, unit))
                                     for name, t in times.items()},
        'pruned_flops_ratio': stats_pruned['flops'] / stats_full['flops_full'],
        'pruned_universal_blocks': {'kept': stats_pruned['universal_blocks_kept'],
                                    'total': stats_pruned['universal_blocks_total']},
    }

    def paired(name, other):
        return statistics.median(a / b for a, b in zip(times[name], times[other]))
    results['paired_ratios'] = {
        'one-pass / two-pass train step': paired('student train step', 'two-pass train step'),
        **{f'one-pass / split-free train step{suffix}': paired(f'student train step{suffix}',
                                                               f'split-free train step{suffix}')
           for suffix in (', CUDA graph' if graphed else '' for graphed in graph_modes)},
        'student train step / frozen teacher forward': paired('student train step', 'frozen teacher forward')}
    print(f"{args.arch}, max_skip {args.max_skip}, batch {args.batch_size}, {args.input_size}x{args.input_size}, "
          f"{device} ({torch.get_num_threads()} threads{', amp' if args.amp else ''}), median of {args.repeats} "
          f"interleaved rounds (ratios: median of each round's ratio)")
    for name in cases:
        print(f"  {name:<40} {results['median_seconds'][name] * 1e3:9.1f} ms  "
              f"{results['ratio_to_teacher_forward'][name]:5.2f} x teacher forward")
    for name, ratio in results['paired_ratios'].items():
        print(f"  {name}: {ratio:.2f}{' (what the per-layer split costs)' if 'split-free' in name else ''}")
    print(f"  pruned network: {results['pruned_flops_ratio']:.2f} of the teacher's FLOPs "
          f"({stats_pruned['universal_blocks_kept']}/{stats_pruned['universal_blocks_total']} universal blocks)")
    save_json(args, results)
    return results


def measure_paths(args, device):
    """--paths: the student's train step and eval forward with every fast.py path, and with each path replaced by
    its plain layers (the models built and run that way), interleaved round by round; printed and returned."""
    setup = Setup(args, device)
    graphed = device.type == 'cuda'  # as main_*.py run there by default

    def within(path, fn):
        def run():
            with plain_path(path):
                fn()
        return run

    cases = {}
    for path in (None, *PLAIN_PATHS):
        with plain_path(path):
            teacher, trained = setup.frozen_teacher(), setup.student()
            cases[path, 'student train step'] = within(
                path, setup.train_step(trained, distillation_losses(trained, teacher), graphed))
            cases[path, 'student eval forward'] = within(path, setup.eval_forward(setup.student(), graphed))
    times = interleaved(cases, args.repeats, device)
    names = ('student train step', 'student eval forward')
    results = {
        'config': {'arch': args.arch, 'max_skip': args.max_skip, 'batch_size': args.batch_size,
                   'input_size': args.input_size, 'device': str(device), 'threads': torch.get_num_threads(),
                   'channels_last': args.channels_last, 'amp': args.amp, 'repeats': args.repeats},
        'median_seconds_every_path': {name: statistics.median(times[None, name]) for name in names},
        # each round's time without the path over the same round's time with every path, then the median
        'ratio_without_path': {path: {name: statistics.median(a / b for a, b in zip(times[path, name],
                                                                                    times[None, name]))
                                      for name in names}
                               for path in PLAIN_PATHS},
    }
    print(f"what each fast.py path is worth: {args.arch}, max_skip {args.max_skip}, batch {args.batch_size}, "
          f"{args.input_size}x{args.input_size}, {device} ({torch.get_num_threads()} threads"
          f"{', amp' if args.amp else ''}{', CUDA graphs' if graphed else ''}), median of {args.repeats} "
          "interleaved rounds")
    seconds = results['median_seconds_every_path']
    print(f"  with every path: train step {seconds[names[0]] * 1e3:.1f} ms, "
          f"eval forward {seconds[names[1]] * 1e3:.1f} ms")
    print(f"  {'one path as its plain layers (x that time)':<44} {'train step':>10} {'eval forward':>13}")
    for path, ratios in results['ratio_without_path'].items():
        print(f"    {path:<42} {ratios[names[0]]:10.3f} {ratios[names[1]]:13.3f}")
    save_json(args, results)
    return results


def save_json(args, results):
    """--json: the results, also as a file (written atomically)."""
    if args.json:
        with writing(f'--json {args.json}'):  # after the whole measurement: its results are printed above
            atomic_write_json(results, args.json)


class Logits(torch.nn.Module):
    """A BlockNet's logits alone (its forward also returns every block's output)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(x)[0]


@torch.no_grad()
def measure_latency(args, device):
    """--latency: the teacher against the exported tailored network, per runtime and batch size."""
    import tempfile
    torch.manual_seed(0)
    teacher = frozen_teacher(create_teacher(args.arch, 10))
    student = create_student(args.arch, 10, args.max_skip, input_size=args.input_size)
    student.prune(args.prune_universal, 0.0)
    stats = student.stats()
    flops_ratio = stats['flops'] / stats['flops_full']
    networks = {'teacher': Logits(teacher).to(device), 'tailored': deploy.TailoredNetwork(student).eval().to(device)}
    runtimes = {}
    if device.type == 'cpu':
        import onnxruntime
        runtimes['PyTorch'] = lambda: networks
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        sessions = {}
        with tempfile.TemporaryDirectory() as folder:
            for name, network in networks.items():
                onnx_path = deploy.export_network(network, args.input_size, folder, name)[1]
                sessions[name] = onnxruntime.InferenceSession(onnx_path, options, providers=['CPUExecutionProvider'])
        runtimes['onnxruntime'] = lambda: {name: lambda x, s=session: s.run(None, {'images': x.numpy()})
                                           for name, session in sessions.items()}
    else:
        runtimes['eager'] = lambda: networks
        runtimes['CUDA graph'] = lambda: {name: CapturedForward(network) for name, network in networks.items()}
    rows = []
    print(f"latency, {args.arch} max_skip {args.max_skip}, {args.input_size}x{args.input_size}, {device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats} interleaved rounds; tailored network: "
          f"{args.prune_universal} universal blocks removed, {flops_ratio:.2f} of the teacher's FLOPs")
    print(f"  {'runtime':<12} {'batch':>5} {'teacher ms':>11} {'tailored ms':>12} {'ratio':>6} {'ratio/FLOPs':>11}")
    for runtime, functions in runtimes.items():
        for batch in (1, 64):
            x = torch.randn(batch, 3, args.input_size, args.input_size, device=device)
            times = interleaved({name: functools.partial(fn, x) for name, fn in functions().items()}, args.repeats,
                                device)
            seconds = {name: statistics.median(t) for name, t in times.items()}
            ratio = statistics.median(a / b for a, b in zip(times['tailored'], times['teacher']))  # paired
            rows.append({'runtime': runtime, 'batch': batch, 'teacher_seconds': seconds['teacher'],
                         'tailored_seconds': seconds['tailored'], 'ratio': ratio,
                         'ratio_over_flops_ratio': ratio / flops_ratio})
            print(f"  {runtime:<12} {batch:>5} {seconds['teacher'] * 1e3:11.2f} {seconds['tailored'] * 1e3:12.2f} "
                  f"{ratio:6.2f} {ratio / flops_ratio:11.2f}")
    results = {'config': {'arch': args.arch, 'max_skip': args.max_skip, 'input_size': args.input_size,
                          'device': str(device), 'threads': torch.get_num_threads(), 'repeats': args.repeats,
                          'prune_universal': args.prune_universal},
               'flops_ratio': flops_ratio, 'latency': rows}
    save_json(args, results)
    return results


if __name__ == '__main__':
    run_cli(main, get_args_parser(), sys.argv[1:])
