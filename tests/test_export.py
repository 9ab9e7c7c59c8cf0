"""fashion_shop/export.py: every kind of model exported to a SavedModel, LiteRT and ONNX, each
proven in its own runtime; an altered export refused; bad input one line, nothing half-written."""

import errno
import json
import math

import cv2
import numpy as np
import onnx
import pytest
from ai_edge_litert.interpreter import Interpreter
from conftest import (
    ROOT,
    assert_clean_failure,
    distinct_images,
    main_here,
    make_dataset,
    run_program,
)
from onnx import numpy_helper
from photo_helpers import (
    SHOP_PHOTOS,
    colour_model,
    framed_items,
    photo_folder,
    product_folder,
    refused_at_once,
    train_model,
    worn_photo,
    write_photo,
)
from PIL import Image, ImageFilter, ImageOps

import fashion_mnist_cnn as fm
from fashion_shop import export, runtimes
from fashion_shop.models import TUNED_NAME, Kind, load_trained_model
from fashion_shop.photos import open_picture, prepare_colour
from fashion_shop.predict import predict_images

keras = fm.start_tensorflow_quietly()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=300, n_test=60)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A default model trained for an epoch on the small data set."""
    (x_train, y_train), _ = fm.load_fashion_mnist(data)
    return train_model(x_train, y_train, 1, tmp_path_factory.mktemp("trained") / "model.keras")


def export_to(out, model, *args):
    return fm.main(["export", str(model), "--out-dir", str(out), *map(str, args)])


def check_images(data):
    _, (x_test, y_test) = fm.load_fashion_mnist(data)
    return x_test, y_test


@pytest.mark.slow
def test_every_format_is_written_and_answers_as_the_model_in_its_own_runtime(
    trained, data, tmp_path, capsys
):
    out = tmp_path / "export"
    assert export_to(out, trained, "--data-dir", data) == 0
    printed = capsys.readouterr().out
    assert "checked on 60 test images" in printed and "same top class on all" in printed
    name = "fashion_mnist_cnn"
    assert (out / name / runtimes.SAVEDMODEL_VERSION / "saved_model.pb").is_file()  # TF Serving
    description = json.loads((out / "model.json").read_text())
    assert set(description["files"]) == {
        name,
        f"{name}.tflite",
        f"{name}.int8.tflite",
        f"{name}.onnx",
    }
    assert {path.name for path in out.iterdir()} == {*description["files"], "model.json"}
    assert description["input"] | {"prepared_by": None, "preparation": None} == {
        "name": "images",
        "shape": [None, 28, 28, 1],
        "dtype": "float32",
        "scale": "pixel values / 255, in [0, 1]",
        "light_on_dark": True,
        "prepared_by": None,
        "preparation": None,
    }
    # Step by step, in model.json and in docs/reference.md alike.
    steps = description["input"]["preparation"]
    assert steps == export.preparation_steps(Kind("fashion-mnist", False)) and len(steps) == 15
    reference = " ".join((ROOT / "docs" / "reference.md").read_text().split())
    for step in steps:
        assert " ".join(step.split()) in reference, step
    assert description["output"] == {
        "name": "probabilities",
        "shape": [None, 10],
        "classes": fm.CLASS_NAMES,
    }
    assert description["mirrored"] is False
    # Loaded again here, each by its own runtime, each answers as Keras does.
    images, labels = check_images(data)
    model = keras.models.load_model(trained, compile=False)
    expected = runtimes.answers(model.predict_on_batch, images)
    paths = {"savedmodel": out / name / "1", "litert": out / f"{name}.tflite"}
    paths["onnx"] = out / f"{name}.onnx"
    for fmt, path in paths.items():
        got = runtimes.answers(runtimes.RUNNERS[fmt](path), images)
        assert np.abs(got - expected).max() < 1e-4, fmt
        assert (got.argmax(1) == expected.argmax(1)).all(), fmt
        check = description["checks"][path.name if fmt != "savedmodel" else name]
        assert check["accuracy"] == pytest.approx(np.mean(expected.argmax(1) == labels))
    # Dynamic-range quantization: int8 weights, about a quarter of the float file.
    sizes = {key: check["size_bytes"] for key, check in description["checks"].items()}
    assert sizes[f"{name}.int8.tflite"] < 0.4 * sizes[f"{name}.tflite"]
    assert sizes[f"{name}.int8.tflite"] == (out / f"{name}.int8.tflite").stat().st_size


def test_a_savedmodel_serves_by_its_named_signatures(trained, data, tmp_path):
    import tensorflow as tf

    assert export_to(tmp_path, trained, "--data-dir", data, "--format", "savedmodel") == 0
    loaded = tf.saved_model.load(str(tmp_path / "fashion_mnist_cnn" / "1"))
    for signature in ("serve", "serving_default"):  # TF Serving asks for serving_default
        function = loaded.signatures[signature]
        assert list(function.structured_input_signature[1]) == ["images"]
        assert list(function.structured_outputs) == ["probabilities"]
    assert {p.name for p in tmp_path.iterdir()} == {"fashion_mnist_cnn", "model.json"}


def test_a_bf16_improved_mirrored_model_exports_in_float32(data, tmp_path):
    model = fm.build_model("bfloat16", "improved", total_steps=10, mirrored=True)
    model.save(tmp_path / "model.keras")
    out = tmp_path / "export"
    assert export_to(out, tmp_path / "model.keras", "--data-dir", data, "--format", "onnx") == 0
    description = json.loads((out / "model.json").read_text())
    assert description["mirrored"] is True and description["input"]["dtype"] == "float32"
    session = runtimes.onnx_runner(out / "fashion_mnist_cnn_improved_mirrored.onnx")
    images, _ = check_images(data)
    assert runtimes.answers(session, images).dtype == np.float32


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """A small untrained model of a --backbone model's shape, and its photos: colour product
    shots in class folders, taller than 224 px or not."""
    folder = tmp_path_factory.mktemp("colour")
    return colour_model(folder / "model.keras"), product_folder(folder / "shop", per_class=3)


@pytest.mark.slow
def test_a_colour_model_is_checked_on_generated_photos(colour, tmp_path, capsys):
    model, shop = colour
    assert export_to(tmp_path / "generated", model, "--format", "litert") == 0
    printed = capsys.readouterr().out
    assert f"checked on {export.GENERATED_PHOTOS} generated photos" in printed
    agrees = f"as predict prepares them: the same top class on {export.GENERATED_PHOTOS} of"
    assert agrees in printed, printed
    given = json.loads((tmp_path / "generated" / "model.json").read_text())["input"]
    assert given["shape"] == [None, None, None, 3] and given["dtype"] == "uint8"
    assert given["prepared_in_the_graph"] == export.COLOUR_STEPS
    assert given["agrees_with_predict"]["same_top_class"] == export.GENERATED_PHOTOS


def app_decoded(path):
    """A photo decoded as model.json's input says, to fit in 224x224 as predict decodes it."""
    with Image.open(path) as image:
        image.thumbnail((224, 224), Image.Resampling.BOX, reducing_gap=1.0)
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


