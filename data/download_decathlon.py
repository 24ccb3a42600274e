"""Download the Visual Decathlon (decathlon-1.0) from the VGG site into <data-dir>/decathlon-1.0.

Fetches the devkit (the annotation files of all ten tasks) and the data tarball (the images of every
task but imagenet12, one tar file per task inside), skipping whatever is already in place, so it can be
re-run after an interruption. The imagenet12 images are distributed by image-net.org only
(decathlon-1.0-data-imagenet.tar, an account is required): the script says how to install them.

    python data/download_decathlon.py [--data-dir data]

For an offline run use the miniature decathlon instead: python data/make_synthetic_decathlon.py
"""
import argparse
import glob
import json
import os
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchvision.datasets.utils import download_url, extract_archive  # noqa: E402

from decathlon_dataloaders import (DECATHLON_TASKS, MEAN_STD_FILE, SPLITS, annotation_path,  # noqa: E402
                                   decathlon_root, images_hint, missing_files)
import utils  # noqa: E402
from utils import UserError  # noqa: E402

MIRROR = 'http://www.robots.ox.ac.uk/~vgg/share/'
DEVKIT_ARCHIVE = 'decathlon-1.0-devkit.tar.gz'
DATA_ARCHIVE = 'decathlon-1.0-data.tar.gz'
PUBLIC_TASKS = [task for task in DECATHLON_TASKS if task != 'imagenet12']


def check_reachable(url):
    utils.check_reachable(url, "downloading the decathlon needs internet access; offline, run "
                               "`python data/make_synthetic_decathlon.py` for the miniature decathlon")


def fetch(url, folder, filename):
    """Download url to folder/filename (unless there already: downloaded by hand, or not yet extracted) through a
    partial file, so an interrupted download is never taken for a complete one."""
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        return path
    check_reachable(url)
    partial = path + '.part'
    if os.path.exists(partial):
        os.remove(partial)
    try:
        download_url(url, folder, filename + '.part')
    except OSError as error:
        raise UserError(f"downloading {url} failed ({error}); run again, or pass --mirror") from error
    os.replace(partial, path)
    return path


def unpack(archive, destination):
    """Extract archive into destination, then delete it."""
    print(f'extracting {archive}')
    try:
        extract_archive(archive, destination, remove_finished=True)
    except (tarfile.TarError, EOFError, OSError, RuntimeError) as error:
        raise UserError(f"corrupt archive {archive}: {error}; delete it and run again") from error


def annotations_present(data_dir):
    """Whether every annotation file is there and reads as JSON (an interrupted extraction leaves a cut one)."""
    for task in DECATHLON_TASKS:
        for split in SPLITS:
            try:
                with open(annotation_path(data_dir, task, split)) as f:
                    json.load(f)
            except (OSError, ValueError):
                return False
    return True


def images_present(data_dir, task):
    """Whether every image named in the task's annotation files exists."""
    root = decathlon_root(data_dir)
    for split in SPLITS:
        path = annotation_path(data_dir, task, split)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            images = json.load(f).get('images', [])
        if not images or missing_files([os.path.join(root, image['file_name']) for image in images]):
            return False
    return True


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', default='data', help='the decathlon goes to <data-dir>/decathlon-1.0')
    parser.add_argument('--mirror', default=MIRROR,
                        help=f'base URL holding {DEVKIT_ARCHIVE} and {DATA_ARCHIVE} (default {MIRROR})')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    root = decathlon_root(args.data_dir)
    image_folder = os.path.join(root, 'data')
    utils.require_folder(args.data_dir, '--data-dir')
    utils.require_http_url(args.mirror, '--mirror')
    mirror = args.mirror if args.mirror.endswith('/') else args.mirror + '/'
    if annotations_present(args.data_dir):
        print(f'annotations: all present in {os.path.join(root, "annotations")}')
    else:
        os.makedirs(args.data_dir, exist_ok=True)
        unpack(fetch(mirror + DEVKIT_ARCHIVE, args.data_dir, DEVKIT_ARCHIVE), args.data_dir)
        if not annotations_present(args.data_dir):
            raise UserError(f"{DEVKIT_ARCHIVE} did not provide every annotation file under "
                            f"{os.path.join(root, 'annotations')}; check --mirror")
        stats_path = os.path.join(root, MEAN_STD_FILE)
        if os.path.isfile(stats_path):
            os.remove(stats_path)
            print(f'removed {stats_path}: it held the miniature decathlon statistics')
    for task_archive in sorted(glob.glob(os.path.join(image_folder, '*.tar'))):  # each removed once extracted:
        unpack(task_archive, image_folder)  # one left there was interrupted (its last image may be cut short)
    if all(images_present(args.data_dir, task) for task in PUBLIC_TASKS) and \
            not os.path.exists(os.path.join(image_folder, DATA_ARCHIVE)):
        print(f'images: all present for {", ".join(PUBLIC_TASKS)}')
    else:
        os.makedirs(image_folder, exist_ok=True)
        unpack(fetch(mirror + DATA_ARCHIVE, image_folder, DATA_ARCHIVE), image_folder)
        for task_archive in sorted(glob.glob(os.path.join(image_folder, '*.tar'))):
            unpack(task_archive, image_folder)
        missing = [task for task in PUBLIC_TASKS if not images_present(args.data_dir, task)]
        if missing:
            raise UserError(f"images of {', '.join(missing)} still missing under {image_folder} after extracting "
                            f"{DATA_ARCHIVE}; delete that folder and run again")
    if images_present(args.data_dir, 'imagenet12'):
        print('imagenet12: images present')
    else:
        print(f"imagenet12: {images_hint('imagenet12', args.data_dir)}")
    print(f'Visual Decathlon in {root}')


if __name__ == '__main__':
    utils.run_script(main)
