"""The backbones NetTailor tailors, by name: torchvision-compatible ResNets and the decathlon's Wide ResNet-26,
and their pre-trained weights."""
import torch

from resnet import ARCHS as RESNET_ARCHS, ResNet
import utils
from utils import UserError
from wide_resnet import BLOCKS_PER_STAGE, STAGE_CHANNELS, WideResNet

ARCHS = (*RESNET_ARCHS, 'wide_resnet26')


def read_state_dict(path, what='pre-trained weights'):
    """Load a state dict from a local file (plain, or wrapped under 'state_dict' / 'model')."""
    state = utils.load_checkpoint(path, what, fix="replace it with a good copy, or name another file with --pretrained")
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state


def load_backbone_weights(model, pretrained):
    """Fill everything but the final classifier from `pretrained` ('imagenet' or a local file)."""
    if pretrained is None:
        return model
    if pretrained == 'imagenet':
        if not hasattr(model, 'imagenet_weights'):
            raise UserError(f"torchvision has no ImageNet weights for {model.arch}; pass its weights file "
                            "with --pretrained (checkpoints/download_models.py fetches the released one)")
        state = model.imagenet_weights()
    else:
        state = read_state_dict(pretrained)
        utils.check_finite(state, f"pre-trained weights {pretrained}", "name another weights file")
    classifier = model.head_prefixes[-1] + '.'
    own = model.state_dict()
    state = {k.removeprefix('module.'): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    expected = [k for k in own if not k.startswith(classifier)]
    missing = [k for k in expected if k not in state and not k.endswith('num_batches_tracked')]  # pre-0.4.1 files
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in expected if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        problem = (f"missing {missing[:3]}" if missing else
                   f"unexpected {unexpected[:3]}" if unexpected else f"wrong shape for {wrong_shape[:3]}")
        raise UserError(f"pre-trained weights {pretrained} do not fit {model.arch}: {problem}")
    model.load_state_dict(state, strict=False)
    return model


def num_blocks(arch):
    """How many residual blocks (NetTailor's universal layers) architecture `arch` has."""
    if arch == 'wide_resnet26':
        return len(STAGE_CHANNELS) * BLOCKS_PER_STAGE
    return sum(RESNET_ARCHS[arch][1])


def check_input_size(network, input_size):
    """A one-line error when `network` cannot take input_size x input_size images (its shapes do not add up)."""
    was_training = network.training
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, 3, input_size, input_size))
    except RuntimeError:
        raise UserError(f"{network.arch} cannot take {input_size}x{input_size} inputs: choose another "
                        "--input-size (the decathlon's 64 or 72, ImageNet's 224)") from None
    finally:
        network.train(was_training)


def create_teacher(arch, num_classes, pretrained=None):
    """A network of architecture `arch` (one of ARCHS) for `num_classes`, the teacher NetTailor starts from.

    `pretrained` is None (random), 'imagenet' (torchvision's weights) or a local state-dict file."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}")
    model = WideResNet(num_classes) if arch == 'wide_resnet26' else ResNet(arch, num_classes)
    return load_backbone_weights(model, pretrained)
