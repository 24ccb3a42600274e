"""Tests of dataloaders.py and data/prepare_data.py on small fixtures written in the real on-disk formats."""
import hashlib
import importlib.util
import os
import re
import shutil
import socket
import tarfile
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision.datasets.utils import download_and_extract_archive

import dataloaders
from dataloaders import (IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES, SVHN, Flowers102, VOCObjectCrops, get_dataloaders,
                         get_datasets, SyntheticAugment, voc_crop_box)
from synthetic import SYNTHETIC_TASKS, make_synthetic
from utils import UserError

from scripts import run_script

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- fixtures in the real formats

def write_jpeg(path, width, height, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_svhn(root, num_train=12, num_test=6):
    """SVHN .mat files as torchvision downloads them: X is 32 x 32 x 3 x N uint8, y is N x 1 with 10 for 0."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, 'svhn'), exist_ok=True)
    arrays = {}
    for split, n in (('train', num_train), ('test', num_test)):
        images = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        labels = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10
        scipy.io.savemat(os.path.join(root, 'svhn', f'{split}_32x32.mat'), {'X': images, 'y': labels})
        arrays[split] = images, labels
    return arrays


FLOWER_LABELS = [1, 2, 3, 102, 5, 1, 7]  # 1-based classes of images 1..7
FLOWER_SPLITS = {'trnid': [1, 2], 'valid': [3, 7], 'tstid': [4, 5, 6]}


def write_flowers(root):
    """flowers-102/{jpg/image_XXXXX.jpg, imagelabels.mat, setid.mat} as torchvision downloads them."""
    base = os.path.join(root, 'flowers-102')
    for image_id in range(1, len(FLOWER_LABELS) + 1):
        write_jpeg(os.path.join(base, 'jpg', f'image_{image_id:05d}.jpg'), 40 + image_id, 30, image_id)
    scipy.io.savemat(os.path.join(base, 'imagelabels.mat'), {'labels': np.array([FLOWER_LABELS], dtype=np.uint8)})
    scipy.io.savemat(os.path.join(base, 'setid.mat'),
                     {key: np.array([ids], dtype=np.uint16) for key, ids in FLOWER_SPLITS.items()})
    return base


def write_image_folder(root, name='pets', splits=None):
    """<root>/<name>/<split>/<class>/<image>, torchvision's ImageFolder layout: per split, {class: images}; each
    class's images of its own colour, so that a network can tell them apart."""
    splits = splits or {'train': {'cat': 4, 'dog': 4, 'eel': 4}, 'val': {'cat': 2, 'dog': 2, 'eel': 2}}
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for label, (class_name, count) in enumerate(sorted(classes.items())):
            os.makedirs(os.path.join(root, name, split, class_name), exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (36, 44, 3)) + 180 * np.eye(3, dtype=int)[label % 3]
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, name, split, class_name, f'{i}.png'))
    return os.path.join(root, name)


def voc_annotation(filename, width, height, objects):
    """VOC XML text; `objects` are (name, (xmin, ymin, xmax, ymax), difficult)."""
    root = ET.Element('annotation')
    ET.SubElement(root, 'filename').text = filename
    size = ET.SubElement(root, 'size')
    for key, value in (('width', width), ('height', height), ('depth', 3)):
        ET.SubElement(size, key).text = str(value)
    for name, box, difficult in objects:
        obj = ET.SubElement(root, 'object')
        ET.SubElement(obj, 'name').text = name
        ET.SubElement(obj, 'pose').text = 'Unspecified'
        ET.SubElement(obj, 'truncated').text = '0'
        ET.SubElement(obj, 'difficult').text = str(int(difficult))
        bndbox = ET.SubElement(obj, 'bndbox')
        for key, value in zip(('xmin', 'ymin', 'xmax', 'ymax'), box):
            ET.SubElement(bndbox, key).text = str(value)
    return ET.tostring(root, encoding='unicode')


# Training images: every class at least once, 'person' 7 times, 'cat' once plus a difficult one.
VOC_TRAIN = {
    '2008_000001': (100, 80, [(name, (5 + i, 5, 40 + i, 60), False) for i, name in enumerate(VOC_CLASSES[:10])]),
    '2008_000002': (90, 70, [(name, (10, 5 + i, 50, 45 + i), False) for i, name in enumerate(VOC_CLASSES[10:])]),
    '2008_000003': (120, 90, [('person', (10 * i + 1, 5, 10 * i + 30, 80), False) for i in range(6)]
                    + [('cat', (3, 3, 60, 60), True)]),
}
# Test image (100 wide, 80 high): an inner box, a box at the top-left corner, one at the bottom-right, a difficult one.
VOC_TEST = {
    '2008_000004': (100, 80, [('person', (21, 11, 60, 50), False), ('cat', (30, 30, 70, 70), True),
                              ('dog', (1, 1, 50, 40), False), ('car', (71, 41, 100, 80), False)]),
}


def write_voc(root):
    """VOCdevkit/VOC2012/{JPEGImages, Annotations, ImageSets/Main/{train,val}.txt}."""
    voc_dir = os.path.join(root, 'VOCdevkit', 'VOC2012')
    os.makedirs(os.path.join(voc_dir, 'Annotations'))
    os.makedirs(os.path.join(voc_dir, 'ImageSets', 'Main'))
    for list_name, images in (('train', VOC_TRAIN), ('val', VOC_TEST)):
        for seed, (image_id, (width, height, objects)) in enumerate(images.items()):
            write_jpeg(os.path.join(voc_dir, 'JPEGImages', f'{image_id}.jpg'), width, height, seed)
            with open(os.path.join(voc_dir, 'Annotations', f'{image_id}.xml'), 'w') as f:
                f.write(voc_annotation(f'{image_id}.jpg', width, height, objects))
        with open(os.path.join(voc_dir, 'ImageSets', 'Main', f'{list_name}.txt'), 'w') as f:
            f.write(''.join(f'{image_id}\n' for image_id in images))
    return voc_dir


def assert_one_line_user_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert '\n' not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------- SVHN

