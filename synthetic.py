"""Procedural stand-in datasets for offline runs, generated in memory from a seed.

ImageNet weights and the real datasets cannot be downloaded everywhere, so the project ships
synthetic tasks with the same roles:

- ``synth-source`` plays ImageNet: 40 classes, 35 of them objects (10 geometric silhouettes and
  25 letters that cannot pass for digits, in random stroke weights) with a random fill (solid,
  gradient, stripes, checker, dots), drawn at a random position, scale, rotation, aspect, slant and
  mirror, in random colours, over a noisy background with faint clutter; the other 5 are textures
  filling the image. A network trained on it learns colours, edges, strokes, shapes and textures.
- ``synth-digits`` (easy, SVHN-like): the centred digit 0-9 in random colours, stroke weights,
  sizes, widths and slants, with distractor digits partly visible at the sides, on a noisy
  background.
- ``synth-textures`` (medium): 10 texture kinds x 2 scales filling the image, in random
  orientations, colours and contrasts.
- ``synth-shapes`` (hard, fine-grained): how many (1-5) small objects of which of 6 kinds are
  scattered over the image, among distractor lines.

Image ``i`` of a split takes all its randomness from a generator seeded with
(seed, task, split, i), so a split is reproducible pixel for pixel, a short split is a prefix of a
long one, and train and test are independent draws. Images are drawn in fixed chunks of
consecutive indices with vectorised numpy, which keeps generation well under a millisecond per
32x32 image. Labels cycle through the classes (image i has label i mod num_classes), so every split
is balanced.
"""
import functools
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from utils import UserError

SYNTHETIC_TASKS = {
    'synth-source': 40,
    'synth-digits': 10,
    'synth-textures': 20,
    'synth-shapes': 30,
}
# Horizontal flips map every image of these tasks to an equally likely image of the same class.
FLIP_INVARIANT = {'synth-source', 'synth-textures', 'synth-shapes'}
DEFAULT_SIZES = {
    'synth-source': {'train': 15000, 'test': 2000},
    'synth-digits': {'train': 4000, 'test': 1000},
    'synth-textures': {'train': 4000, 'test': 1000},
    'synth-shapes': {'train': 4000, 'test': 1500},
}
SPLITS = ('train', 'test')
# Stable ids that enter the per-image seeds (never hash(), which changes between processes).
_TASK_IDS = {'synth-source': 1, 'synth-digits': 2, 'synth-textures': 3, 'synth-shapes': 4}
_SPLIT_IDS = {'train': 1, 'test': 2}
# Images are rendered in chunks of this many consecutive indices; a split is always rendered in
# whole chunks (then cut), so every image goes through exactly the same computation.
_CHUNK = 32

_GEOMETRIC = ('disc', 'ring', 'square', 'frame', 'triangle', 'star', 'cross', 'crescent', 'heart',
              'arrow')
# Letters that cannot pass for digits.
_GLYPHS = tuple('ACEFHJKLMNPRTUVWXYaefhmrt')
_DIGITS = tuple('0123456789')
_WEIGHTS = (0, 1, 2, 3)  # stroke widths of the rendered glyphs, thin to bold
_SOURCE_OBJECTS = _GEOMETRIC + _GLYPHS
_SOURCE_FILLS = ('solid', 'gradient', 'stripes', 'checker', 'dots')
_SOURCE_TEXTURES = ('stripes', 'checker', 'dots', 'grid', 'rings')
_TEXTURE_KINDS = ('stripes', 'grating', 'checker', 'dots', 'grid', 'zigzag', 'waves', 'bricks',
                  'rings', 'blobs')
_PATTERNS = ('solid', 'gradient') + _TEXTURE_KINDS
_SHAPE_KINDS = ('disc', 'square', 'triangle', 'star', 'cross', 'ring')
_MAX_COUNT = 5
_TEMPLATE_SIZE = 64
_TEMPLATE_PAD = 2
_BLOB_CELLS = 8
_NO_BLOBS = np.zeros((_BLOB_CELLS + 1, _BLOB_CELLS + 1), dtype=np.float32)