@pytest.mark.slow
def test_a_colour_export_takes_a_decoded_photo_and_answers_as_predict(colour, tmp_path, capsys):
    """Point 6 of issue 47: the preparation is in the graph, so an app gives it the photo."""
    model, shop = colour
    assert export_to(tmp_path, model, "--photos", shop) == 0
    assert "9 labelled photos" in capsys.readouterr().out  # class folders: accuracy measured
    description = json.loads((tmp_path / "model.json").read_text())
    assert all("accuracy" in check for check in description["checks"].values())
    name = description["name"]
    litert = Interpreter(str(tmp_path / f"{name}.tflite")).get_signature_runner()
    onnx_session = runtimes.onnx_runner(tmp_path / f"{name}.onnx")
    photos = sorted(shop.rglob("*.jpg"))
    heights = {app_decoded(photo).shape[0] for photo in photos}
    assert 224 in heights and min(heights) < 224  # shrunk, or enlarged in the graph
    for photo, answer in zip(photos, predict_images(load_trained_model(model), photos)):
        given = app_decoded(photo)[None]
        for got in (litert(images=given)["probabilities"][0], onnx_session(given)[0]):
            for top in answer["top3"]:
                index = fm.CLASS_NAMES.index(top["class"])
                assert abs(got[index] - top["probability"]) < 1e-5, photo
    # A photo larger than 224 px is shrunk in the graph (its other branch), by each runtime
    # as by Keras.
    large = np.kron(np.asarray(Image.open(photos[0])), np.ones((3, 3, 1), np.uint8))[None]
    keras_model = load_trained_model(model)
    expected = keras_model.predict_on_batch(export.colour_preparation()(large))[0]
    for got in (litert(images=large)["probabilities"][0], onnx_session(large)[0]):
        assert np.abs(got - expected).max() < 1e-5