def test_svhn_images_and_labels(tmp_path):
    arrays = write_svhn(tmp_path)
    for split in ('train', 'test'):
        dataset = SVHN(tmp_path, split)
        images, labels = arrays[split]
        assert len(dataset) == len(labels)
        assert [dataset[i][1] for i in range(len(dataset))] == [int(y) % 10 for y in labels.reshape(-1)]
        image, _ = dataset[3]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert torch.equal(image, torch.from_numpy(images[:, :, :, 3].transpose(2, 0, 1).copy()))
    assert SVHN(tmp_path, 'train')[9][1] == 0  # label 10 is the digit 0


def test_svhn_transform_normalises_and_resizes(tmp_path):
    images = np.zeros((32, 32, 3, 2), dtype=np.uint8)
    images[:, :, :, 0] = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    os.makedirs(tmp_path / 'svhn')
    for split in ('train', 'test'):
        scipy.io.savemat(tmp_path / 'svhn' / f'{split}_32x32.mat', {'X': images, 'y': np.array([[10], [3]])})
    train_set, test_set, num_classes = get_datasets('svhn', tmp_path, input_size=48)
    assert num_classes == 10
    for dataset in (train_set, test_set):
        image, label = dataset[0]
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and label == 0
        assert image.abs().max() < 0.02  # the ImageNet mean maps to zero
    black = test_set[1][0]
    assert torch.allclose(black[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


def test_svhn_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError) as excinfo:
        get_datasets('svhn', tmp_path)
    assert_one_line_user_error(excinfo, os.path.join(str(tmp_path), 'svhn', 'train_32x32.mat'),
                               'python data/prepare_data.py --task svhn', '--data-dir')
    write_svhn(tmp_path)
    path = tmp_path / 'svhn' / 'test_32x32.mat'
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError) as excinfo:
        SVHN(tmp_path, 'test')
    assert_one_line_user_error(excinfo, f'corrupt dataset file {path}', '--task svhn')



@pytest.mark.parametrize('arrays, reason', [
    ({'X': np.zeros((28, 28, 3, 4), np.uint8), 'y': np.ones((4, 1))}, r'X is uint8 of shape \(28, 28, 3, 4\), not '),
    ({'X': np.zeros((32, 32, 3, 4), np.float32), 'y': np.ones((4, 1))}, 'X is float32 of shape'),
    ({'X': np.zeros((32, 32, 3, 4), np.uint8), 'y': np.zeros((4, 1))}, 'the labels y must be integers from 1 to 10'),
    ({'X': np.zeros((32, 32, 3, 4), np.uint8), 'y': np.full((4, 1), 2.5)}, 'the labels y must be integers'),
    ({'X': np.zeros((32, 32, 3, 4), np.uint8), 'y': np.ones((3, 1))}, '3 labels for 4 images'),
])
def test_svhn_file_with_wrong_arrays_is_refused(tmp_path, arrays, reason):
    """Used to load (wrong images, label 0 taken for a digit) or fail later with a traceback."""
    path = tmp_path / 'svhn' / 'train_32x32.mat'
    os.makedirs(path.parent)
    scipy.io.savemat(path, arrays)
    with pytest.raises(UserError, match=f'^corrupt dataset file {path}: {reason}'):
        SVHN(tmp_path, 'train')


# ---------------------------------------------------------------- Flowers102

def test_flowers_splits_and_labels(tmp_path):
    base = write_flowers(tmp_path)
    train, test = Flowers102(tmp_path, 'train'), Flowers102(tmp_path, 'test')
    assert [os.path.basename(p) for p in train.image_paths] == [f'image_{i:05d}.jpg' for i in (1, 2, 3, 7)]
    assert train.labels == [0, 1, 2, 6]
    assert [os.path.basename(p) for p in test.image_paths] == [f'image_{i:05d}.jpg' for i in (4, 5, 6)]
    assert test.labels == [101, 4, 0]
    image, label = test[0]
    assert isinstance(image, Image.Image) and image.mode == 'RGB' and image.size == (44, 30) and label == 101
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(os.path.join(base, 'jpg', 'image_00004.jpg'))))


def test_flowers_loaders_shapes_and_seeded_shuffle(tmp_path):
    write_flowers(tmp_path)
    train_loader, test_loader, num_classes = get_dataloaders('flowers', tmp_path, batch_size=3, workers=0,
                                                             input_size=32, seed=5)
    assert num_classes == 102
    images, labels = next(iter(test_loader))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [101, 4, 0]
    batches = [labels.tolist() for _, labels in train_loader]
    assert [len(b) for b in batches] == [3]  # 4 images: full batches only
    assert set(sum(batches, [])) < {0, 1, 2, 6}
    again, _, _ = get_dataloaders('flowers', tmp_path, batch_size=3, workers=0, input_size=32, seed=5)
    assert [labels.tolist() for _, labels in again] == batches