class SyntheticImages(torch.utils.data.Dataset):
    """A generated split held in memory: uint8 images (N x 3 x H x W) and int64 labels (N)."""

    def __init__(self, images, labels, task, num_classes):
        self.images = images
        self.labels = labels
        self.task = task
        self.num_classes = num_classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


def make_synthetic(task, split, seed=0, num_images=None, image_size=32):
    """Generate split `split` ('train' or 'test') of synthetic task `task` as a SyntheticImages.

    num_images=None gives the task's default size for the split (DEFAULT_SIZES).
    """
    if task not in SYNTHETIC_TASKS:
        raise UserError(f"unknown synthetic task {task!r}; valid tasks: {', '.join(SYNTHETIC_TASKS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for {task}; valid splits: {', '.join(SPLITS)}")
    if num_images is None:
        num_images = DEFAULT_SIZES[task][split]
    if num_images < 0:
        raise UserError(f"num_images must be >= 0, got {num_images}")
    if image_size < 16:
        raise UserError(f"image_size must be at least 16 pixels, got {image_size}")
    sample, render = _TASK_FUNCTIONS[task]
    num_classes = SYNTHETIC_TASKS[task]
    grid = _grid(image_size)
    images = np.empty((num_images, 3, image_size, image_size), dtype=np.uint8)
    labels = np.arange(num_images, dtype=np.int64) % num_classes
    for start in range(0, num_images, _CHUNK):
        params, noise = [], []
        for index in range(start, start + _CHUNK):
            rng = np.random.default_rng([seed, _TASK_IDS[task], _SPLIT_IDS[split], index])
            params.append(sample(_Draws(rng), index % num_classes))
            noise.append(rng.random((3, image_size, image_size), dtype=np.float32))
        batch = {key: np.array([p[key] for p in params]) for key in params[0]}
        chunk = render(batch, grid)
        chunk += (np.stack(noise) - 0.5) * batch['noise'][:, None, None, None].astype(np.float32)
        stop = min(start + _CHUNK, num_images)
        images[start:stop] = np.clip(chunk[:stop - start] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return SyntheticImages(torch.from_numpy(images), torch.from_numpy(labels), task, num_classes)


class _Draws:
    """Random numbers for one image as plain Python values (numpy scalars are slow).

    Uniforms are taken from the image's generator in blocks; parameters are Python floats, ints
    and lists, stacked into per-chunk arrays afterwards.
    """

    def __init__(self, rng, block=64):
        self.rng = rng
        self.block = block
        self.values = rng.random(block).tolist()
        self.used = 0

    def uniform(self, low=0.0, high=1.0):
        if self.used == len(self.values):
            self.values = self.rng.random(self.block).tolist()
            self.used = 0
        self.used += 1
        return low + (high - low) * self.values[self.used - 1]

    def uniforms(self, count, low=0.0, high=1.0):
        return [self.uniform(low, high) for _ in range(count)]

    def integer(self, high):
        """A uniform integer in [0, high)."""
        return min(int(self.uniform() * high), high - 1)

    def chance(self, probability):
        return self.uniform() < probability

    def colour(self):
        return self.uniforms(3)

    def contrasting_colour(self, other, min_difference):
        """A random colour whose luminance differs from `other`'s by at least `min_difference`."""
        colour = self.colour()
        difference = _luminance(colour) - _luminance(other)
        if abs(difference) < min_difference:
            shift = min_difference - abs(difference)
            if _luminance(other) >= 0.5:
                shift = -shift
            if difference * shift < 0:  # move to the far side of `other`
                shift += -2 * difference
            colour = [min(max(channel + shift, 0.0), 1.0) for channel in colour]
        return colour

    def field(self, shape):
        return self.rng.random(shape, dtype=np.float32)


def _luminance(colour):
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


# ---------------------------------------------------------------------------------------------
# Batched rendering. Images are float arrays B x 3 x S x S in [0, 1]; positions are in normalised
# coordinates, -1..1 across the image, so a task looks the same at any image size. Per-image
# parameters arrive as arrays with a leading batch dimension.

@functools.lru_cache(maxsize=None)
def _grid(size):
    """Normalised x and y coordinates (S x S each) of the pixel centres of a size x size image."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    x, y = np.meshgrid(axis, axis)
    return x, y


def _per_image(values):
    """Shape a batch of per-image scalars (B,) to broadcast against B x S x S maps."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _rotated(grid, angle, origin):
    """Pixel-centre coordinates (B x S x S each) in frames rotated by `angle` about `origin`."""
    x, y = grid
    cos, sin = _per_image(np.cos(angle)), _per_image(np.sin(angle))
    dx = x - _per_image(origin[:, 0])
    dy = y - _per_image(origin[:, 1])
    return cos * dx + sin * dy, cos * dy - sin * dx


def _soft(distance, grid):
    """Antialiased indicator of distance > 0, with an edge about one pixel wide."""
    pixel = grid[0][0, 1] - grid[0][0, 0]
    return np.clip(0.5 + distance / pixel, 0.0, 1.0)


def _bilinear(flat, offset, width, height, x, y):
    """Bilinear samples of zero-padded 2-D arrays stored at `offset` (B,) in the 1-D array `flat`.

    x and y are pixel coordinates of the unpadded arrays; outside them the result is 0.
    """
    x = np.clip(x + _TEMPLATE_PAD, 0.0, width - 1.001)
    y = np.clip(y + _TEMPLATE_PAD, 0.0, height - 1.001)
    x0 = x.astype(np.intp)
    y0 = y.astype(np.intp)
    fx = x - x0
    fy = y - y0
    index = offset[:, None, None] + y0 * width + x0
    top_left, top_right = flat.take(index), flat.take(index + 1)
    bottom_left, bottom_right = flat.take(index + width), flat.take(index + width + 1)
    top = top_left + fx * (top_right - top_left)
    bottom = bottom_left + fx * (bottom_right - bottom_left)
    return top + fy * (bottom - top)


def _place(template, centre, scale, angle, grid, aspect=None, shear=None, mirror=None):
    """Coverage maps (B x S x S, 0..1) of templates drawn at `centre` with half-size `scale`.

    Template t's -1..1 square maps to a square of half-size `scale` around `centre`, stretched
    horizontally by `aspect`, slanted by `shear`, mirrored where `mirror` is -1, then rotated by
    `angle`. All arguments but `grid` are per-image arrays; template holds template indices.
    """
    names, stack = _templates()
    across, down = _rotated(grid, angle, centre)
    down = down / _per_image(scale)
    across = across / _per_image(scale)
    if shear is not None:
        across = across + _per_image(shear) * down
    if aspect is not None:
        across = across / _per_image(aspect)
    if mirror is not None:
        across = across * _per_image(mirror)
    half = _TEMPLATE_SIZE / 2.0
    padded = stack.shape[1]
    offset = np.asarray(template, dtype=np.intp) * padded * padded
    return _bilinear(stack.reshape(-1), offset, padded, padded,
                     across * half + (half - 0.5), down * half + (half - 0.5))


def _paint(image, coverage, colour):
    """Alpha-blend `colour` (B x 3 colours or B x 3 x S x S fills) over `image` by `coverage`."""
    if colour.ndim == 2:
        colour = colour[:, :, None, None]
    image += coverage[:, None] * (colour - image)


def _ramp(grid, colours, angle, width):
    """Linear blends from colours[:, 0] to colours[:, 1] across `width`, along direction `angle`."""
    along, _ = _rotated(grid, angle, np.zeros((len(angle), 2)))
    amount = np.clip(0.5 + along / _per_image(width), 0.0, 1.0)
    first = colours[:, 0, :, None, None]
    return first + amount[:, None] * (colours[:, 1, :, None, None] - first)


def _blur(image, amount):
    """Mix each pixel with the mean of its 4 neighbours (edges repeated), by `amount` (B,)."""
    padded = np.pad(image, ((0, 0), (0, 0), (1, 1), (1, 1)), mode='edge')
    neighbours = (padded[:, :, :-2, 1:-1] + padded[:, :, 2:, 1:-1]
                  + padded[:, :, 1:-1, :-2] + padded[:, :, 1:-1, 2:]) * 0.25
    return image + _per_image(amount)[:, None] * (neighbours - image)


def _draw_pattern(draws, kind, period_range):
    """Parameters of one pattern map (see _patterns)."""
    return {
        'pattern': _PATTERNS.index(kind),
        'period': draws.uniform(*period_range),
        'pattern_angle': draws.uniform(0, np.pi),
        'phase': draws.uniforms(2),
        'pattern_shape': draws.uniform(),
        'pattern_centre': draws.uniforms(2, -1.5, 1.5),
        'blobs': draws.field((_BLOB_CELLS + 1, _BLOB_CELLS + 1)) if kind == 'blobs' else _NO_BLOBS,
    }


def _patterns(p, grid):
    """Pattern maps (B x S x S, 0..1), each image's kind and shape from its parameters."""
    size = grid[0].shape[0]
    result = np.zeros((len(p['pattern']), size, size), dtype=np.float32)
    for kind_index in np.unique(p['pattern']):
        chosen = p['pattern'] == kind_index
        result[chosen] = _pattern(_PATTERNS[kind_index], {key: value[chosen] for key, value in p.items()},
                                  grid)
    return result


def _pattern(kind, p, grid):
    period = _per_image(p['period'])
    wave = 2 * np.pi / period
    x, y = _rotated(grid, p['pattern_angle'], np.zeros((len(period), 2)))
    phase_x, phase_y = _per_image(p['phase'][:, 0]), _per_image(p['phase'][:, 1])
    shape = _per_image(p['pattern_shape'])
    if kind == 'solid':
        return np.zeros_like(x)
    if kind == 'gradient':
        return np.clip(0.5 + x / (4 * period), 0.0, 1.0)
    if kind == 'stripes':
        duty = 0.8 * shape - 0.4
        return _soft((np.sin(wave * x + 2 * np.pi * phase_x) - duty) / wave, grid)
    if kind == 'grating':
        return 0.5 + 0.5 * np.sin(wave * x + 2 * np.pi * phase_x)
    if kind == 'checker':
        product = np.sin(wave * x + 2 * np.pi * phase_x) * np.sin(wave * y + 2 * np.pi * phase_y)
        return _soft(product / wave, grid)
    if kind == 'dots':
        fx = (x / period + phase_x) % 1.0 - 0.5
        fy = (y / period + phase_y) % 1.0 - 0.5
        radius = 0.22 + 0.12 * shape
        return _soft((radius - np.sqrt(fx * fx + fy * fy)) * period, grid)
    if kind == 'grid':
        fx = np.abs((x / period + phase_x) % 1.0 - 0.5)
        fy = np.abs((y / period + phase_y) % 1.0 - 0.5)
        width = 0.08 + 0.08 * shape
        return _soft((width - 0.5 + np.maximum(fx, fy)) * period, grid)
    if kind == 'zigzag':
        tooth = np.abs((y / period + phase_y) % 1.0 - 0.5) * period
        return _soft(np.sin(wave * (x + tooth) + 2 * np.pi * phase_x) / wave, grid)
    if kind == 'waves':
        shift = 0.25 * period * np.sin(wave * y + 2 * np.pi * phase_y)
        return _soft(np.sin(wave * (x + shift) + 2 * np.pi * phase_x) / wave, grid)
    if kind == 'bricks':
        row = np.floor(y / period + phase_y)
        fy = np.abs((y / period + phase_y) % 1.0 - 0.5)
        fx = np.abs((x / (2 * period) + phase_x + 0.5 * row) % 1.0 - 0.5)
        return _soft((0.4 - np.maximum(fy, 2.0 * fx)) * period, grid)
    if kind == 'rings':
        cx, cy = _per_image(p['pattern_centre'][:, 0]), _per_image(p['pattern_centre'][:, 1])
        radius = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return _soft(np.sin(wave * radius + 2 * np.pi * phase_x) / wave, grid)
    if kind == 'blobs':
        # A random field on a lattice with spacing `period`, bilinearly interpolated.
        cells = _BLOB_CELLS + 1 + 2 * _TEMPLATE_PAD
        fields = np.pad(p['blobs'], ((0, 0), (_TEMPLATE_PAD, _TEMPLATE_PAD), (_TEMPLATE_PAD, _TEMPLATE_PAD)))
        offset = np.arange(len(fields), dtype=np.intp) * cells * cells
        field = _bilinear(fields.reshape(-1), offset, cells, cells,
                          (x + 1.0) / period, (y + 1.0) / period)
        return _soft((field - 0.5) * period * 0.5, grid)
    raise ValueError(f'unknown pattern {kind}')


@functools.lru_cache(maxsize=None)
def _templates():
    """Silhouette masks of every shape and glyph: (name -> index, T x 68 x 68 floats in 0..1).

    Each mask is 64 x 64, zero-padded by 2 pixels; glyphs are keyed (character, stroke weight)
    and scaled to fill the square's height (or width, for wide letters).
    """
    size = _TEMPLATE_SIZE
    centre = size / 2
    radius = size * 0.44

    def polygon(points):
        return [(centre + radius * px, centre - radius * py) for px, py in points]

    def regular(corners, inner=None):
        steps = corners * (2 if inner else 1)
        points = []
        for step in range(steps):
            angle = np.pi / 2 + 2 * np.pi * step / steps
            length = inner if inner and step % 2 else 1.0
            points.append((length * np.cos(angle), length * np.sin(angle)))
        return polygon(points)

    def box(x0, y0, x1, y1):
        return [centre + radius * x0, centre - radius * y1, centre + radius * x1, centre - radius * y0]

    heart = [(16 * np.sin(t) ** 3 / 16.5,
              (13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t) + 2.5) / 15.5)
             for t in np.linspace(0, 2 * np.pi, 60, endpoint=False)]
    arrow = [(-1, 0.25), (0.2, 0.25), (0.2, 0.7), (1, 0), (0.2, -0.7), (0.2, -0.25), (-1, -0.25)]
    shapes = {
        'disc': lambda draw: draw.ellipse(box(-1, -1, 1, 1), fill=255),
        'ring': lambda draw: (draw.ellipse(box(-1, -1, 1, 1), fill=255),
                              draw.ellipse(box(-0.55, -0.55, 0.55, 0.55), fill=0)),
        'square': lambda draw: draw.rectangle(box(-0.85, -0.85, 0.85, 0.85), fill=255),
        'frame': lambda draw: (draw.rectangle(box(-0.85, -0.85, 0.85, 0.85), fill=255),
                               draw.rectangle(box(-0.45, -0.45, 0.45, 0.45), fill=0)),
        'triangle': lambda draw: draw.polygon(regular(3), fill=255),
        'star': lambda draw: draw.polygon(regular(5, inner=0.45), fill=255),
        'cross': lambda draw: (draw.rectangle(box(-1, -0.3, 1, 0.3), fill=255),
                               draw.rectangle(box(-0.3, -1, 0.3, 1), fill=255)),
        'crescent': lambda draw: (draw.ellipse(box(-1, -1, 1, 1), fill=255),
                                  draw.ellipse(box(-0.45, -0.85, 1.25, 0.85), fill=0)),
        'heart': lambda draw: draw.polygon(polygon(heart), fill=255),
        'arrow': lambda draw: draw.polygon(polygon(arrow), fill=255),
    }
    masks = {}
    for name, paint in shapes.items():
        image = Image.new('L', (size, size))
        paint(ImageDraw.Draw(image))
        masks[name] = image
    font = ImageFont.load_default(size=48)
    for glyph in _GLYPHS + _DIGITS:
        for weight in _WEIGHTS:
            image = Image.new('L', (2 * size, 2 * size))
            ImageDraw.Draw(image).text((size, size), glyph, font=font, fill=255, anchor='mm',
                                       stroke_width=weight, stroke_fill=255)
            crop = image.crop(image.getbbox())
            fit = 0.9 * size / max(crop.width, crop.height)
            crop = crop.resize((round(crop.width * fit), round(crop.height * fit)), Image.BILINEAR)
            canvas = Image.new('L', (size, size))
            canvas.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
            masks[(glyph, weight)] = canvas
    names = {name: index for index, name in enumerate(masks)}
    stack = np.stack([np.pad(np.asarray(mask, dtype=np.float32) / 255.0, _TEMPLATE_PAD)
                      for mask in masks.values()])
    return names, stack


