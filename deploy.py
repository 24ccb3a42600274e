"""A trained NetTailor student as a plain network to deploy, saved with torch.export (.pt2) and as ONNX.

    python main_student.py --model-dir checkpoints/svhn/pruned --export deploy/svhn
    # deploy/svhn/tailored.pt2:  torch.export.load(path).module()(images) -> logits
    # deploy/svhn/tailored.onnx: onnxruntime.InferenceSession(path).run(None, {'images': images})

Both files carry, as JSON, the preprocessing of the task's test images (`preprocessing_steps`) and, for a
folder task (`--task folder:<name>`), the class names, logit i the i-th: `preprocessing.json` and
`classes.json` of the .pt2 (`torch.export.load(path, extra_files={'preprocessing.json': ''})`) and the
ONNX file's metadata `preprocessing` and `classes` (`InferenceSession(path).get_modelmeta().custom_metadata_map`).

`TailoredNetwork` computes what the student computes in eval mode, reduced to what that needs: the
surviving paths only, every convolution + BatchNorm pair one convolution (with the task's own statistics
where it learned them), and each layer's proxies one convolution over their stacked inputs with the gates
folded in (bottleneck proxies: their first convolutions, then one convolution for all of them).  The
files need neither this repository's code nor the universal checkpoint.
"""
import copy
import io
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
import utils
from nettailor import pooled_source
from utils import UserError


