"""Tests of decathlon_dataloaders.py, data/make_synthetic_decathlon.py and the download scripts, on small
fixtures written in the decathlon-1.0 on-disk format."""
import importlib.util
import json
import os
import re
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from decathlon_dataloaders import (BASELINE_ACC, CATEGORY_BASE, DECATHLON_TASKS, MEAN_STD, SPLITS, DecathlonDataset,
                                   annotation_path, available_tasks, crop_size, decathlon_score, decathlon_transform,
                                   get_decathlon_dataloaders,
                                   get_decathlon_datasets, submission_entries, task_mean_std, write_submission)
from utils import UserError

from scripts import run_script

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path):
    """Import one of the repository's scripts (data/, checkpoints/) as a module."""
    name = os.path.splitext(os.path.basename(relative_path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- a hand-written decathlon fixture

def write_task(data_dir, task, labels_per_split, width=90, height=72, test_annotations_key=False):
    """Write one task by hand: JPEG images of width x height and COCO-style annotation files.

    labels_per_split: split -> list of class indices (test_stripped's are used only to count images).
    Returns split -> list of image ids.
    """
    root = os.path.join(data_dir, 'decathlon-1.0')
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    base = CATEGORY_BASE[task]
    num_classes = max(max(labels) for labels in labels_per_split.values()) + 1
    categories = [{'id': base + c, 'name': f'class{c}'} for c in range(num_classes)]
    rng = np.random.default_rng(0)
    image_ids = {}
    for split_number, (split, labels) in enumerate(labels_per_split.items()):
        folder = {'test_stripped': 'test'}.get(split, split)
        images, annotations = [], []
        for index, label in enumerate(labels):
            image_id = base + 1000 * split_number + index
            file_name = f'data/{task}/{folder}/{index:07d}.jpg'
            os.makedirs(os.path.dirname(os.path.join(root, file_name)), exist_ok=True)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, file_name), quality=90)
            images.append({'id': image_id, 'file_name': file_name, 'width': width, 'height': height})
            annotations.append({'id': image_id, 'image_id': image_id, 'category_id': base + label})
        content = {'images': images, 'categories': categories}
        if split != 'test_stripped':
            content['annotations'] = annotations
        elif test_annotations_key:
            content['annotations'] = []
        with open(os.path.join(root, 'annotations', f'{task}_{split}.json'), 'w') as f:
            json.dump(content, f)
        image_ids[split] = [image['id'] for image in images]
    return image_ids


SVHN_LABELS = {'train': [0, 1, 2, 2, 1, 0], 'val': [2, 0, 1], 'test_stripped': [0, 0, 0, 0]}


@pytest.fixture
def decathlon(tmp_path):
    data_dir = str(tmp_path)
    write_task(data_dir, 'svhn', SVHN_LABELS)
    write_task(data_dir, 'dtd', {'train': [0, 1, 0, 1], 'val': [1, 0], 'test_stripped': [0, 0]},
               test_annotations_key=True)
    return data_dir


# ---------------------------------------------------------------- loading

