"""Visual Decathlon data: task metadata, COCO-style annotation loading, per-task transforms,
the decathlon score and evaluation-server submissions.

On-disk layout (the official decathlon-1.0 release, or the offline miniature written by
data/make_synthetic_decathlon.py):

    <data_dir>/decathlon-1.0/annotations/<task>_{train,val,test_stripped}.json
    <data_dir>/decathlon-1.0/<file_name of each image>            (e.g. data/svhn/train/...)
    <data_dir>/decathlon-1.0/decathlon_mean_std.json              (optional, miniature only)
"""
import contextlib
import io
import json
import math
import os

import torch
from pycocotools.coco import COCO
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2

from dataloaders import first_images, load_rgb_image, loader_options, training_loader
from utils import UserError, atomic_write_json, error_reason, writing

DECATHLON_TASKS = ['imagenet12', 'aircraft', 'cifar100', 'daimlerpedcls', 'dtd',
                   'gtsrb', 'vgg-flowers', 'omniglot', 'svhn', 'ucf101']

SPLITS = ('train', 'val', 'test_stripped')

# Category ids of a task are CATEGORY_BASE[task] + class index.
CATEGORY_BASE = {
    'aircraft': 10000001, 'cifar100': 20000001, 'daimlerpedcls': 30000001, 'dtd': 40000001,
    'gtsrb': 50000001, 'imagenet12': 60000001, 'omniglot': 70000001, 'svhn': 80000001,
    'ucf101': 90000001, 'vgg-flowers': 100000001,
}

# Top-1 accuracy (%) of the decathlon baseline; the score gives 250 points to a task at its baseline.
BASELINE_ACC = {
    'imagenet12': 59.87, 'aircraft': 60.34, 'cifar100': 82.12, 'daimlerpedcls': 92.82,
    'dtd': 55.53, 'gtsrb': 97.53, 'vgg-flowers': 81.41, 'omniglot': 87.69, 'svhn': 96.55,
    'ucf101': 51.20,
}

# Per-task (mean, std) of the images in [0, 1], from the decathlon's usual statistics pickle.
MEAN_STD = {
    'imagenet12': ((0.485, 0.456, 0.406),
                   (0.229, 0.224, 0.225)),
    'aircraft': ((0.47983041, 0.51074066, 0.53437998),
                 (0.21070221, 0.20508901, 0.23729657)),
    'cifar100': ((0.50705882, 0.48666667, 0.44078431),
                 (0.26745098, 0.25647059, 0.27607843)),
    'daimlerpedcls': ((0.48203529, 0.48203529, 0.48203529),
                      (0.23612616, 0.23612616, 0.23612616)),
    'dtd': ((0.52696497, 0.47025164, 0.42396662),
            (0.25226877, 0.2409176, 0.2499409)),
    'gtsrb': ((0.33921263, 0.3117836, 0.32047045),
              (0.27560347, 0.26576119, 0.27089863)),
    'vgg-flowers': ((0.43414682, 0.38309883, 0.29714763),
                    (0.28509808, 0.23842338, 0.2639633)),
    'omniglot': ((0.08099839, 0.08099839, 0.08099839),
                 (0.27046935, 0.27046935, 0.27046935)),
    'svhn': ((0.4376821, 0.4437697, 0.47280442),
             (0.19803012, 0.20101562, 0.19703614)),
    'ucf101': ((0.49953101, 0.49880386, 0.49981996),
               (0.10898684, 0.10810246, 0.10679939)),
}