def conv_with(weight, bias, like=None):
    """An nn.Conv2d holding `weight` and `bias` (on their device, in their dtype), with the stride, padding,
    dilation and groups of `like` (a conv) or a plain 1x1 convolution's."""
    settings = (like.stride, like.padding, like.dilation, like.groups) if like is not None else (1, 0, 1, 1)
    conv = nn.Conv2d(weight.shape[1] * settings[3], weight.shape[0], weight.shape[2:], *settings, bias=True,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def folded_conv(conv, bn, scale=1.0):
    """One convolution (with bias) equal to `scale` * bn(conv(x)), bn in eval mode."""
    weight, bias = fast.fold_bn(conv, bn)
    return conv_with(scale * weight, scale * bias, like=conv)


def replace_module(root, old, new):
    """Put `new` wherever `root` holds `old`."""
    for module in root.modules():
        for name, child in module.named_children():
            if child is old:
                setattr(module, name, new)


class TailoredLayer(nn.Module):
    """Layer l of a student in eval mode: relu(gate * universal block + sum of gated proxies), its surviving
    paths only.  Proxy input i reads node `sources[i]`, max-pooled by `pools[i]` (stride `strides[i]`)."""

    def __init__(self, student, l, block):
        super().__init__()
        gates = student.gates().detach()[l]
        proxy_paths = [j for j in student._alive_paths[l] if j > 0]
        proxies = [student.proxies[l][j - 1] for j in proxy_paths]
        proxy_gates = [gates[j] for j in proxy_paths]
        self.block = block
        self.gated_after_relu = student.backbone.gated_after_relu
        self.register_buffer('universal_gate', gates[0].clone() if block is not None else None)
        self.sources = [student.proxy_sources[l][j - 1] for j in proxy_paths]
        self.strides = [proxy.stride for proxy in proxies]
        self.pools = nn.ModuleList(copy.deepcopy(proxy.pool) for proxy in proxies)
        self.hidden = None  # bottleneck proxies: their first conv + BN, one per proxy
        self.proxy_conv = None  # every proxy's (last) conv + BN times its gate, over the stacked inputs
        if proxies and student.backbone.block_kind == 'basic':
            weight, bias = fast.fold_proxies(proxies, proxy_gates)
        elif proxies:  # conv, BN, ReLU, conv, BN
            self.hidden = nn.ModuleList(folded_conv(*proxy.body[:2]) for proxy in proxies)
            last = [folded_conv(*proxy.body[3:], scale=gate) for proxy, gate in zip(proxies, proxy_gates)]
            weight, bias = torch.cat([conv.weight for conv in last], dim=1), sum(conv.bias for conv in last)
        if proxies:
            self.proxy_conv = conv_with(weight, bias)

    def forward(self, nodes, pooled):
        """Node l+1 from `nodes`, every node so far; `pooled` caches each (node, stride) across layers."""
        total = None
        if self.proxy_conv is not None:
            inputs = [pooled_source(pool, stride, nodes, source, pooled)
                      for pool, source, stride in zip(self.pools, self.sources, self.strides)]
            if self.hidden is not None:
                inputs = [F.relu(fast.pointwise_conv(x, c.weight, c.bias)) for c, x in zip(self.hidden, inputs)]
            x = torch.cat(inputs, dim=1).contiguous()
            total = fast.pointwise_conv(x, self.proxy_conv.weight, self.proxy_conv.bias)
        if self.block is not None:
            x = nodes[-1]
            universal = self.block(x) if self.gated_after_relu else self.block.forward_pre_relu(x)
            universal = self.universal_gate * universal
            total = universal if total is None else total + universal
        return F.relu(total)


class TailoredNetwork(nn.Module):
    """The network `student` runs in eval mode, as plain layers: input a normalised image batch, output the
    logits.  Equal to `student.eval()(x)[0]` up to float rounding (tests/test_deploy.py)."""

    def __init__(self, student):
        super().__init__()
        backbone = copy.deepcopy(student.backbone).eval()  # the stem and head stay in it; the blocks move out
        fast.thaw(backbone)
        alive = [bool(paths) and paths[0] == 0 for paths in student._alive_paths]
        for conv, bn in backbone.conv_bn_pairs([b for b, kept in zip(backbone.blocks, alive) if kept]):
            replace_module(backbone, conv, folded_conv(conv, bn))
            replace_module(backbone, bn, nn.Identity())
        blocks = [block if kept else None for block, kept in zip(backbone.blocks, alive)]
        for block in backbone.blocks:
            replace_module(backbone, block, nn.Identity())
        del backbone.blocks
        self.backbone = backbone
        self.layers = nn.ModuleList(TailoredLayer(student, l, block) if paths else None
                                    for l, (paths, block) in enumerate(zip(student._alive_paths, blocks)))
        self.input_size = student.input_size
        self.requires_grad_(False)  # for deployment: nothing here trains

    def forward(self, x):
        nodes = [self.backbone.forward_stem(x)]
        pooled = {}
        for layer in self.layers:
            nodes.append(None if layer is None else layer(nodes, pooled))
        return self.backbone.forward_head(nodes[-1])


def preprocessing_steps(transform):
    """A run's evaluation `transform` as the steps a deployment repeats on an RGB image before the network
    (JSON-ready, in order): {'resize': [h, w]} (the whole image) or {'resize_shorter_side': s} (bilinear,
    antialiased), {'center_crop': [h, w]}, {'divide': 255} (8-bit values to [0, 1]) and
    {'normalize': {'mean': [r, g, b], 'std': [r, g, b]}}."""
    from torchvision.transforms import v2
    from dataloaders import SyntheticAugment
    if isinstance(transform, SyntheticAugment):  # batched, in float
        mean, std = ([round(v, 6) for v in values.flatten().tolist()] for values in (transform.mean, transform.std))
        return [{'divide': 255}, {'resize': [transform.input_size] * 2}, {'normalize': {'mean': mean, 'std': std}}]
    steps = []
    for step in transform.transforms:
        if isinstance(step, v2.Resize):
            steps.append({'resize_shorter_side': step.size[0]} if len(step.size) == 1 else {'resize': list(step.size)})
        elif isinstance(step, v2.CenterCrop):
            steps.append({'center_crop': list(step.size)})
        elif isinstance(step, v2.ToDtype) and step.scale:
            steps.append({'divide': 255})
        elif isinstance(step, v2.Normalize):
            steps.append({'normalize': {'mean': list(step.mean), 'std': list(step.std)}})
        elif not isinstance(step, (v2.ToImage, v2.ToPureTensor)):
            raise ValueError(f"no deployment step for the evaluation transform {step}")
    return steps


def export(student, out_dir, metadata=None):
    """Write `out_dir`/tailored.pt2 (torch.export) and `out_dir`/tailored.onnx for `student`'s tailored network,
    for the CPU, in float32, for any batch size at the student's input size, with `metadata` (see
    `export_network`).  Returns the two paths."""
    return export_network(TailoredNetwork(student), student.input_size, out_dir, 'tailored', metadata)


def exported_paths(out_dir, name='tailored'):
    """The two files `export_network` writes."""
    return os.path.join(out_dir, f'{name}.pt2'), os.path.join(out_dir, f'{name}.onnx')


def export_network(network, input_size, out_dir, name, metadata=None):
    """`network` (images -> logits) as `out_dir`/<name>.pt2 and `out_dir`/<name>.onnx, any batch size (the ONNX
    dimension 'batch'), each entry of `metadata` (e.g. 'classes', 'preprocessing') as JSON in both: the .pt2's
    extra file <key>.json and the ONNX metadata <key>.  Both files new, or (on any failure) neither."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise UserError("exporting to ONNX needs the onnx and onnxscript packages: "
                        "pip install -r requirements.txt") from None
    paths = exported_paths(out_dir, name)
    utils.require_folder(out_dir, '--export')
    for path in paths:
        if os.path.isdir(path):
            raise UserError(f"--export {out_dir}: {path} is a folder; remove it or export elsewhere")
    network = network.cpu().float().eval()
    example = torch.randn(2, 3, input_size, input_size)
    program = torch.export.export(network, (example,),
                                  dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=65536)},))
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=['images'], output_names=['logits'],
                                     dynamic_shapes=({0: 'batch'},), verbose=False)
    extra_files = {}
    for key, value in (metadata or {}).items():
        extra_files[f'{key}.json'] = onnx_program.model.metadata_props[key] = json.dumps(value, ensure_ascii=False)

    archive = io.BytesIO()  # in memory first: a write failing inside PyTorch's archive writer aborts the process
    torch.export.save(program, archive, extra_files=extra_files)

    def write_both(pt2_tmp):  # the .onnx renamed into place once the .pt2 is written, the .pt2 right after
        with open(pt2_tmp, 'wb') as f:
            f.write(archive.getbuffer())
        utils.atomic_write(paths[1], onnx_program.save, suffix='.onnx')

    with utils.writing(f'--export {out_dir}'):
        utils.remove_interrupted_writes(out_dir, ('.pt2', '.onnx'))
        utils.atomic_write(paths[0], write_both, suffix='.pt2')
    return paths
