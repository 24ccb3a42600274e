"""Datasets and data loaders for the single-task experiments.

Tasks: `svhn` (SVHN digits), `flowers` (Oxford Flowers102), `voc12` (PASCAL VOC 2012 classification of
ground-truth object crops), every procedural task of `synthetic.py`, and `folder:<name>`, your own images in
torchvision's ImageFolder layout under `<data-dir>/<name>`. The real datasets are read from the files
`data/prepare_data.py` downloads; images are decoded lazily, one per `__getitem__` (SVHN is one array).
Transforms follow the released demos (docs/method.md §8) with ImageNet mean/std normalisation; a folder task
gets the Flowers transforms (ImageNet's: random resized crops and flips to train, a centre crop to test).
"""
import hashlib
import itertools
import math
import os
import unicodedata
import xml.etree.ElementTree as ET

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from synthetic import FLIP_INVARIANT, SYNTHETIC_TASKS, make_synthetic
from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_TASKS = {'svhn': 10, 'flowers': 102, 'voc12': 20}
TASKS = {**IMAGE_TASKS, **SYNTHETIC_TASKS}  # task name -> number of classes
FOLDER_TASK = 'folder:'  # folder:<name>, your images in <data-dir>/<name>/{train,val}/<class>/<image>

VOC_CLASSES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
               'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
               'tvmonitor')
VOC_CROP_MARGIN = 0.2


def _prepare_hint(task):
    return f'run `python data/prepare_data.py --task {task}` or pass --data-dir'


def _require_file(path, dataset_name, task):
    """Raises a UserError naming `path` and the prepare command when `path` does not exist."""
    if not os.path.exists(path):
        raise UserError(f'{dataset_name} not found: {path} is missing; {_prepare_hint(task)}')


def _one_line(error):
    return ' '.join(str(error).split())


def _corrupt(path, reason, task, kind='dataset file'):
    return UserError(f'corrupt {kind} {path}: {reason}; delete it and {_prepare_hint(task)}')


def _load_mat(path, keys, dataset_name, task):
    """Reads the arrays `keys` of a MATLAB file, reporting a missing or damaged file as a UserError."""
    _require_file(path, dataset_name, task)
    try:
        mat = scipy.io.loadmat(path)
        return [mat[key] for key in keys]
    except Exception as error:  # scipy raises many exception types for truncated or foreign files
        raise _corrupt(path, f'no array {error}' if isinstance(error, KeyError) else _one_line(error), task) from error


def _check_integers(array, low, high, what, path, task):
    """`array` must hold integers in [low, high] (MATLAB files store them as any numeric type); it may be empty."""
    values = np.asarray(array).reshape(-1)
    if not np.issubdtype(values.dtype, np.number) or values.size > 0 and (
            not np.all(np.mod(values, 1) == 0) or values.min() < low or values.max() > high):
        raise _corrupt(path, f'{what} must be integers from {low} to {high}', task)
    return values.astype(np.int64)


def load_rgb_image(path, fix='replace it with a readable copy, or remove it'):
    """Decodes an image file into an RGB PIL image (16-bit grey levels scaled to 8 bits, where PIL's conversion
    would clip them); a damaged file, or one of 32-bit or floating-point pixels (no fixed range), raises a one-line
    UserError that ends with `fix` (a dataset's own: how to get the file again)."""
    try:
        with Image.open(path) as image:
            # Pillow opens 16-bit PNG and TIFF files as 'I;16', 16-bit PGMs (and, in older versions, PNGs) as 'I'
            if image.mode.startswith('I;16') or image.mode == 'I' and image.format in ('PNG', 'PPM'):
                image = Image.fromarray(np.round(np.asarray(image, dtype=np.float32) / 257).astype(np.uint8))
            elif image.mode in ('I', 'F'):
                kind = 'floating-point' if image.mode == 'F' else '32-bit integer'
                raise UserError(f"image file {path} holds {kind} pixels, which have no fixed range: convert it to "
                                "8 or 16 bits per channel")
            return image.convert('RGB')
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f'corrupt image file {path}: {_one_line(error)}; {fix}') from error


