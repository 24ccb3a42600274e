"""NetTailor on Wide ResNet-26 for the Visual Decathlon, and the authors' released decathlon models.

All the machinery (proxies, gates, complexity, distillation, pruning, stats, task packs) is
`nettailor.NetTailor`; only the backbone layout, in `wide_resnet.py`, is new.  The task head here
is the final BatchNorm plus the linear classifier, so each task keeps its own normalisation.
`pack_from_released` turns a task checkpoint of the released code into a task pack.
"""
import os

import torch

from decathlon_dataloaders import DECATHLON_TASKS
from nettailor import GATE_INIT_PROXY, NetTailor
from backbones import create_teacher
from utils import UserError, load_checkpoint
from wide_resnet import BLOCKS_PER_STAGE, STAGE_CHANNELS

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'checkpoints', 'wide_resnet26.pth.tar')
NUM_LAYERS = len(STAGE_CHANNELS) * BLOCKS_PER_STAGE
STATISTICS = ('running_mean', 'running_var', 'num_batches_tracked')
BATCHNORM = ('weight', 'bias') + STATISTICS


def create_student(num_classes, max_skip=3, pretrained=None, input_size=64, task_bn_stats=True):
    """A NetTailor student on Wide ResNet-26; `pretrained` is None or a universal weights file."""
    return NetTailor(create_teacher('wide_resnet26', num_classes, pretrained), max_skip, input_size, task_bn_stats)


def pack_from_released(checkpoint, source='released checkpoint'):
    """This project's task pack from a task checkpoint of the authors' released code.

    A released checkpoint is {'state_dict', 'keep_flags', 'epoch', 'acc', 'xent'} holding only task-specific
    tensors: layer l's gate logits `layers.{l}.alphas_params` (index 0 its universal block, 1 + k its proxy k,
    which reads the k-th nearest earlier node), its proxies `layers.{l}.proxies.{k}.{conv,bn}.*`, the running
    statistics of its universal block `layers.{l}.main.{bn1,bn2}.*` and of the stem `bn1.*`, `ends_bn.*` and
    `classifier.*`; `keep_flags[l][i]` is False for a pruned path.  Here a layer's proxies run from the
    oldest source node to the nearest, so their order is reversed.
    """
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict) \
            or not isinstance(checkpoint.get('keep_flags'), (list, tuple)):
        raise UserError(f"{source} is not a released NetTailor task checkpoint (it has no 'state_dict' and "
                        "'keep_flags')")
    released = {key.removeprefix('module.'): value for key, value in checkpoint['state_dict'].items()}
    keep = [[bool(flag) for flag in row] for row in checkpoint['keep_flags']]
    max_skip = max(len(row) for row in keep) - 1 if keep else 0
    if [len(row) for row in keep] != [1 + min(l + 1, max_skip) for l in range(NUM_LAYERS)] or max_skip < 1:
        raise UserError(f"{source}: its keep_flags do not describe a Wide ResNet-26 student (a universal block "
                        f"and up to max_skip proxies for each of {NUM_LAYERS} layers)")

    def take(key, wanted=True):
        """The released tensor `key`, removed from what is left to map; it must exist when `wanted` (but for
        BatchNorm counters, which PyTorch before 0.4.1 did not write and evaluation never reads: 0)."""
        if wanted and key not in released and key.endswith('num_batches_tracked'):
            return torch.tensor(0)
        if wanted and key not in released:
            raise UserError(f"{source} lacks {key}: not a complete released task checkpoint")
        return released.pop(key, None)

    state = {}
    gate_logits = torch.full((NUM_LAYERS, 1 + max_skip), GATE_INIT_PROXY)
    path_alive = torch.zeros(NUM_LAYERS, 1 + max_skip, dtype=torch.bool)
    for l, flags in enumerate(keep):
        num_proxies = len(flags) - 1
        released_index = [0] + [1 + num_proxies - j for j in range(1, num_proxies + 1)]  # of our path j
        gate_logits[l, :len(flags)] = take(f'layers.{l}.alphas_params')[released_index]
        path_alive[l, :len(flags)] = torch.tensor([flags[i] for i in released_index])
        for j in range(1, num_proxies + 1):
            kept, k = flags[released_index[j]], released_index[j] - 1
            for theirs, ours, keys in (('conv', 'body.0', ('weight',)), ('bn', 'body.1', BATCHNORM)):
                for key in keys:
                    tensor = take(f'layers.{l}.proxies.{k}.{theirs}.{key}', wanted=kept)
                    if kept:
                        state[f'proxies.{l}.{j - 1}.{ours}.{key}'] = tensor
        for bn in ('bn1', 'bn2'):
            for key in STATISTICS:
                tensor = take(f'layers.{l}.main.{bn}.{key}', wanted=flags[0])
                if flags[0]:
                    state[f'backbone.layers.{l}.{bn}.{key}'] = tensor
    for key in STATISTICS:
        state[f'backbone.bn1.{key}'] = take(f'bn1.{key}')
    for key in BATCHNORM:
        state[f'backbone.ends_bn.{key}'] = take(f'ends_bn.{key}')
    for key in ('weight', 'bias'):
        state[f'backbone.linear.{key}'] = take(f'classifier.{key}')
    if released:
        unexpected = ', '.join(sorted(released)[:3])
        raise UserError(f"{source} holds tensors a released task checkpoint does not: {unexpected}")
    state['gate_logits'], state['path_alive'] = gate_logits, path_alive
    meta = {'arch': 'wide_resnet26', 'num_classes': state['backbone.linear.weight'].shape[0], 'max_skip': max_skip,
            'num_layers': NUM_LAYERS, 'task_bn_stats': True}
    return {'meta': meta, 'state': state}


def released_task_checkpoints(folder):
    """{task: path} of the released task checkpoints (`*.pth.tar`) under `folder`: the task is the decathlon task
    a folder or the file of the path is named after (svhn/checkpoint.pth.tar, vgg-flowers.pth.tar, ...)."""
    found = {}
    for path, _, names in sorted(os.walk(folder)):
        for name in sorted(n for n in names if n.endswith('.pth.tar')):
            parts = os.path.relpath(os.path.join(path, name.removesuffix('.pth.tar')), folder).split(os.sep)
            tasks = [task for task in DECATHLON_TASKS if task in parts]
            if len(tasks) == 1:
                if tasks[0] in found:
                    raise UserError(f"two released checkpoints for {tasks[0]} under {folder}: {found[tasks[0]]} and "
                                    f"{os.path.join(path, name)}; keep one")
                found[tasks[0]] = os.path.join(path, name)
    return found


def load_released_pack(path):
    """The task pack of a released task checkpoint file, checked by attaching it to a Wide ResNet-26 student (it
    refuses wrong shapes, NaNs and a mask that leaves no network to run)."""
    released = load_checkpoint(path, 'released task checkpoint',
                               fix="remove it and fetch it again: python checkpoints/download_models.py")
    pack = pack_from_released(released, source=path)
    meta = pack['meta']
    create_student(meta['num_classes'], meta['max_skip']).load_task_pack(pack, source=path)
    return pack