IMAGE_SIZE = 72  # shorter side of every decathlon image
# Preprocessing of the released code (docs/method.md §10).  squash: the whole image resized to 72x72 (else the
# shorter side to 72); crop: the network's input side; pad: reflect padding before the training crop; flip:
# random horizontal flips in training; jitter: colour jitter (brightness, contrast, saturation) in training.
_RESIZE_CROP = dict(squash=False, crop=64, pad=0, flip=True, jitter=None)
_SQUASH_PAD = dict(squash=True, crop=72, pad=8, flip=True, jitter=None)
PREPROCESSING = {
    'svhn': dict(_RESIZE_CROP, flip=False),      # digits and characters change meaning when mirrored
    'omniglot': dict(_RESIZE_CROP, flip=False),
    'aircraft': _SQUASH_PAD,
    'cifar100': _SQUASH_PAD,
    'daimlerpedcls': _SQUASH_PAD,
    'gtsrb': dict(_SQUASH_PAD, flip=False, jitter=(0.5, 0.2, 0.2)),  # traffic signs have a handedness
    'dtd': dict(_RESIZE_CROP, crop=72),
    'imagenet12': _RESIZE_CROP,
    'vgg-flowers': _RESIZE_CROP,
    'ucf101': _RESIZE_CROP,
}

MEAN_STD_FILE = 'decathlon_mean_std.json'
IMAGENET_ARCHIVE = 'decathlon-1.0-data-imagenet.tar'  # the imagenet12 images: from image-net.org only
SCRIPTS_DATA_DIR_FIX = 'pass --data-dir'  # how the scripts name the data folder (the notebook: its variable)


def download_hint(data_dir_fix=SCRIPTS_DATA_DIR_FIX):
    """How to get the decathlon, or `data_dir_fix`: how to name the folder that holds it (the scripts' flag; the
    notebook's environment variable)."""
    return ('run `python data/download_decathlon.py` for the real data or `python data/make_synthetic_decathlon.py` '
            f'for the offline miniature, or {data_dir_fix}')


def images_hint(task, data_dir, data_dir_fix=SCRIPTS_DATA_DIR_FIX):
    """How to get the images of `task`: imagenet12's are not in the public download."""
    if task != 'imagenet12':
        return download_hint(data_dir_fix)
    return (f'the imagenet12 images are not public: download {IMAGENET_ARCHIVE} from https://image-net.org '
            f'(account required, Visual Decathlon download) and extract it with '
            f'`tar -xf {IMAGENET_ARCHIVE} -C {os.path.join(decathlon_root(data_dir), "data")}`')