class SVHN(Dataset):
    """SVHN digits from torchvision's `<root>/svhn/{train,test}_32x32.mat`; yields (uint8 3x32x32 tensor, digit).
    `source` is the file read."""

    def __init__(self, root, split):
        path = self.source = os.path.join(root, 'svhn', f'{split}_32x32.mat')
        images, labels = _load_mat(path, ('X', 'y'), 'SVHN', 'svhn')
        # X is H x W x C x N uint8; y holds 1..10, the label 10 standing for the digit 0.
        if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.dtype != np.uint8:
            raise _corrupt(path, f'X is {images.dtype} of shape {images.shape}, not uint8 32 x 32 x 3 x N', 'svhn')
        labels = _check_integers(labels, 1, 10, 'the labels y', path, 'svhn')
        if len(labels) != images.shape[3]:
            raise _corrupt(path, f'{len(labels)} labels for {images.shape[3]} images', 'svhn')
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1)))
        labels[labels == 10] = 0
        self.labels = labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


class Flowers102(Dataset):
    """Oxford Flowers102 as torchvision lays it out under `<root>/flowers-102`; yields (PIL image, class).

    The training split is the official train + val sets, the test split the official test set; `source` is the
    file listing them.
    """

    def __init__(self, root, split):
        base = os.path.join(root, 'flowers-102')
        id_keys = ('trnid', 'valid') if split == 'train' else ('tstid',)
        labels_path, ids_path = os.path.join(base, 'imagelabels.mat'), os.path.join(base, 'setid.mat')
        self.source = ids_path
        labels, = _load_mat(labels_path, ('labels',), 'Flowers102', 'flowers')
        set_ids = _load_mat(ids_path, id_keys, 'Flowers102', 'flowers')
        labels = _check_integers(labels, 1, 102, 'the labels', labels_path, 'flowers')
        image_ids = _check_integers(np.concatenate([ids.reshape(-1) for ids in set_ids]), 1, len(labels),
                                    f"the image ids {' and '.join(id_keys)}", ids_path, 'flowers').tolist()
        self.image_paths = [os.path.join(base, 'jpg', f'image_{image_id:05d}.jpg') for image_id in image_ids]
        self.labels = [int(labels[image_id - 1]) - 1 for image_id in image_ids]
        for path in self.image_paths:
            _require_file(path, 'Flowers102', 'flowers')

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return load_rgb_image(self.image_paths[index], f"delete it and {_prepare_hint('flowers')}"), self.labels[index]


def folder_name(task):
    """<name> of a `folder:<name>` task (a folder under --data-dir, written plainly), or None for the other
    tasks."""
    if not task.startswith(FOLDER_TASK):
        return None
    name = task[len(FOLDER_TASK):]
    if not name or os.path.isabs(name) or '..' in name.split(os.sep):
        raise UserError(f"--task folder:<name> takes a folder under --data-dir, got folder:{name}: put the "
                        "images in <data-dir>/<name>/{train,val}/<class>/<image>")
    if name != os.path.normpath(name):  # one task, one name: runs compare tasks by name
        raise UserError(f"--task folder:{name}: write it folder:{os.path.normpath(name)}")
    return name


def _unreadable(error):
    return UserError(f"cannot read {error.filename}: {error.strerror}; fix its permissions")


def _layout(root, name):
    return f"{os.path.join(root, name)}/{{train,val}}/<class>/<image> (torchvision's ImageFolder layout)"


def _class_folders(path, name, root):
    """The class folders of the split in `path` of task folder:`name`, sorted (hidden ones skipped)."""
    if not os.path.isdir(path):
        raise UserError(f"folder:{name}: {path} is missing; put the images in {_layout(root, name)}")
    try:
        return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith('.'))
    except OSError as error:
        raise _unreadable(error) from None


def _image_files(folder):
    """The image files under `folder` (sub-folders included, once each, however many links lead to one; a link
    back to a folder above is not followed; hidden files and folders skipped), in sorted order."""
    found, entered, top = [], set(), os.path.join(os.path.realpath(folder), '')

    def refuse(error):
        raise _unreadable(error)

    def enters(path):
        """Whether the walk goes into `path`: a folder neither entered already nor above `folder`."""
        real = os.path.realpath(path)
        if real in entered or top.startswith(os.path.join(real, '')):
            return False
        entered.add(real)
        return True
    for parent, folders, files in os.walk(folder, onerror=refuse, followlinks=True):
        folders[:] = [name for name in sorted(folders)
                      if not name.startswith('.') and enters(os.path.join(parent, name))]
        found += [os.path.join(parent, name) for name in sorted(files)
                  if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith('.')]
    return found


