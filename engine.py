"""The training engine shared by the scripts: argument checks, data loaders, the run directory, the optimizer
and its schedule, mixed precision, the epoch loop (`fit`), evaluation and loading trained teachers and students.

main_teacher.py and main_student.py (and the decathlon scripts and demos built on them) are thin: a
parser, a model, a training step; everything else lives here.
"""
import hashlib
import json
import math
import os
import time
import unicodedata

import torch

import fast
import utils
from backbones import create_teacher
from nettailor import create_student
from utils import UserError


SGD_MOMENTUM = 0.9  # --momentum's default, recorded by every run (Adam's too, which ignores it)


def check_args(args):
    """Reject flag values that cannot work, before anything is written."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.batch_size == 1:
        raise UserError("--batch-size must be at least 2: BatchNorm cannot train on a batch of one")
    for name in ('epochs', 'batch_size', 'lr', 'lr_decay_epochs', 'input_size', 'train_limit', 'test_limit'):
        if getattr(args, name) is not None and getattr(args, name) <= 0:  # None: the run's or a later default
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.momentum not in (None, SGD_MOMENTUM) and args.optimizer != 'sgd':  # checked again: the default is set
        raise UserError(f"--momentum is SGD's: {args.optimizer} takes none (its moment estimates decay at fixed "
                        "rates); drop it, or pass --optimizer sgd")
    args.momentum = SGD_MOMENTUM if args.momentum is None else args.momentum  # recorded so by every run
    for name in ('momentum', 'weight_decay', 'warmup_epochs'):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    if args.workers < 0:
        raise UserError(f"--workers must be non-negative, got {args.workers}")
    if args.epochs is not None and args.warmup_epochs >= args.epochs:
        raise UserError(f"--warmup-epochs {args.warmup_epochs} must be shorter than --epochs {args.epochs}: the "
                        "learning rate would never reach --lr")
    if args.resume and args.force:
        raise UserError("--resume and --force contradict each other; pick one")
    if args.pretrained == 'none':
        args.pretrained = None
    elif args.pretrained not in (None, 'imagenet'):
        args.pretrained = os.path.abspath(args.pretrained)  # recorded so that any working directory finds it


def build_loaders(args):
    """(train_loader, test_loader, num_classes) for args.task, this process's share under torchrun (--batch-size
    images per process and step); the decathlon scripts set args.decathlon."""
    if getattr(args, 'decathlon', False):
        from decathlon_dataloaders import get_decathlon_dataloaders, task_mean_std
        loaders = get_decathlon_dataloaders(args.task, args.data_dir, args.train_splits, args.eval_split,
                                            batch_size=args.batch_size, workers=args.workers,
                                            input_size=args.input_size, seed=args.seed,
                                            train_limit=args.train_limit, test_limit=args.test_limit,
                                            rank=utils.rank(), world_size=utils.world_size(),
                                            train_images=not getattr(args, 'evaluate', False))
        found = {'mean_std': [list(values) for values in task_mean_std(args.task, args.data_dir)]}
    else:  # evaluating reads the test images alone, numbered by the run's classes; their folders must be among them
        from dataloaders import folder_name, get_dataloaders, task_classes
        classes = getattr(args, 'classes', None)
        evaluating = getattr(args, 'evaluate', False) and (classes is not None or folder_name(args.task) is None)
        if evaluating and classes is not None:
            unknown = [name for name in task_classes(args.task, args.data_dir, 'val') if name not in classes]
            check_data(vars(args), {'classes': [*classes, *unknown]}, args)
        loaders = get_dataloaders(args.task, args.data_dir, args.batch_size, args.workers, args.input_size,
                                  args.seed, train_limit=args.train_limit, test_limit=args.test_limit,
                                  rank=utils.rank(), world_size=utils.world_size(), train_images=not evaluating,
                                  classes=classes)
        found = {'classes': classes if evaluating else task_classes(args.task, args.data_dir)}
    check_data(vars(args), found, args)
    vars(args).update(found)  # recorded with the run
    return loaders


def run_evaluation_transform(settings):
    """The transform of the test images of the run whose recorded args are `settings` (a decathlon run's with the
    mean and std it recorded; runs from before they were recorded: those of its --data-dir)."""
    if settings.get('decathlon'):
        from decathlon_dataloaders import decathlon_transform
        return decathlon_transform(settings['task'], False, settings['input_size'], settings['data_dir'],
                                   settings.get('mean_std'))
    from dataloaders import evaluation_transform
    return evaluation_transform(settings['task'], settings['input_size'])


# what a run records of its data, as settings: a folder task's class names, a decathlon task's mean and std
RECORDED_DATA = ('classes', 'mean_std')


def take_recorded_data(args, settings):
    """Give `args` the RECORDED_DATA of a run's `settings`, for build_loaders to check the data against."""
    for key in RECORDED_DATA:
        setattr(args, key, settings.get(key))


