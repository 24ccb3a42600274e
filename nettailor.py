"""The NetTailor student: frozen universal blocks, task-specific proxies and gates (docs/method.md §3-7).

Layer l (0-based here, producing node l+1) combines its universal block and proxies from the
`max_skip` most recent nodes:  x_{l+1} = relu(sum_j a_lj * path_lj(x_source)).  Path 0 of every
layer is the universal block, paths 1.. are proxies, oldest source first.  Gates live in one padded
(L, P) tensor; `path_alive` marks the paths that exist and survived pruning.

`reference_layer` and `two_pass_loss` state the layer and the released code's loss with the plain
modules; `NetTailor.forward` computes the same through fast.py's exact equivalents (folded frozen
layers, proxies folded for evaluation) and computes each layer once (`split_gradient`).
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from backbones import check_input_size, create_teacher
import utils
from utils import UserError, atomic_save

GATE_INIT_UNIVERSAL = 2.0
GATE_INIT_PROXY = -2.0
PROXY_INIT_STD = 0.01


def bottleneck_proxy_width(out_channels):
    """Hidden width of a two-conv proxy into a bottleneck block with `out_channels` outputs (the released code's)."""
    return max(out_channels // 32, 16)


def count_flops(module, run, layer_types=(nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
    """FLOPs, in the paper's convention, of the `layer_types` layers of `module` that `run()` executes.

    A conv costs H_out*W_out*C_in*C_out*kh*kw/groups (multiply-accumulates), a BatchNorm 2*H*W*C, a
    linear layer in*out; counted per sample.
    """
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        per_sample = out.numel() // out.shape[0]
        if isinstance(m, nn.Conv2d):
            total += per_sample * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * per_sample
        else:
            total += m.in_features * m.out_features

    if any(isinstance(m, nn.Conv2d) and fast.is_folded(m) for m in module.modules()):
        raise ValueError("count_flops counts the layers as defined: thaw a network folded by fast.freeze first")
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, layer_types)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total


def count_params(module):
    return sum(p.numel() for p in module.parameters())


class Proxy(nn.Module):
    """Task-specific path A_pl: max-pool to the target resolution, then 1x1 conv + BN.

    With `hidden` (bottleneck backbones) the body is 1x1 conv, BN, ReLU, 1x1 conv, BN.  Initialised as the
    released code does: conv weights ~ N(0, 0.01), BatchNorm weight 1 and bias 0.
    """

    def __init__(self, in_channels, out_channels, stride, hidden=None):
        super().__init__()
        self.stride = stride
        self.pool = nn.MaxPool2d(stride + 1, stride, stride // 2) if stride > 1 else nn.Identity()
        if hidden is None:
            layers = [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        else:
            layers = [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                      nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.body = nn.Sequential(*layers)
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, PROXY_INIT_STD)

    def forward(self, x):
        return self.body(self.pool(x))


def parse_max_skip(max_skip, num_layers):
    """`max_skip` as an int in [1, L]; 'dense' means every earlier node."""
    if max_skip == 'dense':
        return num_layers
    try:
        value = int(max_skip)
    except (TypeError, ValueError):
        value = 0
    if not 1 <= value <= num_layers:
        raise UserError(f"--max-skip must be an integer in [1, {num_layers}] or 'dense', got {max_skip!r}")
    return value


def reference_layer(student, l, nodes, gates):
    """Layer l as docs/method.md §3 states it, with the plain modules: relu(sum over its surviving paths of
    gate * path), the universal path G_l(x_l) and each proxy A_pl(x_p)."""
    total = 0
    for j in student._alive_paths[l]:
        if j == 0:
            total = total + gates[l, 0] * student.backbone.universal_path(l, nodes[l])
        else:
            total = total + gates[l, j] * student.proxies[l][j - 1](nodes[student.proxy_sources[l][j - 1]])
    return F.relu(total)


class NetTailor(nn.Module):
    """A student built around a pre-trained `BlockNet` (see resnet.py), whose stem and blocks it freezes.

    With `task_bn_stats` (the released code's behaviour, docs/method.md §6b) the universal blocks'
    BatchNorms follow the student's mode: in training they normalise with batch statistics and update their
    running averages on the task's data, and those averages belong to the task pack; their affine weights
    stay frozen and shared.  Without it they keep the pre-trained statistics, shared by all tasks, and always
    run in eval mode.
    """

    def __init__(self, backbone, max_skip=3, input_size=224, task_bn_stats=True):
        super().__init__()
        self.backbone = backbone
        self.max_skip = max_skip
        self.input_size = input_size
        self.task_bn_stats = task_bn_stats
        num_layers = len(backbone.blocks)
        skip = parse_max_skip(max_skip, num_layers)
        for name, p in backbone.named_parameters():
            p.requires_grad = name.startswith(backbone.head_prefixes)

        shapes = self._node_shapes(input_size)
        self.proxy_sources = [list(range(max(l + 1 - skip, 0), l + 1)) for l in range(num_layers)]
        num_paths = 1 + max(len(s) for s in self.proxy_sources)
        self.proxies = nn.ModuleList()
        for l, sources in enumerate(self.proxy_sources):
            out_c, out_h, _ = shapes[l + 1]
            hidden = bottleneck_proxy_width(out_c) if backbone.block_kind == 'bottleneck' else None
            self.proxies.append(nn.ModuleList(
                Proxy(shapes[p][0], out_c, round(shapes[p][1] / out_h), hidden) for p in sources))

        logits = torch.full((num_layers, num_paths), GATE_INIT_PROXY)
        logits[:, 0] = GATE_INIT_UNIVERSAL
        self.gate_logits = nn.Parameter(logits)
        exists = torch.zeros(num_layers, num_paths, dtype=torch.bool)
        source = torch.full((num_layers, num_paths), -1, dtype=torch.long)
        for l, sources in enumerate(self.proxy_sources):
            exists[l, :1 + len(sources)] = True
            source[l, 0] = l
            source[l, 1:1 + len(sources)] = torch.tensor(sources)
        self.register_buffer('path_alive', exists.clone())
        self.register_buffer('path_exists', exists, persistent=False)
        self.register_buffer('path_source', source, persistent=False)
        leaving = [(source.flatten() == node).nonzero().flatten() for node in range(num_layers)]
        width = max(len(paths) for paths in leaving)  # per node the flat indices of the paths leaving it,
        padded = [F.pad(paths, (0, width - len(paths)), value=source.numel()) for paths in leaving]  # padded
        self.register_buffer('paths_leaving', torch.stack(padded), persistent=False)  # with one past the end
        self.backbone.eval(), self.proxies.eval()  # batch-of-one probes, on the modules as defined
        self._measure_costs(shapes)
        self._refresh_alive_paths()
        self.train()

    # ----- construction helpers -----
    def universal_modules(self):
        """The frozen, shared part of the backbone (stem and residual blocks)."""
        return [m for name, m in self.backbone.named_children() if not name.startswith(self.backbone.head_prefixes)]

    def head_modules(self):
        return [getattr(self.backbone, name) for name in self.backbone.head_prefixes]

    @torch.no_grad()
    def _node_shapes(self, input_size):
        check_input_size(self.backbone, input_size)
        self.backbone.eval()
        x = self.backbone.forward_stem(torch.zeros(1, 3, input_size, input_size))
        shapes = [tuple(x.shape[1:])]
        for block in self.backbone.blocks:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
        return shapes

    @torch.no_grad()
    def _measure_costs(self, shapes):
        """Per-path FLOPs and parameters, and C(path) = FLOPs / FLOPs of the pre-trained network."""
        bb = self.backbone
        self.stem_flops = count_flops(bb, lambda: bb.forward_stem(torch.zeros(1, 3, self.input_size, self.input_size)))
        self.head_flops = count_flops(bb, lambda: bb.forward_head(torch.zeros(1, *shapes[-1])))
        self.stem_params = count_params(bb) - sum(count_params(b) for b in bb.blocks) - \
            sum(count_params(m) for m in self.head_modules())
        self.head_params = sum(count_params(m) for m in self.head_modules())
        num_layers, num_paths = self.gate_logits.shape
        flops = torch.zeros(num_layers, num_paths, dtype=torch.float64)
        params = torch.zeros(num_layers, num_paths, dtype=torch.long)
        for l, block in enumerate(bb.blocks):
            flops[l, 0] = count_flops(block, lambda: block(torch.zeros(1, *shapes[l])))
            params[l, 0] = count_params(block)
            for j, (p, proxy) in enumerate(zip(self.proxy_sources[l], self.proxies[l]), start=1):
                out = proxy(torch.zeros(1, *shapes[p]))
                if tuple(out.shape[1:]) != shapes[l + 1]:
                    raise UserError(f"proxy from node {p} gives {tuple(out.shape[1:])}, layer {l + 1} "
                                    f"expects {shapes[l + 1]}: input size {self.input_size} is not supported")
                flops[l, j] = count_flops(proxy, lambda: proxy(torch.zeros(1, *shapes[p])))
                params[l, j] = count_params(proxy)
        self.pretrained_flops = self.stem_flops + float(flops[:, 0].sum())
        self.register_buffer('path_flops', flops, persistent=False)
        self.register_buffer('path_params', params, persistent=False)
        self.register_buffer('path_cost', (flops / self.pretrained_flops).float(), persistent=False)

    def _refresh_alive_paths(self):
        """Cache, as Python lists, the paths the forward pass executes (no tensor reads per step)."""
        alive = self.path_alive.tolist()
        self._alive_paths = [[j for j, on in enumerate(row) if on] for row in alive]

    def train(self, mode=True):
        """With shared BatchNorm statistics the universal blocks stay in eval mode.  Entering eval mode (or
        training after evaluation) is a fold point (fast.py): training may have changed the proxies, the gates
        and the task's statistics, and so may weights loaded by hand before `eval()`."""
        refold_universal = not mode or mode != self.training
        super().train(mode)
        if not self.task_bn_stats:
            for m in self.universal_modules():
                m.eval()
        self._fold(universal=refold_universal)
        return self

    def _fold(self, universal=True):
        """Fold what is frozen now: the universal blocks while their BatchNorms are in eval mode (again only when
        `universal`, or when they are not folded yet), and in eval mode each layer's single-conv proxies into
        one convolution with their gates."""
        stem_conv, stem_bn = self.backbone.stem_conv_bn()
        if stem_bn.training:
            fast.thaw(self.backbone)
        elif universal or not fast.is_folded(stem_conv):
            fast.freeze(self.backbone)
        gates = self.gates().detach()
        for l, layer in enumerate(self.proxies):
            layer._buffers.pop('folded_weight', None)
            layer._buffers.pop('folded_bias', None)
            proxy_paths = [j for j in self._alive_paths[l] if j > 0]
            if not self.training and proxy_paths and self.backbone.block_kind == 'basic':
                with torch.no_grad():
                    weight, bias = fast.fold_proxies([layer[j - 1] for j in proxy_paths], gates[l, proxy_paths])
                layer.register_buffer('folded_weight', weight, persistent=False)
                layer.register_buffer('folded_bias', bias, persistent=False)

    # ----- gates and the layer formula (docs/method.md §3) -----
    def gates(self):
        """Softmax of the gate logits over each layer's surviving paths; 0 for removed paths."""
        logits = self.gate_logits.masked_fill(~self.path_alive, -1e4)
        return logits.softmax(dim=1) * self.path_alive

    def forward(self, x, distill=False):
        """Returns (logits, outputs): `reference_layer` for every layer, then the classifier.

        outputs[l] is node l+1 (None once pruned away).  With `distill`, outputs[l] has node l+1's
        value but a gradient that reaches only layer l's own task-specific parameters (its inputs
        treated as constants), for the per-layer distillation terms; nothing is computed twice.
        """
        gate_rows = self.gates().unbind()
        nodes = [self.backbone.forward_stem(x)]
        outputs = []
        pooled = {}
        for l, paths in enumerate(self._alive_paths):
            if not paths:
                nodes.append(None)
                outputs.append(None)
                continue
            proxy_paths = [j for j in paths if j > 0]
            inputs = [self._pooled(nodes, l, j, pooled) for j in proxy_paths]
            if paths[0] == 0:
                inputs.append(self.backbone.universal_path(l, nodes[l]))
            layer_gates = gate_rows[l].unbind()
            combine = functools.partial(self._combine, l, proxy_paths, layer_gates)
            if distill:
                weights = [layer_gates[j] for j in paths]
                weights += [p for j in proxy_paths for p in self.proxies[l][j - 1].parameters()]
                node, local = split_gradient(combine, inputs, weights)
            else:
                node = local = combine(*inputs)
            nodes.append(node)
            outputs.append(local)
        return self.backbone.forward_head(nodes[-1]), outputs

    def _combine(self, l, proxy_paths, gates, *inputs):
        """x_{l+1} from the proxies' pooled inputs and, last when it is alive, the universal block's output.
        The sum is accumulated in place: no backward reads a BatchNorm's or a sum's output."""
        total = None  # made contiguous: nodes stay NCHW, whatever layout the proxies ran in
        if proxy_paths:
            total = self._proxy_sum(l, proxy_paths, gates, inputs[:len(proxy_paths)]).contiguous()
        if len(inputs) > len(proxy_paths):
            universal = inputs[-1]
            total = gates[0] * universal if total is None else total.addcmul_(gates[0], universal)
        return total.relu_()

    def _proxy_sum(self, l, proxy_paths, gates, inputs):
        """sum_j a_lj * A_lj(x_j) over layer l's surviving proxies: in eval mode one folded convolution."""
        layer = self.proxies[l]
        if not self.training and self.backbone.block_kind == 'basic':
            if torch.is_grad_enabled():  # folded afresh, so that gradients reach gates and proxies
                weight, bias = fast.fold_proxies([layer[j - 1] for j in proxy_paths], [gates[j] for j in proxy_paths])
            else:  # as folded when the student entered eval mode
                weight, bias = layer.folded_weight, layer.folded_bias
            return fast.pointwise_conv(torch.cat(inputs, dim=1), weight, bias)
        total = fast.gated_proxy(layer[proxy_paths[0] - 1], inputs[0], gates[proxy_paths[0]]).contiguous()
        for j, x in zip(proxy_paths[1:], inputs[1:]):
            total.add_(fast.gated_proxy(layer[j - 1], x, gates[j]))
        return total

    def _pooled(self, nodes, l, j, cache):
        """Proxy j of layer l's input at the target resolution."""
        proxy = self.proxies[l][j - 1]
        return pooled_source(proxy.pool, proxy.stride, nodes, self.proxy_sources[l][j - 1], cache)

    # ----- complexity (docs/method.md §5) -----
    def expected_complexity(self):
        """E[C] = sum over paths of C(path) * (a - P_in(source node) - P_out(target node)).

        Products are written as elementwise multiplications and gathers as `index_select`: unlike torch.prod
        and advanced indexing, their backward has no step that reads data on the host, so a CUDA graph
        captures the whole training step (engine.TrainStep)."""
        a = self.gates()
        off = torch.where(self.path_alive, 1 - a, torch.ones_like(a))  # per path: the probability it is off
        p_in = torch.cat([a.new_zeros(1), product(off.unbind(1))])  # per node: no path enters it (node 0: the input)
        off_padded = torch.cat([off.flatten(), a.new_ones(1)])
        leaving = off_padded.index_select(0, self.paths_leaving.flatten()).view(self.paths_leaving.shape)
        p_out = product(leaving.unbind(1))  # per node: no path leaves it
        # layer l's target is node l+1; the last node (the classifier's input) is exempt
        p_out_target = torch.cat([p_out[1:], a.new_zeros(1)]).unsqueeze(1)
        p_in_source = p_in.index_select(0, self.path_source.clamp(min=0).flatten()).view_as(a)
        expected = self.path_cost * (a - p_in_source - p_out_target)
        return (expected * self.path_alive).sum()

    # ----- pruning (docs/method.md §7) -----
    @torch.no_grad()
    def prune(self, num_universal, proxy_threshold):
        """Remove the `num_universal` lowest-gated universal blocks and proxies gated below the threshold,
        then every path the exclusion rules make dead.  Refuses a pruning that disconnects the network."""
        if not 0 <= proxy_threshold < 1:
            raise UserError(f"proxy threshold must be in [0, 1), got {proxy_threshold}")
        gates = self.gates()
        alive = self.path_alive.clone()
        kept_universal = alive[:, 0].nonzero().flatten()
        if not 0 <= num_universal <= len(kept_universal):
            raise UserError(f"cannot prune {num_universal} universal blocks: {len(kept_universal)} are left")
        order = gates[kept_universal, 0].argsort()
        alive[kept_universal[order[:num_universal]], 0] = False
        alive[:, 1:] &= gates[:, 1:] >= proxy_threshold
        alive = self._apply_exclusion_rules(alive)
        if not alive[-1].any():
            raise UserError(f"pruning {num_universal} universal blocks and proxies below {proxy_threshold} "
                            "leaves no path from the input to the classifier; prune less")
        self.path_alive.copy_(alive)
        self._refresh_alive_paths()
        self._fold()

    def _apply_exclusion_rules(self, alive):
        """Until nothing changes: a node with no incoming path loses its outgoing paths, and a node
        (other than the last) with no outgoing path loses its incoming paths."""
        num_layers = alive.shape[0]
        while True:
            before = alive.clone()
            node_has_input = torch.cat([alive.new_ones(1), alive.any(dim=1)])
            alive &= node_has_input[self.path_source.clamp(min=0)]
            has_output = [bool(alive[self.path_source == node].any()) for node in range(num_layers)] + [True]
            for l in range(num_layers):
                if not has_output[l + 1]:
                    alive[l] = False
            if torch.equal(alive, before):
                return alive

    # ----- accounting -----
    def stats(self):
        """Parameters and FLOPs (paper convention, per image) of the network as it runs now."""
        gates = self.gates().detach()
        alive = self.path_alive
        rows = []
        for l in range(alive.shape[0]):
            for j in range(int(self.path_exists[l].sum())):
                rows.append({
                    'layer': l + 1, 'path': 'universal' if j == 0 else 'proxy',
                    'source': int(self.path_source[l, j]), 'gate': float(gates[l, j]), 'kept': bool(alive[l, j]),
                    'params': int(self.path_params[l, j]), 'flops': float(self.path_flops[l, j])})
        kept_universal = alive[:, 0]
        proxy_mask = alive.clone()
        proxy_mask[:, 0] = False
        flops = self.stem_flops + float(self.path_flops[alive].sum()) + self.head_flops
        params_universal = self.stem_params + int(self.path_params[kept_universal, 0].sum())
        params_task = int(self.path_params[proxy_mask].sum()) + int(alive.sum()) + self.head_params
        return {
            'flops': flops,
            'flops_full': self.pretrained_flops + self.head_flops,
            'params_universal': params_universal,
            'params_task': params_task,
            'params_full': self.stem_params + int(self.path_params[:, 0].sum()) + self.head_params,
            'universal_blocks_kept': int(kept_universal.sum()),
            'universal_blocks_total': int(alive.shape[0]),
            'proxies_kept': int(proxy_mask.sum()),
            'proxies_total': int(self.path_exists.sum()) - alive.shape[0],
            'layers': rows,
        }

    # ----- task packs -----
    def _task_state_names(self, alive, names):
        """Those of the state-dict names `names` that hold task-specific state when the paths `alive` are kept:
        gates, pruning mask, classifier head, the kept proxies and, with task statistics, the running BatchNorm
        statistics of the stem and of the kept universal blocks."""
        task_prefixes = ('gate_logits', 'path_alive') + tuple(f'backbone.{p}' for p in self.backbone.head_prefixes)
        alive = alive.tolist()
        kept_blocks = {id(b) for l, b in enumerate(self.backbone.blocks) if alive[l][0]}
        pruned_prefixes = tuple(f'{prefix}.' for prefix, module in self.backbone.named_modules()
                                if module in self.backbone.blocks and id(module) not in kept_blocks)
        statistics = set()
        if self.task_bn_stats:
            for prefix, module in self.backbone.named_modules():
                if isinstance(module, nn.BatchNorm2d) and not prefix.startswith(pruned_prefixes +
                                                                                 self.backbone.head_prefixes):
                    statistics |= {f'backbone.{prefix}.{buffer}' for buffer, _ in module.named_buffers()}
        task = set()
        for name in names:
            if name.startswith(task_prefixes) or name in statistics:
                task.add(name)
            elif name.startswith('proxies.'):
                l, j = (int(i) for i in name.split('.')[1:3])
                if alive[l][j + 1]:
                    task.add(name)
        return task

    def task_pack(self):
        """The task-specific state (`_task_state_names`) and what it was built for."""
        own = self.state_dict()
        names = self._task_state_names(self.path_alive, own)
        state = {name: tensor.clone() for name, tensor in own.items() if name in names}
        return {'meta': self.pack_meta(), 'state': state}

    def pack_meta(self):
        return {'arch': self.backbone.arch, 'num_classes': self.num_classes, 'max_skip': self.max_skip,
                'num_layers': len(self.backbone.blocks), 'task_bn_stats': self.task_bn_stats}

    @property
    def num_classes(self):
        return self.head_modules()[-1].out_features

    def load_task_pack(self, pack, source='the task pack'):
        """Attach a task pack (from `task_pack()` or a file) to this student's universal blocks.  A pack that does
        not fit this student, holds non-finite values or prunes every way to the classifier is refused before
        anything changes."""
        if not isinstance(pack, dict) or 'meta' not in pack or 'state' not in pack:
            raise UserError(f"{source} is not a NetTailor task pack")
        meta, mine = dict(pack['meta']), self.pack_meta()
        meta.setdefault('task_bn_stats', False)  # packs written before task statistics existed
        if meta != mine:
            diff = ', '.join(f"{k} {meta.get(k)!r} vs {mine[k]!r}" for k in mine if meta.get(k) != mine[k])
            raise UserError(f"{source} was built for another student ({diff} here)")
        state = pack['state']
        alive = state.get('path_alive')
        fits = torch.is_tensor(alive) and alive.dtype == torch.bool and alive.shape == self.path_alive.shape
        if fits:
            alive = alive.to(self.path_exists.device)  # a pack read to the CPU, a student on the GPU
        if not fits or (alive & ~self.path_exists).any():
            raise UserError(f"{source} has no pruning mask (path_alive) for this student's paths "
                            f"{tuple(self.path_alive.shape)}")
        own = self.state_dict()
        missing = sorted(self._task_state_names(alive, own) - set(state))
        foreign = sorted(set(state) - self._task_state_names(self.path_exists, own))
        wrong_shape = [k for k in state if k not in foreign and state[k].shape != own[k].shape]
        if missing or foreign or wrong_shape:
            raise UserError(f"{source} does not fit this student: " + (
                f"it lacks {missing[0]}" if missing else f"{foreign[0]} is not task-specific state" if foreign else
                f"{wrong_shape[0]} has shape {tuple(state[wrong_shape[0]].shape)}, "
                f"here {tuple(own[wrong_shape[0]].shape)}"))
        node_computed = torch.cat([alive.new_ones(1), alive.any(dim=1)])  # node 0: the stem's output
        reads_nothing = alive & ~node_computed[self.path_source.clamp(min=0)]
        if not node_computed[-1] or reads_nothing.any():
            l, j = reads_nothing.nonzero()[0].tolist() if node_computed[-1] else (len(alive) - 1, None)
            where = (f"prunes every path of layer {l}: no network to run" if j is None else
                     f"keeps path {j} of layer {l}, which reads the output of layer {int(self.path_source[l, j]) - 1}, "
                     "whose paths are all pruned: a path that never runs, which this implementation does not "
                     "represent (docs/differences.md)")
            raise UserError(f"{source} {where}")
        utils.check_finite(state, source, fix="the run that wrote it diverged, or the file is damaged")
        self.load_state_dict(state, strict=False)
        self._refresh_alive_paths()
        self._fold()

    def save_task_pack(self, path):
        atomic_save(self.task_pack(), path)


def pooled_source(pool, stride, nodes, source, cache):
    """nodes[source] max-pooled by `pool` (stride `stride`) to a proxy's target resolution; each (node, stride)
    pooled once per forward pass (`cache`), and a node already at that resolution used as it is."""
    if stride == 1:
        return nodes[source]
    if (source, stride) not in cache:
        cache[source, stride] = pool(fast.channels_last_on_cpu(nodes[source]))
    return cache[source, stride]


def product(factors):
    """The elementwise product of a sequence of tensors."""
    return functools.reduce(torch.mul, factors)


def distillation_loss(student_logits, student_outputs, teacher_logits, teacher_outputs):
    """Omega (paper eq. 11, as the released code normalises it): the MSE between logits plus the per-layer
    MSEs of the surviving layers, all divided by L, the number of layers (pruned ones included)."""
    layer_terms = [F.mse_loss(s, t) for s, t in zip(student_outputs, teacher_outputs) if s is not None]
    return (F.mse_loss(student_logits, teacher_logits) + sum(layer_terms)) / len(teacher_outputs)


def two_pass_loss(student, teacher_logits, teacher_outputs, x, y, complexity_coeff, teacher_coeff):
    """L = CE + gamma1 E[C] + gamma2 Omega as the released code computes it: every layer run twice with the
    plain modules, the second time on detached inputs for its own Omega term.  The reference that
    `forward(distill=True)` reproduces in one pass (tests, benchmark)."""
    gates = student.gates()
    nodes = [student.backbone.forward_stem(x)]
    local_outputs = []
    for l in range(len(student._alive_paths)):
        alive = bool(student._alive_paths[l])
        nodes.append(reference_layer(student, l, nodes, gates) if alive else None)
        detached = [None if n is None else n.detach() for n in nodes]
        local_outputs.append(reference_layer(student, l, detached, gates) if alive else None)
    logits = student.backbone.forward_head(nodes[-1])
    omega = distillation_loss(logits, local_outputs, teacher_logits, teacher_outputs)
    return F.cross_entropy(logits, y) + complexity_coeff * student.expected_complexity() + teacher_coeff * omega


class _SplitGradient(torch.autograd.Function):
    """See `split_gradient`. The graph of `fn` is built once in forward and walked twice in backward."""

    @staticmethod
    def forward(ctx, fn, num_inputs, *tensors):
        inputs, weights = tensors[:num_inputs], tensors[num_inputs:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            out = fn(*leaves)
        ctx.graph = out, leaves, weights
        return out.detach(), out.detach()

    @staticmethod
    def backward(ctx, grad_out, grad_local):
        out, leaves, weights = ctx.graph
        ctx.graph = None
        grads = [None] * (len(leaves) + len(weights))
        wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
        if wanted:  # inputs: only the end-to-end gradient
            for i, g in zip(wanted, torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out, retain_graph=True)):
                grads[i] = g
        wanted = [i for i, t in enumerate(weights) if t.requires_grad]
        if wanted:  # weights: both
            found = torch.autograd.grad(out, [weights[i] for i in wanted], grad_out + grad_local, allow_unused=True)
            for i, g in zip(wanted, found):
                grads[len(leaves) + i] = g
        return (None, None, *grads)


def split_gradient(fn, inputs, weights):
    """(y, y_local) with y = fn(*inputs) computed once; `weights` are tensors fn uses by reference.

    y's gradient reaches `inputs` and `weights`; y_local's reaches only `weights`, exactly as if fn
    had been re-run on detached inputs, without re-running it.
    """
    return _SplitGradient.apply(fn, len(inputs), *inputs, *weights)


def share_universal_weights(backbone, universal):
    """Make `backbone`'s stem and blocks use `universal`'s weights: the same tensors, not copies.  Their
    BatchNorm statistics stay `backbone`'s own (copied from `universal`), since a task may bring its own."""
    for name, module in universal.named_modules():
        if not name or name.startswith(universal.head_prefixes):
            continue
        target = backbone.get_submodule(name)
        for key, parameter in module.named_parameters(recurse=False):
            setattr(target, key, parameter)
        if isinstance(module, nn.BatchNorm2d):
            for key, buffer in module.named_buffers(recurse=False):
                getattr(target, key).copy_(buffer)


def student_on_universal(universal, pack, input_size):
    """A task's student built around the universal weights of `universal` (a BlockNet loaded once and shared by
    every task), with the task pack `pack` attached."""
    meta = pack['meta']
    backbone = create_teacher(universal.arch, meta['num_classes'])
    share_universal_weights(backbone, universal)
    student = NetTailor(backbone, meta['max_skip'], input_size, meta.get('task_bn_stats', False))
    student.load_task_pack(pack)
    return student.to(universal.conv1.weight.device)


def format_stats(stats):
    """A readable per-layer table plus totals for `NetTailor.stats()`."""
    lines = [f"{'layer':>5} {'path':>9} {'src':>3} {'gate':>6} {'kept':>4} {'params':>10} {'MFLOPs':>9}"]
    for row in stats['layers']:
        lines.append(f"{row['layer']:>5} {row['path']:>9} {row['source']:>3} {row['gate']:>6.3f} "
                     f"{'yes' if row['kept'] else 'no':>4} {row['params']:>10,} {row['flops'] / 1e6:>9.2f}")
    lines.append(
        f"universal blocks kept {stats['universal_blocks_kept']}/{stats['universal_blocks_total']}, "
        f"proxies kept {stats['proxies_kept']}/{stats['proxies_total']}; "
        f"params universal {stats['params_universal'] / 1e6:.2f} M + task {stats['params_task'] / 1e6:.2f} M; "
        f"{stats['flops'] / 1e9:.3f} GFLOPs (paper convention: 1 multiply-accumulate = 1 FLOP) "
        f"vs {stats['flops_full'] / 1e9:.3f} for the full network")
    return '\n'.join(lines)


def create_student(backbone, num_classes, max_skip=3, pretrained=None, input_size=224, task_bn_stats=True):
    """A NetTailor student on `backbone` (any `backbones.ARCHS` name) with frozen pre-trained blocks."""
    return NetTailor(create_teacher(backbone, num_classes, pretrained), max_skip, input_size, task_bn_stats)