def test_the_graphs_preparation_is_predicts_for_a_decoded_photo_and_close_for_a_large_one(
    tmp_path,
):
    layer = export.colour_preparation()
    for height, width in [(300, 225), (224, 224), (102, 136), (1200, 900), (640, 1000)]:
        photo = np.full((height, width, 3), (228, 222, 215), np.uint8)
        photo[height // 5 : 4 * height // 5, width // 3 : 2 * width // 3] = (150, 30, 40)
        photo[height // 3 : height // 2, width // 4 : 3 * width // 4] = (30, 60, 200)
        path = tmp_path / f"{height}x{width}.png"
        Image.fromarray(photo).save(path)
        expected = prepare_colour(path).astype(np.float32) / 255
        for given in (app_decoded(path), photo):  # as predict decodes it, and as it is
            got = np.asarray(layer(given[None]))[0]
            difference = np.abs(got - expected)
            if given.shape[:2] == open_picture(path, fit=224).size[::-1]:
                assert difference.max() <= 1.01 / 255, (height, width)  # a rounding apart
            else:  # resized by the graph: a hard edge may blur a little differently
                assert difference.mean() < 0.5 / 255, (height, width)
                assert np.percentile(difference, 99) < 16 / 255, (height, width)


def altered_onnx(write_format):
    """export's write_format, with one weight of the ONNX file changed after it is written."""

    def write(model, fmt, folder, quantized=False):
        path = write_format(model, fmt, folder, quantized)
        if fmt == "onnx":
            graph = onnx.load(path)
            weight = max(graph.graph.initializer, key=lambda tensor: np.prod(tensor.dims))
            values = numpy_helper.to_array(weight).copy()
            values.flat[: values.size // 2] *= -3
            weight.CopyFrom(numpy_helper.from_array(values, weight.name))
            onnx.save(graph, path)
        return path

    return write


@pytest.mark.slow
def test_an_export_altered_on_purpose_is_refused_and_nothing_is_written(
    trained, data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(export, "write_format", altered_onnx(export.write_format))
    assert export_to(tmp_path / "export", trained, "--data-dir", data) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the onnx export answers another class than the model" in err[0]
    assert list(tmp_path.iterdir()) == []  # neither --out-dir nor a partial folder


@pytest.mark.slow
def test_an_earlier_export_is_replaced_and_other_files_are_refused(trained, data, tmp_path):
    out = tmp_path / "export"
    assert export_to(out, trained, "--data-dir", data, "--format", "onnx") == 0
    assert export_to(out, trained, "--data-dir", data, "--format", "litert") == 0
    assert {p.name for p in out.iterdir()} == {
        "fashion_mnist_cnn.tflite",
        "fashion_mnist_cnn.int8.tflite",
        "model.json",
    }
    (out / "notes.txt").write_text("mine")
    result = main_here("export", trained, "--out-dir", out, "--data-dir", data)
    assert_clean_failure(result, "holds files that export did not write")
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["{photo}"], "not a Keras model file"),
        (["{model}", "--out-dir", "{photo}"], "a file, not a folder"),
        (["{model}", "--out-dir", "{folder}"], "holds files that export did not write"),
        (["{model}", "--out-dir", "/proc/no-such/export"], "cannot write there"),
        (["{model}", "--data-dir", "{folder}"], "is missing"),
    ],
)
def test_bad_input_is_one_line_at_once_and_nothing_is_written(
    trained, tmp_path, monkeypatch, capsys, args, message
):
    """Answered before TensorFlow loads, a model or the data: with no Fashion-MNIST in the
    Keras cache and no internet, a download would have been the error."""
    folder = tmp_path / "mine"
    folder.mkdir()
    photo = folder / "photo.jpg"
    photo.write_bytes(b"\xff\xd8 not really")
    values = {"model": trained, "photo": photo, "folder": folder}
    argv = ["export", *[arg.format(**values) for arg in args]]
    assert message in refused_at_once(monkeypatch, capsys, *argv)
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert [p.name for p in folder.iterdir()] == ["photo.jpg"]


def test_an_unknown_format_is_refused_by_argparse(trained):
    result = main_here("export", trained, "--format", "tflite")
    assert result.returncode == 2 and "invalid choice: 'tflite'" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "problem",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
    ids=["full disk", "Ctrl-C"],
)
def test_a_full_disk_or_a_stop_leaves_nothing_that_looks_whole(
    trained, data, tmp_path, monkeypatch, capsys, problem
):
    out = tmp_path / "export"
    assert export_to(out, trained, "--data-dir", data, "--format", "onnx") == 0
    before = (out / "model.json").read_text()
    written = []

    def write_then_fail(model, fmt, folder, quantized=False):
        written.append(export_write(model, fmt, folder, quantized))
        raise problem

    export_write = export.write_format
    monkeypatch.setattr(export, "write_format", write_then_fail)
    code = export_to(out, trained, "--data-dir", data, "--format", "litert")
    assert code == (1 if isinstance(problem, OSError) else 130)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("disk is full" in err[0] or "Interrupted" in err[0]), err
    assert not written[0].exists()  # the half-done export is gone
    assert {p.name for p in tmp_path.iterdir()} == {"export"}  # no partial folder left
    assert (out / "model.json").read_text() == before  # the earlier export stays whole