def check_data(recorded, found, args, network='the network', fix='pass the --data-dir it was trained on'):
    """The data in args.data_dir must be those `network` was trained on (`recorded` and `found`: RECORDED_DATA
    settings; None or absent: nothing recorded, or another kind of task): a folder task's classes, which other
    folders would number otherwise, silently; a decathlon task's mean and std, which its inputs are normalised
    with."""
    old, new = recorded.get('classes'), found.get('classes')
    if old is not None and new is not None and list(old) != list(new):
        missing, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        difference = '; '.join([*(['lacking ' + ', '.join(map(repr, missing))] if missing else []),
                                *(['new ' + ', '.join(map(repr, added))] if added else [])])
        composed = {unicodedata.normalize('NFC', name) for name in old}
        if any(unicodedata.normalize('NFC', name) in composed for name in added):
            difference += (': the same names in other Unicode characters, as one system writes accents composed and '
                           'another decomposed; rename the folders')
        raise UserError(f"the {args.task} classes in {args.data_dir} are not those {network} was trained on "
                        f"({difference}): {fix}")
    old, new = recorded.get('mean_std'), found.get('mean_std')
    if old is not None and new is not None and [list(values) for values in old] != [list(values) for values in new]:
        raise UserError(f"the {args.task} mean and std of {args.data_dir} are not those {network} was trained with "
                        f"(mean {old[0]}, std {old[1]}): {fix}")


def check_decathlon_kind(saved, args, network, fix):
    """A decathlon run's network serves decathlon runs only, and another's only others (`saved`: its recorded
    args): the two svhn tasks are different data (splits, crops, normalisation)."""
    theirs, ours = bool(saved.get('decathlon')), bool(getattr(args, 'decathlon', False))
    if theirs != ours:
        raise UserError(f"{network} is {'a' if theirs else 'not a'} decathlon run, unlike this one: {fix}")


def check_recorded_settings(args, saved, names, command):
    """`command` (--evaluate, --export) rebuilds the run in --model-dir as it recorded it (`saved`): a setting of
    `names` given on the command line unlike the run's is refused, not ignored."""
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    differences = setting_differences(saved, given, ignored=())
    if differences:
        raise UserError(f"{args.model_dir} was trained with {'; '.join(differences)}: drop those flags ({command} "
                        "rebuilds the run as recorded)")


def evaluation_loader(args, checkpoint, num_classes, network_settings):
    """The test loader of the run `checkpoint` records: its task and test subset (when --task and --test-limit
    are not given) and input size.  A different --task is refused, as are data whose class count is not the
    model's and `network_settings` (the input size among them) given on the command line unlike the run's."""
    saved = checkpoint['args']
    check_recorded_settings(args, saved, network_settings, '--evaluate')
    check_decathlon_kind(saved, args, args.model_dir,
                         f"evaluate it with main_teacher_decathlon.py or main_student_decathlon.py --task "
                         f"{saved['task']} --evaluate" if saved.get('decathlon') else
                         "evaluate it with main_teacher.py or main_student.py --model-dir RUN --evaluate")
    args.task = args.task or saved['task']
    args.test_limit = args.test_limit or saved.get('test_limit')
    if args.task != saved['task']:
        raise UserError(f"{args.model_dir} was trained on {saved['task']}, not {args.task}: "
                        f"pass --task {saved['task']}")
    args.input_size = saved['input_size']
    take_recorded_data(args, saved)
    try:
        _, test_loader, data_classes = build_loaders(args)
    except UserError as error:  # data not found, or not the run's: where the run found them helps
        recorded = saved.get('data_dir')
        if recorded is None or os.path.abspath(recorded) == os.path.abspath(args.data_dir):
            raise
        raise UserError(f"{utils.user_error_line(error)} (the run was trained with --data-dir {recorded})") from None
    if data_classes != num_classes:
        raise UserError(f"{args.model_dir} predicts {num_classes} classes, the {args.task} data in "
                        f"{args.data_dir} has {data_classes}")
    return test_loader


def checkpoint_path(model_dir):
    return os.path.join(model_dir, 'checkpoint.pth')


def epochs_done(checkpoint):
    """'N of M epochs': how far the run `checkpoint` belongs to went."""
    return f"{checkpoint['epoch'] + 1} of {checkpoint['args']['epochs']} epochs"


def unfinished_note(checkpoint):
    """A remark for output about a run that is not finished yet, else ''."""
    return '' if checkpoint.get('finished') else f" (unfinished run: {epochs_done(checkpoint)})"


def subset_note(test_limit):
    """A remark for output about an accuracy measured on a --test-limit subset (a quick run's), else ''."""
    return f" (at most {test_limit} images: --test-limit {test_limit})" if test_limit else ''


def run_status(model_dir):
    """'finished', 'unfinished' (a checkpoint to resume) or None (no checkpoint yet) for the run in `model_dir`."""
    path = checkpoint_path(model_dir)
    if not os.path.exists(path):
        return None
    checkpoint = utils.load_checkpoint(path)
    return 'finished' if isinstance(checkpoint, dict) and checkpoint.get('finished') else 'unfinished'