@functools.lru_cache(maxsize=None)
def _half_width(name):
    """Half the inked width of a template, as a fraction of the template's half-size."""
    names, stack = _templates()
    columns = np.nonzero(stack[names[name]].max(axis=0) > 0.5)[0]
    return (columns[-1] - columns[0] + 1) / _TEMPLATE_SIZE


def _gradient_background(draws):
    """Parameters of a background ramp between two related random colours."""
    first = draws.colour()
    second = [min(max(channel + draws.uniform(-0.35, 0.35), 0.0), 1.0) for channel in first]
    return {'background': [first, second], 'background_angle': draws.uniform(0, 2 * np.pi)}


def _render_background(p, grid):
    return _ramp(grid, p['background'], p['background_angle'], np.full(len(p['background_angle']), 2.0))


# ---------------------------------------------------------------------------------------------
# The tasks: for each, sample(draws, label) -> dict of one image's parameters, and
# render(batched parameters, grid) -> B x 3 x S x S float images (noise is added afterwards).

_SOURCE_CLUTTER = 2


def _sample_source(draws, label):
    names, _ = _templates()
    p = _gradient_background(draws)
    background = [(a + b) / 2 for a, b in zip(*p['background'])]
    clutter_names = _GEOMETRIC + tuple((glyph, 1) for glyph in _GLYPHS)
    p['clutter'] = [names[clutter_names[draws.integer(len(clutter_names))]] for _ in range(_SOURCE_CLUTTER)]
    p['clutter_centre'] = [draws.uniforms(2, -1.0, 1.0) for _ in range(_SOURCE_CLUTTER)]
    p['clutter_scale'] = draws.uniforms(_SOURCE_CLUTTER, 0.12, 0.25)
    p['clutter_angle'] = draws.uniforms(_SOURCE_CLUTTER, 0, 2 * np.pi)
    p['clutter_colour'] = [draws.colour() for _ in range(_SOURCE_CLUTTER)]
    shown = draws.integer(_SOURCE_CLUTTER + 1)
    p['clutter_alpha'] = [draws.uniform(0.3, 0.6) if slot < shown else 0.0 for slot in range(_SOURCE_CLUTTER)]
    if label < len(_SOURCE_OBJECTS):
        name = _SOURCE_OBJECTS[label]
        p['object'] = names[name if name in _GEOMETRIC else (name, _WEIGHTS[draws.integer(len(_WEIGHTS))])]
        p['object_alpha'] = 1.0
        p['texture_alpha'] = 0.0
        first = draws.contrasting_colour(background, 0.25)
        second = draws.contrasting_colour(first, draws.uniform(0.1, 0.25))
        p.update(_draw_pattern(draws, _SOURCE_FILLS[draws.integer(len(_SOURCE_FILLS))], (0.2, 0.4)))
    else:
        p['object'] = 0
        p['object_alpha'] = 0.0
        p['texture_alpha'] = 1.0
        first = draws.colour()
        second = draws.contrasting_colour(first, draws.uniform(0.2, 0.5))
        p.update(_draw_pattern(draws, _SOURCE_TEXTURES[label - len(_SOURCE_OBJECTS)], (0.22, 0.7)))
    p['colours'] = [first, second]
    p['centre'] = draws.uniforms(2, -0.15, 0.15)
    p['scale'] = draws.uniform(0.55, 0.85)
    p['angle'] = draws.uniform(-0.35, 0.35)
    p['aspect'] = math.exp(draws.uniform(-0.2, 0.2))
    p['shear'] = draws.uniform(-0.2, 0.2)
    p['mirror'] = 1.0 if draws.chance(0.5) else -1.0
    p['noise'] = draws.uniform(0.0, 0.2)
    return p


