"""Each exported format run in its own runtime, as a shop's server or app runs it: TensorFlow's
SavedModel loader, LiteRT's interpreter (ai-edge-litert), onnxruntime. Each takes a batch of
float32 images scaled to [0, 1] as "images" and answers the ten "probabilities"."""

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
    """A runtime's probabilities for prepared uint8 photos or images, a batch at a time."""
    return np.concatenate(
        [run(scale_pixels(images[i : i + batch])) for i in range(0, len(images), batch)]
    )