def test_labels_come_from_category_bases(decathlon):
    datasets = get_decathlon_datasets('svhn', decathlon, splits=('train', 'val'))
    assert datasets['train'].labels == SVHN_LABELS['train']
    assert datasets['val'].labels == SVHN_LABELS['val']
    assert datasets['train'].num_classes == 3  # from the file's categories, not the real svhn's 10
    image, label = datasets['val'][0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label == 2
    assert available_tasks(decathlon) == ['dtd', 'svhn']


def test_test_stripped_has_image_ids_and_no_labels(decathlon):
    test_set = get_decathlon_datasets('svhn', decathlon, splits=('test_stripped',))['test_stripped']
    with open(os.path.join(decathlon, 'decathlon-1.0', 'annotations', 'svhn_test_stripped.json')) as f:
        expected_ids = [image['id'] for image in json.load(f)['images']]
    assert test_set.image_ids == expected_ids
    assert test_set.category_ids == [80000001, 80000002, 80000003]
    assert [test_set[i][1] for i in range(len(test_set))] == [-1] * 4
    dtd_test = DecathlonDataset('dtd', 'test_stripped', decathlon)  # an empty 'annotations' list
    assert dtd_test.labels == [-1, -1] and dtd_test.category_ids == [40000001, 40000002]

    # a test_stripped file without categories takes them from the task's training file
    path = os.path.join(decathlon, 'decathlon-1.0', 'annotations', 'dtd_test_stripped.json')
    with open(path) as f:
        content = json.load(f)
    del content['categories']
    with open(path, 'w') as f:
        json.dump(content, f)
    assert DecathlonDataset('dtd', 'test_stripped', decathlon).category_ids == [40000001, 40000002]


def test_dataloaders_train_on_union_and_are_seeded(decathlon):
    train_loader, eval_loader, num_classes = get_decathlon_dataloaders(
        'svhn', decathlon, train_splits=('train', 'val'), eval_split='val', batch_size=4, workers=0, seed=3)
    assert num_classes == 3 and len(train_loader.dataset) == 9 and len(eval_loader.dataset) == 3

    def label_order(seed):
        loader = get_decathlon_dataloaders('svhn', decathlon, batch_size=9, workers=0, seed=seed)[0]
        return next(iter(loader))[1].tolist()
    assert label_order(3) == label_order(3)
    assert sorted(label_order(3)) == sorted(SVHN_LABELS['train'] + SVHN_LABELS['val'])
    images, labels = next(iter(eval_loader))
    assert images.shape == (3, 3, 64, 64) and labels.tolist() == SVHN_LABELS['val']
    limited = get_decathlon_dataloaders('svhn', decathlon, train_splits=('train', 'val'), workers=0, batch_size=2,
                                        train_limit=5, test_limit=2)
    assert len(limited[0].dataset) == 5 and len(limited[1].dataset) == 2
    assert [len(labels) for _, labels in limited[0]] == [2, 2]  # full batches only, as released
    with pytest.raises(UserError, match='test_stripped has no labels'):
        get_decathlon_dataloaders('svhn', decathlon, train_splits=('test_stripped',), workers=0)


def test_loader_workers_live_across_epochs_and_draw_nothing_a_run_depends_on(decathlon):
    """The training images are augmented from their own seeds, not from the workers' generators: the workers are
    kept from epoch to epoch (not started anew each epoch), and a second epoch's crops do not depend on them."""
    train_loader, eval_loader, _ = get_decathlon_dataloaders('svhn', decathlon, batch_size=4, workers=1, seed=0)
    for loader in (train_loader, eval_loader):
        assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
        workers = []
        for epoch in range(2):
            assert sum(len(labels) for _, labels in loader) > 0
            workers.append(loader._iterator)
        assert workers[0] is not None and workers[1] is workers[0]

    def two_epochs(workers):
        loader = get_decathlon_dataloaders('svhn', decathlon, batch_size=4, workers=workers, seed=0)[0]
        return [images for epoch in range(2) for images, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(two_epochs(0), two_epochs(1), strict=True))


def step_types(transform):
    return [type(step) for step in transform.transforms]


def describe(transform):
    """(resize size, training crop (size, padding, mode) or None, center crop or None, flip, jitter) of a transform."""
    steps = {type(step): step for step in transform.transforms}
    crop = steps.get(v2.RandomCrop)
    center = steps.get(v2.CenterCrop)
    jitter = steps.get(v2.ColorJitter)
    return (list(steps[v2.Resize].size),
            None if crop is None else (tuple(crop.size), crop.padding, crop.padding_mode if crop.padding else None),
            None if center is None else list(center.size),
            v2.RandomHorizontalFlip in steps,
            None if jitter is None else (jitter.brightness, jitter.contrast, jitter.saturation))


# docs/method.md §10, row by row: (train, eval) descriptions
RESIZE_64_NO_FLIP = ((([72], ((64, 64), None, None), None, False, None)), ([72], None, [64, 64], False, None))
RESIZE_64_FLIP = ((([72], ((64, 64), None, None), None, True, None)), ([72], None, [64, 64], False, None))
SQUASH_PAD_FLIP = (([72, 72], ((72, 72), [8, 8, 8, 8], 'reflect'), None, True, None),
                   ([72, 72], None, None, False, None))
EXPECTED_PREPROCESSING = {
    'svhn': RESIZE_64_NO_FLIP, 'omniglot': RESIZE_64_NO_FLIP,
    'aircraft': SQUASH_PAD_FLIP, 'cifar100': SQUASH_PAD_FLIP, 'daimlerpedcls': SQUASH_PAD_FLIP,
    'gtsrb': (([72, 72], ((72, 72), [8, 8, 8, 8], 'reflect'), None, False, ((0.5, 1.5), (0.8, 1.2), (0.8, 1.2))),
              ([72, 72], None, None, False, None)),
    'dtd': (([72], ((72, 72), None, None), None, True, None), ([72], None, [72, 72], False, None)),
    'imagenet12': RESIZE_64_FLIP, 'vgg-flowers': RESIZE_64_FLIP, 'ucf101': RESIZE_64_FLIP,
}


@pytest.mark.parametrize('task', sorted(EXPECTED_PREPROCESSING))
def test_per_task_preprocessing_is_the_released_codes(task):
    train, evaluation = EXPECTED_PREPROCESSING[task]
    assert describe(decathlon_transform(task, train=True)) == train
    assert describe(decathlon_transform(task, train=False)) == evaluation
    assert crop_size(task) == train[1][0][0]


def test_per_task_transforms(decathlon):
    svhn_train = decathlon_transform('svhn', train=True)
    # svhn training draws only crops, never mirrors: an image whose columns all differ never comes back flipped
    image = Image.fromarray(np.tile(np.arange(0, 216, 3, dtype=np.uint8), (72, 1))[:, :, None].repeat(3, 2))
    for _ in range(20):
        row = svhn_train(image)[0, 0]
        assert bool((row[1:] > row[:-1]).all())
    # gtsrb neither (signs have a handedness); its reflect padding mirrors only the 8 border columns and its
    # colour jitter keeps the order of grey levels (or saturates them)
    gtsrb_train = decathlon_transform('gtsrb', train=True)
    for _ in range(20):
        steps = gtsrb_train(image).mean(dim=(0, 1))[8:-8].diff()
        assert bool((steps >= 0).all() and (steps > 0).any())

    # squashed tasks are evaluated on the whole image, distorted to 72x72: a 72x144 image keeps every column
    wide = Image.fromarray(np.tile(np.arange(0, 144, dtype=np.uint8), (72, 1))[:, :, None].repeat(3, 2))
    squashed = decathlon_transform('aircraft', train=False)(wide)[0]
    assert squashed.shape == (72, 72) and squashed[0, 0] < squashed[0, 1] < squashed[0, -1]
    assert decathlon_transform('svhn', train=False)(wide).shape == (3, 64, 64)

    # input sizes: 64 by default, 72 for dtd and the squashed tasks; input_size overrides and scales the rest
    svhn_val = DecathlonDataset('svhn', 'val', decathlon, decathlon_transform('svhn', False, data_dir=decathlon))
    dtd_val = DecathlonDataset('dtd', 'val', decathlon, decathlon_transform('dtd', False, data_dir=decathlon))
    dtd_train = DecathlonDataset('dtd', 'train', decathlon, decathlon_transform('dtd', True, data_dir=decathlon))
    assert svhn_val[0][0].shape == (3, 64, 64)
    assert dtd_val[0][0].shape == (3, 72, 72) and dtd_train[0][0].shape == (3, 72, 72)
    small = decathlon_transform('svhn', False, input_size=32)
    assert small.transforms[0].size == [36] and small(image).shape == (3, 32, 32)
    assert decathlon_transform('dtd', False, input_size=72).transforms[0].size == [72]
    half = describe(decathlon_transform('cifar100', True, input_size=36))
    assert half[0] == [36, 36] and half[1] == ((36, 36), [4, 4, 4, 4], 'reflect')


def test_mean_std_file_takes_precedence(decathlon):
    assert task_mean_std('svhn', decathlon) == MEAN_STD['svhn']
    stats = {'svhn': {'mean': [0.1, 0.2, 0.3], 'std': [0.4, 0.5, 0.6]}}
    with open(os.path.join(decathlon, 'decathlon-1.0', 'decathlon_mean_std.json'), 'w') as f:
        json.dump(stats, f)
    assert task_mean_std('svhn', decathlon) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert task_mean_std('dtd', decathlon) == MEAN_STD['dtd']  # not in the file
    normalize = decathlon_transform('svhn', False, data_dir=decathlon).transforms[-2]
    assert list(normalize.mean) == [0.1, 0.2, 0.3] and list(normalize.std) == [0.4, 0.5, 0.6]
    assert list(decathlon_transform('svhn', False).transforms[-2].mean) == list(MEAN_STD['svhn'][0])



@pytest.mark.parametrize('entry', [{'mean': [0.1, 0.2, 0.3]}, {'mean': [0.1, 0.2], 'std': [0.4, 0.5]},
                                   {'mean': [0.1, 0.2, 0.3], 'std': [0.4, 0.0, 0.6]}, [0.1, 0.2, 0.3],
                                   {'mean': ['a', 0.2, 0.3], 'std': [0.4, 0.5, 0.6]}])
def test_malformed_mean_std_entry_is_refused(decathlon, entry):
    """Used to raise KeyError or TypeError, or to normalise by a zero std (every input infinite)."""
    path = os.path.join(decathlon, 'decathlon-1.0', 'decathlon_mean_std.json')
    with open(path, 'w') as f:
        json.dump({'svhn': entry}, f)
    with pytest.raises(UserError, match=f"^mean/std file {path}: svhn needs 'mean' and 'std', three numbers each "
                                        r"\(std positive\); delete it or re-run"):
        task_mean_std('svhn', decathlon)


def edit_annotations(data_dir, task, split, edit):
    """Rewrites the annotation file of `task` and `split` as `edit` returns its content; returns its path."""
    path = annotation_path(data_dir, task, split)
    with open(path) as f:
        content = json.load(f)
    with open(path, 'w') as f:
        json.dump(edit(content), f)
    return path


def set_field(key, index, field, value=None):
    """An annotation edit setting field `field` of entry `index` of list `key` to `value`, or deleting it."""
    def edit(content):
        if value is None:
            del content[key][index][field]
        else:
            content[key][index][field] = value
        return content
    return edit


# Edits of svhn_train.json and the reasons given.
ANNOTATION_FAULTS = {
    'no file_name': (set_field('images', 1, 'file_name'), 'images entry 2 has no string file_name'),
    'no image id': (set_field('images', 1, 'id'), 'images entry 2 has no integer id'),
    'no image_id': (set_field('annotations', 1, 'image_id'), 'annotations entry 2 has no integer image_id'),
    'no category id': (set_field('categories', 1, 'id'), 'categories entry 2 has no integer id'),
    'string category id': (set_field('categories', 0, 'id', '80000001'), 'categories entry 1 has no integer id'),
    'string category_id': (set_field('annotations', 0, 'category_id', '80000001'),
                           'annotations entry 1 has no integer category_id'),
    'shared image id': (set_field('images', 1, 'id', 80000001), 'image id 80000001 is listed twice'),
    'image not an object': (lambda content: {**content, 'images': content['images'] + ['x.jpg']},
                            'images entry 7 has no integer id'),
    'images a dict': (lambda content: {**content, 'images': {image['file_name']: image for image in content['images']}},
                      "no 'images' list"),
    'no images': (lambda content: {key: value for key, value in content.items() if key != 'images'},
                  "no 'images' list"),
    'a list': (lambda content: [content], "no 'images' list"),
    'annotations a dict': (lambda content: {**content, 'annotations': {}}, "'annotations' is not a list"),
}


@pytest.mark.parametrize('fault', ANNOTATION_FAULTS)
def test_malformed_annotation_file_is_refused(decathlon, fault):
    """Used to raise TypeError or KeyError, to report a missing 'images' as too few training images, or to give a
    second image with the same id the first one's label."""
    edit, reason = ANNOTATION_FAULTS[fault]
    path = edit_annotations(decathlon, 'svhn', 'train', edit)
    with pytest.raises(UserError, match=f'^corrupt annotation file {path}: {reason}; download or generate it again$'):
        DecathlonDataset('svhn', 'train', decathlon)


def test_annotation_path_that_is_a_folder_is_not_called_missing(decathlon):
    path = annotation_path(decathlon, 'svhn', 'val')
    os.remove(path)
    os.mkdir(path)
    with pytest.raises(UserError, match=f'^corrupt annotation file {path}: .*Is a directory.*; download or generate'):
        DecathlonDataset('svhn', 'val', decathlon)


@pytest.mark.parametrize('split', SPLITS)
def test_split_without_images_is_refused(decathlon, split):
    """An empty val split used to train and report a top-1 accuracy of 0.00%; an empty test_stripped split failed
    in torch.cat when writing a submission."""
    path = edit_annotations(decathlon, 'svhn', split, lambda content: {**content, 'images': [], 'annotations': []})
    with pytest.raises(UserError, match=f'^the {split} split of svhn has no images \\({re.escape(path)}\\); run '
                                        '`python data/download_decathlon.py`'):
        get_decathlon_dataloaders('svhn', decathlon, train_splits=('train',), eval_split=split, workers=0)


def test_missing_data_and_unknown_task_are_clear(tmp_path, decathlon):
    with pytest.raises(UserError) as error:
        get_decathlon_dataloaders('gtsrb', str(tmp_path / 'nowhere'), workers=0)
    message = str(error.value)
    assert '\n' not in message
    assert os.path.join('decathlon-1.0', 'annotations', 'gtsrb_train.json') in message
    assert 'python data/download_decathlon.py' in message and 'python data/make_synthetic_decathlon.py' in message
    with pytest.raises(UserError, match='unknown decathlon task .cifar10.; valid tasks: imagenet12, aircraft'):
        DecathlonDataset('cifar10', 'train', decathlon)
    os.rename(os.path.join(decathlon, 'decathlon-1.0', 'annotations', 'svhn_val.json'),
              os.path.join(decathlon, 'decathlon-1.0', 'annotations', 'cifar100_val.json'))
    with pytest.raises(UserError, match='category ids must run from 20000001'):  # svhn's file under another name
        DecathlonDataset('cifar100', 'val', decathlon)


def test_corrupt_image_is_reported_by_path(decathlon):
    dataset = DecathlonDataset('svhn', 'train', decathlon)
    with open(dataset.paths[2], 'wb') as f:
        f.write(b'not a jpeg at all')
    dataset[1]
    with pytest.raises(UserError, match=f'^corrupt image file {dataset.paths[2]}: cannot identify image file.*; '
                                        'delete it and run `python data/download_decathlon.py`'):
        dataset[2]
    grey = np.arange(72 * 90, dtype=np.uint16).reshape(72, 90) * 9  # 16-bit grey levels up to 58311
    Image.fromarray(grey).save(dataset.paths[3].replace('.jpg', '.png'))
    os.replace(dataset.paths[3].replace('.jpg', '.png'), dataset.paths[3])  # a PNG under the decathlon's name
    pixels = np.asarray(DecathlonDataset('svhn', 'train', decathlon)[3][0])
    assert pixels.shape == (72, 90, 3) and pixels.max() == round(grey.max() / 257)  # scaled to 8 bits, not clipped
    os.remove(dataset.paths[4])
    with pytest.raises(UserError, match=f'^image file {dataset.paths[4]} is missing; run `python data/download'):
        dataset[4]  # removed after the dataset checked its images


def test_missing_images_are_refused_before_a_run_starts(decathlon, tmp_path):
    """Checked when a split is read, not at the batch that needs the first of them; the imagenet12 images, not in
    the public download, get their own hint; --task all checks every task before training the first."""
    root = os.path.join(decathlon, 'decathlon-1.0')
    os.remove(os.path.join(root, 'data', 'svhn', 'train', '0000004.jpg'))
    with pytest.raises(UserError, match=re.escape(
            f"1 of the 6 images of the train split of svhn are missing ({root}/data/svhn/train/0000004.jpg the "
            "first); run `python data/download_decathlon.py` for the real data")):
        DecathlonDataset('svhn', 'train', decathlon)
    DecathlonDataset('svhn', 'val', decathlon)
    write_task(decathlon, 'imagenet12', {'train': [0, 1], 'val': [1, 0], 'test_stripped': [0]})
    shutil.rmtree(os.path.join(root, 'data', 'imagenet12'))
    imagenet_hint = ("the imagenet12 images are not public: download decathlon-1.0-data-imagenet.tar from "
                     "https://image-net.org (account required, Visual Decathlon download) and extract it with "
                     f"`tar -xf decathlon-1.0-data-imagenet.tar -C {root}/data`")
    with pytest.raises(UserError, match='^' + re.escape(
            f"2 of the 2 images of the val split of imagenet12 are missing ({root}/data/imagenet12/val/0000000.jpg "
            f"the first); {imagenet_hint}") + '$'):
        DecathlonDataset('imagenet12', 'val', decathlon)
    main_teacher_decathlon = load_script('main_teacher_decathlon.py')
    models = tmp_path / 'models'
    args = main_teacher_decathlon.get_args_parser().parse_args(
        ['--task', 'all', '--data-dir', decathlon, '--model-root', str(models), '--pretrained', 'none',
         '--arch', 'resnet18', '--input-size', '32', '--workers', '0'])
    with pytest.raises(UserError, match=r"^2 of the 2 images of the train split of imagenet12 are missing"):
        main_teacher_decathlon.main(args)
    os.remove(os.path.join(root, 'annotations', 'imagenet12_train.json'))  # not a task of this data any more
    with pytest.raises(UserError, match=r"^1 of the 6 images of the train split of svhn are missing"):
        main_teacher_decathlon.main(args)  # before dtd, whose turn comes first, is trained
    shutil.rmtree(os.path.join(root, 'data', 'dtd', 'test'))  # one task's submission: found once it had trained
    main_student_decathlon = load_script('main_student_decathlon.py')
    args = main_student_decathlon.get_args_parser().parse_args(
        ['--task', 'dtd', '--write-submission', '--data-dir', decathlon, '--model-root', str(models), '--pretrained',
         'none', '--backbone', 'resnet18', '--input-size', '32', '--workers', '0', '--teacher-coeff', '0',
         '--classifier-init', 'fresh'])
    with pytest.raises(UserError, match=r"^2 of the 2 images of the test_stripped split of dtd are missing"):
        main_student_decathlon.main(args)
    assert not models.exists()


# ---------------------------------------------------------------- score and submission

def test_baseline_accuracies_score_250_each():
    total, per_task = decathlon_score(BASELINE_ACC)
    assert total == pytest.approx(2500)
    assert list(per_task) == DECATHLON_TASKS and all(v == pytest.approx(250) for v in per_task.values())


def test_error_at_twice_the_baseline_error_scores_zero():
    # svhn: baseline error 3.45%, so Emax = 6.9%: accuracy 93.1% or less earns nothing
    _, per_task = decathlon_score({'svhn': 93.1, 'dtd': 5.0})
    assert per_task['svhn'] == pytest.approx(0, abs=1e-9) and per_task['dtd'] == 0


def test_hand_computed_scores_and_partial_runs():
    # cifar100: baseline error 0.1788, Emax 0.3576; accuracy 91.06 -> E = 0.0894 = Emax / 4:
    #   1000 * (0.75)^2 = 562.5
    # svhn at 100%: E = 0 -> 1000 * (Emax / Emax)^2 = 1000
    total, per_task = decathlon_score({'cifar100': 91.06, 'svhn': 100.0})
    assert per_task == {'cifar100': pytest.approx(562.5), 'svhn': pytest.approx(1000)}
    assert total == pytest.approx(1562.5)
    # imagenet12: baseline error 0.4013, Emax 0.8026; accuracy 71.909 -> E = 0.28091 = 0.35 Emax,
    #   (Emax - E) / Emax = 0.65, 1000 * 0.65^2 = 422.5
    assert decathlon_score({'imagenet12': 71.909})[0] == pytest.approx(422.5)
    with pytest.raises(UserError, match='unknown decathlon task'):
        decathlon_score({'mnist': 99.0})


def test_submission_lists_every_test_image(decathlon, tmp_path):
    test_set = DecathlonDataset('svhn', 'test_stripped', decathlon)
    entries = submission_entries(torch.tensor([2, 0, 1, 2]), test_set)
    entries += submission_entries([1, 1], DecathlonDataset('dtd', 'test_stripped', decathlon))
    path = str(tmp_path / 'out' / 'results.json')
    write_submission(entries, path)
    with open(path) as f:
        written = json.load(f)
    assert written[:4] == [{'image_id': image_id, 'category_id': 80000001 + label}
                           for image_id, label in zip(test_set.image_ids, [2, 0, 1, 2])]
    assert [e['category_id'] for e in written[4:]] == [40000002, 40000002]
    assert len({e['image_id'] for e in written}) == 6
    assert os.listdir(tmp_path / 'out') == ['results.json']  # no temporary file left behind


def test_submission_of_a_model_with_more_classes_than_the_test_file_is_refused(decathlon):
    """A test_stripped file cut to 2 categories under a 3-class model used to raise a ValueError traceback."""
    path = edit_annotations(decathlon, 'svhn', 'test_stripped',
                            lambda content: {**content, 'categories': content['categories'][:2]})
    with pytest.raises(UserError, match=f'^annotation file {path} lists 2 svhn categories but the model predicts '
                                        'class 2, so it has at least 3: download or generate the annotation files '
                                        'again, or use a model trained on them$'):
        submission_entries([1, 0, 2, 1], DecathlonDataset('svhn', 'test_stripped', decathlon))


# ---------------------------------------------------------------- the miniature decathlon

def test_make_synthetic_decathlon_writes_the_real_format(tmp_path, capsys):
    maker = load_script('data/make_synthetic_decathlon.py')
    data_dir = str(tmp_path)
    maker.main(['--data-dir', data_dir, '--tasks', 'svhn', 'dtd', '--images-per-class', '4'])
    root = os.path.join(data_dir, 'decathlon-1.0')
    all_ids = []
    for task in ('svhn', 'dtd'):
        num_classes = maker.SYNTHETIC_TASKS[maker.MINIATURE_TASKS[task]]
        for split, expected in (('train', 4 * num_classes), ('val', num_classes), ('test_stripped', num_classes)):
            with open(os.path.join(root, 'annotations', f'{task}_{split}.json')) as f:
                content = json.load(f)
            assert len(content['images']) == expected
            assert [c['id'] for c in content['categories']] == [CATEGORY_BASE[task] + c for c in range(num_classes)]
            assert ('annotations' in content) == (split != 'test_stripped')
            for image in content['images']:
                assert min(image['width'], image['height']) == 72
                with Image.open(os.path.join(root, image['file_name'])) as picture:
                    assert min(picture.size) == 72
            all_ids += [image['id'] for image in content['images']]
        train_set = DecathlonDataset(task, 'train', data_dir)
        assert sorted(set(train_set.labels)) == list(range(num_classes))
    assert len(all_ids) == len(set(all_ids))

    with open(os.path.join(root, 'decathlon_mean_std.json')) as f:
        stats = json.load(f)
    assert set(stats) == {'svhn', 'dtd'}
    assert task_mean_std('svhn', data_dir) == (tuple(stats['svhn']['mean']), tuple(stats['svhn']['std']))
    train_loader, eval_loader, num_classes = get_decathlon_dataloaders('dtd', data_dir, batch_size=8, workers=0)
    assert next(iter(train_loader))[0].shape == (8, 3, 72, 72)
    assert num_classes == maker.SYNTHETIC_TASKS[maker.MINIATURE_TASKS['dtd']]

    # idempotent: existing tasks are skipped, their files untouched
    stamp = os.path.getmtime(os.path.join(root, 'annotations', 'svhn_train.json'))
    capsys.readouterr()
    maker.main(['--data-dir', data_dir, '--tasks', 'svhn', '--images-per-class', '4'])
    assert 'svhn: annotation files exist, skipped' in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(root, 'annotations', 'svhn_train.json')) == stamp