def test_flowers_missing_image_and_corrupt_jpeg(tmp_path):
    base = write_flowers(tmp_path)
    missing = os.path.join(base, 'jpg', 'image_00007.jpg')
    os.rename(missing, missing + '.bak')
    with pytest.raises(UserError) as excinfo:
        get_datasets('flowers', tmp_path)
    assert_one_line_user_error(excinfo, missing, 'python data/prepare_data.py --task flowers')
    os.rename(missing + '.bak', missing)

    corrupt = os.path.join(base, 'jpg', 'image_00002.jpg')
    with open(corrupt, 'rb') as f:
        data = f.read()
    with open(corrupt, 'wb') as f:
        f.write(data[:len(data) // 2])
    train_set, _, _ = get_datasets('flowers', tmp_path, input_size=32)
    with pytest.raises(UserError) as excinfo:
        train_set[1]
    assert_one_line_user_error(excinfo, f'corrupt image file {corrupt}: image file is truncated',  # and the fix
                               '; delete it and run `python data/prepare_data.py --task flowers`')
    with open(corrupt, 'wb') as f:
        f.write(b'not a jpeg')
    with pytest.raises(UserError) as excinfo:
        train_set[1]
    assert_one_line_user_error(excinfo, f'corrupt image file {corrupt}: cannot identify image file')


def test_your_own_images_in_imagefolder_layout(tmp_path):
    base = write_image_folder(tmp_path, splits={'train': {'dog': 2, 'cat': 3, 'eel': 1}, 'val': {'eel': 1, 'cat': 2}})
    os.makedirs(os.path.join(base, 'train', 'cat', 'more'))
    Image.new('RGB', (20, 10)).save(os.path.join(base, 'train', 'cat', 'more', 'nested.JPG'))
    open(os.path.join(base, 'train', 'dog', 'notes.txt'), 'w').close()
    open(os.path.join(base, 'train', 'dog', '._0.png'), 'w').close()  # macOS metadata, not an image
    os.makedirs(os.path.join(base, 'train', '.ipynb_checkpoints'))  # not a class
    os.makedirs(os.path.join(base, 'train', 'eel', '.ipynb_checkpoints'))
    Image.new('RGB', (20, 10)).save(os.path.join(base, 'train', 'eel', '.ipynb_checkpoints', '0-checkpoint.png'))
    train_set, test_set, num_classes = get_datasets('folder:pets', tmp_path, input_size=32)
    assert num_classes == 3 and len(train_set) == 7 and len(test_set) == 3  # nested images in, others out
    raw_train, raw_test = train_set.dataset, test_set.dataset
    assert raw_train.classes == raw_test.classes == ['cat', 'dog', 'eel']  # sorted, val numbered as train
    assert raw_train.labels == [label for _, label in raw_train.samples] == [0, 0, 0, 0, 1, 1, 2]
    assert [(os.path.relpath(path, base), label) for path, label in raw_test.samples] == [
        ('val/cat/0.png', 0), ('val/cat/1.png', 0), ('val/eel/0.png', 2)]
    image, label = test_set[2]
    assert image.shape == (3, 32, 32) and label == 2 and image[2].mean() > image[0].mean()  # blue eel, normalised
    train_loader, _, classes = get_dataloaders('folder:pets', tmp_path, batch_size=7, workers=0, input_size=32)
    assert classes == 3 and [sorted(labels.tolist()) for _, labels in train_loader] == [[0, 0, 0, 0, 1, 1, 2]]
    train_loader, test_loader, _ = get_dataloaders('folder:pets', tmp_path, batch_size=3, workers=0, input_size=32,
                                                   train_limit=3, test_limit=2)
    assert [sorted(labels.tolist()) for _, labels in train_loader] == [[0, 1, 2]]  # every class kept (first_images)
    assert [labels.tolist() for _, labels in test_loader] == [[0, 2]]


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    """PNG and TIFF (which Pillow opens as 'I;16') and PGM (as 'I'): PIL's own conversion made 99.6 % of them white;
    32-bit and floating-point pixels, of no fixed range, are refused rather than clipped."""
    levels = np.linspace(0, 65535, 40 * 44).reshape(40, 44).astype(np.uint16)  # a depth map or a medical scan
    expected = np.round(levels / 257).astype(np.uint8)
    for name in ('grey16.png', 'grey16.tif', 'grey16.pgm'):
        Image.fromarray(levels).save(tmp_path / name)
        rgb = np.asarray(dataloaders.load_rgb_image(tmp_path / name))
        assert rgb.shape == (40, 44, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3)), name
    Image.fromarray(levels.astype(np.int32) * 3, 'I').save(tmp_path / 'int32.tif')
    Image.fromarray(levels.astype(np.float32) / 65535, 'F').save(tmp_path / 'float.tif')
    for name, kind in (('int32.tif', '32-bit integer'), ('float.tif', 'floating-point')):
        with pytest.raises(UserError, match=f"^image file {tmp_path / name} holds {kind} pixels, which have no fixed "
                                            "range: convert it to 8 or 16 bits per channel$"):
            dataloaders.load_rgb_image(tmp_path / name)


@pytest.mark.parametrize('task', ['folder:pets', 'synth-shapes'])
@pytest.mark.parametrize('count, batch', [(12, 8), (11, 6)])
def test_training_augmentation_follows_the_images_place_not_the_processes_or_workers(tmp_path, task, count, batch):
    """Under torchrun, each of two processes loads every other image of a batch: they take the steps of one
    process with the whole batch (11 images, 6 per step: one step, not the two that each process's 6 images,
    one repeated, would make), and crop and flip their images as it does (with the same crops and flips on
    both, the two halves repeated each other's), whatever the number of loader workers."""
    write_image_folder(tmp_path)  # 12 training images, noise around each class's colour: every crop differs

    def batches(batch_size, rank=0, world_size=1, workers=0):
        torch.manual_seed(0)  # as every process of a run seeds itself
        loader = get_dataloaders(task, tmp_path, batch_size, workers, input_size=24, seed=1, train_limit=count,
                                 rank=rank, world_size=world_size)[0]
        return [images for epoch in range(2) for images, _ in loader]

    whole = batches(batch)
    halves = [batches(batch // 2, rank, 2) for rank in (0, 1)]
    assert [len(images) for images in whole] == [batch, batch]  # two epochs of one full batch, the rest left out
    assert [len(images) for half in halves for images in half] == [batch // 2] * 4
    for step, images in enumerate(whole):  # process r holds the places r, r + 2, ... of the order
        assert torch.equal(images, torch.stack([halves[0][step], halves[1][step]], 1).flatten(0, 1)), step
    if task.startswith('folder:'):
        assert all(torch.equal(a, b) for a, b in zip(batches(batch, workers=2), whole))


@pytest.mark.parametrize('task', ['folder:pets', 'synth-shapes'])
def test_training_loaders_give_full_batches_only(tmp_path, task):
    """As the released code trains: each epoch ends at its first incomplete batch, whatever its size; a split
    smaller than one batch is one batch, unless it is a single image."""
    write_image_folder(tmp_path)  # 12 training images

    def sizes(batch_size, rank=0, world_size=1):
        loader = get_dataloaders(task, tmp_path, batch_size, 0, input_size=24, train_limit=11, rank=rank,
                                 world_size=world_size)[0]
        return len(loader), [len(labels) for _, labels in loader]
    assert sizes(4) == (2, [4, 4]) and sizes(5) == (2, [5, 5]) and sizes(2) == (5, [2] * 5)
    assert sizes(3, 1, 2) == (1, [3]) and sizes(2, 1, 2) == (2, [2, 2])  # the steps of 1 process with 6, with 4
    assert sizes(12) == (1, [11]) and sizes(7, 1, 2) == (1, [6])  # less than a batch: one batch
    with pytest.raises(UserError, match=r'^the training split has 1 image for 1 process: BatchNorm cannot train on '
                                        r'a batch of one \(--train-limit\?\)$'):
        get_dataloaders(task, tmp_path, 4, 0, input_size=24, train_limit=1)
    with pytest.raises(UserError, match=r'^the training split has 2 images for 2 processes: BatchNorm cannot'):
        get_dataloaders(task, tmp_path, 4, 0, input_size=24, train_limit=2, rank=1, world_size=2)


def test_seeded_samples_draw_from_their_seed_alone():
    train_set = get_datasets('synth-shapes', input_size=24)[0]  # flipped at random, one image at a time
    seeded = dataloaders.SeededSamples(train_set)
    views = [seeded[(0, seed)][0] for seed in range(8)]
    assert all(torch.equal(seeded[(0, seed)][0], views[seed]) for seed in range(8))
    assert not all(torch.equal(view, views[0]) for view in views)  # flipped for some seeds, not for others
    state = torch.get_rng_state()
    seeded[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator untouched
    generator = torch.Generator().manual_seed(0)
    shard = dataloaders.SeededShard(12, generator)
    epochs = [list(shard) for _ in range(2)]
    assert sorted(index for index, _ in epochs[0]) == list(range(12))
    assert len({seed for epoch in epochs for _, seed in epoch}) == 24  # a seed per image and epoch


def test_your_own_images_linked_unreadable_or_too_large(tmp_path, monkeypatch):
    base = write_image_folder(tmp_path, splits={'train': {'cat': 2, 'dog': 2}, 'val': {'cat': 1, 'dog': 1}})
    os.symlink('..', os.path.join(base, 'train', 'cat', 'up'))  # a loop, and the dogs seen as cats
    os.symlink(os.path.join(base, 'train'), os.path.join(base, 'train', 'dog', 'again'))
    os.symlink(os.path.join(base, 'val', 'dog'), os.path.join(base, 'train', 'dog', 'more'))  # linked images: in
    os.symlink(os.path.join(base, 'val', 'dog'), os.path.join(base, 'train', 'dog', 'same'))  # ... once, not twice
    train_set, _, _ = get_datasets('folder:pets', tmp_path)
    assert sorted((os.path.relpath(path, base), label) for path, label in train_set.dataset.samples) == [
        ('train/cat/0.png', 0), ('train/cat/1.png', 0),
        ('train/dog/0.png', 1), ('train/dog/1.png', 1), ('train/dog/more/0.png', 1)]

    def denied(path):
        raise PermissionError(13, 'Permission denied', path)
    monkeypatch.setattr(os, 'scandir', denied)  # as a user without read permission meets it (the tests run as root)
    with pytest.raises(UserError) as excinfo:
        get_datasets('folder:pets', tmp_path)
    assert_one_line_user_error(excinfo, f"cannot read {base}/train: Permission denied; fix its permissions")
    monkeypatch.undo()

    Image.MAX_IMAGE_PIXELS, limit = 500, Image.MAX_IMAGE_PIXELS  # images past twice it: a decompression bomb
    try:
        with pytest.raises(UserError) as excinfo:
            get_datasets('folder:pets', tmp_path)[0][0]
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert_one_line_user_error(excinfo, f"corrupt image file {base}/train/cat/0.png: Image size (1584 pixels) exceeds")
    assert str(excinfo.value).endswith('; replace it with a readable copy, or remove it')


@pytest.mark.parametrize('task, splits, message', [
    ('folder:none', None, "folder:none: {root}/none/train is missing; put the images in {root}/none/{{train,val}}/"
     "<class>/<image> (torchvision's ImageFolder layout)"),
    ('folder:pets', {'train': {'cat': 1, 'dog': 1}}, "folder:pets: {root}/pets/val is missing"),
    ('folder:pets', {'train': {'cat': 1, 'dog': 1}, 'val': {'cat': 1, 'cow': 1}},
     "{root}/pets/val holds classes the training split lacks: cow; put the images in"),
    ('folder:pets', {'train': {'caf\u00e9': 1, 'dog': 1}, 'val': {'cafe\u0301': 1}},  # composed, decomposed
     "{root}/pets/val holds classes the training split lacks: cafe\u0301 (cafe\u0301: the training folder of that name "
     "is spelt in other Unicode characters, as one system writes accents composed and another decomposed; rename "
     "one); put the images in"),
    ('folder:pets', {'train': {'cat': 1, 'dog': 0}, 'val': {'cat': 1}},
     "{root}/pets/train: classes without images: dog; put the images in"),
    ('folder:pets', {'train': {'cat': 2}, 'val': {'cat': 1}},
     "{root}/pets/train: 1 class folders, a task needs 2 or more"),
    ('folder:pets', {'train': {'cat': 1, 'dog': 1}, 'val': {'cat': 0}}, "{root}/pets/val holds no images"),
    ('folder:../pets', None, "--task folder:<name> takes a folder under --data-dir, got folder:../pets"),
    ('folder:', None, "--task folder:<name> takes a folder under --data-dir, got folder:: put the images in"),
    ('folder:./pets/', None, "--task folder:./pets/: write it folder:pets"),
    ('pets', None, "unknown task 'pets'; valid tasks: svhn, flowers, voc12, synth-source, synth-digits, "
     "synth-textures, synth-shapes, or folder:<name> for your images in <data-dir>/<name>/{{train,val}}/"),
])
def test_your_own_images_missing_or_misplaced_are_one_line(tmp_path, task, splits, message):
    if splits:
        write_image_folder(tmp_path, splits=splits)
    with pytest.raises(UserError) as excinfo:
        get_datasets(task, tmp_path)
    assert_one_line_user_error(excinfo, message.format(root=tmp_path))


def test_flowers_labels_or_ids_out_of_range_are_refused(tmp_path):
    """An image id beyond imagelabels.mat used to raise IndexError; a label 0 became class -1."""
    base = write_flowers(tmp_path)
    scipy.io.savemat(os.path.join(base, 'setid.mat'), {'trnid': np.array([[1, 9]]), 'valid': np.array([[2]]),
                                                       'tstid': np.array([[3]])})
    with pytest.raises(UserError, match=f"^corrupt dataset file {os.path.join(base, 'setid.mat')}: the image ids "
                                        "trnid and valid must be integers from 1 to 7; delete it and run"):
        Flowers102(tmp_path, 'train')
    Flowers102(tmp_path, 'test')  # its ids are valid
    scipy.io.savemat(os.path.join(base, 'imagelabels.mat'), {'labels': np.array([[0, 1, 2, 3, 4, 5, 6]])})
    with pytest.raises(UserError, match="imagelabels.mat: the labels must be integers from 1 to 102"):
        Flowers102(tmp_path, 'test')


# ---------------------------------------------------------------- VOC 2012

def test_voc_crop_box_margin_and_clipping():
    # VOC boxes are 1-based inclusive: (11, 11, 20, 30) covers pixels 10..19 x 10..29, i.e. 10 x 20 pixels.
    assert voc_crop_box((11, 11, 20, 30), 500, 500) == (8, 6, 22, 34)
    assert voc_crop_box((11, 11, 20, 30), 21, 33) == (8, 6, 21, 33)
    assert voc_crop_box((1, 1, 10, 10), 500, 500) == (0, 0, 12, 12)
    assert voc_crop_box((11, 11, 13, 13), 500, 500) == (9, 9, 14, 14)  # 0.6 px margins round outwards


def test_voc_test_crops_geometry_and_pixels(tmp_path):
    voc_dir = write_voc(tmp_path)
    dataset = VOCObjectCrops(tmp_path, 'test')
    image_path = os.path.join(voc_dir, 'JPEGImages', '2008_000004.jpg')
    # person (21,11,60,50): 40 x 40 px from (20,10), margin 8; dog (1,1,50,40): 50 x 40 px, margins 10 and 8,
    # clipped at 0; car (71,41,100,80): 30 x 40 px, margins 6 and 8, clipped at the 100 x 80 image.
    # The difficult cat is left out.
    assert dataset.samples == [(image_path, (12, 2, 68, 58), VOC_CLASSES.index('person')),
                               (image_path, (0, 0, 60, 48), VOC_CLASSES.index('dog')),
                               (image_path, (64, 32, 100, 80), VOC_CLASSES.index('car'))]
    full = np.asarray(Image.open(image_path).convert('RGB'))
    for index, (left, upper, right, lower) in enumerate(box for _, box, _ in dataset.samples):
        crop, label = dataset[index]
        assert crop.size == (right - left, lower - upper)
        assert np.array_equal(np.asarray(crop), full[upper:lower, left:right])
        assert label == dataset.samples[index][2]
    write_jpeg(image_path, 90, 80, 0)  # narrower than its annotation says: the car's crop was padded with black
    assert dataset[0][0].size == (56, 56)
    with pytest.raises(UserError) as excinfo:
        dataset[2]
    assert_one_line_user_error(excinfo, f'image file {image_path} (90 x 80 pixels) does not hold the crop '
                               '(64, 32, 100, 80) its annotation gives; delete both and run `python data/prepare_')
    with open(image_path, 'wb') as f:
        f.write(b'not a jpeg')
    with pytest.raises(UserError) as excinfo:
        dataset[0]
    assert_one_line_user_error(excinfo, f'corrupt image file {image_path}: cannot identify image file',
                               '; delete it and run `python data/prepare_data.py --task voc12`')


def test_voc_training_split_is_balanced_and_seeded(tmp_path):
    write_voc(tmp_path)
    balanced = VOCObjectCrops(tmp_path, 'train', crops_per_class=5, seed=0)
    labels = np.array(balanced.labels)
    assert len(balanced) == 5 * 20
    assert np.bincount(labels, minlength=20).tolist() == [5] * 20
    person = [sample for sample in balanced.samples if sample[2] == VOC_CLASSES.index('person')]
    assert len(set(person)) == 5  # 7 person crops: drawn without replacement
    cat = [sample for sample in balanced.samples if sample[2] == VOC_CLASSES.index('cat')]
    assert len(set(cat)) == 1  # one non-difficult cat: repeated
    assert VOCObjectCrops(tmp_path, 'train', crops_per_class=5, seed=0).samples == balanced.samples
    assert VOCObjectCrops(tmp_path, 'train', crops_per_class=5, seed=1).samples != balanced.samples
    assert len(VOCObjectCrops(tmp_path, 'train').samples) == 1000 * 20


def test_limits_keep_every_class_whatever_the_order_of_the_split(tmp_path):
    """VOC's balanced training crops come a class at a time: --train-limit 40 used to keep 40 aeroplanes."""
    write_voc(tmp_path)
    train_loader, test_loader, _ = get_dataloaders('voc12', tmp_path, batch_size=8, workers=0, input_size=32,
                                                   train_limit=40, test_limit=2)
    assert np.bincount([label for _, labels in train_loader for label in labels.tolist()]).tolist() == [2] * 20
    assert [labels.tolist() for _, labels in test_loader] == [[VOC_CLASSES.index('person'), VOC_CLASSES.index('dog')]]
    parts = [torch.utils.data.TensorDataset(torch.arange(n)) for n in (5, 3)]
    for part, labels in zip(parts, ([0, 0, 1, 0, 2], [2, 1, 1])):
        part.labels = labels
    joined = torch.utils.data.ConcatDataset(parts)
    assert dataloaders.first_images(joined, 4).indices == [0, 1, 2, 4]  # the first of each class, then a second
    assert dataloaders.first_images(joined, 6).indices == [0, 1, 2, 4, 5, 6]
    assert dataloaders.first_images(joined, 8) is dataloaders.first_images(joined, None) is joined


def test_voc_loaders_shapes(tmp_path):
    write_voc(tmp_path)
    train_loader, test_loader, num_classes = get_dataloaders('voc12', tmp_path, batch_size=4, workers=0,
                                                             input_size=32, eval_batch_size=8)
    assert num_classes == 20 and len(train_loader.dataset) == 20000
    images, labels = next(iter(test_loader))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [VOC_CLASSES.index(name) for name in ('person', 'dog', 'car')]
    images, labels = next(iter(train_loader))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


def remove_training_images(root, task):
    """`task`'s fixture under `root` without what only its training split reads."""
    if task == 'svhn':
        os.remove(os.path.join(root, 'svhn', 'train_32x32.mat'))
    elif task == 'flowers':
        for image_id in FLOWER_SPLITS['trnid']:
            os.remove(os.path.join(root, 'flowers-102', 'jpg', f'image_{image_id:05d}.jpg'))
    elif task == 'voc12':
        voc_dir = os.path.join(root, 'VOCdevkit', 'VOC2012')
        os.remove(os.path.join(voc_dir, 'ImageSets', 'Main', 'train.txt'))
        for image_id in VOC_TRAIN:
            os.remove(os.path.join(voc_dir, 'Annotations', f'{image_id}.xml'))
    else:
        shutil.rmtree(os.path.join(root, 'pets', 'train'))


@pytest.mark.parametrize('task', ['svhn', 'flowers', 'voc12', 'folder:pets'])
def test_evaluation_reads_the_test_images_alone(tmp_path, task):
    """--evaluate read, and required, the training split too: SVHN's 180 MB training file, every VOC training
    annotation.  A folder task's test images are numbered as the network's classes, not by the folders there."""
    writers = {'svhn': write_svhn, 'flowers': write_flowers, 'voc12': write_voc, 'folder:pets': write_image_folder}
    writers[task](tmp_path)
    classes = ['cat', 'dog', 'eel'] if task == 'folder:pets' else None
    train, test, num_classes = get_dataloaders(task, tmp_path, 4, 0, input_size=24)
    expected = [(images, labels) for images, labels in test]
    remove_training_images(tmp_path, task)
    with pytest.raises(UserError):  # training needs them
        get_dataloaders(task, tmp_path, 4, 0, input_size=24)
    train, test, found_classes = get_dataloaders(task, tmp_path, 4, 0, input_size=24, train_images=False,
                                                 classes=classes)
    assert train is None and found_classes == num_classes
    for (images, labels), (expected_images, expected_labels) in zip(test, expected, strict=True):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    if task == 'folder:pets':  # a val split of the network's last two classes: dog is still 1, eel 2
        shutil.rmtree(os.path.join(tmp_path, 'pets', 'val', 'cat'))
        _, test, _ = get_dataloaders(task, tmp_path, 4, 0, input_size=24, train_images=False, classes=classes)
        assert sorted(test.dataset.labels) == [1, 1, 2, 2]


def test_voc_missing_split_list(tmp_path):
    voc_dir = write_voc(tmp_path)
    os.remove(os.path.join(voc_dir, 'ImageSets', 'Main', 'val.txt'))
    with pytest.raises(UserError) as excinfo:
        get_datasets('voc12', tmp_path)
    assert_one_line_user_error(excinfo, os.path.join(voc_dir, 'ImageSets', 'Main', 'val.txt'),
                               'python data/prepare_data.py --task voc12')


def test_voc_corrupt_annotation_names_the_fix(tmp_path):
    voc_dir = write_voc(tmp_path)
    path = os.path.join(voc_dir, 'Annotations', '2008_000002.xml')
    with open(path, 'w') as f:
        f.write('<annotation><size>')  # cut short
    with pytest.raises(UserError) as excinfo:
        get_datasets('voc12', tmp_path)
    assert_one_line_user_error(excinfo, f'corrupt annotation file {path}', 'delete it and run',
                               'python data/prepare_data.py --task voc12')
    os.remove(path)
    os.mkdir(path)  # used to raise IsADirectoryError
    with pytest.raises(UserError, match=f"^corrupt annotation file {path}: .*Is a directory.*; delete it and run"):
        get_datasets('voc12', tmp_path)


def voc_edit(parent, tag, text=None):
    """An edit of a VOC annotation tree: set the text of `parent`'s child `tag`, or remove that child."""
    def edit(root):
        element = root.find(parent)
        if text is None:
            element.remove(element.find(tag))
        else:
            element.find(tag).text = text
    return edit


# Edits of the test image's annotation (objects: person, a difficult cat, dog, car) and the reasons given.
VOC_ANNOTATION_FAULTS = {
    'no size': (voc_edit('.', 'size'), 'the annotation has no <size/width>'),
    'float width': (voc_edit('size', 'width', '100.0'), "the annotation has <size/width> '100.0', not a positive "
                                                        'integer'),
    'zero height': (voc_edit('size', 'height', '0'), "the annotation has <size/height> '0', not a positive integer"),
    'no name': (voc_edit('object[1]', 'name'), 'object 1 has no <name>'),
    'not a class': (voc_edit('object[1]', 'name', 'Person'), "object 1 has <name> 'Person', not a VOC class"),
    'empty difficult': (voc_edit('object[1]', 'difficult', ''), "object 1 has <difficult> '', not 0 or 1"),
    'no ymax': (voc_edit('object[3]/bndbox', 'ymax'), 'object 3 has no <bndbox/ymax>'),
    'text xmin': (voc_edit('object[3]/bndbox', 'xmin', 'abc'), "object 3 has <bndbox/xmin> 'abc', not a number"),
    'infinite xmax': (voc_edit('object[3]/bndbox', 'xmax', 'inf'), "object 3 has <bndbox/xmax> 'inf', not a number"),
    'xmax below xmin': (voc_edit('object[1]/bndbox', 'xmax', '10'),
                        r'object 1 has the box \(xmin, ymin, xmax, ymax\) = \(21, 11, 10, 50\), empty or outside the '
                        '100 x 80 image'),
    'outside the image': (voc_edit('object[4]/bndbox', 'xmin', '101'),
                          r'object 4 has the box .* = \(101, 41, 100, 80\), empty or outside the 100 x 80 image'),
}


@pytest.mark.parametrize('fault', VOC_ANNOTATION_FAULTS)
def test_voc_malformed_annotation_is_refused_when_read(tmp_path, fault):
    """Used to raise AttributeError, ValueError or TypeError, or PIL's ValueError mid-epoch for a bad box."""
    edit, reason = VOC_ANNOTATION_FAULTS[fault]
    voc_dir = write_voc(tmp_path)
    path = os.path.join(voc_dir, 'Annotations', '2008_000004.xml')
    tree = ET.parse(path)
    edit(tree.getroot())
    tree.write(path)
    with pytest.raises(UserError, match=f'^corrupt annotation file {path}: {reason}; delete it and run '
                                        '`python data/prepare_data.py --task voc12` or pass --data-dir$'):
        VOCObjectCrops(tmp_path, 'test')


def test_voc_difficult_object_and_partly_outside_box_are_accepted(tmp_path):
    """Only used objects are checked; a box reaching beyond the image is clipped to it."""
    voc_dir = write_voc(tmp_path)
    path = os.path.join(voc_dir, 'Annotations', '2008_000004.xml')
    tree = ET.parse(path)
    voc_edit('object[2]', 'name', 'Kitten')(tree.getroot())  # the difficult cat
    voc_edit('object[4]/bndbox', 'xmax', '130.5')(tree.getroot())
    tree.write(path)
    # the car (71, 41, 130.5, 80): 60.5 px wide, so a 12.1 px margin; cut at the image's right edge
    assert [box for _, box, _ in VOCObjectCrops(tmp_path, 'test').samples][2] == (57, 32, 100, 80)


def empty_svhn(root, split):
    write_svhn(root)
    path = os.path.join(root, 'svhn', f'{split}_32x32.mat')
    scipy.io.savemat(path, {'X': np.zeros((32, 32, 3, 0), np.uint8), 'y': np.zeros((0, 1), np.uint8)})
    return path


def empty_flowers(root, split):
    path = os.path.join(write_flowers(root), 'setid.mat')
    emptied = ('tstid',) if split == 'test' else ('trnid', 'valid')
    scipy.io.savemat(path, {key: np.array([[] if key in emptied else ids], dtype=np.uint16)
                            for key, ids in FLOWER_SPLITS.items()})
    return path


def empty_voc_list(root, split):
    path = os.path.join(write_voc(root), 'ImageSets', 'Main', 'val.txt')
    open(path, 'w').close()
    return path


def voc_without_used_objects(root, split):
    voc_dir = write_voc(root)
    with open(os.path.join(voc_dir, 'Annotations', '2008_000004.xml'), 'w') as f:
        f.write(voc_annotation('2008_000004.jpg', 100, 80, [('cat', (30, 30, 70, 70), True)]))
    return os.path.join(voc_dir, 'ImageSets', 'Main', 'val.txt')


@pytest.mark.parametrize('task, split, empty', [('svhn', 'test', empty_svhn), ('svhn', 'train', empty_svhn),
                                                ('flowers', 'test', empty_flowers), ('flowers', 'train', empty_flowers),
                                                ('voc12', 'test', empty_voc_list),
                                                ('voc12', 'test', voc_without_used_objects)])
def test_split_without_images_is_refused(tmp_path, task, split, empty):
    """An empty test split used to train and report a top-1 accuracy of 0.00% with exit status 0."""
    source = empty(tmp_path, split)
    with pytest.raises(UserError, match=f'^the {split} split of {task} has no images \\({re.escape(source)}\\); run '
                                        f'`python data/prepare_data.py --task {task}` or pass --data-dir$'):
        get_dataloaders(task, tmp_path, workers=0)


# ---------------------------------------------------------------- synthetic tasks and task names

def test_synthetic_augmentation_flips_and_normalises():
    assert dataloaders.TASKS == {'svhn': 10, 'flowers': 102, 'voc12': 20, **SYNTHETIC_TASKS}
    images = make_synthetic('synth-shapes', 'train', num_images=64).images
    size = images.shape[-1]
    test_view = SyntheticAugment('synth-shapes', False, size)(images)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(test_view, (images.float() / 255 - mean) / std, atol=1e-6)
    assert SyntheticAugment('synth-shapes', False, 2 * size)(images).shape == (64, 3, 2 * size, 2 * size)
    assert SyntheticAugment('synth-shapes', True, size)(images[0]).shape == (3, size, size)

    torch.manual_seed(0)
    train_view = SyntheticAugment('synth-shapes', True, size)(images)
    flipped = [torch.equal(train_view[b], test_view[b].flip(-1)) and not torch.equal(train_view[b], test_view[b])
               for b in range(len(images))]
    assert all(flipped[b] or torch.equal(train_view[b], test_view[b]) for b in range(len(images)))  # no crop
    assert 20 < sum(flipped) < 44
    digits = make_synthetic('synth-digits', 'train', num_images=64).images
    assert torch.equal(SyntheticAugment('synth-digits', True, size)(digits),
                       SyntheticAugment('synth-digits', False, size)(digits))  # digits are never flipped


def test_synthetic_get_dataloaders():
    for task in ('synth-digits', 'synth-textures'):
        train_loader, test_loader, num_classes = get_dataloaders(task, batch_size=16, workers=0, input_size=48,
                                                                 seed=3, train_limit=40, test_limit=40)
        assert num_classes == SYNTHETIC_TASKS[task]
        assert len(train_loader.dataset) == len(test_loader.dataset) == 40 and len(train_loader) == 2  # full batches
        images, labels = next(iter(train_loader))
        assert images.shape == (16, 3, 48, 48) and images.dtype == torch.float32
        assert 0 <= labels.min() and labels.max() < num_classes
        epoch = torch.cat([labels for _, labels in train_loader])
        assert len(epoch) == 32 and all(epoch.bincount(minlength=num_classes)  # 32 of the 40, each once at most
                                        <= train_loader.dataset.labels.bincount(minlength=num_classes))
        first = next(iter(test_loader))[0]
        again = get_datasets(task, input_size=48, seed=3)[1]
        assert all(torch.allclose(first[i], again[i][0], atol=1e-6) for i in range(3))  # test images: no randomness


def test_unknown_task_lists_valid_tasks():
    with pytest.raises(UserError) as excinfo:
        get_dataloaders('imagenet', workers=0)
    assert_one_line_user_error(excinfo, "unknown task 'imagenet'", 'svhn', 'flowers', 'voc12')


# ---------------------------------------------------------------- data/prepare_data.py

@pytest.fixture
def prepare_data():
    spec = importlib.util.spec_from_file_location('prepare_data', os.path.join(REPO_ROOT, 'data', 'prepare_data.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def md5_of(path):
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


def forbid_downloads(monkeypatch, module):
    def fail(*args, **kwargs):
        raise AssertionError(f'unexpected download {args}')
    for name in ('check_reachable', 'download_url', 'download_and_extract_archive'):
        monkeypatch.setattr(module, name, fail)


def test_prepare_data_offline_fails_fast_with_one_line(prepare_data, monkeypatch, tmp_path, capsys):
    with socket.socket() as probe:  # a local port nobody listens on: connecting is refused at once
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    url = f'http://127.0.0.1:{port}/housenumbers/train_32x32.mat'
    monkeypatch.setattr(prepare_data, 'SVHN_FILES', [(url, 'train_32x32.mat', '0' * 32)])
    monkeypatch.setattr(prepare_data, 'download_url', lambda *args, **kwargs: pytest.fail('download attempted'))
    start = time.monotonic()
    assert prepare_data.main(['--task', 'svhn', '--data-dir', str(tmp_path)]) == 1
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert err.count('\n') == 1
    assert err.startswith('error: cannot reach 127.0.0.1 (') and 'no network?' in err
    assert f'download {url} manually into {tmp_path / "svhn"}' in err


def test_prepare_data_skips_complete_datasets(prepare_data, monkeypatch, tmp_path, capsys):
    write_svhn(tmp_path)
    base = write_flowers(tmp_path)
    write_voc(tmp_path)
    monkeypatch.setattr(prepare_data, 'SVHN_FILES', [
        (url, name, md5_of(tmp_path / 'svhn' / name)) for url, name, _ in prepare_data.SVHN_FILES])
    monkeypatch.setattr(prepare_data, 'FLOWERS_LISTS', [
        (url, name, md5_of(os.path.join(base, name))) for url, name, _ in prepare_data.FLOWERS_LISTS])
    forbid_downloads(monkeypatch, prepare_data)
    assert prepare_data.main(['--data-dir', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count('nothing to download') == 6  # 2 SVHN files, 2 Flowers lists, Flowers images, VOC


def test_prepare_data_downloads_what_is_missing_or_wrong(prepare_data, monkeypatch, tmp_path):
    write_svhn(tmp_path)
    voc_dir = write_voc(tmp_path)
    os.remove(os.path.join(voc_dir, 'JPEGImages', '2008_000002.jpg'))
    calls = []
    monkeypatch.setattr(prepare_data, 'check_reachable', lambda url, target_dir: None)
    monkeypatch.setattr(prepare_data, 'download_url', lambda url, root, **kwargs: calls.append((url, root)))
    monkeypatch.setattr(prepare_data, 'download_and_extract_archive',
                        lambda url, root, **kwargs: calls.append((url, root)))
    # The fixture files do not have the official checksums, so both SVHN files are fetched again.
    assert prepare_data.main(['--task', 'svhn', '--data-dir', str(tmp_path)]) == 0
    assert calls == [(url, str(tmp_path / 'svhn')) for url, _, _ in prepare_data.SVHN_FILES]
    calls.clear()
    assert prepare_data.main(['--task', 'voc12', '--data-dir', str(tmp_path)]) == 0
    assert calls == [(prepare_data.VOC2012['url'], str(tmp_path))]
    voc_dir = write_voc(tmp_path / 'empty_list')
    open(os.path.join(voc_dir, 'ImageSets', 'Main', 'train.txt'), 'w').close()  # the loader calls this incomplete
    calls.clear()
    assert prepare_data.main(['--task', 'voc12', '--data-dir', str(tmp_path / 'empty_list')]) == 0
    assert calls == [(prepare_data.VOC2012['url'], str(tmp_path / 'empty_list'))]


def test_prepare_data_extracts_an_archive_already_there_without_the_network(prepare_data, monkeypatch, tmp_path):
    """An archive downloaded by hand (the offline error's advice) was refused offline; one left by an interrupted
    extraction (removed only once extracted) is extracted again: its truncated last image was taken as complete."""
    source = write_voc(tmp_path / 'source')
    data = tmp_path / 'data'
    archive = data / prepare_data.VOC2012['filename']
    os.makedirs(data)
    with tarfile.open(tmp_path / 'by-hand.tar', 'w') as tar:
        tar.add(tmp_path / 'source' / 'VOCdevkit', arcname='VOCdevkit')
    monkeypatch.setattr(prepare_data, 'VOC2012', dict(prepare_data.VOC2012, md5=md5_of(tmp_path / 'by-hand.tar')))
    forbid_downloads(monkeypatch, prepare_data)
    monkeypatch.setattr(prepare_data, 'download_and_extract_archive', download_and_extract_archive)  # the real one
    image = data / 'VOCdevkit' / 'VOC2012' / 'JPEGImages' / '2008_000002.jpg'
    for interrupted in (False, True):
        shutil.copy(tmp_path / 'by-hand.tar', archive)
        if interrupted:  # every file there, the last one cut short
            image.write_bytes(image.read_bytes()[:100])
        assert prepare_data.main(['--task', 'voc12', '--data-dir', str(data)]) == 0
        assert image.read_bytes() == open(os.path.join(source, 'JPEGImages', '2008_000002.jpg'), 'rb').read()
        assert not archive.exists()


def test_prepare_data_runs_as_a_script():
    result = run_script('data/prepare_data.py', '--help')
    assert result.returncode == 0, result.stderr
    assert '--task {svhn,flowers,voc12,all}' in result.stdout
