"""NetTailor on PASCAL VOC 2012 (object crops) with the released recipe (ResNet34, ImageNet weights,
docs/method.md §8).

    python data/prepare_data.py --task voc12     # once: downloads the dataset into data/
    python demo_voc12.py                          # teacher, student, prune + retrain, final table
"""
from demo import demo_main

if __name__ == '__main__':
    demo_main('voc12')