# ---------------------------------------------------------------- download scripts

def closed_local_url(path):
    """An http URL on localhost where nothing listens: connecting to it fails at once, as offline."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    return f'http://127.0.0.1:{port}/{path}'


def test_download_decathlon_fails_fast_and_clearly_offline(tmp_path):
    start = time.time()
    result = run_script('data/download_decathlon.py', '--data-dir', tmp_path, '--mirror', closed_local_url('share/'))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: cannot reach 127.0.0.1')
    assert 'make_synthetic_decathlon.py' in lines[0]
    assert time.time() - start < 30


def test_download_models_fails_fast_and_clearly_offline(tmp_path):
    downloader = load_script('checkpoints/download_models.py')
    output, models = tmp_path / 'wide_resnet26.pth.tar', tmp_path / 'decathlon_models'
    with pytest.raises(UserError, match=f'^cannot reach 127.0.0.1 .*--url .*{output}'):
        downloader.main(['--url', closed_local_url('w.pth.tar'), '--output', str(output), '--models-dir', str(models)])
    assert not output.exists()
    output.write_bytes(b'weights')  # the universal blocks are there, the task-specific ones are not
    with pytest.raises(UserError, match=f'^cannot reach 127.0.0.1 .*--models-url for another location or unpack '
                                        f'm.tar.gz into {models}$'):  # not the temporary file it would be saved as
        downloader.main(['--output', str(output), '--models-url', closed_local_url('m.tar.gz'),
                         '--models-dir', str(models)])
    assert sorted(os.listdir(tmp_path)) == ['wide_resnet26.pth.tar']  # nothing half-written left behind
    for flags, message in ((['--url', 'file:///x'], "--url must be an http(s) URL, got 'file:///x'"),
                           (['--models-url', 'notaurl'], "--models-url must be an http(s) URL, got 'notaurl'")):
        with pytest.raises(UserError, match=f'^{re.escape(message)}$'):  # was 'cannot reach None'
            downloader.main([*flags, '--output', str(tmp_path / 'w.pth'), '--models-dir', str(models)])
    assert sorted(os.listdir(tmp_path)) == ['wide_resnet26.pth.tar']


def refuse_network(*args, **kwargs):
    raise AssertionError('the network was used although the files exist')


def test_download_decathlon_skips_what_exists(tmp_path, monkeypatch, capsys):
    downloader = load_script('data/download_decathlon.py')
    for name in ('check_reachable', 'download_url', 'extract_archive'):
        monkeypatch.setattr(downloader, name, refuse_network)
    data_dir = str(tmp_path)
    for task in DECATHLON_TASKS:
        write_task(data_dir, task, {'train': [0], 'val': [0], 'test_stripped': [0]}, width=72)
    downloader.main(['--data-dir', data_dir])
    out = capsys.readouterr().out
    assert 'annotations: all present' in out and 'imagenet12: images present' in out

    os.remove(os.path.join(data_dir, 'decathlon-1.0', 'data', 'imagenet12', 'train', '0000000.jpg'))
    downloader.main(['--data-dir', data_dir])
    assert 'decathlon-1.0-data-imagenet.tar from https://image-net.org' in capsys.readouterr().out

    assert downloader.annotations_present(data_dir)
    path = annotation_path(data_dir, 'ucf101', 'train')
    with open(path) as f:
        text = f.read()
    with open(path, 'w') as f:  # cut by an interrupted extraction: not taken for present
        f.write(text[:len(text) // 2])
    assert not downloader.annotations_present(data_dir)
    with pytest.raises(UserError, match="--mirror must be an http\\(s\\) URL, got 'file:///x'"):
        downloader.main(['--data-dir', data_dir, '--mirror', 'file:///x'])


def test_download_decathlon_fetches_only_the_missing_archive(tmp_path, monkeypatch):
    downloader = load_script('data/download_decathlon.py')
    data_dir = str(tmp_path)
    for task in DECATHLON_TASKS:
        write_task(data_dir, task, {'train': [0], 'val': [0], 'test_stripped': [0]}, width=72)
    svhn_image = os.path.join(data_dir, 'decathlon-1.0', 'data', 'svhn', 'val', '0000000.jpg')
    with open(svhn_image, 'rb') as f:
        svhn_bytes = f.read()
    os.remove(svhn_image)
    fetched = []

    def fake_download(url, folder, filename):
        fetched.append(url)
        with open(os.path.join(folder, filename), 'wb') as f:
            f.write(b'archive')

    def fake_extract(archive, destination, remove_finished):
        with open(svhn_image, 'wb') as f:
            f.write(svhn_bytes)
        os.remove(archive)
    monkeypatch.setattr(downloader, 'check_reachable', lambda url: None)
    monkeypatch.setattr(downloader, 'download_url', fake_download)
    monkeypatch.setattr(downloader, 'extract_archive', fake_extract)
    downloader.main(['--data-dir', data_dir])
    assert fetched == ['http://www.robots.ox.ac.uk/~vgg/share/decathlon-1.0-data.tar.gz']
    assert not os.path.exists(os.path.join(data_dir, 'decathlon-1.0', 'data', 'decathlon-1.0-data.tar.gz'))


def test_download_decathlon_extracts_archives_already_there_without_the_network(tmp_path, monkeypatch):
    """The data archive put there by hand (offline) was refused; a task's archive whose extraction was interrupted
    (each is removed once extracted) was left, its task's last image cut short and taken as present."""
    import tarfile
    downloader = load_script('data/download_decathlon.py')
    for name in ('check_reachable', 'download_url'):
        monkeypatch.setattr(downloader, name, refuse_network)
    for task in DECATHLON_TASKS:
        write_task(str(tmp_path), task, {'train': [0], 'val': [0], 'test_stripped': [0]}, width=72)
    images = tmp_path / 'decathlon-1.0' / 'data'
    svhn_image = images / 'svhn' / 'val' / '0000000.jpg'
    svhn_bytes = svhn_image.read_bytes()
    with tarfile.open(tmp_path / 'svhn.tar', 'w') as archive:
        archive.add(images / 'svhn', arcname='svhn')
    shutil.copy(tmp_path / 'svhn.tar', images / 'svhn.tar')
    svhn_image.write_bytes(svhn_bytes[:50])  # where the extraction stopped
    downloader.main(['--data-dir', str(tmp_path)])
    assert svhn_image.read_bytes() == svhn_bytes and not (images / 'svhn.tar').exists()
    with tarfile.open(images / downloader.DATA_ARCHIVE, 'w:gz') as archive:  # downloaded by hand
        archive.add(tmp_path / 'svhn.tar', arcname='svhn.tar')
    shutil.rmtree(images / 'svhn')
    downloader.main(['--data-dir', str(tmp_path)])
    assert svhn_image.read_bytes() == svhn_bytes and sorted(name for name in os.listdir(images) if '.tar' in name) == []


