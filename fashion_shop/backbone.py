"""Transfer learning: a network pre-trained on ImageNet sees the colour photos, and a new
10-class layer learns from what it sees (`finetune --backbone`)."""

import os
from pathlib import Path

import numpy as np

from fashion_mnist_cnn import BATCH_SIZE, UserError, first_sentence
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


def backbone_weights(name):
    """The ImageNet weights file, downloaded once into the Keras cache and checked."""
    import keras

    _, _, file, sha256 = BACKBONES[name]
    file_name = file.rpartition("/")[2]
    try:
        return keras.utils.get_file(
            file_name, KERAS_APPLICATIONS + file, file_hash=sha256, cache_subdir="models"
        )
    except Exception as error:  # get_file raises bare Exceptions for network failures
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        raise UserError(
            f"could not download {file_name} ({first_sentence(error)}). Without internet, put "
            f"that file (from {KERAS_APPLICATIONS + file}) in {cache}/"
        ) from None


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
    head = keras.Sequential(
        [
            keras.Input(backbone.output_shape[1:]),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="head",
    )
    model = keras.Sequential(
        [keras.Input(size), keras.layers.Rescaling(2.0, offset=-1.0), backbone, head],
        name=f"{name}_fashion",
    )
    return model, head


def photo_features(model, images):
    """What the frozen backbone sees in each photo and then in each mirror image (so the new
    layer learns shoes pointing either way), computed once: the new layer trains in seconds."""
    import keras

    extractor = keras.Sequential([keras.Input(model.input_shape[1:]), *model.layers[:-1]])
    return np.concatenate(
        [
            extractor.predict_on_batch(scale_pixels(x[i : i + FEATURE_BATCH]))
            for x in (images, images[:, :, ::-1])
            for i in range(0, len(x), FEATURE_BATCH)
        ]
    )


def feature_batches(features, labels, seed, epoch):
    """An epoch of (features, labels) batches in an order drawn from (seed, epoch) alone."""
    import tensorflow as tf

    order = np.random.default_rng((seed, epoch)).permutation(len(labels))
    return tf.data.Dataset.from_tensor_slices((features[order], labels[order])).batch(BATCH_SIZE)
