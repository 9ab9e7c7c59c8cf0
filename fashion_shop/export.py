"""`fashion_mnist_cnn.py export`: a model as files that run where shops run things, a SavedModel
for TF Serving, a LiteRT file for phones (and a smaller one with int8 weights), an ONNX file
for any runtime, each proven in its own runtime to answer as the model does."""

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np

from fashion_mnist_cnn import (
    CLASS_NAMES,
    ArgumentParser,
    HelpFormatter,
    UserError,
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
    kind_of,
    load_trained_model,
)
from fashion_shop.photos import COLOUR_SIZE, find_images

FORMATS = ["savedmodel", "litert", "onnx"]
WRITTEN_BY = "fashion_mnist_cnn.py export"  # model.json says so: a folder export may replace
GENERATED_PHOTOS = 64  # the check batch of a colour model when no photos are given
TIE = 1e-4  # probabilities this close are a tie that float rounding may break either way
PREPARED = {
    "fashion-mnist": "fashion_shop/photos.py prepare_image: the item cut out of its background, "
    "its longest side 28 px, centred on 28x28, light on dark (Fashion-MNIST's view: a garment "
    "off its model, a shoe level and pointing left)",
    "as photographed": "fashion_shop/photos.py prepare_as_photographed: as prepare_image, with "
    "garments left on their models and shoes as they were shot",
    "colour": "fashion_shop/photos.py prepare_colour: the whole photo in colour, its longest side "
    f"{COLOUR_SIZE} px, made square with its own background colour",
}


def parse_export_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py export",
        description="Export a model.keras for where shops run things, and prove each export "
        "answers as the model does in its own runtime: a SavedModel for TF Serving, a LiteRT "
        "file for phones (plus one with int8 weights, a quarter of the size), an ONNX file.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", type=Path, help="a model.keras written by a run")
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
    args = parser.parse_args(argv)
    args.formats = FORMATS if args.format == "all" else [args.format]
    args.shown_out_dir = args.out_dir or args.model.parent / "export"  # as the user gave it
    # The folder itself, not a link to it, and never "." by its empty name.
    args.out_dir = args.shown_out_dir.resolve()
    return args


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
    """Colour product shots of random items on random backgrounds, already COLOUR_SIZE square."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:COLOUR_SIZE, :COLOUR_SIZE]
    photos = np.empty((count, COLOUR_SIZE, COLOUR_SIZE, 3), np.uint8)
    for photo in photos:
        photo[:] = rng.integers(0, 256, 3)
        cy, cx, ry, rx = rng.integers(40, 184, 2).tolist() + rng.integers(15, 90, 2).tolist()
        photo[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1] = rng.integers(0, 256, 3)
        noise = rng.normal(0, 6, photo.shape)
        photo[:] = np.clip(photo + noise, 0, 255)
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


def check_batch(args, kind):
    """The images every export must answer as the model does: (images, labels or None, what)."""
    if args.photos:
        photos = labelled(args.photos)
        images = prepare_photos([path for path, _ in photos], kind.photos)
        labels = [label for _, label in photos]
        known = None if None in labels else np.array(labels)
        return images, known, f"{len(images):,} {'labelled ' * (known is not None)}photos"
    if kind.photos == "colour":
        return generated_photos(GENERATED_PHOTOS), None, f"{GENERATED_PHOTOS} generated photos"
    _, (x_test, y_test) = load_fashion_mnist(args.data_dir)
    return x_test, y_test, f"{len(x_test):,} test images"


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


def named(model):
    """The model with its input called "images" and its output "probabilities", the names
    every format keeps; called once, as the ONNX export needs."""
    import keras

    images = keras.Input(model.input_shape[1:], name=runtimes.INPUT)
    exported = keras.Model(images, {runtimes.OUTPUT: model(images)}, name=model.name)
    exported(np.zeros((1, *model.input_shape[1:]), np.float32))
    return exported


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


def describe(model, kind, files, checks):
    """model.json: what a program that loads the exports needs to know."""
    return {
        "written_by": WRITTEN_BY,
        "name": model.name,
        "input": {
            "name": runtimes.INPUT,
            "shape": [None, *model.input_shape[1:]],
            "dtype": "float32",
            "scale": "pixel values / 255, in [0, 1]",
            "light_on_dark": kind.photos != "colour",
            "prepared_by": PREPARED[kind.photos],
        },
        "output": {"name": runtimes.OUTPUT, "shape": [None, 10], "classes": CLASS_NAMES},
        "mirrored": kind.mirrored,  # average the answers for a photo and its mirror image
        "files": files,
        "checks": checks,
    }


def export(model, formats, images, expected, labels, folder):
    """Write each format in folder and prove it answers `expected` (the Keras model's answers
    for the images); returns model.json's files and checks."""
    files, checks = {}, {}
    outputs = [(fmt, False) for fmt in formats] + [("litert", True)] * ("litert" in formats)
    for fmt, quantized in outputs:
        path, got = written_and_run(model, fmt, quantized, folder, images)
        name = path.relative_to(folder).parts[0]
        check = {"size_bytes": size_of(path)}
        if quantized:  # int8 weights answer a little differently: measured, not refused
            check["same_top_class"] = float(np.mean(got.argmax(1) == expected.argmax(1)))
            line = f"{check['same_top_class']:.1%} the same top class"
        else:
            check["largest_difference"] = prove(fmt, got, expected, len(images))
            line = f"same top class on all, largest difference {check['largest_difference']:.1g}"
        if labels is not None:
            check["accuracy"] = float(np.mean(got.argmax(1) == labels))
            line += f", accuracy {check['accuracy']:.4f}"
        files[name] = {"format": fmt, "int8_weights": quantized}
        checks[name] = check
        print(f"  {name + '/' * path.is_dir()}: {check['size_bytes'] / 1e6:.2f} MB, {line}")
    return files, checks


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
        model, (images, labels, what) = model_and_check_batch(args)
        kind = kind_of(model)
        in_float32(model)  # exports compute in float32, whatever the model was trained in
        expected = runtimes.answers(model.predict_on_batch, images)  # one photo: no mirror
        model = named(model)
        print(f"Exporting {args.model} ({model.name}), checked on {what}:")
        try:
            files, checks = export(model, args.formats, images, expected, labels, partial)
            description = describe(model, kind, files, checks) | {"contents": contents(partial)}
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