def task_classes(task, data_dir, split='train'):
    """The class names of a folder task, as its training folders number them (or those of another `split`); None
    for the other tasks, whose classes are fixed. A run records them, so that data of other classes are refused
    rather than renumbered."""
    name = folder_name(task)
    return None if name is None else _class_folders(os.path.join(data_dir, name, split), name, data_dir)


class ImageFolderSplit(Dataset):
    """One split of your own task, in torchvision's ImageFolder layout: `<root>/<name>/<split>/<class>/<image>`
    (images in sub-folders of a class folder too; hidden files and folders, such as .ipynb_checkpoints or macOS's
    ._ files, and files of other extensions skipped); yields (PIL image, class).
    The classes are numbered in the sorted order of the training split's folders (`classes`); another split may
    hold fewer of them, not others. `samples` holds (file, class) pairs; `source` is the split's folder."""

    def __init__(self, root, name, split, classes=None):
        path = self.source = os.path.join(root, name, split)
        layout = _layout(root, name)
        found = _class_folders(path, name, root)
        self.classes = classes or found
        others = sorted(set(found) - set(self.classes))
        if others:
            known = {unicodedata.normalize('NFC', class_name) for class_name in self.classes}
            lookalikes = [other for other in others if unicodedata.normalize('NFC', other) in known]
            hint = (f" ({', '.join(lookalikes)}: the training folder of that name is spelt in other Unicode "
                    "characters, as one system writes accents composed and another decomposed; rename one)"
                    if lookalikes else '')
            raise UserError(f"{path} holds classes the training split lacks: {', '.join(others)}{hint}; put the "
                            f"images in {layout}")
        per_class = [[(file, label) for file in _image_files(os.path.join(path, class_name))] if class_name in found
                     else [] for label, class_name in enumerate(self.classes)]
        self.samples = [sample for samples in per_class for sample in samples]
        self.labels = [label for _, label in self.samples]
        if classes is None:  # the training split defines the classes: two or more, each with images
            empty = [class_name for class_name, samples in zip(self.classes, per_class) if not samples]
            if len(self.classes) < 2 or empty:
                reason = f"classes without images: {', '.join(empty)}" if empty else \
                    f"{len(self.classes)} class folders, a task needs 2 or more"
                raise UserError(f"{path}: {reason}; put the images in {layout}")
        if not self.samples:
            raise UserError(f"{path} holds no images; put them in {layout}")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return load_rgb_image(path), label


def voc_crop_box(bndbox, image_width, image_height, margin=VOC_CROP_MARGIN):
    """Crop box (left, upper, right, lower) in PIL pixel coordinates around a VOC bounding box.

    `bndbox` is VOC's (xmin, ymin, xmax, ymax), 1-based and inclusive. Each side moves out by `margin` times the
    box width (left/right) or height (top/bottom), rounded outwards and clipped to the image.
    """
    xmin, ymin, xmax, ymax = bndbox
    left, upper, right, lower = xmin - 1, ymin - 1, xmax, ymax
    dx, dy = margin * (right - left), margin * (lower - upper)
    return (max(0, math.floor(left - dx)), max(0, math.floor(upper - dy)),
            min(image_width, math.ceil(right + dx)), min(image_height, math.ceil(lower + dy)))


def _positive_integer(text):
    return int(text) if text.isdecimal() and int(text) > 0 else None


def _finite_number(text):
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _voc_corrupt(path, reason):
    return _corrupt(path, reason, 'voc12', 'annotation file')


def _voc_field(element, tag, where, parse, expected, path):
    """`parse` applied to the text of `element`'s child `tag`; a missing child or a text `parse` maps to None
    raises a UserError naming the annotation file `path`."""
    node = element.find(tag)
    if node is None:
        raise _voc_corrupt(path, f'{where} has no <{tag}>')
    text = (node.text or '').strip()
    value = parse(text)
    if value is None:
        raise _voc_corrupt(path, f'{where} has <{tag}> {text!r}, not {expected}')
    return value