def _render_source(p, grid):
    image = _render_background(p, grid)
    for slot in range(_SOURCE_CLUTTER):
        coverage = _place(p['clutter'][:, slot], p['clutter_centre'][:, slot], p['clutter_scale'][:, slot],
                          p['clutter_angle'][:, slot], grid)
        _paint(image, coverage * _per_image(p['clutter_alpha'][:, slot]), p['clutter_colour'][:, slot])
    amount = _patterns(p, grid)[:, None]
    first = p['colours'][:, 0, :, None, None]
    paint = first + amount * (p['colours'][:, 1, :, None, None] - first)
    coverage = _place(p['object'], p['centre'], p['scale'], p['angle'], grid, aspect=p['aspect'],
                      shear=p['shear'], mirror=p['mirror'])
    _paint(image, coverage * _per_image(p['object_alpha']) + _per_image(p['texture_alpha']), paint)
    return image


def _sample_digits(draws, label):
    names, _ = _templates()
    background = draws.colour()
    p = _gradient_background(draws)
    p['background'] = [[0.3 * a + 0.7 * b for a, b in zip(colour, background)] for colour in p['background']]
    p.update(_draw_pattern(draws, 'stripes', (0.3, 0.8)))
    p['stripes_alpha'] = draws.uniform(0.05, 0.2) if draws.chance(0.3) else 0.0
    p['stripes_colour'] = draws.colour()
    p['colour'] = draws.contrasting_colour(background, 0.3)
    weight = _WEIGHTS[draws.integer(len(_WEIGHTS))]
    scale = draws.uniform(0.55, 0.8)  # the glyph fills 90% of the template's height
    aspect = math.exp(draws.uniform(-0.25, 0.15))
    angle = draws.uniform(-0.15, 0.15)
    centre = draws.uniforms(2, -0.1, 0.1)
    gap = draws.uniform(0.3, 0.6) * scale  # neighbours are cut by the image border
    neighbours = [str(draws.integer(10)) for _ in range(2)]
    # Slots: the labelled digit, then its left and right neighbours (alpha 0 when absent).
    p['glyph'] = [names[(glyph, weight)] for glyph in [str(label)] + neighbours]
    p['glyph_alpha'] = [1.0] + [1.0 if draws.chance(0.5) else 0.0 for _ in neighbours]
    p['glyph_centre'] = [centre]
    for side, glyph in zip((-1, 1), neighbours):
        offset = (_half_width((str(label), weight)) + _half_width((glyph, weight))) * scale * aspect + gap
        p['glyph_centre'].append([centre[0] + side * offset * math.cos(angle),
                                  centre[1] + side * offset * math.sin(angle)])
    p['scale'] = scale
    p['aspect'] = aspect
    p['shear'] = draws.uniform(-0.3, 0.3)
    p['angle'] = angle
    p['blur'] = draws.uniform(0.0, 0.6)
    p['noise'] = draws.uniform(0.0, 0.25)
    return p


