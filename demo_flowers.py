"""NetTailor on Oxford Flowers102 with the released recipe (ResNet34, ImageNet weights, docs/method.md §8).

    python data/prepare_data.py --task flowers     # once: downloads the dataset into data/
    python demo_flowers.py                          # teacher, student, prune + retrain, final table
"""
from demo import demo_main

if __name__ == '__main__':
    demo_main('flowers')