@pytest.mark.slow
def test_export_as_a_command_is_quiet(trained, data, tmp_path):
    result = run_program("export", trained, "--data-dir", data, "--out-dir", tmp_path / "x")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # TensorFlow's, LiteRT's and tf2onnx's notes hidden
    assert "Saved fashion_mnist_cnn, fashion_mnist_cnn.tflite" in result.stdout


def test_a_version_a_person_added_beside_the_export_is_never_removed(trained, data, tmp_path):
    out = tmp_path / "export"
    assert export_to(out, trained, "--data-dir", data, "--format", "savedmodel") == 0
    added = out / "fashion_mnist_cnn" / "2" / "saved_model.pb"  # TF Serving's next version
    added.parent.mkdir()
    added.write_text("theirs")
    result = main_here("export", trained, "--out-dir", out, "--data-dir", data)
    assert_clean_failure(result, "holds files that export did not write")
    assert added.read_text() == "theirs"
    (out / "model.json").write_text("{damaged")
    added.unlink()
    result = main_here("export", trained, "--out-dir", out, "--data-dir", data)
    assert_clean_failure(result, "holds files that export did not write")


def test_an_out_dir_given_as_a_link_is_filled_through_it(trained, data, tmp_path):
    target = tmp_path / "served"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert export_to(tmp_path / "link", trained, "--data-dir", data, "--format", "onnx") == 0
    assert (tmp_path / "link").is_symlink() and (target / "fashion_mnist_cnn.onnx").is_file()
    assert {p.name for p in tmp_path.iterdir()} == {"served", "link"}


def missing_runtime(path):
    raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")


def unconvertible(model, fmt, folder, quantized=False):
    raise ValueError("Unsupported operation MyLayer. See the converter's documentation")


