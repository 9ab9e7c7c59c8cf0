"""Photos probably in the wrong folder (`finetune --backbone`'s doubtful.csv): confident
learning (Northcutt, Jiang and Chuang, 2021) on probabilities from layers that never learned
the photo, listed for `review FOLDER --queue`.

The finding is cleanlab's find_label_issues(filter_by="confident_learning",
return_indices_ranked_by="self_confidence") in a dozen lines of NumPy: cleanlab itself would
bring scikit-learn, pandas and more for them (benchmarks/mislabelled.py checks the same list)."""

import csv

import numpy as np

from fashion_mnist_cnn import CLASS_NAMES, atomic_path
from fashion_shop.catalogue import FILE_NAME_BYTES

DOUBTFUL_NAME = "doubtful.csv"  # in the run folder; review FOLDER --queue reads it
DOUBTFUL_HEADER = [
    "photo",
    "folder_class",
    "model_class",
    "model_probability",
    "folder_probability",
]
NEAR = 1e-6  # cleanlab's allowance for rounding: a probability this near another counts as it


def class_thresholds(labels, probabilities):
    """Each class's bar: the mean probability of that class among the photos filed in it, how
    sure the model is where a photo is that class (never under 2 x NEAR); a class without
    photos is never reached."""
    thresholds = np.full(probabilities.shape[1], np.inf)
    for label in np.unique(labels):
        thresholds[label] = max(probabilities[labels == label, label].mean(), 2 * NEAR)
    return thresholds


def doubtful_photos(labels, probabilities):
    """Indices of the photos whose folder the model doubts, most doubted first: the model is
    confident of another class (at or above its bar; of several, the likeliest) and likelier
    to say another class than the folder's. Ranked by the folder class's probability, lowest
    first."""
    confident = probabilities >= class_thresholds(labels, probabilities) - NEAR
    likeliest = probabilities.argmax(axis=1)
    confident_class = np.where(confident.sum(axis=1) > 1, likeliest, confident.argmax(axis=1))
    folder = probabilities[np.arange(len(labels)), labels]
    beaten = probabilities.max(axis=1) > folder + NEAR
    found = np.flatnonzero(confident.any(axis=1) & (confident_class != labels) & beaten)
    return found[np.argsort(folder[found], kind="stable")]


def write_doubtful(path, folder, photos, probabilities):
    """doubtful.csv: the doubted photos of (path, class index) photos, most doubted first, each
    by its path in FOLDER, its folder's class and the model's, and both classes' probabilities
    (to 4 decimals, as predict's CSV gives them); the number of photos listed."""
    labels = np.array([label for _, label in photos])
    found = doubtful_photos(labels, probabilities)
    with (
        atomic_path(path) as partial,
        partial.open("w", newline="", encoding="utf-8", errors=FILE_NAME_BYTES) as file,
    ):
        writer = csv.writer(file)
        writer.writerow(DOUBTFUL_HEADER)
        for i in found:
            said = probabilities[i].argmax()
            writer.writerow(
                [
                    photos[i][0].relative_to(folder).as_posix(),
                    CLASS_NAMES[labels[i]],
                    CLASS_NAMES[said],
                    f"{probabilities[i, said]:.4f}",
                    f"{probabilities[i, labels[i]]:.4f}",
                ]
            )
    return len(found)