def read_voc_objects(annotation_path):
    """(crop box, class index) for every non-difficult object of one VOC XML annotation file.

    A file without a positive integer image size, or with a used object lacking a VOC class name, a 0/1
    difficult flag (absent means 0) or numeric box coordinates, or whose box clipped to the image is empty,
    raises a UserError naming it.
    """
    try:
        root = ET.parse(annotation_path).getroot()
    except (ET.ParseError, OSError) as error:
        raise _voc_corrupt(annotation_path, _one_line(error)) from error
    width, height = (_voc_field(root, f'size/{key}', 'the annotation', _positive_integer, 'a positive integer',
                                annotation_path) for key in ('width', 'height'))
    objects = []
    for number, obj in enumerate(root.findall('object'), 1):
        where = f'object {number}'
        if obj.find('difficult') is not None and _voc_field(obj, 'difficult', where, {'0': False, '1': True}.get,
                                                            '0 or 1', annotation_path):
            continue
        label = _voc_field(obj, 'name', where, {name: index for index, name in enumerate(VOC_CLASSES)}.get,
                           'a VOC class', annotation_path)
        bndbox = [_voc_field(obj, f'bndbox/{key}', where, _finite_number, 'a number', annotation_path)
                  for key in ('xmin', 'ymin', 'xmax', 'ymax')]
        left, upper, right, lower = voc_crop_box(bndbox, width, height, margin=0)
        if not (left < right and upper < lower):
            box = ', '.join(f'{value:g}' for value in bndbox)
            raise _voc_corrupt(annotation_path, f'{where} has the box (xmin, ymin, xmax, ymax) = ({box}), empty or '
                                                f'outside the {width} x {height} image')
        objects.append((voc_crop_box(bndbox, width, height), label))
    return objects


class VOCObjectCrops(Dataset):
    """PASCAL VOC 2012 object classification: every non-difficult ground-truth object cropped with a margin.

    The train split lists images of `ImageSets/Main/train.txt`, the test split those of `val.txt`. The training
    split is re-sampled to `crops_per_class` crops of every class (without replacement when a class has more,
    with replacement when fewer), deterministically from `seed`. `samples` holds (image path, crop box, class)
    triples; items are (PIL crop, class), an image too small for its crop refused; `source` is the image list read.
    """

    def __init__(self, root, split, crops_per_class=1000, seed=0):
        voc_dir = os.path.join(root, 'VOCdevkit', 'VOC2012')
        list_path = self.source = os.path.join(voc_dir, 'ImageSets', 'Main',
                                               'train.txt' if split == 'train' else 'val.txt')
        _require_file(list_path, 'VOC 2012', 'voc12')
        with open(list_path) as f:
            image_ids = f.read().split()
        samples = []
        for image_id in image_ids:
            annotation_path = os.path.join(voc_dir, 'Annotations', f'{image_id}.xml')
            image_path = os.path.join(voc_dir, 'JPEGImages', f'{image_id}.jpg')
            _require_file(annotation_path, 'VOC 2012', 'voc12')
            _require_file(image_path, 'VOC 2012', 'voc12')
            samples += [(image_path, box, label) for box, label in read_voc_objects(annotation_path)]
        if split == 'train':
            samples = self._balance(samples, crops_per_class, seed, list_path)
        self.samples = samples
        self.labels = [label for _, _, label in samples]

    @staticmethod
    def _balance(samples, crops_per_class, seed, list_path):
        """Draws `crops_per_class` samples of every class."""
        rng = np.random.default_rng(seed)
        labels = np.array([label for _, _, label in samples])
        balanced = []
        for label, name in enumerate(VOC_CLASSES):
            indices = np.flatnonzero(labels == label)
            if len(indices) == 0:
                raise UserError(f'VOC 2012 incomplete: no {name!r} object in the images of {list_path}; '
                                f'{_prepare_hint("voc12")}')
            chosen = rng.choice(indices, crops_per_class, replace=len(indices) < crops_per_class)
            balanced += [samples[i] for i in chosen]
        return balanced

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image_path, box, label = self.samples[index]
        image = load_rgb_image(image_path, f"delete it and {_prepare_hint('voc12')}")
        if box[2] > image.width or box[3] > image.height:  # PIL would pad the crop with black
            raise UserError(f"image file {image_path} ({image.width} x {image.height} pixels) does not hold the crop "
                            f"{box} its annotation gives; delete both and {_prepare_hint('voc12')}")
        return image.crop(box), label


