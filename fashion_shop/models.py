"""What a model file is: which models predict takes, how each is shown a photo, its answers.

What a model is, is declared once, by its name, which training and finetune write and the
.keras file keeps (docs/reference.md, "What a model file declares"); model_kind() is the
one place that reads it:

    fashion_mnist_cnn, fashion_mnist_cnn_improved   a training run's: photos in Fashion-MNIST's
                                                    view (garments off their models, shoes level)
    ... ending in _mirrored                         an --augment run's: the same, and each photo's
                                                    mirror image too, the answers averaged
    fashion_mnist_cnn_tuned                         finetune's: photos as photographed
    any name, with a 224x224x3 input                finetune --backbone's: the colour photo
    ... ending in _calibrated                       its probabilities calibrated (finetune
                                                    --backbone's, on enough photos): only then
                                                    do predict's unsure marks and expected share
                                                    right mean what they say
"""

import json
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fashion_mnist_cnn import MIRRORED, UserError, cpu_info, find_gpus, first_sentence, native_bf16
from fashion_shop.photos import COLOUR_SIZE, IMAGE_SUFFIXES

TUNED_NAME = "fashion_mnist_cnn_tuned"  # the name finetune gives the 28x28 models it tunes
# The end of the name of a model whose probabilities were calibrated (finetune --backbone's):
# only for such a model do predict's unsure marks and expected share right mean what they say.
CALIBRATED = "_calibrated"


class Kind(NamedTuple):
    """How predict shows a model a photo."""

    photos: str  # how its photos are prepared: a key of fashion_shop.photos.PREPARATIONS
    mirrored: bool  # whether its answers for a photo and its mirror image are averaged
    calibrated: bool = False  # whether its probabilities were calibrated (its name says so)


def model_kind(name, input_shape):
    """What a model is, from its name and the shape of one input; None if not one of ours."""
    input_shape, calibrated = tuple(input_shape), name.endswith(CALIBRATED)
    if input_shape == (COLOUR_SIZE, COLOUR_SIZE, 3):
        return Kind("colour", mirrored=False, calibrated=calibrated)
    if input_shape != (28, 28, 1):
        return None
    if name.removesuffix(CALIBRATED) == TUNED_NAME:
        return Kind("as photographed", mirrored=False, calibrated=calibrated)
    mirrored = name.removesuffix(CALIBRATED).endswith(MIRRORED)
    return Kind("fashion-mnist", mirrored=mirrored, calibrated=calibrated)


def kind_of(model):
    return model_kind(model.name, model.input_shape[1:])


def declared_kind(path):
    """A model.keras file's kind, read from its config without TensorFlow, so that its photos
    are prepared while TensorFlow loads; None if it cannot be read (load_trained_model says
    why)."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))["config"]
        # Sequential and functional models alike list their InputLayer, with its shape.
        layers = (layer for layer in config["layers"] if layer["class_name"] == "InputLayer")
        inputs = (layer["config"] for layer in layers)
        return model_kind(config["name"], next(inputs)["batch_shape"][1:])
    except (OSError, zipfile.BadZipFile, KeyError, TypeError, ValueError, StopIteration):
        return None


def is_model_file(path):
    """Is it whole enough to be a model file: a zip archive (.keras) or HDF5 (legacy .h5)? A
    file that cannot be read at all is one clear error."""
    try:
        with open(path, "rb") as file:
            hdf5 = file.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror})") from None
    return hdf5 or zipfile.is_zipfile(path)


def in_float32(model):
    """Make a model trained in bf16 compute in float32, as it must where bf16 is not native
    (oneDNN has no bf16 convolutions for AVX2 CPUs); its weights are float32 already."""
    layers = [model]
    while layers:
        layer = layers.pop()
        layers += getattr(layer, "layers", [])  # models within the model
        if layer.dtype_policy.compute_dtype == "bfloat16":
            layer.dtype_policy = "float32"


MODEL_SUFFIXES = (".keras", ".h5")


def looks_like_a_model(path):
    """Whether path is a file that could be a model: its suffix, and a model file's first bytes."""
    try:
        return path.suffix.lower() in MODEL_SUFFIXES and path.is_file() and is_model_file(path)
    except UserError:  # cannot be read: not taken for a model
        return False


def check_model_file(path, given_after=(), then="the photos"):
    """Refuse in one line, before TensorFlow loads, a MODEL that is no model file: missing, a
    folder, a photo, or cut short. Where it is a photo, or a model file is among given_after
    (the arguments after MODEL), the arguments were given in the wrong order: said so."""
    swapped = any(looks_like_a_model(Path(other)) for other in given_after)
    order = f"; MODEL comes first, then {then}"
    if path.is_dir():
        inside = path / "model.keras"
        hint = f"; the run's model is {inside}" if inside.is_file() else order * swapped
        raise UserError(f"{path}: a folder, not a model file{hint}")
    if not path.is_file():
        raise UserError(f"{path}: no such model file{order * swapped}")
    if not is_model_file(path):  # Keras would say "File not found" of a photo or a cut file
        swapped = swapped or path.suffix.lower() in IMAGE_SUFFIXES
        raise UserError(f"{path}: not a Keras model file, or a damaged one{order * swapped}")


def load_trained_model(path):
    """A model.keras from a run, refused unless it maps 28x28x1 images (a training run's) or
    224x224 colour photos (finetune --backbone's) to 10 classes."""
    import keras

    check_model_file(path)
    try:
        # safe_mode (the default, stated here on purpose) never runs code stored in the file.
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        raise UserError(
            f"{path}: not a usable Keras model file ({first_sentence(error)})"
        ) from None
    input_shape = tuple(getattr(model, "input_shape", ()) or ())
    output_shape = tuple(getattr(model, "output_shape", ()) or ())
    if model_kind(model.name, input_shape[1:]) is None or output_shape[1:] != (10,):
        raise UserError(
            f"{path}: this model maps {input_shape[1:]} to {output_shape[1:]}, not a 28x28x1 "
            f"image or a {COLOUR_SIZE}x{COLOUR_SIZE} colour photo to 10 Fashion-MNIST classes"
        )
    if not native_bf16(find_gpus(), cpu_info()[1]):
        in_float32(model)
    return model


def scale_pixels(images):
    """uint8 -> float32 in [0, 1], what the models take: (N, 28, 28) gets its channel axis,
    colour photos (N, 224, 224, 3) have theirs."""
    images = images[..., np.newaxis] if images.ndim == 3 else images
    return images.astype(np.float32) / 255.0


def class_probabilities(model, images):
    """A model's class probabilities for a batch of prepared photos; a mirrored model answers
    for each photo and its mirror image, averaged."""
    if not kind_of(model).mirrored:
        return model.predict_on_batch(scale_pixels(images))
    both = model.predict_on_batch(scale_pixels(np.concatenate([images, images[:, :, ::-1]])))
    return (both[: len(images)] + both[len(images) :]) / 2
