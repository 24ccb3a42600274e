"""Write the offline miniature Visual Decathlon: procedural tasks from synthetic.py stored in the exact
decathlon-1.0 on-disk format, so the decathlon pipeline runs end to end without downloading anything.

    <data-dir>/decathlon-1.0/annotations/<task>_{train,val,test_stripped}.json   (COCO style, real category bases)
    <data-dir>/decathlon-1.0/data/<task>/{train,val,test}/<n>.jpg               (72 x 72 JPEG images)
    <data-dir>/decathlon-1.0/decathlon_mean_std.json                            (the miniature tasks' statistics)

The miniature tasks borrow decathlon names (see MINIATURE_TASKS) but hold synthetic images with fewer
classes than the real tasks. Training images come from the synthetic 'train' split; val and test_stripped
are disjoint halves (per class) of one draw of the synthetic 'test' split. Tasks whose annotation files
exist are skipped unless --force is given.

    python data/make_synthetic_decathlon.py                       # default size, data/decathlon-1.0
    python data/make_synthetic_decathlon.py --images-per-class 8  # a tiny one
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from decathlon_dataloaders import (CATEGORY_BASE, IMAGE_SIZE, MEAN_STD_FILE, annotation_path,  # noqa: E402
                                   decathlon_root)
from synthetic import SYNTHETIC_TASKS, make_synthetic  # noqa: E402
import utils  # noqa: E402
from utils import atomic_write_json  # noqa: E402

# decathlon task name -> synthetic task stored under that name: three target tasks from easy to hard,
# then the source task that plays ImageNet (the universal network is pre-trained on it)
MINIATURE_TASKS = {
    'svhn': 'synth-digits',
    'dtd': 'synth-textures',
    'cifar100': 'synth-shapes',
    'imagenet12': 'synth-source',
}

# Image ids of a task are CATEGORY_BASE[task] + SPLIT_ID_OFFSET[split] + index: unique over all files.
SPLIT_ID_OFFSET = {'train': 0, 'val': 3000000, 'test_stripped': 6000000}
SPLIT_FOLDER = {'train': 'train', 'val': 'val', 'test_stripped': 'test'}

# Training images per class by default (classes: svhn 10, dtd 20, cifar100 30, imagenet12 100), sized so
# that the whole miniature is written in about half a minute on one CPU core.
DEFAULT_IMAGES_PER_CLASS = {'svhn': 150, 'dtd': 80, 'cifar100': 50, 'imagenet12': 30}


def eval_images_per_class(images_per_class):
    """Size of val and of test_stripped per class: a fifth of the training size, at least one."""
    return max(1, images_per_class // 5)


def split_per_class(labels):
    """Indices of a draw split into two disjoint halves within every class (val, test)."""
    first, second = [], []
    for label in labels.unique().tolist():
        indices = (labels == label).nonzero().flatten().tolist()
        half = (len(indices) + 1) // 2
        first += indices[:half]
        second += indices[half:]
    return sorted(first), sorted(second)


def channel_mean_std(images):
    """Per-channel mean and std, in [0, 1], of a uint8 N x 3 x H x W tensor."""
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255
    return [round(v, 8) for v in pixels.mean(1).tolist()], [round(v, 8) for v in pixels.std(1).tolist()]


def write_split(task, split, images, labels, data_dir, categories):
    """Save the images as JPEG files and write the split's COCO-style annotation file (last, so that a
    split with an annotation file is complete)."""
    root = decathlon_root(data_dir)
    folder = f'data/{task}/{SPLIT_FOLDER[split]}'
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    entries, annotations = [], []
    for index, (image, label) in enumerate(zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist())):
        image_id = CATEGORY_BASE[task] + SPLIT_ID_OFFSET[split] + index
        file_name = f'{folder}/{index + 1:07d}.jpg'
        Image.fromarray(image).save(os.path.join(root, file_name), quality=95)
        entries.append({'id': image_id, 'file_name': file_name, 'width': image.shape[1], 'height': image.shape[0]})
        annotations.append({'id': image_id, 'image_id': image_id, 'category_id': CATEGORY_BASE[task] + label})
    content = {'info': {'description': f'miniature decathlon: {task} <- {MINIATURE_TASKS[task]} (synthetic)'},
               'images': entries, 'categories': categories}
    if split != 'test_stripped':
        content['annotations'] = annotations
    atomic_write_json(content, annotation_path(data_dir, task, split))


def record_mean_std(data_dir, task, mean, std):
    """Add a task's statistics to <data-dir>/decathlon-1.0/decathlon_mean_std.json (the loaders prefer them)."""
    path = os.path.join(decathlon_root(data_dir), MEAN_STD_FILE)
    stats = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                stats = json.load(f)
        except (OSError, ValueError):
            print(f'{path} was unreadable: rewritten from the tasks generated now')
    stats[task] = {'mean': mean, 'std': std}
    atomic_write_json(stats, path)


