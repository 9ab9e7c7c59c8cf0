"""finetune --backbone's calibration: the new layers of its folds side by side against one by one.

    python benchmarks/calibration.py ../shared/product-photos/shop [--backbone mobilenet_v2]

For each seed, the photos are held out as finetune holds them out (20% of each class), the
backbone's features of the rest computed once, and the out-of-fold scores that give the
temperature found both ways, alternating, in one process: finetune's (the folds' layers side by
side in one layer, one fit) and the plain one (a new layer per fold, each fitted in turn, as
finetune fits its own). Prints each way's seconds (fastest of --repeats), the temperature each
finds, and on the held-out photos, classified by a new layer trained as finetune trains it, the
expected calibration error (10 bins of top probability) as trained and at each temperature.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fashion_mnist_cnn as fm  # noqa: E402
from fashion_shop import backbone, finetune, folders  # noqa: E402


def one_by_one(features, labels, seed, epochs, learning_rate):
    """The plain way: a new layer per fold, fitted in turn on the other folds' photos."""
    import keras

    keras.utils.set_random_seed(seed)
    n = len(labels)
    folds = backbone.calibration_folds(labels, seed)
    logits = np.empty((n, 10), np.float32)
    for fold in range(backbone.CALIBRATION_FOLDS):
        tuned = np.flatnonzero(folds != fold)
        head = backbone.new_head(features.shape[1:])
        fm.compile_model(head, keras.optimizers.Adam(learning_rate))
        head.fit(
            features[np.concatenate([tuned, tuned + n])], np.tile(labels[tuned], 2),
            batch_size=fm.BATCH_SIZE, epochs=epochs, verbose=0,
        )  # fmt: skip
        held_out = folds == fold
        logits[held_out] = head_logits(head, features[:n][held_out])
    return logits


def head_logits(head, features):
    """The new layer's scores before its softmax (dropout is off when it classifies)."""
    kernel, bias = head.layers[-1].get_weights()
    return features @ kernel + bias


def calibration_error(probabilities, labels, bins=10):
    """The share-weighted gap between top probability and accuracy, over bins of the former."""
    top, right = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    edges = np.minimum((top * bins).astype(int), bins - 1)
    return sum(
        abs(top[edges == b].mean() - right[edges == b].mean()) * np.mean(edges == b)
        for b in range(bins)
        if np.any(edges == b)
    )


def softmax(logits):
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("--backbone", default="mobilenet_v2", choices=sorted(backbone.BACKBONES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    keras = fm.start_tensorflow_quietly()
    photos = folders.find_labelled_photos(args.photos)
    images = folders.prepare_photos([path for path, _ in photos], "colour")
    labels = np.array([label for _, label in photos])
    model, head = backbone.build_transfer_model(args.backbone)
    epochs, rate = finetune.BACKBONE_EPOCHS, finetune.FINETUNE_LEARNING_RATE
    print(f"{len(photos)} photos, {args.backbone}, {epochs} epochs")
    for seed in args.seeds:
        tune, held_out = finetune.hold_out_photos(labels, finetune.FINETUNE_HOLDOUT, seed)
        features = backbone.photo_features(model, images[tune])
        ways = {"side by side": backbone.out_of_fold_logits, "one by one": one_by_one}
        seconds, temperatures = {way: [] for way in ways}, {}
        for _ in range(args.repeats):
            for way, logits_of in ways.items():
                start = time.perf_counter()
                logits = logits_of(features, labels[tune], seed, epochs, rate)
                seconds[way].append(time.perf_counter() - start)
                temperatures[way] = backbone.best_temperature(logits, labels[tune])
        # The new layer itself, trained as finetune trains it.
        keras.utils.set_random_seed(seed)
        trained = fm.compile_model(
            backbone.new_head(features.shape[1:]), keras.optimizers.Adam(rate)
        )
        for epoch in range(epochs):
            batches = backbone.feature_batches(features, np.tile(labels[tune], 2), seed, epoch)
            trained.fit(batches, shuffle=False, verbose=0)
        held = backbone.photo_features(model, images[held_out])[: len(held_out)]
        logits = head_logits(trained, held)
        errors = {
            f"T={t:.2f}": calibration_error(softmax(logits / t), labels[held_out])
            for t in [1.0, *temperatures.values()]
        }
        print(
            f"seed {seed}: "
            + ", ".join(
                f"{way} {min(s):.1f} s, T={temperatures[way]:.2f}" for way, s in seconds.items()
            )
            + f"; held-out accuracy {np.mean(logits.argmax(1) == labels[held_out]):.3f}, "
            + "calibration error "
            + ", ".join(f"{name}: {error:.3f}" for name, error in errors.items())
        )


if __name__ == "__main__":
    main()