class TransformedDataset(Dataset):
    """Applies `transform` to the images of a dataset of (image, label) pairs; `labels` are the dataset's."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform
        self.labels = dataset.labels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(image), label


def _to_normalized_tensor():
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor()]


def image_transform(task, train, input_size=224):
    """Transform of the svhn, flowers, voc12 and folder images (PIL images or uint8 tensors) -> normalised float
    tensor."""
    if task == 'svhn':  # digits: no random crop, no flip
        geometry = [v2.Resize((input_size, input_size), antialias=True)]
    elif (task == 'flowers' or folder_name(task)) and train:
        geometry = [v2.RandomResizedCrop(input_size, antialias=True), v2.RandomHorizontalFlip()]
    elif task == 'flowers' or folder_name(task):
        geometry = [v2.Resize(int(input_size * 256 / 224), antialias=True), v2.CenterCrop(input_size)]
    elif task == 'voc12':
        geometry = [v2.Resize((input_size, input_size), antialias=True)]
        if train:
            geometry.append(v2.RandomHorizontalFlip())
    else:
        raise ValueError(f'no image transform for task {task!r}')
    return v2.Compose(geometry + _to_normalized_tensor())


def evaluation_transform(task, input_size=224):
    """What `task`'s test images go through before the network (and a deployed network's input must)."""
    if task in SYNTHETIC_TASKS:
        return SyntheticAugment(task, False, input_size)
    return image_transform(task, False, input_size)


class SyntheticAugment:
    """Batched transform of uint8 synthetic images (B x 3 x H x W) -> normalised float tensors.

    Resizes to `input_size` when it differs from the native size; training adds a horizontal flip for
    the tasks in `synthetic.FLIP_INVARIANT`.  No random crop: the generators already draw every
    object's position and scale (and, as for SVHN in the paper, crops only slowed training down: on
    the demo's short budgets they cost 8-15 points of accuracy).  Whole batches at once: per-image
    transforms would cost more than the training step itself on a small CPU.  Randomness comes from
    torch's global generator: under torchrun every process draws the flips of the whole batch of all
    processes, as one process with it would, and keeps its share (`rank`, `world_size`).
    """

    def __init__(self, task, train, input_size):
        self.input_size = input_size
        self.flip = train and task in FLIP_INVARIANT
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __call__(self, images, rank=0, world_size=1):
        if images.dim() == 3:  # one image
            return self(images[None])[0]
        x = images.float().div_(255)
        size = self.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
        if self.flip:
            flipped = torch.rand(x.shape[0] * world_size)[rank::world_size] < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        return ((x - self.mean) / self.std).contiguous()


class ShuffledShard(torch.utils.data.Sampler):
    """The training order: each epoch a new permutation of range(n) drawn from `generator`, cut (or wrapped
    around) to `size` x `world_size` indices (default: n wrapped around to a multiple of `world_size`), and
    every `world_size`-th index from `rank`.  Every process draws the same permutation (same seed), so with a
    batch of B each, their step-s batches together are the step-s batch of one process with a batch of
    world_size x B.  With one process and all n, torch's RandomSampler order."""

    def __init__(self, n, generator, rank=0, world_size=1, size=None):
        self.n, self.generator, self.rank, self.world_size = n, generator, rank, world_size
        self.size = math.ceil(n / world_size) if size is None else size

    def __len__(self):
        return self.size

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)
        total = self.size * self.world_size
        order = torch.cat([order, order[:max(total - self.n, 0)]])[:total]
        return iter(order[self.rank::self.world_size].tolist())