def run_kind(checkpoint):
    """Which script wrote a run's `checkpoint`: 'teacher' (main_teacher.py), 'student' (main_student.py) or None."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('args'), dict) or 'model' not in checkpoint:
        return None
    if 'num_classes' in checkpoint:
        return 'teacher'
    return 'student' if isinstance(checkpoint['model'], dict) and 'meta' in checkpoint['model'] else None


# settings that name files or steer the process rather than define what a run trains (and RECORDED_DATA, which no
# flag gives: build_loaders checks them against the data; the process count, check_resumable's)
NOT_TRAINING_SETTINGS = ('model_dir', 'model_root', 'data_dir', 'teacher_fn', 'full_model_dir', 'pretrained', 'device',
                         'workers', 'cuda_graph', 'resume', 'force', 'log2file', 'evaluate', 'export', 'summary',
                         'write_submission', *RECORDED_DATA, 'processes')


def setting_differences(recorded, wanted, ignored=NOT_TRAINING_SETTINGS):
    """How settings `recorded` by a run differ from `wanted` (setting -> value), one '--setting recorded, not
    wanted' phrase per difference; `ignored` settings are not compared."""
    def text(value):  # a list setting is recorded parsed ('train', 'val') and given as 'train,val'
        return ','.join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    return [f"--{key.replace('_', '-')} {text(recorded.get(key))}, not {text(value)}" for key, value in wanted.items()
            if key not in ignored and text(recorded.get(key)) != text(value)]


def trained_settings(args):
    """The settings a run of a script's `args` trains with, as a finished run is compared against them: every one
    set (those left None its script resolves: from the run it prunes, or by default) and the data limits, whose
    None is all the data."""
    return {key: value for key, value in vars(args).items()
            if value is not None or key in ('train_limit', 'test_limit')}


def finished_run_differences(model_dir, wanted, processes=None):
    """`setting_differences` of the finished run in `model_dir` (NOT_TRAINING_SETTINGS are not compared), then
    `stale_sources`, against the sources `wanted` names; given `processes`, the count of processes it was
    trained by (--batch-size is per process)."""
    checkpoint = utils.load_checkpoint(checkpoint_path(model_dir))
    differences = setting_differences(checkpoint['args'], wanted) + stale_sources(checkpoint, wanted)
    recorded = checkpoint['args'].get('processes')
    if processes is not None and recorded is not None and recorded != processes:
        differences.append(f"{recorded} process(es), not {processes}")
    return differences


def stale_sources(checkpoint, wanted=None):
    """What the run of `checkpoint` was trained from, where it is not what `wanted` (settings) names: its teacher
    and the student it was pruned from by the fingerprints it recorded ('another teacher than <checkpoint>'; where
    `wanted` names none, or the same file, 'an earlier <checkpoint> (trained again since)'), its universal weights
    by their file ('--pretrained <recorded>, not <wanted>', unless the recorded file is gone: moved)."""
    wanted = wanted or {}
    stale = []
    for key, setting, current, source in (('teacher_sha256', 'teacher_fn', teacher_fingerprint, 'teacher'),
                                          ('full_sha256', 'full_model_dir', student_fingerprint, 'full student')):
        recorded, path = run_file(checkpoint['args'].get(setting)), run_file(wanted.get(setting))
        path = path or recorded
        if checkpoint.get(key) and path and os.path.isfile(path) and \
                current(utils.load_checkpoint(path)) != checkpoint[key]:
            same = recorded is not None and os.path.isfile(recorded) and os.path.samefile(recorded, path)
            stale.append(f"an earlier {path} (trained again since)" if same else f"another {source} than {path}")
    if 'pretrained' in wanted:
        recorded, given = (None if value in (None, 'none') else value
                           for value in (checkpoint['args'].get('pretrained'), wanted['pretrained']))
        files = None not in (recorded, given) and 'imagenet' not in (recorded, given)
        if recorded != given and (not files or os.path.exists(recorded) and not (
                os.path.exists(given) and os.path.samefile(recorded, given))):
            stale.append(f"--pretrained {recorded or 'none'}, not {given or 'none'}")
    return stale


def run_file(path):
    """The checkpoint file of a run given as its folder or as the file (None stays None)."""
    return checkpoint_path(path) if path and os.path.isdir(path) else path