def missing_files(paths):
    """The files among `paths` that are not there, found with one listing per folder rather than one look-up
    per file (a split of imagenet12 names over a million)."""
    by_folder = {}
    for path in paths:
        by_folder.setdefault(os.path.dirname(path), []).append(path)
    missing = []
    for folder, files in by_folder.items():
        try:
            present = set(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        except OSError as error:
            raise UserError(f"cannot read {folder}: {error.strerror}; fix its permissions") from None
        missing += [path for path in files if os.path.basename(path) not in present]
    return missing


def check_task(task):
    if task not in CATEGORY_BASE:
        raise UserError(f"unknown decathlon task '{task}'; valid tasks: {', '.join(DECATHLON_TASKS)}")


def decathlon_root(data_dir):
    return os.path.join(data_dir, 'decathlon-1.0')


def annotation_path(data_dir, task, split):
    return os.path.join(decathlon_root(data_dir), 'annotations', f'{task}_{split}.json')


def available_tasks(data_dir):
    """Decathlon tasks (in DECATHLON_TASKS order) whose training annotation file exists under data_dir."""
    return [task for task in DECATHLON_TASKS if os.path.isfile(annotation_path(data_dir, task, 'train'))]


def task_mean_std(task, data_dir='data'):
    """(mean, std) of a task: from <data_dir>/decathlon-1.0/decathlon_mean_std.json when that file
    lists the task (the miniature decathlon writes it), otherwise the published MEAN_STD."""
    check_task(task)
    path = os.path.join(decathlon_root(data_dir), MEAN_STD_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                stats = json.load(f)
        except (OSError, ValueError) as error:
            raise UserError(f"corrupt mean/std file {path}: {error}; delete it or re-run "
                            "`python data/make_synthetic_decathlon.py --force`") from error
        if task in stats:
            entry = stats[task]
            valid = isinstance(entry, dict) and all(
                isinstance(entry.get(key), list) and len(entry[key]) == 3 and all(
                    isinstance(v, (int, float)) and math.isfinite(v) and (key == 'mean' or v > 0) for v in entry[key])
                for key in ('mean', 'std'))
            if not valid:
                raise UserError(f"mean/std file {path}: {task} needs 'mean' and 'std', three numbers each (std "
                                "positive); delete it or re-run `python data/make_synthetic_decathlon.py --force`")
            return tuple(entry['mean']), tuple(entry['std'])
    return MEAN_STD[task]


def crop_size(task, input_size=None):
    """Side of the square input fed to the network: input_size, or the task's default (64; 72 for aircraft,
    cifar100, daimlerpedcls, gtsrb and dtd)."""
    check_task(task)
    return input_size if input_size is not None else PREPROCESSING[task]['crop']


def decathlon_transform(task, train, input_size=None, data_dir='data', mean_std=None):
    """The task's preprocessing (PREPROCESSING): resize (shorter side to 72, or the whole image to 72x72),
    then for training a random crop (after reflect padding), flip and colour jitter where the task has them,
    for evaluation a center crop (squashed images are used whole), and normalisation with `mean_std` (default:
    `task_mean_std` of data_dir).  A non-default input_size scales the resize and padding with the crop."""
    recipe = PREPROCESSING[task]
    crop = crop_size(task, input_size)
    scale = crop / recipe['crop']
    side = round(IMAGE_SIZE * scale)
    mean, std = mean_std or task_mean_std(task, data_dir)
    steps = [v2.Resize((side, side) if recipe['squash'] else side, antialias=True)]
    if train:
        pad = round(recipe['pad'] * scale)
        steps.append(v2.RandomCrop(crop, padding=pad, padding_mode='reflect') if pad else v2.RandomCrop(crop))
        if recipe['flip']:
            steps.append(v2.RandomHorizontalFlip())
        if recipe['jitter']:
            brightness, contrast, saturation = recipe['jitter']
            steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation))
    elif not recipe['squash']:
        steps.append(v2.CenterCrop(crop))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
    return v2.Compose(steps)


# The lists of an annotation file and the (field, type) pairs every entry of each needs; 'images' is required.
ENTRY_FIELDS = {'images': (('id', int), ('file_name', str)),
                'annotations': (('id', int), ('image_id', int), ('category_id', int)),
                'categories': (('id', int),)}


def _corrupt_annotations(path, reason):
    return UserError(f"corrupt annotation file {path}: {reason}; download or generate it again")


def _load_annotations(path):
    """The annotation file as a pycocotools COCO index (its progress prints silenced), once its lists, their
    entries' fields and the uniqueness of image ids are checked."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise _corrupt_annotations(path, ' '.join(str(error).split())) from error
    if not isinstance(content, dict) or not isinstance(content.get('images'), list):
        raise _corrupt_annotations(path, "no 'images' list")
    for key, fields in ENTRY_FIELDS.items():
        entries = content.get(key, [])
        if not isinstance(entries, list):
            raise _corrupt_annotations(path, f"'{key}' is not a list")
        for number, entry in enumerate(entries, 1):
            for field, kind in fields:
                if not isinstance(entry, dict) or type(entry.get(field)) is not kind:
                    raise _corrupt_annotations(path, f"{key} entry {number} has no "
                                                     f"{'integer' if kind is int else 'string'} {field}")
    image_ids = set()
    for image in content['images']:
        if image['id'] in image_ids:
            raise _corrupt_annotations(path, f"image id {image['id']} is listed twice")
        image_ids.add(image['id'])
    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _category_ids(task, categories, path):
    """The real category ids of a task, index = class label; they must run from the task's base."""
    base = CATEGORY_BASE[task]
    category_ids = sorted(category['id'] for category in categories)
    if not category_ids or category_ids != list(range(base, base + len(category_ids))):
        raise UserError(f"annotation file {path}: {task} category ids must run from {base} to "
                        f"{base} + number of classes - 1; is it the annotation file of another task?")
    return category_ids


