"""NetTailor on Wide ResNet-26 for the Visual Decathlon.

All the machinery (proxies, gates, complexity, distillation, pruning, stats, task packs) is
`nettailor.NetTailor`; only the backbone layout, in `wide_resnet.py`, is new.  The task head here
is the final BatchNorm plus the linear classifier, so each task keeps its own normalisation.
"""
from nettailor import NetTailor
from resnet import create_teacher

DEFAULT_WEIGHTS = 'checkpoints/wide_resnet26.pth.tar'


def create_student(num_classes, max_skip=3, pretrained=None, input_size=64):
    """A NetTailor student on Wide ResNet-26; `pretrained` is None or a universal weights file."""
    return NetTailor(create_teacher('wide_resnet26', num_classes, pretrained), max_skip, input_size)
