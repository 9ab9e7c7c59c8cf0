"""Transfer learning: a network pre-trained on ImageNet sees the colour photos, and a new
10-class layer learns from what it sees (`finetune --backbone`)."""

import os
from pathlib import Path

import numpy as np

from fashion_mnist_cnn import BATCH_SIZE, download
from fashion_shop.folders import each_class_shuffled
from fashion_shop.models import scale_pixels
from fashion_shop.photos import COLOUR_SIZE

# Keras Applications' two smallest: name -> (network, width, weights file, its sha256). Keras
# checks no hash for these files, so we pass one; we fetch the file as Keras would.
BACKBONES = {
    "mobilenet_v2": (
        "MobileNetV2",
        0.35,
        "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5",
        "df1c3db1d0d9193719c4c70f707c56f7021f999f825bdc57454c275cf6def19f",
    ),
    "mobilenet": (
        "MobileNet",
        0.25,
        "mobilenet/mobilenet_2_5_224_tf_no_top.h5",
        "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf",
    ),
}
KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"
FEATURE_BATCH = 64  # photos per call into the backbone
# The new layer's probabilities are calibrated on the photos it was tuned on, cross-validated
# in this many folds; under MIN_CALIBRATED photos the folds are too small to tell.
CALIBRATION_FOLDS = 5
MIN_CALIBRATED = 50
TEMPERATURES = np.geomspace(0.25, 4.0, 121)  # the temperatures tried, 2.3% apart


def backbone_weights(name):
    """The ImageNet weights file, downloaded once into the Keras cache and checked."""
    _, _, file, sha256 = BACKBONES[name]
    url = KERAS_APPLICATIONS + file
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    offline = f"put that file (from {url}) in {cache}/"
    return str(download(url, sha256, "models", offline))


def build_transfer_model(name):
    """(model, head): the ImageNet network, frozen, and a new 10-class layer on what it sees.
    The model takes [0, 1] colour photos like the other models; the backbone wants [-1, 1]."""
    import keras

    network, alpha, _, _ = BACKBONES[name]
    size = (COLOUR_SIZE, COLOUR_SIZE, 3)
    backbone = getattr(keras.applications, network)(
        input_shape=size, alpha=alpha, include_top=False, weights=backbone_weights(name),
        pooling="avg",
    )  # fmt: skip
    backbone.trainable = False  # tuning its top measured no better (benchmarks/README.md)
    head = new_head(backbone.output_shape[1:])
    model = keras.Sequential(
        [keras.Input(size), keras.layers.Rescaling(2.0, offset=-1.0), backbone, head],
        name=f"{name}_fashion",
    )
    return model, head


def new_head(feature_shape, name="head"):
    """The new last layer: 10 classes from what the backbone sees."""
    import keras

    return keras.Sequential(
        [
            keras.Input(feature_shape),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name=name,
    )


def photo_features(model, images, mirrored=True):
    """What the frozen backbone sees in each photo and then in each mirror image (so the new
    layer learns shoes pointing either way), computed once: the new layer trains in seconds.
    Not mirrored: the photos alone, as predict shows them."""
    import keras

    extractor = keras.Sequential([keras.Input(model.input_shape[1:]), *model.layers[:-1]])
    views = (images, images[:, :, ::-1]) if mirrored else (images,)
    return np.concatenate(
        [
            extractor.predict_on_batch(scale_pixels(x[i : i + FEATURE_BATCH]))
            for x in views
            for i in range(0, len(x), FEATURE_BATCH)
        ]
    )


def feature_batches(features, labels, seed, epoch):
    """An epoch of (features, labels) batches in an order drawn from (seed, epoch) alone."""
    import tensorflow as tf

    order = np.random.default_rng((seed, epoch)).permutation(len(labels))
    return tf.data.Dataset.from_tensor_slices((features[order], labels[order])).batch(BATCH_SIZE)


def calibration_folds(labels, seed):
    """Each photo's fold, class by class in turn, so that every fold holds every class."""
    folds = np.empty(len(labels), int)
    for _, members in each_class_shuffled(labels, seed):
        folds[members] = np.arange(len(members)) % CALIBRATION_FOLDS
    return folds


def fold_layers(feature_shape):
    """CALIBRATION_FOLDS new last layers side by side, as one layer of folds x 10 scores: a
    step trains all of them in the time of one (benchmarks/calibration.py)."""
    import keras

    return keras.Sequential(
        [
            keras.Input(feature_shape),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(CALIBRATION_FOLDS * 10),
            keras.layers.Reshape((CALIBRATION_FOLDS, 10)),
            keras.layers.Softmax(),
        ]
    )


def out_of_fold_logits(features, labels, seed, epochs, learning_rate, unseen=None):
    """Each tuned photo's scores from a new layer trained as finetune trains one, but on the
    other folds' photos alone (both ways round): fold k's layer is told nothing of fold k's
    photos. features holds the photos, then their mirror images. After them, the scores of
    the photos whose features are `unseen` (held out: no fold learned them), by each fold's
    layer in turn."""
    import keras

    keras.utils.set_random_seed(seed)  # the same temperature when a run is continued
    n = len(labels)
    folds = calibration_folds(labels, seed)
    targets = np.where(folds[:, None] == np.arange(CALIBRATION_FOLDS), -1, labels[:, None])
    layers = fold_layers(features.shape[1:])
    layers.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=-1),
    )
    layers.fit(features, np.tile(targets, (2, 1)), batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    kernel, bias = layers.layers[1].get_weights()
    if unseen is not None and len(unseen):
        features = np.concatenate([features[:n], unseen])
        folds = np.concatenate([folds, np.arange(len(unseen)) % CALIBRATION_FOLDS])
    scores = (features[: len(folds)] @ kernel + bias).reshape(len(folds), CALIBRATION_FOLDS, 10)
    return scores[np.arange(len(folds)), folds]


def best_temperature(logits, labels):
    """The temperature T at which softmax(logits / T) gives the labels the most likelihood:
    above 1, the probabilities were too sure of themselves."""
    import keras

    def loss(t):
        return float(
            keras.ops.mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits / t, from_logits=True)
            )
        )

    return float(min(TEMPERATURES, key=loss))


def calibrate(head, temperature):
    """Divide the new layer's scores by the temperature, in its own weights: the model, its
    exports and predict are unchanged, its probabilities honest, its answers the same."""
    dense = head.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel / temperature, bias / temperature])