def _load_image(path, hint):
    """`dataloaders.load_rgb_image` (16-bit grey scaled, damaged files refused), a file removed since the dataset
    checked it named as missing; `hint` says how to get the task's images."""
    if not os.path.exists(path):
        raise UserError(f"image file {path} is missing; {hint}")
    return load_rgb_image(path, f"delete it and {hint}")


class DecathlonDataset(Dataset):
    """One split of one decathlon task: yields (transformed image, class label); label -1 for test_stripped.

    image_ids[i] is the image id of sample i and category_ids[label] the real category id of a label,
    which is what a submission to the evaluation server needs; `path` is the annotation file read.  Missing
    image files are refused when it is built, unless `check_images` is False (a split no image will be read of).
    """

    def __init__(self, task, split, data_dir='data', transform=None, check_images=True,
                 data_dir_fix=SCRIPTS_DATA_DIR_FIX):
        check_task(task)
        hint = download_hint(data_dir_fix)
        if split not in SPLITS:
            raise UserError(f"unknown decathlon split '{split}'; valid splits: {', '.join(SPLITS)}")
        path = self.path = annotation_path(data_dir, task, split)
        if not os.path.exists(path):
            raise UserError(f"Visual Decathlon task {task} not found: {path} is missing; {hint}")
        coco = _load_annotations(path)
        categories = coco.dataset.get('categories')
        if not categories and split == 'test_stripped':
            train_path = annotation_path(data_dir, task, 'train')
            if not os.path.exists(train_path):
                raise UserError(f"{path} lists no categories and {train_path} is missing; {hint}")
            categories = _load_annotations(train_path).dataset.get('categories')
        self.task = task
        self.split = split
        self.transform = transform
        self.category_ids = _category_ids(task, categories or [], path)
        self.num_classes = len(self.category_ids)
        images = coco.dataset['images']
        if not images:
            raise UserError(f"the {split} split of {task} has no images ({path}); {hint}")
        self.image_ids = [image['id'] for image in images]
        self.paths = [os.path.join(decathlon_root(data_dir), image['file_name']) for image in images]
        self.images_hint = images_hint(task, data_dir, data_dir_fix)
        missing = missing_files(self.paths) if check_images else []
        if missing:  # now, not at the batch that reads the first of them
            raise UserError(f"{len(missing)} of the {len(self.paths)} images of the {split} split of {task} are "
                            f"missing ({missing[0]} the first); {self.images_hint}")
        if split == 'test_stripped':
            self.labels = [-1] * len(images)
        else:
            self.labels = [self._label(coco, image_id, path) for image_id in self.image_ids]

    def _label(self, coco, image_id, path):
        annotations = coco.imgToAnns.get(image_id, [])
        if len(annotations) != 1:
            raise UserError(f"annotation file {path}: image {image_id} has {len(annotations)} annotations, "
                            "expected exactly one")
        label = annotations[0]['category_id'] - CATEGORY_BASE[self.task]
        if not 0 <= label < self.num_classes:
            raise UserError(f"annotation file {path}: image {image_id} has category id "
                            f"{annotations[0]['category_id']}, which is not among the file's categories")
        return label

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = _load_image(self.paths[index], self.images_hint)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def get_decathlon_datasets(task, data_dir='data', splits=('train', 'val'), input_size=None):
    """dict split -> DecathlonDataset; the 'train' split gets training augmentation, the others
    the evaluation transform."""
    return {split: DecathlonDataset(task, split, data_dir,
                                    decathlon_transform(task, split == 'train', input_size, data_dir))
            for split in splits}