def check_run_dir(args):
    """The run already in --model-dir (or None), refused unless --force, or --resume of that same run with
    epochs still to go.  Writes nothing: scripts call it before building anything."""
    args.processes = getattr(args, 'processes', None) or utils.world_size()  # recorded (submit.py sets its jobs')
    path = checkpoint_path(args.model_dir)
    for flag in ('full_model_dir', 'teacher_fn', 'pretrained'):  # what the run reads must outlive it
        value = getattr(args, flag, None)
        read = run_file(value)
        if read not in (None, 'imagenet', 'none') and os.path.realpath(read) == os.path.realpath(path):
            raise UserError(f"--{flag.replace('_', '-')} {value} is the checkpoint of --model-dir {args.model_dir}, "
                            "which this run would overwrite: write the run to another --model-dir")
    existing = None
    if os.path.exists(path):
        try:
            existing = utils.load_checkpoint(path, fix='pass --force to start a new run over it')
            if not isinstance(existing, dict) or not isinstance(existing.get('args'), dict):
                raise UserError(f"{path} is not a checkpoint of a run; pass --force to start a new run over it")
        except UserError:
            if args.resume or not args.force:
                raise
            existing = None
    if existing is not None and not (args.force or args.resume):
        state = 'a finished run' if existing.get('finished') else 'an unfinished run'
        hint = 'pass --force to overwrite it' + ('' if existing.get('finished') else ' or --resume to continue it')
        raise UserError(f"{args.model_dir} already holds {state}; {hint}")
    if args.resume and existing is None:
        raise UserError(f"--resume: no checkpoint in {args.model_dir} to resume from")
    if args.resume and existing.get('finished'):
        raise UserError(f"--resume: the run in {args.model_dir} is already finished")
    if args.resume:
        recorded = run_kind(existing)
        if recorded not in (None, 'student' if 'teacher_fn' in vars(args) else 'teacher'):
            raise UserError(f"--resume: the run in {args.model_dir} is a {recorded}'s: resume it with "
                            f"main_{recorded}.py")
        check_resumable(args, existing)
        take_recorded_data(args, existing['args'])  # build_loaders checks the data against them
    return existing


def prepare_run_dir(args):
    """Create the run directory and record args.json there, once `check_run_dir` has passed it again with the
    directory locked (another process may have written a run there since it was first read).

    Returns the checkpoint to resume from (or None).  Under torchrun the main process writes, the others wait."""
    if not utils.is_main_process():
        utils.barrier()
        return check_run_dir(args) if args.resume else None  # what the main process resumes from
    with utils.writing(f'the run directory {args.model_dir}', '; choose a folder you can write'):
        os.makedirs(args.model_dir, exist_ok=True)
        utils.lock_run_dir(args.model_dir)
        existing = check_run_dir(args)
        utils.remove_interrupted_writes(args.model_dir)
        if existing is None or args.force:  # nothing of the overwritten run stays beside the new one
            for name in ('checkpoint.pth', 'metrics.jsonl', 'log.txt', 'architecture.png', 'submission.json'):
                if os.path.exists(os.path.join(args.model_dir, name)):
                    os.remove(os.path.join(args.model_dir, name))
        utils.atomic_write_text(json.dumps(vars(args), indent=1, default=str) + '\n',
                                os.path.join(args.model_dir, 'args.json'))
    utils.barrier()
    return existing if args.resume else None


def weights_location(value):
    """A setting naming weights or a run (--pretrained, --teacher-fn, --full-model-dir) as an absolute path, so
    that the same file named from two working directories compares equal; None and 'imagenet' as they are."""
    return value if value in (None, 'imagenet') else os.path.abspath(value)


def moved(recorded, given):
    """Whether weights recorded at `recorded` (a file or run) may be those now at `given`: the recorded ones are
    gone.  'imagenet' and None (none) name no place."""
    return (recorded not in (None, 'imagenet') and given not in (None, 'imagenet') and recorded != given
            and not os.path.exists(recorded))


def check_resumable(args, existing):
    """--resume continues the run `existing` records: every training setting and the weights it starts from as
    recorded (only --epochs may change, the schedule following it; weights whose recorded file or run is gone may
    be named where they are now, the fingerprints the run recorded checking them), and epochs still to go."""
    weights = ('pretrained', 'teacher_fn', 'full_model_dir')

    def located(settings):
        return {key: weights_location(value) if key in weights else value for key, value in settings.items()}
    recorded = located(existing['args'])
    wanted = located({key: value for key, value in vars(args).items() if key != 'epochs'})
    for key in weights:
        if moved(recorded.get(key), wanted.get(key)):
            wanted[key] = recorded[key]
    differences = setting_differences(recorded, wanted, ignored=set(NOT_TRAINING_SETTINGS) - set(weights))
    if differences:
        raise UserError(f"--resume: the run in {args.model_dir} was trained with {differences[0]}; resume it with "
                        "its own flags (its args.json), or pass --force to start it again")
    processes = existing['args'].get('processes')  # --batch-size is per process: another count trains otherwise
    if processes is not None and processes != args.processes:
        how = ('as one process (no torchrun; submit.py: --processes-per-job 1)' if processes == 1 else
               f'with torchrun --nproc-per-node {processes} (submit.py: --processes-per-job {processes})')
        raise UserError(f"--resume: the run in {args.model_dir} was trained by {processes} process(es), not "
                        f"{args.processes}: resume it {how}")
    if args.epochs <= existing['epoch'] + 1:
        raise UserError(f"--resume: the run in {args.model_dir} already went through epoch {existing['epoch'] + 1}; "
                        f"pass --epochs above {existing['epoch'] + 1} to continue it")