@pytest.mark.parametrize(
    "patch, message",
    [
        (("RUNNERS", {"onnx": missing_runtime}), "export needs onnxruntime: pip install -r"),
        (("write_format", unconvertible), "the onnx export failed (Unsupported operation MyLayer)"),
    ],
    ids=["a runtime missing", "a converter failing"],
)
def test_a_runtime_or_converter_that_fails_is_one_line(
    trained, data, tmp_path, monkeypatch, capsys, patch, message
):
    name, value = patch
    monkeypatch.setattr(runtimes if name == "RUNNERS" else export, name, value)
    assert export_to(tmp_path / "export", trained, "--data-dir", data, "--format", "onnx") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_an_export_and_leaves_nothing(trained, data, tmp_path, monkeypatch):
    import os
    import signal

    def terminated(model, fmt, folder, quantized=False):
        os.kill(os.getpid(), signal.SIGTERM)
        return folder / "never"

    monkeypatch.setattr(export, "write_format", terminated)
    assert export_to(tmp_path / "export", trained, "--data-dir", data) == 130
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is not export.interrupt  # put back


def test_given_photos_that_cannot_be_prepared_or_labelled_are_one_line_at_once(
    trained, tmp_path, monkeypatch, capsys
):
    photos = photo_folder(tmp_path / "shop", per_class=1, classes=[3])
    (photos / "Dress" / "bad.jpg").write_text("not a picture")
    argv = ["export", trained, "--photos", photos, "--out-dir", tmp_path / "x"]
    assert "bad.jpg: not a PNG or JPEG image" in refused_at_once(monkeypatch, capsys, *argv)
    (photos / "Dress" / "bad.jpg").unlink()
    (photos / "Hats").mkdir()  # a folder of class folders, one of them no class
    assert "Hats: names no class" in refused_at_once(monkeypatch, capsys, *argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop"]


def test_model_first_is_told_where_it_came_later(trained, tmp_path):
    photos = photo_folder(tmp_path / "shop", per_class=1, classes=[3])
    for argv in (["--photos", photos, trained], [photos, trained]):
        result = main_here("export", *argv)
        assert result.returncode == 2 and "MODEL comes first" in result.stderr, result.stderr
        assert f"export {trained} [--photos" in result.stderr
    assert main_here("export").returncode == 2  # no MODEL at all: argparse's own line
    for argv in (["--photos", photos, trained], [trained]):  # a second model, never dropped
        result = main_here("export", trained, *argv)
        assert result.returncode == 2 and "a second model" in result.stderr, result.stderr


# The accuracy on given photos: only those the model was not tuned on.


@pytest.mark.slow
def test_accuracy_on_given_photos_leaves_out_those_the_model_was_tuned_on(
    trained, tmp_path, capsys
):
    photos = photo_folder(tmp_path / "shop", per_class=3, classes=[0, 1, 2, 3])
    tuned = tmp_path / "tuned"
    argv = ["finetune", trained, photos, "--epochs", "1", "--holdout", "0.34"]
    assert main_here(*argv, "--out-dir", tuned).returncode == 0
    held_out = json.loads((tuned / "metrics.json").read_text())["photos_held_out"]
    assert held_out == 4  # one photo of each class

    def exported(model, out):
        assert export_to(tmp_path / out, model, "--photos", photos, "--format", "onnx") == 0
        checks = json.loads((tmp_path / out / "model.json").read_text())["checks"]
        return capsys.readouterr().out, checks

    printed, checks = exported(tuned / "model.keras", "e1")
    assert "8 of them tuned on (its metrics.json): accuracy on the other 4" in printed, printed
    assert [check["accuracy_on"] for check in checks.values()] == [4]
    # Moved away from its metrics.json, the model cannot tell: it says so, and counts all.
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "model.keras").write_bytes((tuned / "model.keras").read_bytes())
    printed, checks = exported(tmp_path / "alone" / "model.keras", "e2")
    assert "which of them it was tuned on is unknown" in printed, printed
    assert [check["accuracy_on"] for check in checks.values()] == [12]
    # A training run's model learned Fashion-MNIST alone.
    printed, _ = exported(trained, "e3")
    assert "a training run's model: none of them tuned on" in printed


# A 28x28 model's preparation, done by an app from model.json's words alone: no call into
# fashion_shop/photos.py here. Each function is a step of export.STEPS_28.