def _render_digits(p, grid):
    image = _render_background(p, grid)
    _paint(image, _patterns(p, grid) * _per_image(p['stripes_alpha']), p['stripes_colour'])
    for slot in (1, 2, 0):
        coverage = _place(p['glyph'][:, slot], p['glyph_centre'][:, slot], p['scale'], p['angle'], grid,
                          aspect=p['aspect'], shear=p['shear'])
        _paint(image, coverage * _per_image(p['glyph_alpha'][:, slot]), p['colour'])
    return _blur(image, p['blur'])


def _sample_textures(draws, label):
    kind = _TEXTURE_KINDS[label // 2]
    period_range = (0.45, 0.7) if label % 2 == 0 else (0.22, 0.32)
    first = draws.colour()
    p = {'colours': [first, draws.contrasting_colour(first, draws.uniform(0.15, 0.5))]}
    p.update(_draw_pattern(draws, kind, period_range))
    p['shading'] = draws.uniform(0.0, 0.3)
    p['shading_angle'] = draws.uniform(0, 2 * np.pi)
    p['noise'] = draws.uniform(0.0, 0.3)
    return p


def _render_textures(p, grid):
    amount = _patterns(p, grid)[:, None]
    first = p['colours'][:, 0, :, None, None]
    image = first + amount * (p['colours'][:, 1, :, None, None] - first)
    along, _ = _rotated(grid, p['shading_angle'], np.zeros((len(amount), 2)))
    return image * (1.0 + _per_image(p['shading']) * along)[:, None]


_SHAPES_LINES = 3


def _sample_shapes(draws, label):
    names, _ = _templates()
    count = label % _MAX_COUNT + 1
    p = _gradient_background(draws)
    background = [(a + b) / 2 for a, b in zip(*p['background'])]
    shown = 1 + draws.integer(_SHAPES_LINES)
    p['line_alpha'] = [draws.uniform(0.4, 1.0) if slot < shown else 0.0 for slot in range(_SHAPES_LINES)]
    p['line_centre'] = [draws.uniforms(2, -0.8, 0.8) for _ in range(_SHAPES_LINES)]
    p['line_angle'] = draws.uniforms(_SHAPES_LINES, 0, np.pi)
    p['line_length'] = draws.uniforms(_SHAPES_LINES, 0.2, 0.6)
    p['line_colour'] = [draws.contrasting_colour(background, 0.2) for _ in range(_SHAPES_LINES)]
    # Objects sit in distinct cells of a 3 x 3 grid, so they never overlap.
    order = draws.uniforms(9)
    cells = sorted(range(9), key=order.__getitem__)[:_MAX_COUNT]
    p['object'] = [names[_SHAPE_KINDS[label // _MAX_COUNT]]] * _MAX_COUNT
    p['object_centre'] = [[(cell % 3 - 1) * 2 / 3 + draws.uniform(-0.06, 0.06),
                           (cell // 3 - 1) * 2 / 3 + draws.uniform(-0.06, 0.06)] for cell in cells]
    p['object_scale'] = draws.uniforms(_MAX_COUNT, 0.22, 0.3)
    p['object_angle'] = draws.uniforms(_MAX_COUNT, 0, 2 * np.pi)
    p['object_alpha'] = [1.0 if slot < count else 0.0 for slot in range(_MAX_COUNT)]
    p['object_colour'] = [draws.contrasting_colour(background, 0.3) for _ in range(_MAX_COUNT)]
    p['noise'] = draws.uniform(0.0, 0.25)
    return p


def _render_shapes(p, grid):
    image = _render_background(p, grid)
    for slot in range(_SHAPES_LINES):
        along, across = _rotated(grid, p['line_angle'][:, slot], p['line_centre'][:, slot])
        segment = _soft(np.minimum(_per_image(p['line_length'][:, slot]) - np.abs(along),
                                   0.03 - np.abs(across)), grid)
        _paint(image, segment * _per_image(p['line_alpha'][:, slot]), p['line_colour'][:, slot])
    for slot in range(_MAX_COUNT):
        coverage = _place(p['object'][:, slot], p['object_centre'][:, slot], p['object_scale'][:, slot],
                          p['object_angle'][:, slot], grid)
        _paint(image, coverage * _per_image(p['object_alpha'][:, slot]), p['object_colour'][:, slot])
    return image


_TASK_FUNCTIONS = {
    'synth-source': (_sample_source, _render_source),
    'synth-digits': (_sample_digits, _render_digits),
    'synth-textures': (_sample_textures, _render_textures),
    'synth-shapes': (_sample_shapes, _render_shapes),
}
