"""`fashion_mnist_cnn.py export`: a model as files that run where shops run things, a SavedModel
for TF Serving, a LiteRT file for phones (and a smaller one with int8 weights), an ONNX file
for any runtime, each proven in its own runtime to answer as the model does."""

import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from fashion_mnist_cnn import (
    CLASS_NAMES,
    ArgumentParser,
    HelpFormatter,
    UserError,
    fingerprint,
    first_sentence,
    load_fashion_mnist,
    start_tensorflow_quietly,
    tensorflow_notes_hidden,
)
from fashion_shop import runtimes
from fashion_shop.folders import find_labelled_photos, prepare_photos
from fashion_shop.models import (
    check_model_file,
    declared_kind,
    in_float32,
    is_model_file,
    kind_of,
    load_trained_model,
)
from fashion_shop.photos import (
    COLOUR_SIZE,
    DECODED,
    PhotoError,
    find_images,
    open_picture,
    prepare_colour,
)

FORMATS = ["savedmodel", "litert", "onnx"]
WRITTEN_BY = "fashion_mnist_cnn.py export"  # model.json says so: a folder export may replace
GENERATED_PHOTOS = 64  # the check batch of a colour model when no photos are given
TIE = 1e-4  # probabilities this close are a tie that float rounding may break either way
# How predict prepares a photo for a 28x28 model, step by step, for an app to do the same: in
# model.json and docs/reference.md (tests/test_export.py follows these words alone, and checks
# that the reference gives them). Steps marked VIEW are for Fashion-MNIST's view (a training
# run's model) alone; a tuned model's photos skip them (fashion_shop/photos.py prepare_image).
VIEW = "[Fashion-MNIST's view only] "
STEPS_28 = [
    "Decode the PNG or JPEG shrunk to fit in 224x224, upright, in RGB: Pillow's "
    "Image.thumbnail((224, 224), Image.Resampling.BOX, reducing_gap=1.0) (which decodes a JPEG "
    "at 1/2, 1/4 or 1/8 of its size where that still leaves 224 px or more), then "
    "ImageOps.exif_transpose; a 16-bit grey PNG divided by 257 first, a palette or 1-bit image "
    "made RGB (RGBA if it has transparency) before shrinking, a transparent one put on white.",
    "Background: the border is the outer 2 rows at the top and at the bottom and the outer 2 "
    "columns at the left and at the right, corners in both (4 x width + 4 x height pixels); the "
    "background colour is the border's median, channel by channel. A pixel's distance from a "
    "colour is the square root of the mean of the three squared channel differences. The "
    "noise is 2.5 times the median distance of the border's pixels from the background colour.",
    "The item map (height x width, 0-255): each pixel's distance from the background colour "
    "less the noise, clipped to 0-255 and truncated to a whole number. All 0: a blank photo, "
    "not classified.",
    "The box: the item map's pixels above 13 through a 3x3 median filter (a pixel is kept "
    "where 5 or more of the 9 pixels around and including it are above 13, the outer rows and "
    "columns repeated outwards); the box runs from the first to the last row and column "
    "holding a kept pixel: (left, top, right + 1, bottom + 1). No kept pixel: no box.",
    VIEW + "A garment on a model: only for a box at least 0.9 times as tall as wide (10 x "
    "height >= 9 x width). In the photo's area (left + width // 10, top, right - width // 10, "
    "top + height // 2), made grey by Pillow's convert('L'), OpenCV's "
    "haarcascade_frontalface_default.xml finds faces: detectMultiScale(grey, 1.1, 5, "
    "minSize=(max(16, height // 10),) * 2, maxSize=(2 * height // 5,) * 2), each face (x, y, "
    "w, h) then moved into the photo's coordinates. A face counts where its middle (rows y + "
    "h // 4 to y + 3 * h // 4, columns x + w // 4 to x + 3 * w // 4, ends excluded) has, in "
    "Pillow's YCbCr, a median Cb of 77 to 127 and a median Cr of 133 to 173 (skin); the "
    "largest (w x h) is the model's.",
    VIEW + "With a face (x, y, w, h): the item map is set to 0 above row y + h + h // 5 "
    "(excluded) between columns max(0, x - 3 * w // 10) and x + w + 3 * w // 10 (excluded). "
    "Then each pixel's colour is numbered (R // 16) x 256 + (G // 16) x 16 + B // 16; over the "
    "chest, rows y + 13 * h // 10 to y + 3 * h and columns max(0, x - w // 4) to x + w + w // 4 "
    "(ends excluded), each number's share of the chest's pixels is counted, and every item "
    "pixel whose colour's share is under 0.002 is set to 0. The box again (step 4).",
    VIEW + "Without a face, a box wider than tall (a shoe or a bag) is made level: within the "
    "box, the columns holding item pixels above 13; with 10 or more such columns, each one's "
    "lowest such pixel (its row from the box's top); through the middle 80% of these columns "
    "(from n // 10 to n * 9 // 10, end excluded), the least-squares line of lowest row against "
    "column (numpy.polyfit, degree 1). Where atan(slope) is 3 to 30 degrees either way, the "
    "whole item map is turned by that many degrees (Pillow's rotate(degrees, "
    "Image.Resampling.BILINEAR, expand=True)); the box again (step 4).",
    "Crop the item map to the box, if there is one.",
    VIEW + "With a face, an item more than 3/4 as wide as tall is squeezed to (3 x height // "
    "4) x height by Pillow's BOX resize.",
    "Its longest side made 28: each side max(1, round(side / longest side x 28)) by Pillow's "
    "LANCZOS resize; then Pillow's UnsharpMask(radius=1, percent=100, threshold=0).",
    "Stretched: top = max(the 99.5th percentile of its pixels (NumPy's, linear), 1); each "
    "pixel v becomes min(255, round(v x 255 / top)).",
    "Wider than tall (a shoe or a bag), lit: the median of its pixels above 40 (if any); under "
    "160, each pixel v becomes round(255 x (v / 255) ^ gamma), gamma = ln(160 / 255) / "
    "ln(median / 255).",
    "Centred on a black 28x28 (Pillow's ImageOps.pad(image, (28, 28), color=0): offset "
    "round(free pixels / 2), a half to even).",
    "A shoe points left: count each column's pixels above 40; of the columns from the first "
    "to the last with any (4 or more of them), compare the mean count of the first third and "
    "of the last third ((last + 1 - first) // 3 columns each); where the first is more than "
    "1.15 times the last, mirror the image left to right.",
    "Feed it as float32 pixel values / 255, shape (1, 28, 28, 1); for a model with mirrored "
    "true, feed its mirror image too and average the two answers.",
]
PREPARED_BY = {
    "fashion-mnist": "fashion_shop/photos.py prepare_image: the item cut out of its background, "
    "its longest side 28 px, centred on 28x28, light on dark (Fashion-MNIST's view: a garment "
    "off its model, a shoe level and pointing left); step by step in preparation",
    "as photographed": "fashion_shop/photos.py prepare_as_photographed: as prepare_image, with "
    "garments left on their models and shoes as they were shot; step by step in preparation",
}
COLOUR_STEPS = [
    "Its longest side made 224: each side round(side / longest side x 224). A photo already "
    "so is left as it is; a smaller one is enlarged bilinearly; a larger one is shrunk by a "
    "bilinear resize to 4 times that size, then 4x4 averages.",
    "Its background colour: channel by channel, the median of its outer 2 rows and columns "
    "(of the photo as given, or of the shrunk one where it was larger), rounded down.",
    "Made square, 224x224, the photo centred on its background colour (offset round(free "
    "pixels / 2), a half to even).",
    "Pixel values / 255, in [0, 1], into the network.",
]
COLOUR_INPUT = (
    "N decoded photos of one size, (N, height, width, 3), uint8 RGB 0-255: upright (EXIF "
    "orientation applied), a transparent background put on white. Decoded to fit in 224x224 as "
    "predict decodes them (Pillow's Image.thumbnail((224, 224), Image.Resampling.BOX, "
    "reducing_gap=1.0)), the answers are predict's; other sizes are resized in the graph, a "
    "little differently (docs/reference.md). A blank photo, which predict refuses, is answered."
)


