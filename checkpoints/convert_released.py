"""Convert the authors' released NetTailor decathlon task checkpoints into this project's task packs.

    python checkpoints/convert_released.py checkpoints/decathlon_models/svhn/checkpoint.pth.tar --out svhn.pth
    python checkpoints/convert_released.py checkpoints/decathlon_models --out checkpoints/released_packs

A folder is searched for released checkpoints (`*.pth.tar`) whose path names a decathlon task (a folder
or a file called svhn, vgg-flowers, ...); each becomes <out>/<task>.pth.  A pack attaches to the
released universal blocks (checkpoints/wide_resnet26.pth.tar) with `nettailor.student_on_universal`,
as deploy_decathlon.ipynb does.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from utils import UserError  # noqa: E402
from wide_nettailor import load_released_pack, released_task_checkpoints  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('checkpoint', help='a released task checkpoint, or a folder of them (one per task)')
    parser.add_argument('--out', required=True, help='the task pack to write, or a folder for a folder of checkpoints')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if os.path.isdir(args.checkpoint):
        checkpoints = released_task_checkpoints(args.checkpoint)
        if not checkpoints:
            raise UserError(f"no released task checkpoint (*.pth.tar named after a decathlon task) under "
                            f"{args.checkpoint}; `python checkpoints/download_models.py` fetches them")
        utils.require_folder(args.out, '--out')
        outputs = {task: os.path.join(args.out, f'{task}.pth') for task in checkpoints}
    else:
        utils.require_file_path(args.out, '--out')
        checkpoints, outputs = {None: args.checkpoint}, {None: args.out}
    packs = {task: load_released_pack(path) for task, path in checkpoints.items()}  # all read before any write
    for task, pack in packs.items():
        utils.atomic_save(pack, outputs[task])
        print(f"{checkpoints[task]} -> {outputs[task]} ({pack['meta']['num_classes']} classes, "
              f"{int(pack['state']['path_alive'][:, 0].sum())}/{pack['meta']['num_layers']} universal blocks kept)")


if __name__ == '__main__':
    utils.run_script(main)