class SeededShard(ShuffledShard):
    """A `ShuffledShard` whose indices come with the seed of their random augmentation (`SeededSamples`): the
    epoch's seed, a hash of `generator`'s state before its permutation (which the checkpoints hold), plus the
    image's place in the permutation.  An image is thus cropped and flipped alike whatever the number of
    processes or of loader workers, and a resumed run draws what an uninterrupted one draws."""

    def __iter__(self):
        state = self.generator.get_state().numpy().tobytes()
        epoch_seed = int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), 'little')
        places = range(self.rank, len(self) * self.world_size, self.world_size)
        return ((index, (epoch_seed + place) % 2 ** 63) for index, place in zip(super().__iter__(), places))


class SeededSamples(Dataset):
    """`dataset` indexed by the (index, seed) pairs of a `SeededShard`: each image is transformed with torch's
    generator seeded by its `seed` (the caller's generator left as it was)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        generator = torch.default_generator  # the CPU generator the transforms draw from
        state = generator.get_state()
        generator.manual_seed(seed)  # not torch.manual_seed: it seeds the GPUs too, 100 times slower
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def training_loader(train_set, batch_size, workers, seed, rank=0, world_size=1, augment=None):
    """The training loader of process `rank` of `world_size`: its share of each epoch's shuffled order, drawn
    from `seed` (`ShuffledShard`), in full batches only: the released code ends each epoch at its first
    incomplete batch, so every step normalises over `batch_size` images per process (and a CUDA graph replays
    every step); the steps are those of one process with all the processes' images per batch.  A split smaller
    than one such batch is one batch (of two images at least per process: BatchNorm cannot train on one).
    In-memory synthetic splits give their batched transform `augment` (`SyntheticLoader`); datasets of image
    files a DataLoader with `workers` processes, each image's random augmentation seeded by its place
    (`SeededShard`)."""
    share = math.ceil(len(train_set) / world_size)
    if share < 2:
        raise UserError(f"the training split has {len(train_set)} image{'s' if len(train_set) > 1 else ''} for "
                        f"{world_size} process{'es' if world_size > 1 else ''}: BatchNorm cannot train on a batch of "
                        "one (--train-limit?)")
    steps = len(train_set) // (batch_size * world_size)
    size = steps * batch_size if steps else share
    generator = torch.Generator().manual_seed(seed)
    if augment is not None:
        return SyntheticLoader(train_set, batch_size, augment,
                               ShuffledShard(len(train_set), generator, rank, world_size, size))
    return DataLoader(SeededSamples(train_set), batch_size=batch_size,
                      sampler=SeededShard(len(train_set), generator, rank, world_size, size),
                      generator=torch.Generator(),  # seeds the workers' generators, which draw nothing here
                      **loader_options(workers))


class SyntheticLoader:
    """A DataLoader stand-in for in-memory synthetic splits: batches in the order of `sampler` (default: the
    dataset's), augmented a batch at once (a `ShuffledShard`'s share of the flips of every process)."""

    def __init__(self, dataset, batch_size, augment, sampler=None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.augment = augment
        self.sampler = range(len(dataset)) if sampler is None else sampler

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        share = (self.sampler.rank, self.sampler.world_size) if isinstance(self.sampler, ShuffledShard) else ()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.augment(self.dataset.images[index], *share), self.dataset.labels[index]


def get_datasets(task, data_dir='data', input_size=224, seed=0, train_images=True, classes=None):
    """(train_set, test_set, num_classes) of `task`, yielding (normalised 3 x input_size x input_size, label).

    `seed` fixes the VOC class re-sampling; the synthetic images are always those of seed 0.  `train_images`
    False (evaluating a trained network): the training images are neither read nor needed (train_set is None);
    a folder task then takes `classes`, those the network was trained on, in their order.
    """
    name = folder_name(task)
    if task not in TASKS and name is None:
        raise UserError(f'unknown task {task!r}; valid tasks: {", ".join(TASKS)}, or folder:<name> for your '
                        'images in <data-dir>/<name>/{train,val}/<class>/<image>')
    if name is not None or task in IMAGE_TASKS:
        splits = ('train', 'test') if train_images else ('test',)
        if name is not None:
            raw = {'train': ImageFolderSplit(data_dir, name, 'train')} if train_images else {}
            raw['test'] = ImageFolderSplit(data_dir, name, 'val', raw['train'].classes if train_images else classes)
            num_classes = len(raw['test'].classes)
        else:
            num_classes = IMAGE_TASKS[task]
            if task == 'svhn':
                raw = {split: SVHN(data_dir, split) for split in splits}
            elif task == 'flowers':
                raw = {split: Flowers102(data_dir, split) for split in splits}
            else:
                raw = {split: VOCObjectCrops(data_dir, split, seed=seed) for split in splits}
            for split, dataset in raw.items():
                if len(dataset) == 0:
                    raise UserError(f'the {split} split of {task} has no images ({dataset.source}); '
                                    f'{_prepare_hint(task)}')
        train_transform = image_transform(task, True, input_size)
        test_transform = image_transform(task, False, input_size)
    else:
        num_classes = SYNTHETIC_TASKS[task]
        raw = {split: make_synthetic(task, split) for split in ('train', 'test')}
        train_transform = SyntheticAugment(task, True, input_size)
        test_transform = SyntheticAugment(task, False, input_size)
    train_set = TransformedDataset(raw['train'], train_transform) if train_images else None
    return train_set, TransformedDataset(raw['test'], test_transform), num_classes


def get_dataloaders(task, data_dir='data', batch_size=32, workers=4, input_size=224, seed=0,
                    eval_batch_size=None, train_limit=None, test_limit=None, rank=0, world_size=1,
                    train_images=True, classes=None):
    """(train_loader, test_loader, num_classes) of `task`; the training order is shuffled from `seed`.

    `train_limit` / `test_limit` keep only N images of a split, every class's first ones (`first_images`; quick
    runs, tests).  Under torchrun, process `rank` of `world_size` gets its share of each split (`ShuffledShard`;
    every world_size-th test image).  Synthetic tasks, held in memory, get `SyntheticLoader`s (batched
    augmentation, no workers).  `train_images` False: only evaluating, as in `get_datasets` (train_loader None)."""
    if task in SYNTHETIC_TASKS:
        train_set = make_synthetic(task, 'train', num_images=train_limit) if train_images else None
        test_set = make_synthetic(task, 'test', num_images=test_limit)
        num_classes = SYNTHETIC_TASKS[task]
        train_augment = SyntheticAugment(task, True, input_size)
        test_augment = SyntheticAugment(task, False, input_size)
        test_loader = SyntheticLoader(test_set, eval_batch_size or batch_size, test_augment,
                                      range(rank, len(test_set), world_size))
    else:
        train_set, test_set, num_classes = get_datasets(task, data_dir, input_size, seed, train_images, classes)
        train_set = None if train_set is None else first_images(train_set, train_limit)
        test_set = first_images(test_set, test_limit)
        train_augment = None
        test_loader = DataLoader(test_set, batch_size=eval_batch_size or batch_size,
                                 sampler=range(rank, len(test_set), world_size), **loader_options(workers))
    train_loader = None if train_set is None else training_loader(train_set, batch_size, workers, seed, rank,
                                                                  world_size, train_augment)
    return train_loader, test_loader, num_classes


def first_images(dataset, limit):
    """`dataset` cut to `limit` images for a quick run (--train-limit, --test-limit; None keeps them all): the
    first image of every class, then the second ones, and so on, kept in the split's order, so that a limit
    keeps every class in whatever order the split lists its images (VOC's balanced crops come a class at a
    time).  `dataset` has `labels`, or is a ConcatDataset of such datasets."""
    if limit is None or limit >= len(dataset):
        return dataset
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    per_class = {}
    for index, label in enumerate(label for part in parts for label in part.labels):
        per_class.setdefault(label, []).append(index)
    turns = itertools.zip_longest(*per_class.values())
    return Subset(dataset, sorted([index for turn in turns for index in turn if index is not None][:limit]))


def loader_options(workers):
    """DataLoader settings for image files: `workers` processes, kept from epoch to epoch, and batches in pinned
    memory when there is a GPU, so that `.to(device, non_blocking=True)` copies them asynchronously.  The
    processes' own generators draw nothing a run depends on: training images are augmented from their seeds
    (`SeededSamples`), so that a resumed run draws the crops and flips an uninterrupted one draws."""
    return dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