def use_cuda_graph(args, device):
    """--cuda-graph resolved: on by default with a CUDA device and one process; refused without a CUDA device,
    and with several processes, whose synchronised BatchNorms communicate inside the step."""
    if args.cuda_graph and device.type != 'cuda':
        raise UserError(f"--cuda-graph needs a CUDA device, not {device}: drop it or pass --device cuda")
    if args.cuda_graph and utils.world_size() > 1:
        raise UserError("--cuda-graph runs one process; under torchrun with several, drop it")
    return device.type == 'cuda' and utils.world_size() == 1 if args.cuda_graph is None else args.cuda_graph


class MixedPrecision:
    """--amp for a training step: forward and losses under `autocast()`, then `scaler.scale(loss).backward()`
    and `step(optimizer)`; the GradScaler (float16 on CUDA only; bfloat16 needs none) does nothing when off."""

    def __init__(self, device, enabled):
        self.device_type, self.enabled = device.type, enabled
        self.dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and device.type == 'cuda')

    def autocast(self):
        # without the cast cache, which CUDA graph capture cannot keep and which saves nothing here (a step uses
        # each trainable weight once)
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=False)

    def step(self, optimizer):
        self.scaler.step(optimizer)
        self.scaler.update()


def on_side_stream(fn, times):
    """Run `fn()` `times` times on a new side CUDA stream, the warm-up torch.cuda.graph's documentation asks for
    before a capture, and return that stream for the capture to run on as well: an autograd node that outlives
    the warm-up keeps the stream it ran on, and a capture must not wait on any other stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    return side


def capturing(graph, stream):
    """torch.cuda.graph capturing into `graph` on `stream`, in 'thread_local' mode: a DataLoader's pin-memory
    thread keeps allocating pinned host memory while a capture is under way, which the default 'global' mode
    counts as an error of the capture (and raises in that thread too); the thread never touches the captured
    stream, so only the capturing thread needs to be held to capture's rules."""
    return torch.cuda.graph(graph, stream=stream, capture_error_mode='thread_local')


class TrainStep:
    """One optimisation step of `model`: `loss_fn(images, labels)` -> (loss, metrics: a dict of 0-d tensors)
    under autocast, backward, optimizer step; returns the metrics and 'loss'.

    With `cuda_graph`, the forward and backward passes are captured once, on the first batch, as a CUDA graph
    (torch.cuda.graph) and replayed for every later batch of that shape: the step is no longer bound by
    Python and kernel launches.  The optimizer step stays eager, so the learning-rate schedule, gradient
    scaling (--amp) and resumption work unchanged; a batch of another shape (an epoch's last) runs eagerly
    into the same gradient tensors.  Capture's warm-up passes leave the model's buffers (BatchNorm
    statistics) as they were, so every step computes what the eager step computes.  Under torchrun the
    gradients are averaged over the processes before the optimizer step (`utils.average_gradients`).
    """

    def __init__(self, model, loss_fn, optimizer, precision, cuda_graph=False):
        self.model, self.loss_fn, self.optimizer, self.precision = model, loss_fn, optimizer, precision
        self.cuda_graph = cuda_graph
        self.parameters = [p for group in optimizer.param_groups for p in group['params']]
        self.graph = None

    def __call__(self, images, labels):
        if self.cuda_graph and self.graph is None:
            self._capture(images, labels)
        if self.graph is not None and images.shape == self.static_images.shape:
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            self.graph.replay()
            metrics = dict(self.static_metrics)
        else:
            self.optimizer.zero_grad(set_to_none=self.graph is None)  # in place where the graph writes them
            metrics = self._forward_backward(images, labels)
        utils.average_gradients(self.parameters)
        self.precision.step(self.optimizer)
        return metrics

    def _forward_backward(self, images, labels):
        with self.precision.autocast():
            loss, metrics = self.loss_fn(images, labels)
        self.precision.scaler.scale(loss).backward()
        return {**{name: value.detach() for name, value in metrics.items()}, 'loss': loss.detach()}

    def _capture(self, images, labels):
        require_cuda(images, 'TrainStep(cuda_graph=True)')
        self.static_images, self.static_labels = images.clone(), labels.clone()
        buffers = [(buffer, buffer.clone()) for buffer in self.model.buffers()]

        def warm_up():
            self.optimizer.zero_grad(set_to_none=True)
            self._forward_backward(self.static_images, self.static_labels)
        stream = on_side_stream(warm_up, 3)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients it writes
        self.graph = torch.cuda.CUDAGraph()
        with capturing(self.graph, stream):
            self.static_metrics = self._forward_backward(self.static_images, self.static_labels)


def require_cuda(batch, capturer):
    """A CUDA graph captures work on a CUDA device only: a batch elsewhere is refused before any warm-up pass."""
    if batch.device.type != 'cuda':
        raise ValueError(f"{capturer} captures a CUDA graph: its batches must be on a CUDA device, not {batch.device}")