def get_decathlon_dataloaders(task, data_dir='data', train_splits=('train', 'val'), eval_split='val',
                              batch_size=32, workers=4, input_size=None, seed=0, train_limit=None, test_limit=None,
                              rank=0, world_size=1, train_images=True):
    """(train_loader, eval_loader, num_classes): training on the union of train_splits (with augmentation),
    evaluation on eval_split (center crops, fixed order); process `rank` of `world_size` gets its share of
    each (dataloaders.training_loader).  `train_images` False: only evaluating, the training images are not
    checked for (they may be absent)."""
    if 'test_stripped' in train_splits:
        raise UserError("test_stripped has no labels and cannot be used for training; "
                        "choose train splits among train, val")
    train_transform = decathlon_transform(task, True, input_size, data_dir)
    train_sets = [DecathlonDataset(task, split, data_dir, train_transform, train_images) for split in train_splits]
    eval_set = DecathlonDataset(task, eval_split, data_dir, decathlon_transform(task, False, input_size, data_dir))
    num_classes = eval_set.num_classes
    for dataset in train_sets:
        if dataset.num_classes != num_classes:
            raise UserError(f"decathlon task {task}: split {dataset.split} has {dataset.num_classes} classes "
                            f"but {eval_split} has {num_classes}; the annotation files do not match")
    train_set = first_images(ConcatDataset(train_sets), train_limit)
    eval_set = first_images(eval_set, test_limit)
    train_loader = training_loader(train_set, batch_size, workers, seed, rank, world_size)
    eval_loader = DataLoader(eval_set, batch_size=batch_size, sampler=range(rank, len(eval_set), world_size),
                             **loader_options(workers))
    return train_loader, eval_loader, num_classes


def decathlon_score(accuracies):
    """Decathlon score of top-1 accuracies (%, dict task -> accuracy): (total, dict task -> points).

    Task d earns 1000 * (max(0, Emax_d - E_d) / Emax_d)^2 with errors as fractions and Emax_d twice the
    baseline error, so the baseline earns 250 and an error of Emax_d or more earns 0. Only the given
    tasks are scored.
    """
    for task in accuracies:
        check_task(task)
    points = {}
    for task in DECATHLON_TASKS:
        if task in accuracies:
            error = 1 - accuracies[task] / 100
            max_error = 2 * (1 - BASELINE_ACC[task] / 100)
            points[task] = 1000 * max(0.0, max_error - error) ** 2 / max_error ** 2
    return sum(points.values()), points


def submission_entries(predictions, dataset):
    """Evaluation-server entries {"image_id", "category_id"} for predicted class indices over a test_stripped set;
    a class beyond the set's categories (a model trained on other data) raises a UserError."""
    predictions = [int(label) for label in predictions]
    if len(predictions) != len(dataset.image_ids):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset.image_ids)} images of {dataset.task}")
    top = max(predictions)
    if top >= dataset.num_classes:
        raise UserError(f"annotation file {dataset.path} lists {dataset.num_classes} {dataset.task} categories but "
                        f"the model predicts class {top}, so it has at least {top + 1}: download or generate the "
                        "annotation files again, or use a model trained on them")
    return [{'image_id': image_id, 'category_id': dataset.category_ids[label]}
            for image_id, label in zip(dataset.image_ids, predictions)]


def read_submission(path):
    """The entries of a task's submission.json (`write_submission`'s), refused in one line unless it holds them."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as error:
        entries, reason = None, error_reason(error)
    else:
        reason = 'not a list of {"image_id", "category_id"} entries'
    if not isinstance(entries, list) or not all(isinstance(entry, dict) and set(entry) == {'image_id', 'category_id'}
                                                for entry in entries):
        raise UserError(f"{path} is not a submission written by --write-submission ({reason}): delete it, and pass "
                        "--write-submission to write it again")
    return entries


def write_submission(entries, path):
    """Write a results file for the evaluation server: the JSON list of entries (from submission_entries,
    concatenated over the tasks to submit)."""
    with writing(path, '; make its folder writable'):
        atomic_write_json(list(entries), path)
