"""Tests for the procedural offline datasets in synthetic.py."""
import time

import pytest
import torch

import synthetic
from synthetic import FLIP_INVARIANT, SYNTHETIC_TASKS, SyntheticImages, make_synthetic
from utils import UserError


@pytest.mark.parametrize('task', sorted(SYNTHETIC_TASKS))
def test_shapes_dtypes_and_labels(task):
    dataset = make_synthetic(task, 'train', num_images=70)
    num_classes = SYNTHETIC_TASKS[task]
    assert isinstance(dataset, SyntheticImages)
    assert dataset.task == task and dataset.num_classes == num_classes
    assert len(dataset) == 70
    assert dataset.images.shape == (70, 3, 32, 32) and dataset.images.dtype == torch.uint8
    assert dataset.labels.shape == (70,) and dataset.labels.dtype == torch.int64
    assert 0 <= dataset.labels.min() and dataset.labels.max() < num_classes
    image, label = dataset[3]
    assert torch.equal(image, dataset.images[3])
    assert type(label) is int and label == dataset.labels[3]
    # Real pictures, not blank or saturated canvases.
    assert dataset.images.float().std(dim=(1, 2, 3)).min() > 5


@pytest.mark.parametrize('task', sorted(SYNTHETIC_TASKS))
def test_same_seed_same_pixels_other_seed_differs(task):
    first = make_synthetic(task, 'test', seed=3, num_images=40)
    again = make_synthetic(task, 'test', seed=3, num_images=40)
    other = make_synthetic(task, 'test', seed=4, num_images=40)
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.labels, again.labels)
    differing = (first.images != other.images).flatten(1).any(dim=1)
    assert differing.all()


@pytest.mark.parametrize('task', sorted(SYNTHETIC_TASKS))
def test_short_split_is_prefix_of_long_one(task):
    # 37 and 150 end inside different rendering chunks.
    short = make_synthetic(task, 'train', seed=1, num_images=37)
    long = make_synthetic(task, 'train', seed=1, num_images=150)
    assert torch.equal(short.images, long.images[:37])
    assert torch.equal(short.labels, long.labels[:37])


@pytest.mark.parametrize('task', sorted(SYNTHETIC_TASKS))
def test_train_and_test_are_disjoint(task):
    train = make_synthetic(task, 'train', num_images=300).images.flatten(1)
    test = make_synthetic(task, 'test', num_images=300).images.flatten(1)
    identical = (train[:, None, :] == test[None, :, :]).all(dim=2)
    assert not identical.any()
    assert len(torch.unique(train, dim=0)) == len(train)


def test_every_class_present_and_balanced():
    for task, num_classes in SYNTHETIC_TASKS.items():
        labels = make_synthetic(task, 'test', num_images=3 * num_classes).labels
        assert torch.equal(torch.bincount(labels, minlength=num_classes), torch.full((num_classes,), 3))


def test_default_sizes():
    dataset = make_synthetic('synth-digits', 'test')
    assert len(dataset) == synthetic.DEFAULT_SIZES['synth-digits']['test']
    for task in SYNTHETIC_TASKS:
        assert synthetic.DEFAULT_SIZES[task]['train'] >= 10 * SYNTHETIC_TASKS[task]


def test_image_size_64():
    dataset = make_synthetic('synth-source', 'train', num_images=20, image_size=64)
    assert dataset.images.shape == (20, 3, 64, 64)
    # The same scene at twice the resolution: downsampled, it resembles the 32-pixel image.
    small = make_synthetic('synth-source', 'train', num_images=20, image_size=32).images.float()
    pooled = torch.nn.functional.avg_pool2d(dataset.images.float(), 2)
    same_scene = (pooled - small).abs().mean()
    other_scene = (pooled - small.roll(1, dims=0)).abs().mean()
    assert same_scene < 0.5 * other_scene


def test_unknown_task_and_split_raise_user_error():
    with pytest.raises(UserError, match='synth-digits'):
        make_synthetic('synth-nothing', 'train')
    with pytest.raises(UserError, match='train'):
        make_synthetic('synth-digits', 'val')


def test_flip_invariant_tasks_exist_and_exclude_digits():
    assert FLIP_INVARIANT <= set(SYNTHETIC_TASKS)
    assert 'synth-digits' not in FLIP_INVARIANT
    assert 'synth-source' in FLIP_INVARIANT


def test_generation_is_fast():
    make_synthetic('synth-source', 'train', num_images=8)  # build the glyph templates once
    for task in SYNTHETIC_TASKS:
        start = time.perf_counter()
        make_synthetic(task, 'train', num_images=500)
        assert time.perf_counter() - start < 3.0, task


def test_dataloader_batches():
    dataset = make_synthetic('synth-digits', 'train', num_images=10)
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 3]