def decoded(path):
    """Step 1."""
    with Image.open(path) as image:
        picture = image
        if image.mode in ("I", "I;16", "I;16B"):
            picture = image.convert("I").point(lambda v: v / 257).convert("L")
        if image.mode in ("1", "P"):
            picture = image.convert("RGBA" if image.has_transparency_data else "RGB")
        picture.thumbnail((224, 224), Image.Resampling.BOX, reducing_gap=1.0)
        picture = ImageOps.exif_transpose(picture)
        if picture.has_transparency_data:
            white = Image.new("RGBA", picture.size, "white")
            picture = Image.alpha_composite(white, picture.convert("RGBA"))
        return picture.convert("RGB")


def distance(pixels, colour):
    return np.sqrt(((pixels - colour) ** 2).mean(axis=-1))


def item_map(pixels):
    """Steps 2 and 3."""
    edges = [pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:]]
    border = np.concatenate([edge.reshape(-1, 3) for edge in edges])
    background = np.median(border, axis=0)
    noise = 2.5 * np.median(distance(border, background))
    return np.clip(distance(pixels, background) - noise, 0, 255).astype(np.uint8)


def box_of(item):
    """Step 4."""
    above = np.pad(item > 13, 1, mode="edge").astype(int)
    height, width = item.shape
    around = sum(above[i : i + height, j : j + width] for i in range(3) for j in range(3))
    rows, columns = np.flatnonzero((around >= 5).any(axis=1)), np.flatnonzero((around >= 5).any(0))
    return (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1) if rows.size else None