class CapturedForward:
    """`model(x)` without gradients, replayed from a CUDA graph captured on the first batch; batches of another
    shape run eagerly.  The outputs of a replay are overwritten by the next one.  Capture it after the model
    enters eval mode: that folds its frozen layers into the tensors the graph reads."""

    def __init__(self, model):
        self.model, self.graph = model, None

    @torch.no_grad()
    def __call__(self, x):
        if self.graph is None:
            require_cuda(x, 'CapturedForward')
            self.static_input = x.clone()
            stream = on_side_stream(lambda: self.model(self.static_input), 2)
            self.graph = torch.cuda.CUDAGraph()
            with capturing(self.graph, stream):
                self.static_output = self.model(self.static_input)
        if x.shape != self.static_input.shape:
            return self.model(x)
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output


@torch.no_grad()
def evaluate(model, loader, device, desc='eval', cuda_graph=False):
    """Top-1 accuracy (%) of `model` (which returns (logits, ...)) over `loader` (under torchrun, over every
    process's share); with `cuda_graph`, its forward replayed from a CUDA graph (`CapturedForward`)."""
    model.eval()
    forward = CapturedForward(model) if cuda_graph else model
    counts = torch.zeros(2, dtype=torch.long, device=device)  # correct, total; on the device: no wait per batch
    for images, labels in utils.progress(loader, desc=desc):
        logits = forward(images.to(device, non_blocking=True))[0]
        counts[0] += (logits.argmax(1) == labels.to(device, non_blocking=True)).sum()
        counts[1] += labels.numel()
    correct, total = utils.all_reduce_sum(counts).tolist()
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def predict(model, loader, device):
    """Predicted label indices for every sample of `loader`, in order."""
    model.eval()
    return torch.cat([model(images.to(device))[0].argmax(1).cpu() for images, _ in loader]).tolist()


def fused_available(params):
    """Whether PyTorch has fused (one kernel per step) optimizers for `params`' devices, which beat the
    per-tensor loop on a student's many small tensors."""
    return all(p.device.type in ('cpu', 'cuda') for p in params)