def released_fixture_archive(path):
    """A decathlon_models.tar.gz like the authors': a top folder, one folder per task holding its checkpoint."""
    import tarfile
    with tarfile.open(path, 'w:gz') as archive:
        archive.add(os.path.join(REPO_ROOT, 'tests', 'data', 'released_fixture', 'task', 'checkpoint.pth.tar'),
                    arcname='decathlon_models/svhn/checkpoint.pth.tar')


def test_download_models_skips_what_exists_and_fetches_what_is_missing(tmp_path, monkeypatch, capsys):
    downloader = load_script('checkpoints/download_models.py')
    output, models = tmp_path / 'wide_resnet26.pth.tar', tmp_path / 'decathlon_models'
    output.write_bytes(b'weights')
    (models / 'svhn').mkdir(parents=True)
    (models / 'svhn' / 'checkpoint.pth.tar').write_bytes(b'task')
    monkeypatch.setattr(downloader, 'check_reachable', refuse_network)
    monkeypatch.setattr(downloader, 'download_url', refuse_network)
    downloader.main(['--output', str(output), '--models-dir', str(models)])
    assert output.read_bytes() == b'weights' and 'holds released task checkpoints, kept' in capsys.readouterr().out

    output.unlink()
    (models / 'svhn' / 'checkpoint.pth.tar').unlink()
    (models / 'svhn').rmdir()
    fetched = []

    def fake_download(url, folder, filename):
        fetched.append(url)
        if url.endswith('.tar.gz'):
            released_fixture_archive(os.path.join(folder, filename))
        elif url.endswith('.html'):  # what a moved site answers
            with open(os.path.join(folder, filename), 'w') as f:
                f.write('<html>moved</html>')
        else:
            torch.save({'state_dict': {}}, os.path.join(folder, filename))

    monkeypatch.setattr(downloader, 'check_reachable', lambda url, flag, by_hand: None)
    monkeypatch.setattr(downloader, 'download_url', fake_download)
    with pytest.raises(UserError, match=r'https://example.org/moved.html did not return a PyTorch checkpoint .*'
                                        r'not a PyTorch file\); pass --url'):
        downloader.main(['--output', str(output), '--url', 'https://example.org/moved.html'])
    assert os.listdir(tmp_path) == ['decathlon_models']  # neither the page nor a partial file kept
    with pytest.raises(UserError, match=f'--output {tmp_path} names a folder'):
        downloader.main(['--output', str(tmp_path)])
    with pytest.raises(UserError, match=f'--models-dir {tmp_path / "afile"} is a file'):
        (tmp_path / 'afile').write_text('x')
        downloader.main(['--output', str(output), '--url', 'https://example.org/w.pth.tar', '--models-dir',
                         str(tmp_path / 'afile')])
    (tmp_path / 'afile').unlink()
    with pytest.raises(UserError, match=r'^https://example.org/moved.html is not a readable archive \(.+\); pass '
                                        r'--models-url for another location$'):  # the reason's first line, one line
        downloader.main(['--output', str(output), '--models-dir', str(models), '--models-url',
                         'https://example.org/moved.html'])
    assert sorted(os.listdir(tmp_path)) == ['decathlon_models', 'wide_resnet26.pth.tar'] and not os.listdir(models)
    output.unlink()
    fetched.clear()
    downloader.main(['--output', str(output), '--url', 'https://example.org/w.pth.tar', '--models-dir', str(models),
                     '--models-url', 'https://example.org/decathlon_models.tar.gz'])
    assert fetched == ['https://example.org/w.pth.tar', 'https://example.org/decathlon_models.tar.gz']
    assert sorted(os.listdir(tmp_path)) == ['decathlon_models', 'wide_resnet26.pth.tar']
    assert os.listdir(models) == ['svhn'] and os.listdir(models / 'svhn') == ['checkpoint.pth.tar']
    assert 'released task-specific blocks of 1 tasks (svhn)' in capsys.readouterr().out

    (models / 'svhn' / 'checkpoint.pth.tar').unlink()
    (models / 'svhn' / 'notes.txt').write_text('mine')
    with pytest.raises(UserError, match='holds no released task checkpoint; move it away'):
        downloader.main(['--output', str(output), '--models-dir', str(models)])
    assert (models / 'svhn' / 'notes.txt').read_text() == 'mine'


def test_data_dir_naming_a_file_is_refused(tmp_path):
    (tmp_path / 'afile').write_text('x')
    for script in ('data/make_synthetic_decathlon.py', 'data/download_decathlon.py'):
        with pytest.raises(UserError, match=f'^--data-dir {tmp_path / "afile"} is a file: name a folder$'):
            load_script(script).main(['--data-dir', str(tmp_path / 'afile')])
    assert os.listdir(tmp_path) == ['afile']