def face_of(picture, box):
    """Step 5."""
    left, top, right, bottom = box
    height, width = bottom - top, right - left
    if 10 * height < 9 * width:
        return None
    area = (left + width // 10, top, right - width // 10, top + height // 2)
    grey = np.asarray(picture.crop(area).convert("L"))
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    sizes = {"minSize": (max(16, height // 10),) * 2, "maxSize": (2 * height // 5,) * 2}
    ycbcr = np.asarray(picture.convert("YCbCr"))
    skin = []
    for x, y, w, h in cascade.detectMultiScale(grey, 1.1, 5, **sizes):
        x, y = x + area[0], y + area[1]
        middle = ycbcr[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4].reshape(-1, 3)
        if 77 <= np.median(middle[:, 1]) <= 127 and 133 <= np.median(middle[:, 2]) <= 173:
            skin.append((x, y, w, h))
    return max(skin, key=lambda face: face[2] * face[3]) if skin else None


def garment_alone(item, picture, face):
    """Step 6."""
    x, y, w, h = face
    item = item.copy()
    item[: y + h + h // 5, max(0, x - 3 * w // 10) : x + w + 3 * w // 10] = 0
    rgb = np.asarray(picture).astype(int) // 16
    numbers = rgb[..., 0] * 256 + rgb[..., 1] * 16 + rgb[..., 2]
    chest = numbers[y + 13 * h // 10 : y + 3 * h, max(0, x - w // 4) : x + w + w // 4]
    item[(np.bincount(chest.ravel(), minlength=4096) / chest.size)[numbers] < 0.002] = 0
    return item


def made_level(item, box):
    """Step 7."""
    left, top, right, bottom = box
    above = item[top:bottom, left:right] > 13
    columns = np.flatnonzero(above.any(axis=0))
    if columns.size < 10:
        return item
    lowest = np.array([np.flatnonzero(above[:, column])[-1] for column in columns])
    middle = slice(columns.size // 10, columns.size * 9 // 10)
    degrees = math.degrees(math.atan(np.polyfit(columns[middle], lowest[middle], 1)[0]))
    if not 3 <= abs(degrees) <= 30:
        return item
    return np.asarray(Image.fromarray(item).rotate(degrees, Image.Resampling.BILINEAR, expand=True))


def prepared_from_the_words(path, fashion_mnist_view):
    picture = decoded(path)
    item = item_map(np.asarray(picture, np.float64))
    box, face = box_of(item), None
    if fashion_mnist_view and box is not None:
        face = face_of(picture, box)
        if face is not None:
            item = garment_alone(item, picture, face)
        elif box[2] - box[0] > box[3] - box[1]:
            item = made_level(item, box)
        box = box_of(item)
    grey = Image.fromarray(item).crop(box) if box is not None else Image.fromarray(item)
    if face is not None and 4 * grey.width > 3 * grey.height:
        grey = grey.resize((3 * grey.height // 4, grey.height), Image.Resampling.BOX)
    size = tuple(max(1, round(side / max(grey.size) * 28)) for side in grey.size)
    grey = grey.resize(size, Image.Resampling.LANCZOS)
    grey = grey.filter(ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0))
    top = max(np.percentile(np.asarray(grey), 99.5), 1)
    grey = grey.point(lambda v: min(255, round(v * 255 / top)))
    lit = np.asarray(grey)[np.asarray(grey) > 40]
    if grey.width > grey.height and lit.size and np.median(lit) < 160:
        gamma = math.log(160 / 255) / math.log(np.median(lit) / 255)
        grey = grey.point(lambda v: round(255 * (v / 255) ** gamma))
    image = np.asarray(ImageOps.pad(grey, (28, 28), color=0))
    counts = (image > 40).sum(axis=0)
    columns = np.flatnonzero(counts)
    if columns.size >= 4:
        first, last = columns[0], columns[-1]
        third = (last + 1 - first) // 3
        if counts[first : first + third].mean() > 1.15 * counts[last + 1 - third : last + 1].mean():
            image = image[:, ::-1]
    return image


def some_photos(folder):
    """A worn T-shirt (a face found), a boot at an angle (levelled, lit, turned left), a
    product shot, a grey PNG; and every 24th real shop photo where they are here."""
    tilted = np.zeros((120, 200), np.uint8)
    tilted[60:90, 20:180] = tilted[30:60, 120:180] = 110
    boot = Image.fromarray(255 - tilted).rotate(-15, Image.Resampling.BILINEAR, fillcolor=255)
    boot.convert("RGB").save(folder / "boot.jpg", quality=92)
    Image.fromarray(framed_items(np.array([4]))[0]).save(folder / "grey.png")
    photos = [worn_photo(folder / "worn.png"), folder / "boot.jpg", folder / "grey.png"]
    photos.append(write_photo(folder / "coat.jpg", distinct_images(np.array([4]))[0]))
    if SHOP_PHOTOS.is_dir():
        photos += sorted(SHOP_PHOTOS.rglob("*.jpg"))[::24]
    return photos


@pytest.mark.slow
@pytest.mark.parametrize("tuned", [False, True], ids=["a training run's", "a tuned one"])
def test_an_app_following_model_json_gets_predicts_answers_from_the_tflite(
    trained, data, tmp_path, tuned
):
    model_path = trained
    if tuned:  # a model finetune wrote, by its name: shown photos as photographed
        model = load_trained_model(trained)
        model.name = TUNED_NAME
        model.save(model_path := tmp_path / "tuned.keras")
    argv = ["--format", "litert", "--data-dir", data]
    assert export_to(tmp_path / "export", model_path, *argv) == 0
    description = json.loads((tmp_path / "export" / "model.json").read_text())
    steps = description["input"]["preparation"]
    assert len(steps) == (11 if tuned else 15)  # the Fashion-MNIST view's four left out
    name = description["name"]
    runner = Interpreter(str(tmp_path / "export" / f"{name}.tflite")).get_signature_runner()
    photos = some_photos(tmp_path)
    answers = predict_images(load_trained_model(model_path), photos)
    for photo, answer in zip(photos, answers):
        image = prepared_from_the_words(photo, fashion_mnist_view=not tuned)
        given = {description["input"]["name"]: (image / 255).astype(np.float32)[None, ..., None]}
        probabilities = runner(**given)[description["output"]["name"]][0]
        for top in answer["top3"]:
            index = description["output"]["classes"].index(top["class"])
            assert abs(probabilities[index] - top["probability"]) < 1e-5, photo
