"""Shared helpers for the training scripts: errors, logging, checkpoints, seeding, devices, several processes."""
import argparse
import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, wrong checkpoint): printed as one line."""


def user_error_line(exc):
    """The one-line message of a UserError, also when a DataLoader worker re-raised it with a traceback."""
    text = str(exc).strip()
    marker = 'UserError: '
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.splitlines()[-1] if text else exc.__class__.__name__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help that shows a flag's default unless it is None or False, or the help text already states it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or 'default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


def run_cli(main, parser, argv=None):
    """Parse arguments and run `main`; a UserError becomes one line on stderr and exit status 1, Ctrl-C one line
    and exit status 130."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        how = ("a training run continues from its last finished epoch with --resume (one stopped in its first epoch: "
               "run it again)" if hasattr(args, 'resume') else
               "run the command again (the demos and experiments.py keep their finished runs and resume the one "
               "interrupted)")
        print(f"error: interrupted; {how}", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        print(f"error: {user_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # a UserError raised inside a DataLoader worker arrives re-wrapped
        if 'UserError' not in str(e):
            raise
        print(f"error: {user_error_line(e)}", file=sys.stderr)
        sys.exit(1)


def run_script(main):
    """Run a script's `main()`; a UserError becomes `error: <line>` on stderr and exit status 1."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {user_error_line(e)}")


_run_dir_locks = {}


def lock_run_dir(model_dir):
    """Hold an exclusive lock on <model_dir>/.lock until this process ends: a second process that would write
    the same run directory (and interleave its metrics) stops at once instead."""
    import fcntl
    path = os.path.abspath(os.path.join(model_dir, '.lock'))
    if path in _run_dir_locks:
        return
    handle = open(path, 'a')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"another process is writing {model_dir}; wait for it to end, or write this run to another "
                        "folder") from None
    _run_dir_locks[path] = handle


def atomic_write(path, write, suffix=''):
    """`write(tmp)` to a temporary file in path's folder, then a rename: never a half-written `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode open() would give, not mkstemp's owner-only one
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def writing(what, fix=''):
    """Turns an OSError of the writes inside (a full disk, a folder one cannot write) into one line: 'cannot write
    <what>: <reason><fix>'."""
    try:
        yield
    except OSError as error:
        raise UserError(f"cannot write {what}: {error.strerror or error}{fix}") from None


def remove_interrupted_writes(folder, suffixes=('',)):
    """Remove the temporary files (ending in one of `suffixes`) that `atomic_write` left in `folder` when it was
    killed mid-write."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith('.tmp-') and name.endswith(suffixes):
            os.remove(os.path.join(folder, name))


def atomic_save(obj, path):
    """torch.save, atomically; a failed write (a full disk) raises OSError, as other writes do."""
    def save(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError as error:  # PyTorch's writer reports a short write as a RuntimeError
            raise OSError(f"the write failed; is the disk full? ({error_reason(error)})") from None
    atomic_write(path, save, suffix='.pth')


def atomic_write_text(text, path):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(obj, path):
    atomic_write_text(json.dumps(obj), path)


def require_http_url(url, flag):
    if not url.startswith(('http://', 'https://')):
        raise UserError(f"{flag} must be an http(s) URL, got {url!r}")


def check_reachable(url, hint, timeout=5):
    """Fail at once, with one line ending in `hint`, when the host of `url` cannot be reached (offline)."""
    import socket
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == 'https' else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise UserError(f"cannot reach {parts.hostname} ({error}): {hint}") from None


def first_non_finite(state, prefix=''):
    """The name of the first floating-point tensor of a (nested) state dict holding NaN or inf, else None."""
    for key, value in state.items():
        if isinstance(value, dict):
            found = first_non_finite(value, f'{prefix}{key}.')
            if found:
                return found
        elif torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return prefix + key
    return None


def check_finite(state, source, fix="the run that wrote it diverged; train it again with a lower --lr"):
    """A one-line error when `state` (a model's state dict or task pack, read from `source`) holds non-finite
    values."""
    name = first_non_finite(state)
    if name is not None:
        raise UserError(f"{source} holds non-finite values ({name}): {fix}")


def require_folder(path, flag):
    """A flag naming a folder (created when missing) must name one, and not a file, that can be written."""
    if not path:
        raise UserError(f"{flag} needs the folder to write to")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file: name a folder")
    _require_writable_place(path, path, flag)


def require_file_path(path, flag):
    """A flag naming a file to write must name neither a folder nor a path under a file, in a folder that can be
    written."""
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UserError(f"{flag} {path} names a folder: name the file to write")
    _require_writable_place(os.path.dirname(os.path.abspath(path)), path, flag)


def _require_writable_place(folder, path, flag):
    """`folder` (where `flag` `path` will be written), or the nearest existing folder above it, is a folder in
    which files can be created."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path} lies under {folder}, which is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {folder} cannot be written; choose a folder you can write")


def error_reason(error):
    """The first line of an exception's message, or its type when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__


def load_checkpoint(path, what='checkpoint', fix="restore it, or train its run again with --force"):
    """torch.load(weights_only=True) with a one-line error for a missing or unreadable file; an unreadable one's
    ends with `fix` (the default suits a run's checkpoint.pth; None: the caller's message says it)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        text = str(e)
        if 'Unsupported global' in text:  # PyTorch suggests weights_only=False: unsafe for a file one does not trust
            reason = ("it holds Python objects besides tensors, which are not loaded for safety (never load a file "
                      "you do not trust with weights_only=False)")
        elif 'weights_only' in text:  # any other refusal of the tensors-only unpickler
            reason = "not a PyTorch file"
        else:
            reason = f"truncated or not a PyTorch file ({error_reason(e).split('. ')[0]})"  # torch's 1st sentence
        raise UserError(f"{what} {path} is unreadable: {reason}" + (f"; {fix}" if fix else '')) from None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG state a training run draws from, for exact resumption."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def parse_device(name):
    """--device as a torch.device (None for 'auto'), refused in one line unless auto, cpu or cuda[:N]; what it
    names need not be here (submit.py checks its jobs' flags on a machine without their GPUs)."""
    if name == 'auto':
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):  # the devices this code runs on
        raise UserError(f"invalid --device {name!r}; use auto, cpu or cuda[:N]")
    return device


def resolve_device(name):
    """'auto' picks CUDA when present; anything else is passed to torch.device, with a clear error."""
    device = parse_device(name)
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return device


# ----- several processes: torchrun, or a submitit job with several tasks (submit.py) -----
def init_distributed(device_name):
    """This process's device; under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment) it first joins
    the process group, once: NCCL with CUDA, each process on GPU LOCAL_RANK, and gloo on CPUs."""
    device = resolve_device(device_name)
    if 'RANK' not in os.environ:
        return device
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return device


def require_one_process(command):
    """`command` (--export, --summary) runs in one process: under torchrun with several, each would do it all,
    writing the same files."""
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UserError(f"{command} runs in one process: run it without torchrun")


def print_once(*lines):
    """print(), from the main process only: under torchrun every process runs the same command (rank 0 also
    before the processes join their group)."""
    if is_main_process() and os.environ.get('RANK', '0') == '0':
        print(*lines, sep='\n')


def processes_text():
    """', N processes' under torchrun with several, for the scripts' first log line; else ''."""
    return f", {world_size()} processes" if world_size() > 1 else ''


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if world_size() > 1 else 0


def is_main_process():
    """The process that writes run directories, logs and figures (rank 0)."""
    return rank() == 0


def barrier():
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor):
    """The sum of `tensor` over the processes (itself with one)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def average_gradients(parameters):
    """Each gradient replaced by its mean over the processes, in one collective: what DistributedDataParallel
    computes, done after the backward pass so that a captured CUDA graph can hold the whole backward."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce(sum) whose gradient is the all_reduce(sum) of the output's gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def synced_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps):
    """F.batch_norm in training over the whole batch of every process: the statistics (and their gradients)
    are those one process with the concatenated batch would compute, and the running averages are updated
    with them, the same on every process."""
    all_reduce = _SumOverProcesses.apply
    dims = [0, *range(2, x.dim())]  # every dimension but the channels'
    shape = (1, -1) + (1,) * (x.dim() - 2)
    count = x.numel() // x.shape[1] * world_size()
    mean = all_reduce(x.sum(dims)) / count
    centred = x - mean.view(shape)
    var = all_reduce(centred.square().sum(dims)) / count
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.detach() * count / max(count - 1, 1), alpha=momentum)
    scale = torch.rsqrt(var + eps) if weight is None else weight * torch.rsqrt(var + eps)
    out = centred * scale.view(shape)
    return out if bias is None else out + bias.view(shape)


def setup_logging(model_dir=None, log2file=False):
    """Log to stdout and, with `log2file`, also to <model_dir>/log.txt; other processes than the main one log
    only warnings."""
    logger = logging.getLogger('nettailor')
    logger.handlers.clear()
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S')
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log2file and model_dir:
        handler = logging.FileHandler(os.path.join(model_dir, 'log.txt'))
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


class MetricsLog:
    """Appends one JSON object per line to <model_dir>/metrics.jsonl."""

    def __init__(self, path):
        self.path = path

    def write(self, **record):
        record.setdefault('time', time.time())
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')

    def truncate_after(self, epoch):
        """Drop records past `epoch` (a resumed run rewrites them), and a line torn by a failed write."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get('epoch', -1) <= epoch:
                    kept.append(line.rstrip('\n') + '\n')
        atomic_write_text(''.join(kept), self.path)


def progress(iterable, **kwargs):
    """tqdm progress bar, silent when stdout is not a terminal."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not sys.stdout.isatty() or not is_main_process(), leave=False, dynamic_ncols=True,
                **kwargs)
