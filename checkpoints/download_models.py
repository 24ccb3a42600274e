"""Download the authors' released NetTailor decathlon models: the universal blocks (the Wide ResNet-26
pre-trained on the decathlon's imagenet12, checkpoints/wide_resnet26.pth.tar) and the task-specific blocks
of their final decathlon students (decathlon_models.tar.gz, unpacked into checkpoints/decathlon_models/).

The URLs are where the authors published the files (their lab's web space); they cannot be checked from
here and may have moved. Pass --url / --models-url to fetch them from another location (any http(s) URL
of the same file), or copy the files there yourself. What already exists is kept.

    python checkpoints/download_models.py [--url URL] [--output checkpoints/wide_resnet26.pth.tar]
                                          [--models-url URL] [--models-dir checkpoints/decathlon_models]
    python checkpoints/convert_released.py checkpoints/decathlon_models --out checkpoints/released_packs
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchvision.datasets.utils import download_url, extract_archive  # noqa: E402

import utils  # noqa: E402
from utils import UserError  # noqa: E402
from wide_nettailor import released_task_checkpoints  # noqa: E402

WIDE_RESNET26_URL = 'http://www.svcl.ucsd.edu/~morgado/nettailor/data/wide_resnet26.pth.tar'
DECATHLON_MODELS_URL = 'http://www.svcl.ucsd.edu/~morgado/nettailor/data/decathlon_models.tar.gz'
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, 'wide_resnet26.pth.tar')
DEFAULT_MODELS_DIR = os.path.join(HERE, 'decathlon_models')


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--url', default=WIDE_RESNET26_URL,
                        help='where to fetch the universal blocks (default %(default)s)')
    parser.add_argument('--output', default=DEFAULT_OUTPUT, help='where to save them (default %(default)s)')
    parser.add_argument('--models-url', default=DECATHLON_MODELS_URL,
                        help='where to fetch the task-specific blocks (default %(default)s)')
    parser.add_argument('--models-dir', default=DEFAULT_MODELS_DIR,
                        help='where to unpack them, one folder per task (default %(default)s)')
    return parser.parse_args(argv)


def check_reachable(url, flag, by_hand):
    utils.check_reachable(url, f"downloading the released models needs internet access; pass {flag} for another "
                               f"location or {by_hand}")


def download(url, path, flag, by_hand, check=None):
    """`url` saved as `path`, through a partial file renamed when complete (and accepted by `check`, which raises
    a UserError for what is not the expected file); offline, the error says to pass `flag` or do `by_hand`."""
    check_reachable(url, flag, by_hand)
    folder, filename = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, filename + '.part')
    if os.path.exists(partial):
        os.remove(partial)
    try:
        download_url(url, folder, filename + '.part')
    except OSError as error:
        raise UserError(f"downloading {url} failed ({error}); pass {flag} for another location") from error
    try:
        if check is not None:
            check(partial)
    except UserError:
        os.remove(partial)
        raise
    os.replace(partial, path)


def fetch_universal(args):
    if os.path.isfile(args.output):
        print(f'{args.output} exists, kept')
        return
    utils.require_file_path(args.output, '--output')

    def check(partial):  # a moved site answers with an HTML page, not a checkpoint
        try:
            utils.load_checkpoint(partial, 'download', fix=None)
        except UserError as error:
            raise UserError(f"{args.url} did not return a PyTorch checkpoint ({error}); pass --url for another "
                            "location") from None
    download(args.url, args.output, '--url', f"copy the file to {args.output}", check)
    print(f'saved {args.output}')


def fetch_task_models(args):
    """The released task checkpoints, unpacked into --models-dir (whole, or not at all)."""
    utils.require_folder(args.models_dir, '--models-dir')
    if os.path.isdir(args.models_dir) and released_task_checkpoints(args.models_dir):
        print(f'{args.models_dir} holds released task checkpoints, kept')
        return
    if os.path.isdir(args.models_dir) and os.listdir(args.models_dir):
        raise UserError(f"{args.models_dir} exists but holds no released task checkpoint; move it away or pass "
                        "another --models-dir")
    parent = os.path.dirname(os.path.abspath(args.models_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix='.decathlon_models-') as scratch:
        archive = os.path.join(scratch, os.path.basename(args.models_url.split('?')[0]) or 'decathlon_models.tar.gz')
        download(args.models_url, archive, '--models-url',
                 f"unpack {os.path.basename(args.models_url.split('?')[0])} into {args.models_dir}")
        unpacked = os.path.join(scratch, 'unpacked')
        try:
            extract_archive(archive, unpacked, remove_finished=True)
        except Exception as error:
            raise UserError(f"{args.models_url} is not a readable archive ({utils.error_reason(error)}); pass "
                            "--models-url for another location") from error
        entries = os.listdir(unpacked)
        root = os.path.join(unpacked, entries[0]) if len(entries) == 1 and os.path.isdir(
            os.path.join(unpacked, entries[0])) else unpacked
        tasks = released_task_checkpoints(root)
        if not tasks:
            raise UserError(f"{args.models_url} holds no task checkpoint named after a decathlon task")
        if os.path.isdir(args.models_dir):
            os.rmdir(args.models_dir)  # empty
        os.replace(root, args.models_dir)
    print(f"unpacked the released task-specific blocks of {len(tasks)} tasks ({', '.join(sorted(tasks))}) "
          f"into {args.models_dir}")


def main(argv=None):
    args = parse_args(argv)
    utils.require_http_url(args.url, '--url')
    utils.require_http_url(args.models_url, '--models-url')
    fetch_universal(args)
    fetch_task_models(args)


if __name__ == '__main__':
    utils.run_script(main)