def make_optimizer(param_groups, args, steps_per_epoch):
    """The optimizer and its lr schedule (stepped after every iteration): a linear warm-up over
    --warmup-epochs, then x0.1 every --lr-decay-epochs ('step') or a cosine decay to 0 ('cosine')."""
    param_groups = list(param_groups)
    fused = fused_available([p for g in param_groups for p in (g['params'] if isinstance(g, dict) else [g])])
    if args.optimizer == 'adam':
        optimizer = torch.optim.Adam(param_groups, lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    elif args.optimizer == 'adamw':
        optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    else:
        optimizer = torch.optim.SGD(param_groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                    fused=fused)
    total = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)

    def lr_factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if args.lr_schedule == 'cosine':
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        return 0.1 ** (step // (args.lr_decay_epochs * steps_per_epoch))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def fit(args, model, optimizer, scheduler, train_loader, test_loader, device, train_step, model_state,
        resume_from, logger, precision, extra_checkpoint=None):
    """The epoch loop shared by teacher and student: train, evaluate, log a metrics line, checkpoint.

    `train_step(images, labels)` (a `TrainStep`) returns a dict of 0-d tensors (at least 'loss' and
    'correct'), read back in one transfer per step;
    `model_state()` gives what the checkpoint stores of the model.  Resumption restores the model
    (by the caller), optimizer, schedule, gradient scale (`precision`) and every RNG, so it ends where
    an uninterrupted run would.
    """
    metrics = utils.MetricsLog(os.path.join(args.model_dir, 'metrics.jsonl'))
    main_process = utils.is_main_process()
    start_epoch = 0
    if resume_from is not None:
        optimizer.load_state_dict(resume_from['optimizer'])
        scheduler.load_state_dict(resume_from['scheduler'])
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group['lr'] = base_lr * factor(scheduler.last_epoch)  # the schedule of this run's --epochs, changed or not
        if resume_from.get('scaler'):  # empty without --amp
            precision.scaler.load_state_dict(resume_from['scaler'])
        utils.set_rng_state(resume_from['rng'])
        train_loader.sampler.generator.set_state(resume_from['loader_rng'])
        start_epoch = resume_from['epoch'] + 1
        if main_process:
            metrics.truncate_after(resume_from['epoch'])
        logger.info(f"resuming from epoch {start_epoch}")
    accuracy = resume_from.get('accuracy') if resume_from else None
    for epoch in range(start_epoch, args.epochs):
        model.train()
        start = time.time()
        sums, seen = {}, 0
        lr = optimizer.param_groups[0]['lr']
        for step, (images, labels) in enumerate(utils.progress(train_loader, desc=f'epoch {epoch}')):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            out = train_step(images, labels)  # under torchrun: 'correct' summed over the processes, the rest averaged
            values = utils.all_reduce_sum(torch.stack([value.float() for value in out.values()])).tolist()
            out = {key: value if key == 'correct' else value / utils.world_size() for key, value in zip(out, values)}
            if not math.isfinite(out['loss']):
                if resume_from is None and epoch == step == 0:
                    raise UserError(f"the loss is {out['loss']} on the first batch, before any update: the network "
                                    "the run starts from (its weights) or the data give it, not --lr")
                raise UserError(f"training diverged at epoch {epoch}, step {step} (loss {out['loss']}); lower --lr "
                                f"(the last good checkpoint in {args.model_dir}, if any, is kept)")
            scheduler.step()
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value * (len(labels) * utils.world_size() if key != 'correct' else 1)
            seen += len(labels) * utils.world_size()
        train_time = time.time() - start
        state = model_state()
        diverged = utils.first_non_finite(state)
        if diverged:  # the epoch's last step made the weights non-finite (after any other, the loss would be)
            raise UserError(f"training diverged at epoch {epoch}, step {step} (its last): {diverged} became "
                            f"non-finite; lower --lr (the last good checkpoint in {args.model_dir}, if any, is kept)")
        accuracy = evaluate(model, test_loader, device, cuda_graph=args.cuda_graph)
        record = {key: value / seen for key, value in sums.items() if key != 'correct'}
        record.update(epoch=epoch, train_acc=100.0 * sums.get('correct', 0) / max(seen, 1), test_acc=accuracy,
                      lr=lr, epoch_time=train_time)
        logger.info(' '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        checkpoint = {'model': state, 'optimizer': optimizer.state_dict(),
                      'scheduler': scheduler.state_dict(), 'scaler': precision.scaler.state_dict(),
                      'epoch': epoch, 'rng': utils.rng_state(),
                      'loader_rng': train_loader.sampler.generator.get_state(), 'args': vars(args),
                      'accuracy': accuracy, 'finished': epoch + 1 == args.epochs}
        checkpoint.update(extra_checkpoint or {})
        try:
            if main_process:  # the metrics first: --resume drops those of epochs after its checkpoint's
                metrics.write(**record)
                utils.atomic_save(checkpoint, checkpoint_path(args.model_dir))
        except OSError as error:  # a full disk, a vanished folder: the previous checkpoint is intact
            raise UserError(f"cannot save epoch {epoch} in {args.model_dir}: {error.strerror or error}; the previous "
                            "checkpoint, if any, is kept") from None
    utils.barrier()  # under torchrun: what runs next in any process reads the run as saved
    return accuracy


def load_teacher(path, device, num_classes=None, arch=None, task=None, args=None, unfinished=False):
    """A trained teacher from its checkpoint (or its run directory), checked against the expected class count,
    arch and task (and the class names of a folder task in `args`), and finished unless `unfinished` (--evaluate
    takes one); in eval mode with its weights frozen and folded (`fast.freeze`): it is fixed while the student
    trains."""
    path = run_file(path)
    checkpoint = utils.load_checkpoint(path, 'teacher checkpoint')
    if run_kind(checkpoint) != 'teacher':
        but = " but a student's" if run_kind(checkpoint) == 'student' else \
            ": name a teacher's run directory or its checkpoint.pth"
        raise UserError(f"{path} is not a teacher checkpoint written by main_teacher.py{but}")
    if not (unfinished or checkpoint.get('finished')):
        raise UserError(f"teacher {path} is an unfinished run ({epochs_done(checkpoint)}): finish it with --resume "
                        "first")
    saved, classes = checkpoint['args'], checkpoint['num_classes']
    if arch is not None and saved['arch'] != arch:
        raise UserError(f"teacher {path} is a {saved['arch']}, the student needs a {arch} teacher (--backbone)")
    if num_classes is not None and classes != num_classes:
        raise UserError(f"teacher {path} predicts {classes} classes ({saved['task']}), this task has "
                        f"{num_classes}: wrong --teacher-fn?")
    if task is not None and saved['task'] != task:
        raise UserError(f"teacher {path} was trained on {saved['task']}, the student's task is {task}: "
                        "wrong --teacher-fn?")
    if args is not None:
        check_decathlon_kind(saved, args, f"teacher {path}", 'wrong --teacher-fn?')
        check_data(saved, vars(args), args, f"teacher {path}", 'wrong --teacher-fn or --data-dir?')
    utils.check_finite(checkpoint['model'], f'teacher checkpoint {path}')
    model = create_teacher(saved['arch'], classes)
    model.load_state_dict(checkpoint['model'])
    return frozen_teacher(model).to(device), checkpoint


def frozen_teacher(model):
    """`model` as the student's teacher runs: in eval mode, its weights frozen and folded (`fast.freeze`)."""
    model.eval().requires_grad_(False)
    fast.freeze(model)
    return model


def missing_weights(weights, model_dir):
    """The refusal when the universal weights file `weights` the run in `model_dir` recorded is gone."""
    return UserError(f"the universal weights {weights} that {model_dir} was trained on are missing: put them back, "
                     "or pass --pretrained with the file where it is now")


def load_student(model_dir, device, pretrained=None):
    """A trained student rebuilt from its run directory (its args.json-recorded setup + task pack), on the
    universal weights it recorded or, given `pretrained` (a --pretrained value), on those: the same file moved, or
    a local copy of the ImageNet weights offline.  Either way they must be the weights it was trained on (the
    fingerprint it recorded)."""
    run = checkpoint_path(model_dir)
    checkpoint = utils.load_checkpoint(run, 'student checkpoint')
    if run_kind(checkpoint) != 'student':
        but = " but a teacher's (main_teacher.py --evaluate)" if run_kind(checkpoint) == 'teacher' else \
            ": name a student's run directory"
        raise UserError(f"{run} is not a student checkpoint written by main_student.py{but}")
    saved, pack = checkpoint['args'], checkpoint['model']
    meta = pack['meta']
    if saved['pretrained'] is None and 'universal' not in pack:
        raise UserError(f"{run} was trained on random universal weights that it does not hold "
                        "(written by an older version): train it again")
    if saved['pretrained'] is None and pretrained not in (None, 'none'):
        raise UserError(f"{run} was trained on random universal weights, which it holds: drop --pretrained "
                        f"{pretrained}")
    weights = (saved['pretrained'] if pretrained is None else None if pretrained == 'none'
               else weights_location(pretrained))
    if weights is None and 'universal' not in pack:
        raise UserError(f"{run} was trained on the universal weights {saved['pretrained']}, which it does not hold: "
                        "--pretrained none cannot rebuild it; name the weights file")
    if weights not in (None, 'imagenet') and not os.path.isfile(weights):
        raise UserError(f"--pretrained {weights}: no such file") if pretrained is not None else \
            missing_weights(weights, model_dir)
    student = create_student(saved['backbone'], meta['num_classes'], saved['max_skip'], weights,
                             saved['input_size'], task_bn_stats=meta.get('task_bn_stats', False))
    attach_run_state(student, pack, run, weights)
    return student.to(device), checkpoint


def fingerprint(named_tensors):
    """SHA-256 of (name, tensor) pairs: names the weights a run was trained with."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def teacher_fingerprint(checkpoint):
    """The `fingerprint` of a teacher checkpoint's weights: a student records its teacher's."""
    return fingerprint(checkpoint['model'].items())


def student_fingerprint(checkpoint):
    """The `fingerprint` of a student checkpoint's task pack, what it learnt (a student trained again has
    another): a pruned run records its full student's."""
    return fingerprint(sorted(checkpoint['model']['state'].items()))


