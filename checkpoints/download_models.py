"""Download the released NetTailor universal blocks: the Wide ResNet-26 pre-trained on the decathlon's
imagenet12, saved as checkpoints/wide_resnet26.pth.tar.

WIDE_RESNET26_URL is where the authors published the file (their lab's web space); it cannot be checked
from here and may have moved. Pass --url to fetch it from another location (any http(s) URL of the same
file), or copy the file to checkpoints/wide_resnet26.pth.tar yourself. An existing file is kept.

    python checkpoints/download_models.py [--url URL] [--output checkpoints/wide_resnet26.pth.tar]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchvision.datasets.utils import download_url  # noqa: E402

import utils  # noqa: E402
from utils import UserError  # noqa: E402

WIDE_RESNET26_URL = 'http://www.svcl.ucsd.edu/~morgado/nettailor/data/wide_resnet26.pth.tar'
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'wide_resnet26.pth.tar')


def check_reachable(url):
    utils.check_reachable(url, "downloading the released weights needs internet access; pass --url for another "
                               f"location or copy the file to {DEFAULT_OUTPUT}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--url', default=WIDE_RESNET26_URL, help=f'where to fetch it (default {WIDE_RESNET26_URL})')
    parser.add_argument('--output', default=DEFAULT_OUTPUT, help='where to save it (default %(default)s)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if os.path.isfile(args.output):
        print(f'{args.output} exists, kept')
        return
    check_reachable(args.url)
    folder, filename = os.path.split(os.path.abspath(args.output))
    partial = os.path.join(folder, filename + '.part')
    if os.path.exists(partial):
        os.remove(partial)
    try:
        download_url(args.url, folder, filename + '.part')
    except OSError as error:
        raise UserError(f"downloading {args.url} failed ({error}); pass --url for another location") from error
    os.replace(partial, args.output)
    print(f'saved {args.output}')


if __name__ == '__main__':
    utils.run_script(main)
