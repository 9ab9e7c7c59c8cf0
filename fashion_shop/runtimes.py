"""Each exported format run in its own runtime, as a shop's server or app runs it: TensorFlow's
SavedModel loader, LiteRT's interpreter (ai-edge-litert), onnxruntime. Each takes a batch as
"images" (float32 images scaled to [0, 1]; for a colour model, uint8 decoded photos of one
size, which it prepares itself) and answers the ten "probabilities"."""

import numpy as np

from fashion_mnist_cnn import cpu_cores
from fashion_shop.models import scale_pixels

INPUT, OUTPUT = "images", "probabilities"  # the names every export gives its input and output
SAVEDMODEL_VERSION = "1"  # TF Serving serves DIR/<name>/<version>/


def savedmodel_runner(path):
    """The SavedModel's `serve` signature, loaded by TensorFlow without Keras."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serve"]
    return lambda images: serve(**{INPUT: tf.constant(images)})[OUTPUT].numpy()


def litert_runner(path):
    """The .tflite file in LiteRT's interpreter (XNNPACK on the CPU, on every core), by its
    signature."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=cpu_cores())
    runner = interpreter.get_signature_runner("serving_default")
    return lambda images: runner(**{INPUT: images})[OUTPUT]


def onnx_runner(path):
    """The .onnx file in onnxruntime, on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run([OUTPUT], {INPUT: images})[0]


RUNNERS = {"savedmodel": savedmodel_runner, "litert": litert_runner, "onnx": onnx_runner}


def answers(run, images, batch=256):
    """A runtime's probabilities for prepared uint8 photos or images (N, 28, 28) or (N, 224,
    224, 3), scaled to [0, 1] here, a batch at a time; or, for a colour model's export, which
    prepares photos itself, for a list of decoded uint8 photos, fed as they are."""
    if isinstance(images, list):
        return photo_answers(run, images)
    return np.concatenate(
        [run(scale_pixels(images[i : i + batch])) for i in range(0, len(images), batch)]
    )


def photo_answers(run, photos, batch=64):
    """A colour export's probabilities for decoded photos of any sizes: those of one size go in
    together, a batch at a time; the answers come back in the photos' order."""
    by_size = {}
    for n, photo in enumerate(photos):
        by_size.setdefault(photo.shape, []).append(n)
    found = np.empty((len(photos), 10), np.float32)
    for members in by_size.values():
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            found[chunk] = run(np.stack([photos[n] for n in chunk]))
    return found