def make_task(task, data_dir, images_per_class, seed):
    """Generate one miniature task (its images, annotation files and statistics); returns the split sizes.
    The training annotation file comes last: a task with all its annotation files is complete."""
    synthetic_task = MINIATURE_TASKS[task]
    num_classes = SYNTHETIC_TASKS[synthetic_task]
    num_eval = eval_images_per_class(images_per_class)
    train = make_synthetic(synthetic_task, 'train', seed=seed, num_images=images_per_class * num_classes,
                           image_size=IMAGE_SIZE)
    held_out = make_synthetic(synthetic_task, 'test', seed=seed, num_images=2 * num_eval * num_classes,
                              image_size=IMAGE_SIZE)
    val_indices, test_indices = split_per_class(held_out.labels)
    categories = [{'id': CATEGORY_BASE[task] + label, 'name': f'{synthetic_task}-class{label:03d}'}
                  for label in range(num_classes)]
    splits = {'val': val_indices, 'test_stripped': test_indices}
    for split, indices in splits.items():
        indices = torch.tensor(indices, dtype=torch.long)
        write_split(task, split, held_out.images[indices], held_out.labels[indices], data_dir, categories)
    record_mean_std(data_dir, task, *channel_mean_std(train.images))
    write_split(task, 'train', train.images, train.labels, data_dir, categories)
    return {'train': len(train.labels), 'val': len(val_indices), 'test_stripped': len(test_indices)}


def task_is_complete(task, data_dir):
    return all(os.path.isfile(annotation_path(data_dir, task, split)) for split in SPLIT_ID_OFFSET)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', default='data', help='the decathlon goes to <data-dir>/decathlon-1.0')
    parser.add_argument('--tasks', nargs='+', choices=list(MINIATURE_TASKS), default=list(MINIATURE_TASKS),
                        help='miniature tasks to write (default: all)')
    defaults = ', '.join(f'{task} {n}' for task, n in DEFAULT_IMAGES_PER_CLASS.items())
    parser.add_argument('--images-per-class', type=int,
                        help='training images per class of every task; val and test_stripped get a fifth of it '
                             f'each (default: {defaults})')
    parser.add_argument('--seed', type=int, default=0, help='seed of the synthetic generators')
    parser.add_argument('--force', action='store_true',
                        help='regenerate tasks whose annotation files exist (overwrites them, real data included)')
    args = parser.parse_args(argv)
    if args.images_per_class is not None and args.images_per_class < 1:
        parser.error('--images-per-class must be at least 1')
    return args


def main(argv=None):
    args = parse_args(argv)
    utils.require_folder(args.data_dir, '--data-dir')
    start = time.time()
    for task in args.tasks:
        if task_is_complete(task, args.data_dir) and not args.force:
            print(f'{task}: annotation files exist, skipped (--force regenerates)')
            continue
        task_start = time.time()
        images_per_class = args.images_per_class or DEFAULT_IMAGES_PER_CLASS[task]
        sizes = make_task(task, args.data_dir, images_per_class, args.seed)
        print(f'{task} <- {MINIATURE_TASKS[task]}: {SYNTHETIC_TASKS[MINIATURE_TASKS[task]]} classes, '
              + ', '.join(f'{n} {split}' for split, n in sizes.items()) + f' ({time.time() - task_start:.1f}s)')
    print(f'miniature decathlon in {decathlon_root(args.data_dir)} ({time.time() - start:.1f}s)')


if __name__ == '__main__':
    utils.run_script(main)
