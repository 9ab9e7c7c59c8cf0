"""fashion_shop/doubts.py: which photos the model doubts are in the right folder (confident
learning), most doubted first, and doubtful.csv as review --queue reads it. Hand-made
probabilities, in this process; finetune --backbone's own list is tested in test_backbone."""

import csv

import numpy as np
from conftest import ROOT  # noqa: F401  (puts the project on the path)

from fashion_shop.doubts import DOUBTFUL_HEADER, doubtful_photos, write_doubtful

# Photos of classes 0 and 1 (class 2 has none), each row a photo's probabilities. The bars: class
# 0's is the mean of column 0 over rows labelled 0, class 1's of column 1 over rows labelled 1.
LABELS = np.array([0, 0, 0, 1, 1, 1, 0, 1, 1])
PROBABILITIES = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.80, 0.10, 0.10],
        [0.85, 0.10, 0.05],
        [0.10, 0.80, 0.10],
        [0.05, 0.90, 0.05],
        [0.20, 0.70, 0.10],
        [0.10, 0.85, 0.05],  # 6: filed in 0, confidently 1 (0.85 >= class 1's bar 0.60)
        [0.70, 0.25, 0.05],  # 7: filed in 1, confidently 0 (0.70 >= class 0's bar 0.6625)
        [0.45, 0.35, 0.20],  # 8: filed in 1, likelier 0, but under every bar: unsure, not doubted
    ]
)


def test_a_photo_confidently_of_another_class_is_doubted_most_doubted_first():
    # 6 gives its folder's class 0.10, 7 gives its folder's 0.25: 6 first.
    assert doubtful_photos(LABELS, PROBABILITIES).tolist() == [6, 7]


def test_the_order_is_the_folder_class_probability_lowest_first():
    probabilities = PROBABILITIES.copy()
    probabilities[6] = [0.30, 0.68, 0.02]  # still over class 1's bar (now 0.58)
    probabilities[7] = [0.80, 0.15, 0.05]
    assert doubtful_photos(LABELS, probabilities).tolist() == [7, 6]


def test_none_is_doubted_where_the_model_agrees_with_every_folder():
    agree = PROBABILITIES[[0, 1, 2, 3, 4, 5]]
    assert doubtful_photos(LABELS[:6], agree).tolist() == []


def test_a_class_without_photos_is_never_confident_so_never_doubts_a_folder():
    # Filed in 0, the model's top class is 2, which no photo is filed in: no bar to reach.
    labels = np.array([0, 0, 1, 1, 0])
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.8, 0.1, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.85, 0.05],
            [0.05, 0.05, 0.9],
        ]
    )
    assert doubtful_photos(labels, probabilities).tolist() == []
    # Once class 2 has photos, its bar is theirs, and the photo is doubted.
    labels = np.append(labels, 2)
    probabilities = np.vstack([probabilities, [0.1, 0.1, 0.8]])
    assert doubtful_photos(labels, probabilities).tolist() == [4]


def test_a_photo_whose_top_class_is_its_folder_is_never_doubted():
    # Class 1's photos are unsure of it (bar 0.4): the last photo passes that bar, but its
    # folder's class 0 is still its likeliest.
    labels = np.array([0, 0, 1, 1, 0])
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.9, 0.05, 0.05],
            [0.55, 0.4, 0.05],
            [0.55, 0.4, 0.05],
            [0.5, 0.45, 0.05],
        ]
    )
    assert doubtful_photos(labels, probabilities).tolist() == []


def write(tmp_path, labels, probabilities, names):
    folder = tmp_path / "shop"
    photos = [(folder / name, label) for name, label in zip(names, labels)]
    out = tmp_path / "run" / "doubtful.csv"
    out.parent.mkdir()
    return write_doubtful(out, folder, photos, probabilities), out.read_bytes().decode()


def test_doubtful_csv_as_review_reads_it(tmp_path):
    names = [f"T-shirt-top/{n}.jpg" for n in range(3)] + [f"Trouser/{n}.jpg" for n in range(3)]
    names += ["T-shirt-top/unsure/6.jpg", "Trouser/7.jpg", "Trouser/8.jpg"]
    count, text = write(tmp_path, LABELS, PROBABILITIES, names)
    assert count == 2
    assert text == (
        "photo,folder_class,model_class,model_probability,folder_probability\r\n"
        "T-shirt-top/unsure/6.jpg,T-shirt/top,Trouser,0.8500,0.1000\r\n"
        "Trouser/7.jpg,Trouser,T-shirt/top,0.7000,0.2500\r\n"
    )
    assert list(csv.reader(text.splitlines()))[0] == DOUBTFUL_HEADER


def test_doubtful_csv_with_none_doubted_is_its_header_alone(tmp_path):
    names = [f"T-shirt-top/{n}.jpg" for n in range(3)] + [f"Trouser/{n}.jpg" for n in range(3)]
    count, text = write(tmp_path, LABELS[:6], PROBABILITIES[:6], names)
    assert (count, text) == (0, ",".join(DOUBTFUL_HEADER) + "\r\n")
