"""NetTailor on SVHN with the released recipe (ResNet34, ImageNet weights, docs/method.md §8).

    python data/prepare_data.py --task svhn     # once: downloads the dataset into data/
    python demo_svhn.py                          # teacher, student, prune + retrain, final table
"""
from demo import demo_main

if __name__ == '__main__':
    demo_main('svhn')
