"""fashion_shop/export.py: every kind of model exported to a SavedModel, LiteRT and ONNX, each
proven in its own runtime; an altered export refused; bad input one line, nothing half-written."""

import errno
import json

import numpy as np
import onnx
import pytest
from conftest import assert_clean_failure, make_dataset, run_program
from onnx import numpy_helper
from photo_helpers import colour_model, photo_folder, refused_at_once, train_model

import fashion_mnist_cnn as fm
from fashion_shop import export, runtimes

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


def test_a_colour_model_is_checked_on_generated_or_given_photos(tmp_path, capsys):
    model = colour_model(tmp_path / "model.keras")
    assert export_to(tmp_path / "generated", model, "--format", "litert") == 0
    assert f"checked on {export.GENERATED_PHOTOS} generated photos" in capsys.readouterr().out
    description = json.loads((tmp_path / "generated" / "model.json").read_text())
    assert description["input"]["shape"] == [None, 224, 224, 3]
    assert not description["input"]["light_on_dark"]
    shop = photo_folder(tmp_path / "shop", per_class=2)  # class folders: accuracy measured
    assert export_to(tmp_path / "given", model, "--photos", shop, "--format", "litert") == 0
    assert "labelled photos" in capsys.readouterr().out
    checks = json.loads((tmp_path / "given" / "model.json").read_text())["checks"]
    assert all("accuracy" in check for check in checks.values())


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


def test_an_export_altered_on_purpose_is_refused_and_nothing_is_written(
    trained, data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(export, "write_format", altered_onnx(export.write_format))
    assert export_to(tmp_path / "export", trained, "--data-dir", data) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the onnx export answers another class than the model" in err[0]
    assert list(tmp_path.iterdir()) == []  # neither --out-dir nor a partial folder


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
    result = run_program("export", trained, "--out-dir", out, "--data-dir", data)
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
    result = run_program("export", trained, "--format", "tflite")
    assert result.returncode == 2 and "invalid choice: 'tflite'" in result.stderr


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
    result = run_program("export", trained, "--out-dir", out, "--data-dir", data)
    assert_clean_failure(result, "holds files that export did not write")
    assert added.read_text() == "theirs"
    (out / "model.json").write_text("{damaged")
    added.unlink()
    result = run_program("export", trained, "--out-dir", out, "--data-dir", data)
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