def universal_fingerprint(student):
    """The `fingerprint` of the universal blocks' frozen parameters (not their BatchNorm statistics, buffers that
    may be the task's): names the universal weights a student was trained on."""
    return fingerprint((name, tensor) for name, tensor in student.backbone.named_parameters()
                       if not name.startswith(student.backbone.head_prefixes))


def check_source(source, path, sha256, recorded, trained, fix):
    """The `source` run (a teacher, a full student) in `path`, of fingerprint `sha256`, must be the one a run
    recorded (None: none recorded): one replaced since (trained again with --force, say) would silently change
    what the student imitates or was pruned from.  `trained` names what it trained, `fix` says what to do."""
    if recorded is not None and recorded != sha256:
        raise UserError(f"the {source} {path} is not the one {trained} was trained with (replaced since): {fix}")


def run_state(student, pretrained, fingerprint):
    """What a student checkpoint stores: the task pack, the `universal_fingerprint` of the universal weights
    and, when those come from no file (--pretrained none), the weights too, or the run could not be rebuilt."""
    pack = student.task_pack()
    pack['universal_sha256'] = fingerprint
    if pretrained is None:
        pack['universal'] = {k: v.detach().clone() for k, v in student.backbone.state_dict().items()
                             if not k.startswith(student.backbone.head_prefixes)}
    return pack


def attach_run_state(student, pack, source, pretrained):
    """The universal weights a checkpoint holds (see `run_state`), checked against the fingerprint it recorded
    (a universal weights file `pretrained` replaced since would silently change every result), then its task
    pack."""
    if 'universal' in pack:
        utils.check_finite(pack['universal'], f'checkpoint {source}')
        student.backbone.load_state_dict(pack['universal'], strict=False)
    recorded = pack.get('universal_sha256')  # absent from checkpoints written before fingerprints
    if recorded is not None and recorded != universal_fingerprint(student):
        raise UserError(f"the universal weights {pretrained} are not those {source} was trained on (another file, "
                        "or changed since): give it the file it was trained on (--pretrained)")
    student.load_task_pack(pack, source)


def param_groups(student, weight_decay):
    """Task-specific parameters; gates get no weight decay."""
    others = [p for n, p in student.named_parameters() if p.requires_grad and n != 'gate_logits']
    return [{'params': others, 'weight_decay': weight_decay}, {'params': [student.gate_logits], 'weight_decay': 0.0}]