def preparation_steps(kind):
    """The steps of STEPS_28 for a kind of 28x28 model, numbered."""
    steps = [s for s in STEPS_28 if kind.photos == "fashion-mnist" or not s.startswith(VIEW)]
    return [f"{n}. {step.removeprefix(VIEW)}" for n, step in enumerate(steps, 1)]


def parse_export_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py export",
        usage="%(prog)s MODEL [--format F] [--out-dir DIR] [--data-dir DIR | --photos PATH...]",
        description="Export a model.keras for where shops run things, and prove each export "
        "answers as the model does in its own runtime: a SavedModel for TF Serving, a LiteRT "
        "file for phones (plus one with int8 weights, a quarter of the size), an ONNX file.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", type=Path, nargs="?", help="a model.keras written by a run")
    parser.add_argument("--format", choices=[*FORMATS, "all"], default="all", help="what to write")
    parser.add_argument(
        "--out-dir", type=Path, help="where the files go (default: export/ beside MODEL)"
    )
    check = parser.add_mutually_exclusive_group()
    check.add_argument(
        "--data-dir",
        type=Path,
        help="the Fashion-MNIST files whose test images check a 28x28 model (default: the "
        "download, as training reads them)",
    )
    check.add_argument(
        "--photos",
        type=Path,
        nargs="+",
        metavar="PATH",
        help="check on these photos and folders instead, prepared as predict prepares them "
        f"(default for a colour model: {GENERATED_PHOTOS} generated ones)",
    )
    args, extra = parser.parse_known_args(argv)
    refuse_swapped(parser, args, extra)
    args.formats = FORMATS if args.format == "all" else [args.format]
    args.shown_out_dir = args.out_dir or args.model.parent / "export"  # as the user gave it
    # The folder itself, not a link to it, and never "." by its empty name.
    args.out_dir = args.shown_out_dir.resolve()
    return args


