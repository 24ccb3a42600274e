"""Downloads and prepares the SVHN, Flowers102 and VOC 2012 datasets that `dataloaders.py` reads.

    python data/prepare_data.py [--task {svhn,flowers,voc12,all}] [--data-dir data]

Files come from the official locations torchvision uses, checked against torchvision's md5 sums. Files that are
already in place are not downloaded again, so the script can be re-run after an interruption.
"""
import argparse
import os
import socket
import sys
import urllib.error

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scipy.io import loadmat  # noqa: E402
from torchvision.datasets import SVHN, Flowers102  # noqa: E402
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, download_url  # noqa: E402
from torchvision.datasets.voc import DATASET_YEAR_DICT  # noqa: E402

import utils  # noqa: E402
from utils import UserError  # noqa: E402

# (url, file name, md5) of every file, as torchvision's dataset classes define them.
SVHN_FILES = [tuple(SVHN.split_list[split]) for split in ('train', 'test')]
FLOWERS_IMAGES = (Flowers102._download_url_prefix + Flowers102._file_dict['image'][0],) + Flowers102._file_dict['image']
FLOWERS_LISTS = [(Flowers102._download_url_prefix + Flowers102._file_dict[key][0],) + Flowers102._file_dict[key]
                 for key in ('label', 'setid')]
VOC2012 = DATASET_YEAR_DICT['2012']

CONNECT_TIMEOUT_S = 5
DOWNLOAD_TIMEOUT_S = 60


def check_reachable(url, target_dir):
    utils.check_reachable(url, f"no network? download {url} manually into {target_dir}", CONNECT_TIMEOUT_S)


def fetch(url, target_dir, filename, md5, extract=False):
    """Downloads `url` into `target_dir` (and unpacks it there when `extract`), checking its md5; a file of that
    md5 already there (downloaded by hand, or an archive whose extraction was interrupted) is not downloaded."""
    if not check_integrity(os.path.join(target_dir, filename), md5):
        check_reachable(url, target_dir)
    try:
        if extract:
            download_and_extract_archive(url, target_dir, filename=filename, md5=md5, remove_finished=True)
        else:
            download_url(url, target_dir, filename=filename, md5=md5)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise UserError(f'download of {url} failed: {error}; re-run this script, or download it manually '
                        f'into {target_dir}') from error


def fetch_unless_present(task, files, target_dir):
    """Downloads each (url, filename, md5) of `files` into `target_dir` unless a file with that md5 is there."""
    for url, filename, md5 in files:
        path = os.path.join(target_dir, filename)
        if check_integrity(path, md5):
            print(f'{task}: {path} already present (md5 ok), nothing to download')
        else:
            fetch(url, target_dir, filename, md5)


def prepare_svhn(data_dir):
    """SVHN: `<data_dir>/svhn/{train,test}_32x32.mat`."""
    fetch_unless_present('svhn', SVHN_FILES, os.path.join(data_dir, 'svhn'))


def missing_flowers_image(base_dir):
    """Path of the first Flowers102 image listed in imagelabels.mat that is missing, or None."""
    labels = loadmat(os.path.join(base_dir, 'imagelabels.mat'))['labels'].reshape(-1)
    for image_id in range(1, len(labels) + 1):
        path = os.path.join(base_dir, 'jpg', f'image_{image_id:05d}.jpg')
        if not os.path.exists(path):
            return path
    return None


def prepare_flowers(data_dir):
    """Flowers102: `<data_dir>/flowers-102/{imagelabels.mat,setid.mat,jpg/}`."""
    base_dir = os.path.join(data_dir, 'flowers-102')
    fetch_unless_present('flowers', FLOWERS_LISTS, base_dir)
    url, filename, md5 = FLOWERS_IMAGES
    if missing_flowers_image(base_dir) is None and not os.path.exists(os.path.join(base_dir, filename)):
        print(f'flowers: all images already present in {os.path.join(base_dir, "jpg")}, nothing to download')
    else:  # an archive still there: its extraction was interrupted (it is removed once extracted)
        fetch(url, base_dir, filename, md5, extract=True)


def missing_voc_file(voc_dir):
    """Path of the first missing VOC 2012 file among the split lists (an empty list counts as missing) and their
    images and annotations, or None."""
    for split in ('train', 'val'):
        list_path = os.path.join(voc_dir, 'ImageSets', 'Main', f'{split}.txt')
        if not os.path.exists(list_path):
            return list_path
        with open(list_path) as f:
            image_ids = f.read().split()
        if not image_ids:
            return list_path
        for image_id in image_ids:
            for path in (os.path.join(voc_dir, 'Annotations', f'{image_id}.xml'),
                         os.path.join(voc_dir, 'JPEGImages', f'{image_id}.jpg')):
                if not os.path.exists(path):
                    return path
    return None


def prepare_voc12(data_dir):
    """VOC 2012: `<data_dir>/VOCdevkit/VOC2012/{JPEGImages,Annotations,ImageSets/Main}`."""
    voc_dir = os.path.join(data_dir, VOC2012['base_dir'])
    if missing_voc_file(voc_dir) is None and not os.path.exists(os.path.join(data_dir, VOC2012['filename'])):
        print(f'voc12: {voc_dir} already complete, nothing to download')
    else:  # an archive still there: its extraction was interrupted (it is removed once extracted)
        fetch(VOC2012['url'], data_dir, VOC2012['filename'], VOC2012['md5'], extract=True)


PREPARE = {'svhn': prepare_svhn, 'flowers': prepare_flowers, 'voc12': prepare_voc12}


def main(argv=None):
    """Prepares the requested datasets; returns the exit code (1 after a one-line error message)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--task', choices=[*PREPARE, 'all'], default='all', help='dataset to prepare')
    parser.add_argument('--data-dir', default='data', help='folder the datasets go into')
    args = parser.parse_args(argv)
    tasks = list(PREPARE) if args.task == 'all' else [args.task]
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a stalled download fails instead of hanging
    try:
        for task in tasks:
            PREPARE[task](args.data_dir)
    except UserError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    finally:
        socket.setdefaulttimeout(previous_timeout)
    print(f'done: {", ".join(tasks)} ready in {args.data_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