def looks_like_a_model(path):
    return path.suffix.lower() in (".keras", ".h5") or (path.is_file() and is_model_file(path))


def refuse_swapped(parser, args, extra):
    """`export --photos PHOTOS MODEL` or `export FOLDER MODEL`: predict's kind of hint where
    MODEL came after what follows it."""
    model = next((Path(arg) for arg in extra if looks_like_a_model(Path(arg))), None)
    if model is None and args.photos and looks_like_a_model(args.photos[-1]):
        model, args.photos = args.photos[-1], args.photos[:-1]
    if model is not None and (args.model is None or not looks_like_a_model(args.model)):
        parser.error(f"{model}: MODEL comes first, then the options: export {model} [--photos ...]")
    if model is not None:  # never dropped in silence: each model is its own export
        parser.error(f"{model}: a second model; export takes one MODEL at a time")
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.model is None:
        parser.error("the following arguments are required: model")


def contents(folder):
    """Every file and folder under folder, as paths relative to it."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def refuse_other_files(out_dir):
    """An existing --out-dir is replaced only if it holds an earlier export and nothing else,
    down to the last file (a version a person added beside TF Serving's 1/ stays theirs)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir}: a file, not a folder")
    inside = set(contents(out_dir))
    if not inside:
        return
    try:
        written = json.loads((out_dir / "model.json").read_text())
        ours = written["written_by"] == WRITTEN_BY and inside <= {
            "model.json",
            *written["contents"],
        }
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise UserError(
            f"--out-dir {out_dir} holds files that export did not write; give another --out-dir "
            "or empty it"
        )


def generated_photos(count):
    """Colour product shots of random items on random backgrounds, in four sizes that fit in
    COLOUR_SIZE square, as predict decodes photos."""
    rng = np.random.default_rng(0)
    photos = []
    for n in range(count):
        height, width = [(224, 224), (168, 224), (224, 150), (102, 136)][n % 4]
        y, x = np.mgrid[:height, :width]
        photo = np.empty((height, width, 3), np.uint8)
        photo[:] = rng.integers(0, 256, 3)
        cy, cx = (
            rng.integers(height // 5, 4 * height // 5),
            rng.integers(width // 5, 4 * width // 5),
        )
        ry, rx = rng.integers(height // 12, height // 3), rng.integers(width // 12, width // 3)
        photo[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1] = rng.integers(0, 256, 3)
        photo[:] = np.clip(photo + rng.normal(0, 6, photo.shape), 0, 255)
        photos.append(photo)
    return photos


def labelled(paths):
    """(path, class) of the photos given: the classes from their folders where one folder
    holding only folders is given (finetune's layout, refused as finetune refuses it), else
    None."""
    folder = paths[0]
    if len(paths) == 1 and folder.is_dir():
        entries = [path for path in folder.iterdir() if not path.name.startswith(".")]
        if entries and all(path.is_dir() for path in entries):
            return find_labelled_photos(folder)
    return [(path, None) for path in find_images(paths)]


def decoded_photos(paths):
    """Each photo as predict decodes it (shrunk to fit in DECODED square), and as it prepares it
    for a colour model: (decoded, prepared); a photo that cannot be prepared is one line."""
    decoded, prepared = [], []
    try:
        for path in paths:
            picture = open_picture(path, fit=DECODED)
            prepared.append(prepare_colour(path, picture=picture))
            decoded.append(np.asarray(picture))
    except PhotoError as error:
        raise UserError(str(error)) from None
    return decoded, np.stack(prepared)


class CheckBatch(NamedTuple):
    """What every export must answer as the model does."""

    images: object  # prepared images (N, 28, 28); for a colour model, a list of decoded photos
    labels: object  # their classes, or None
    what: str  # the check batch in words: "60 test images"
    prepared: object = None  # a colour model's photos as predict prepares them
    measured: object = None  # which labelled photos the accuracy counts (None: all)
    measured_line: str = ""  # and why


def check_batch(args, kind):
    """The images every export must answer as the model does, with their labels where known."""
    colour = kind.photos == "colour"
    if args.photos:
        photos = labelled(args.photos)
        paths = [path for path, _ in photos]
        prepared = None
        if colour:
            images, prepared = decoded_photos(paths)
        else:
            images = prepare_photos(paths, kind.photos)
        labels = [label for _, label in photos]
        known = None if None in labels else np.array(labels)
        what = f"{len(images):,} {'labelled ' * (known is not None)}photos"
        batch = CheckBatch(images, known, what, prepared)
        if known is None:
            return batch
        measured, line = not_tuned_on(args.model, kind, prepared if colour else images)
        return batch._replace(measured=measured, measured_line=line)
    if colour:
        images = generated_photos(GENERATED_PHOTOS)
        pictures = [Image.fromarray(photo) for photo in images]
        prepared = np.stack([prepare_colour(None, picture=picture) for picture in pictures])
        return CheckBatch(images, None, f"{GENERATED_PHOTOS} generated photos", prepared)
    _, (x_test, y_test) = load_fashion_mnist(args.data_dir)
    return CheckBatch(x_test, y_test, f"{len(x_test):,} test images")


def not_tuned_on(model_path, kind, prepared):
    """Which of the labelled photos the accuracy counts, and a line saying so: the photos a
    finetune run's model was tuned on (its metrics.json beside it lists their fingerprints)
    are left out; a training run's model was tuned on none."""
    if kind.photos == "fashion-mnist":
        return None, "a training run's model: none of them tuned on"
    try:
        metrics = json.loads((model_path.parent / "metrics.json").read_text())
        tuned = set(metrics["tuned_photos"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, (
            "which of them it was tuned on is unknown (no finetune metrics.json beside MODEL "
            "lists them): the accuracy may count photos it learned"
        )
    measured = np.array([fingerprint(image)[:16] not in tuned for image in prepared])
    left_out = int((~measured).sum())
    if measured.all():
        return measured, "none of them tuned on (its metrics.json)"
    if not measured.any():
        return measured, f"all {left_out:,} tuned on (its metrics.json): accuracy not measured"
    return measured, (
        f"{left_out:,} of them tuned on (its metrics.json): accuracy on the other "
        f"{int(measured.sum()):,}"
    )


def model_and_check_batch(args):
    """The model and check_batch's images for it, gathered before TensorFlow loads as the model
    file declares its kind, so that a bad --data-dir or photo is answered at once."""
    declared = declared_kind(args.model)
    batch = check_batch(args, declared) if declared else None
    start_tensorflow_quietly()
    model = load_trained_model(args.model)
    if declared is None or kind_of(model).photos != declared.photos:
        batch = check_batch(args, kind_of(model))
    return model, batch


def colour_preparation():
    """A layer doing predict's preparation of a decoded photo for a colour model (COLOUR_STEPS)
    inside the exported graph, in operations that LiteRT and ONNX have built in: uint8 photos
    of one size, (N, height, width, 3), in; (N, 224, 224, 3) in [0, 1] out."""
    import keras
    import tensorflow as tf

    size = COLOUR_SIZE

    def border_median(photos):
        """Channel by channel, the median of the outer 2 rows and columns: (N, 1, 1, 3)."""
        columns = tf.transpose(photos, [0, 2, 1, 3])  # so that columns slice as rows
        edges = [photos[:, :2], photos[:, -2:], columns[:, :2], columns[:, -2:]]
        border = tf.concat([tf.reshape(edge, [tf.shape(photos)[0], -1, 3]) for edge in edges], 1)
        values = tf.transpose(border, [0, 2, 1])
        count = tf.shape(values)[2]
        ascending = -tf.math.top_k(-values, k=count).values
        middle = tf.gather(ascending, (count - 1) // 2, axis=2)
        return ((middle + tf.gather(ascending, count // 2, axis=2)) / 2)[:, None, None, :]

    class PrepareColour(keras.layers.Layer):
        def call(self, photos):
            photos = tf.cast(photos, tf.float32)
            height = tf.cast(tf.shape(photos)[1], tf.float32)
            width = tf.cast(tf.shape(photos)[2], tf.float32)
            longest = tf.maximum(height, width)
            new_height = tf.cast(tf.round(height / longest * size), tf.int32)
            new_width = tf.cast(tf.round(width / longest * size), tf.int32)

            def shrunk():  # a box filter, near enough: 4x4 averages of a 4 times larger resize
                finer = tf.image.resize(photos, tf.stack([4 * new_height, 4 * new_width]))
                resized = tf.nn.avg_pool2d(finer, 4, 4, "VALID")
                return resized, border_median(resized)

            def as_given():  # as it is, or enlarged bilinearly
                resized = tf.image.resize(photos, tf.stack([new_height, new_width]))
                return resized, border_median(photos)

            # Only the branch taken is computed (LiteRT's IF, ONNX's If): the larger resize
            # would cost 4 times the network's time on every photo.
            resized, background = tf.cond(longest > size, shrunk, as_given)
            background = tf.floor(background)
            top = tf.cast(tf.round(tf.cast(size - new_height, tf.float32) / 2), tf.int32)
            left = tf.cast(tf.round(tf.cast(size - new_width, tf.float32) / 2), tf.int32)
            margins = [[0, 0], [top, size - new_height - top], [left, size - new_width - left]]
            square = tf.pad(resized - background, [*margins, [0, 0]]) + background
            return tf.reshape(square, [-1, size, size, 3]) / 255.0

        def compute_output_shape(self, input_shape):
            return (input_shape[0], size, size, 3)

    return PrepareColour(name="prepare_photo")


def named(model, colour):
    """The model with its input called "images" and its output "probabilities", the names
    every format keeps; a colour model with its preparation in front (colour_preparation).
    Called once, as the ONNX export needs."""
    import keras

    if colour:
        images = keras.Input((None, None, 3), dtype="uint8", name=runtimes.INPUT)
        probabilities = model(colour_preparation()(images))
        sample = np.zeros((1, 150, 100, 3), np.uint8)
    else:
        images = keras.Input(model.input_shape[1:], name=runtimes.INPUT)
        probabilities = model(images)
        sample = np.zeros((1, *model.input_shape[1:]), np.float32)
    exported = keras.Model(images, {runtimes.OUTPUT: probabilities}, name=model.name)
    exported(sample)
    return exported


def keras_answers(exported):
    """The exported Keras model's answers for a batch: traced once for photos of any size
    (predict_on_batch would trace it again for each size)."""
    import tensorflow as tf

    spec = tf.TensorSpec(exported.inputs[0].shape, exported.inputs[0].dtype)
    answer = tf.function(lambda images: exported(images)[runtimes.OUTPUT], input_signature=[spec])
    return lambda images: answer(images).numpy()


def write_format(model, fmt, folder, quantized=False):
    """The model written in one format under folder; returns the path a runtime loads."""
    import tensorflow as tf

    if fmt == "savedmodel":  # TF Serving's layout: a folder per model, one per version
        path = folder / model.name / runtimes.SAVEDMODEL_VERSION
        model.export(path, format="tf_saved_model", verbose=False)
    elif fmt == "litert":
        path = folder / f"{model.name}{'.int8' * quantized}.tflite"
        # Dynamic-range quantization: int8 weights, float32 inputs, outputs and activations.
        options = {"optimizations": [tf.lite.Optimize.DEFAULT]} if quantized else {}
        model.export(path, format="litert", verbose=False, **options)
    else:
        path = folder / f"{model.name}.onnx"
        model.export(path, format="onnx", verbose=False)
    return path


def size_of(path):
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(file.stat().st_size for file in files if file.is_file())


def unlike(got, expected):
    """How many images get another top class from the export than from the model, not counting
    near-ties (the model's two classes within TIE of each other), which rounding may flip."""
    top, model_top = got.argmax(axis=1), expected.argmax(axis=1)
    rows = np.arange(len(expected))
    gap = expected[rows, model_top] - expected[rows, top]
    return int(np.sum(gap > TIE))


def written_and_run(model, fmt, quantized, folder, images):
    """The model written in one format under folder, and its answers for the images from its
    own runtime: (path, answers). A converter or runtime that fails is one line."""
    try:
        with tensorflow_notes_hidden(shown_on_failure=False):  # LiteRT's and tf2onnx's notes
            path = write_format(model, fmt, folder, quantized)
            return path, runtimes.answers(runtimes.RUNNERS[fmt](path), images)
    except ImportError as error:
        raise UserError(f"export needs {error.name}: pip install -r requirements.txt") from None
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"the {fmt} export failed ({error.strerror or error})") from None
    except Exception as error:  # a layer a converter cannot convert, in a model of your own
        raise UserError(f"the {fmt} export failed ({first_sentence(error)})") from None


def prove(fmt, got, expected, count):
    """The largest probability difference from the model's answers; refused unless every image
    gets the model's top class."""
    difference = float(np.abs(got - expected).max())
    unlike_model = unlike(got, expected)
    if unlike_model:
        raise UserError(
            f"the {fmt} export answers another class than the model for {unlike_model:,} of "
            f"{count:,} images (probabilities differ by up to {difference:.2g}): nothing was "
            "written"
        )
    return difference


def describe(model, kind, files, checks, agreement=None):
    """model.json: what a program that loads the exports needs to know."""
    if kind.photos == "colour":
        given = {
            "name": runtimes.INPUT,
            "shape": [None, None, None, 3],
            "dtype": "uint8",
            "range": "0-255",
            "photos": COLOUR_INPUT,
            "prepared_in_the_graph": COLOUR_STEPS,
            "agrees_with_predict": agreement,
        }
    else:
        given = {
            "name": runtimes.INPUT,
            "shape": [None, *model.input_shape[1:]],
            "dtype": "float32",
            "scale": "pixel values / 255, in [0, 1]",
            "light_on_dark": True,
            "prepared_by": PREPARED_BY[kind.photos],
            "preparation": preparation_steps(kind),
        }
    return {
        "written_by": WRITTEN_BY,
        "name": model.name,
        "input": given,
        "output": {"name": runtimes.OUTPUT, "shape": [None, 10], "classes": CLASS_NAMES},
        "mirrored": kind.mirrored,  # average the answers for a photo and its mirror image
        "files": files,
        "checks": checks,
    }


def export(model, formats, batch, expected, folder):
    """Write each format in folder and prove it answers `expected` (the Keras model's answers
    for the check batch); returns model.json's files and checks."""
    files, checks = {}, {}
    outputs = [(fmt, False) for fmt in formats] + [("litert", True)] * ("litert" in formats)
    measured = batch.measured
    if batch.labels is not None and measured is None:
        measured = np.ones(len(batch.labels), bool)
    for fmt, quantized in outputs:
        path, got = written_and_run(model, fmt, quantized, folder, batch.images)
        name = path.relative_to(folder).parts[0]
        check = {"size_bytes": size_of(path)}
        if quantized:  # int8 weights answer a little differently: measured, not refused
            check["same_top_class"] = float(np.mean(got.argmax(1) == expected.argmax(1)))
            line = f"{check['same_top_class']:.1%} the same top class"
        else:
            check["largest_difference"] = prove(fmt, got, expected, len(expected))
            line = f"same top class on all, largest difference {check['largest_difference']:.1g}"
        if measured is not None and measured.any():
            right = got.argmax(1)[measured] == batch.labels[measured]
            check["accuracy"] = float(np.mean(right))
            check["accuracy_on"] = int(measured.sum())
            line += f", accuracy {check['accuracy']:.4f}"
        files[name] = {"format": fmt, "int8_weights": quantized}
        checks[name] = check
        print(f"  {name + '/' * path.is_dir()}: {check['size_bytes'] / 1e6:.2f} MB, {line}")
    return files, checks


def agreement_with_predict(model, batch, answers):
    """How often a colour export's own preparation gives predict's top class (predict prepares
    the photo in Python): {"photos", "same_top_class", "largest_difference"}, and a line."""
    predicted = runtimes.answers(model.predict_on_batch, batch.prepared)
    same = int(np.sum(predicted.argmax(1) == answers.argmax(1)))
    agreement = {
        "photos": len(predicted),
        "same_top_class": same,
        "largest_difference": float(np.abs(predicted - answers).max()),
    }
    line = (
        f"prepared in the graph, as predict prepares them: the same top class on {same:,} of "
        f"{len(predicted):,}, probabilities within {agreement['largest_difference']:.1g}"
    )
    return agreement, line


def partial_folder(out_dir):
    """A new folder beside --out-dir, named for this process, to write everything in before it
    takes --out-dir's place."""
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # a dead process of the same number's
    try:
        partial.mkdir(parents=True)
    except OSError as error:
        raise UserError(f"--out-dir {out_dir}: cannot write there ({error.strerror})") from None
    return partial


def put_in_place(partial, out_dir):
    """partial becomes out_dir, an earlier export there replaced; a failure puts it back."""
    # Not atomic_path: a rename cannot replace a folder holding files, so the old one steps aside.
    refuse_other_files(out_dir)  # again: a person may have put a file there meanwhile
    old = partial.with_name(partial.name.replace(".partial-", ".old-"))
    if out_dir.exists():
        os.replace(out_dir, old)
    try:
        os.replace(partial, out_dir)
    except BaseException:
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM, as Ctrl-C: the partial folder is removed on the way out


def main(argv):
    """--out-dir and MODEL checked -> the check images -> model -> float32 with named input and
    output -> each format written and proven in its own runtime -> model.json -> all moved into
    --out-dir at once."""
    args = parse_export_args(argv)
    refuse_other_files(args.out_dir)
    check_model_file(args.model)
    partial = partial_folder(args.out_dir)  # made first: a folder that cannot be written, at once
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        model, batch = model_and_check_batch(args)
        kind = kind_of(model)
        in_float32(model)  # exports compute in float32, whatever the model was trained in
        exported = named(model, colour=kind.photos == "colour")
        # The Keras model's answers, one photo at a time (no mirror image), to prove each
        # export against.
        expected = runtimes.answers(keras_answers(exported), batch.images)
        print(f"Exporting {args.model} ({model.name}), checked on {batch.what}:")
        agreement = None
        if kind.photos == "colour":
            agreement, line = agreement_with_predict(model, batch, expected)
            print(f"  {line}")
        if batch.measured_line:
            print(f"  {batch.measured_line}")
        try:
            files, checks = export(exported, args.formats, batch, expected, partial)
            description = describe(exported, kind, files, checks, agreement)
            description["contents"] = contents(partial)
            (partial / "model.json").write_text(json.dumps(description, indent=2) + "\n")
            put_in_place(partial, args.out_dir)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(
                    "the disk is full: nothing was written; free some space and export again"
                ) from None
            reason = error.strerror or error
            raise UserError(f"--out-dir {args.out_dir}: cannot write there ({reason})") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(partial, ignore_errors=True)
    print(f"Saved {', '.join(files)} and model.json to {args.shown_out_dir}/")
    return 0
