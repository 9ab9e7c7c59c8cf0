"""fashion_shop/models.py: what a model file is (its kind, read from its name and input), the
models predict refuses and why, bf16 models on CPUs without bf16, and how a model answers."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import start_program
from photo_helpers import as_picture_files, framed_items

import fashion_mnist_cnn as fm
from fashion_shop import models
from fashion_shop.models import Kind
from fashion_shop.photos import PREPARATIONS, prepare_colour, prepare_image
from fashion_shop.predict import top_three

keras = fm.start_tensorflow_quietly()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A model of the default recipe, untrained (what it answers does not matter here, only
    that its answers differ clearly from photo to photo): its last layer sharpened."""
    keras.utils.set_random_seed(0)
    model = fm.build_model("float32")
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * 10, bias])
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


def predict_json(capsys, *args):
    code = fm.main(["predict", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


# A model's kind: declared by its name and input, the one place predict learns it from.

FASHION_MNIST, MIRRORED = Kind("fashion-mnist", mirrored=False), Kind("fashion-mnist", True)


KINDS = [
    ("fashion_mnist_cnn", (28, 28, 1), FASHION_MNIST),  # a training run's
    ("fashion_mnist_cnn_improved", (28, 28, 1), FASHION_MNIST),
    ("fashion_mnist_cnn_mirrored", (28, 28, 1), MIRRORED),  # an --augment run's
    ("fashion_mnist_cnn_improved_mirrored", (28, 28, 1), MIRRORED),
    ("fashion_mnist_cnn_tuned", (28, 28, 1), Kind("as photographed", False)),  # finetune's
    ("mobilenet_v2_fashion", (224, 224, 3), Kind("colour", False)),  # finetune --backbone's
    ("mobilenet_v2_fashion_calibrated", (224, 224, 3), Kind("colour", False, calibrated=True)),
    ("mobilenet_fashion_calibrated", (224, 224, 3), Kind("colour", False, calibrated=True)),
    ("fashion_mnist_cnn_calibrated", (28, 28, 1), Kind("fashion-mnist", False, True)),  # by name
    ("fashion_mnist_cnn_mirrored_calibrated", (28, 28, 1), Kind("fashion-mnist", True, True)),
    ("fashion_mnist_cnn_tuned_calibrated", (28, 28, 1), Kind("as photographed", False, True)),
    ("calibrated", (224, 224, 3), Kind("colour", False)),  # the ending, not the word
    ("mobilenet_fashion", (224, 224, 3), Kind("colour", False)),
    ("sequential", (224, 224, 3), Kind("colour", False)),  # any name, in colour
    ("sequential", (28, 28, 1), FASHION_MNIST),  # a model made elsewhere: Keras' name
    ("fashion_mnist_cnn", (32, 32, 3), None),  # an input no preparation makes
    ("fashion_mnist_cnn", (28, 28), None),
    ("fashion_mnist_cnn_tuned", (224, 224, 1), None),
]


@pytest.mark.parametrize("name, input_shape, kind", KINDS, ids=[f"{n}{s}" for n, s, _ in KINDS])
def test_the_kind_of_every_name_the_program_writes_and_wrote(name, input_shape, kind):
    assert models.model_kind(name, input_shape) == kind
    assert models.model_kind(name, list(input_shape)) == kind  # as a config's JSON has it
    if kind:  # only a name that ends so is calibrated: every model a training run writes is not
        assert kind.calibrated == name.endswith(models.CALIBRATED)


def test_a_model_built_for_each_recipe_is_read_back_as_its_kind(tmp_path):
    for arch in ("seed", "improved"):
        for mirrored in (False, True):
            model = fm.build_model("float32", arch, total_steps=1, mirrored=mirrored)
            expected = Kind("fashion-mnist", mirrored)
            assert models.kind_of(model) == expected, model.name
            path = tmp_path / f"{arch}-{mirrored}.keras"
            model.save(path)
            assert models.declared_kind(path) == expected, model.name  # without TensorFlow
            assert models.kind_of(models.load_trained_model(path)) == expected, model.name


def test_the_model_file_says_which_photos_it_takes(tmp_path):
    colour = keras.Sequential([keras.Input((224, 224, 3)), keras.layers.Flatten()])
    colour.save(tmp_path / "colour.keras")
    inputs = keras.Input((224, 224, 3))  # a functional model says it in another place
    keras.Model(inputs, keras.layers.Flatten()(inputs)).save(tmp_path / "functional.keras")
    (tmp_path / "text.keras").write_text("not a model")
    in_colour = Kind("colour", mirrored=False)
    assert models.declared_kind(tmp_path / "colour.keras") == in_colour
    assert models.declared_kind(tmp_path / "functional.keras") == in_colour
    assert PREPARATIONS[in_colour.photos] is prepare_colour
    assert models.declared_kind(tmp_path / "text.keras") is None
    assert models.declared_kind(tmp_path / "missing.keras") is None


# How a model answers: pixels scaled, and a mirrored model's answers averaged.


def test_scaling_is_float32_in_unit_range():
    images = np.array([[[0, 128, 255] + [0] * 25] * 28], dtype=np.uint8)
    scaled = models.scale_pixels(images)
    assert scaled.dtype == np.float32 and scaled.shape == (1, 28, 28, 1)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert scaled[0, 0, 1, 0] == pytest.approx(128 / 255)


def test_a_model_trained_on_mirror_images_sees_each_photo_both_ways(model_path, tmp_path, capsys):
    model = models.load_trained_model(model_path)
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), np.uint8)
    plain, mirror = (
        model.predict(models.scale_pixels(x), verbose=0) for x in (images, images[..., ::-1])
    )
    assert np.allclose(models.class_probabilities(model, images), plain, atol=1e-6)
    assert not np.allclose(plain, mirror, atol=1e-3)  # so the test can tell the two apart
    model.name = "fashion_mnist_cnn" + fm.MIRRORED  # as an --augment run names it
    averaged = models.class_probabilities(model, images)
    assert np.allclose(averaged, (plain + mirror) / 2, atol=1e-6)
    assert np.allclose(models.class_probabilities(model, images[..., ::-1]), averaged, atol=1e-6)
    # and predict, given that model's file, answers so
    model.save(tmp_path / "mirrored.keras")
    small, _ = as_picture_files(framed_items(np.array([2]))[0], tmp_path, "x")
    code, (result,), _ = predict_json(capsys, tmp_path / "mirrored.keras", small)
    image = prepare_image(small)[np.newaxis]
    expected = (
        sum(model.predict(models.scale_pixels(x), verbose=0) for x in (image, image[..., ::-1])) / 2
    )[0]
    top3 = top_three(expected)
    assert code == 0 and [c["class"] for c in result["top3"]] == [c["class"] for c in top3]
    for got, want in zip(result["top3"], top3):
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)


# The models predict refuses, in one line each.


def text_file(path):
    path.write_text("not a model")
    return path


def cut_short(path):
    path.write_bytes(path.read_bytes()[:1000])  # as a copy stopped midway leaves it
    return path


def save_model(path, input_shape, classes, lambda_layer=False):
    layers = [keras.Input(input_shape), keras.layers.Flatten()]
    if lambda_layer:
        layers.append(keras.layers.Lambda(lambda x: x * 2))  # code stored in the file
    model = keras.Sequential([*layers, keras.layers.Dense(classes, activation="softmax")])
    path.parent.mkdir(exist_ok=True)
    model.save(path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.keras", "no such model file"),
        (lambda d: save_model(d / "run" / "model.keras", (28, 28, 1), 10).parent, "run's model is"),
        (lambda d: text_file(d / "text.keras"), "not a keras model file, or a damaged one"),
        (lambda d: cut_short(save_model(d / "cut.keras", (28, 28, 1), 10)), "or a damaged one"),
        (lambda d: as_picture_files(framed_items(np.array([1]))[0], d, "photo")[0], "comes first"),
        (lambda d: save_model(d / "rgb.keras", (32, 32, 3), 10), "not a 28x28x1 image"),
        (lambda d: save_model(d / "five.keras", (28, 28, 1), 5), "to 10 fashion-mnist classes"),
        (lambda d: save_model(d / "code.keras", (28, 28, 1), 10, True), "not a usable"),
    ],
)
def test_unusable_models_are_refused(tmp_path, capsys, make, message):
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    assert fm.main(["predict", str(make(tmp_path)), str(good)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0].lower(), err


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Bad layer. Details follow.\nMore.", "(Bad layer)"),
        (". Odd", "(ValueError)"),
        ("\n. Odd", "(ValueError)"),
        ("", "(ValueError)"),
        ("x" * 300, "(ValueError)"),
    ],
)
def test_keras_reasons_for_refusing_a_model_are_one_short_line(
    model_path, tmp_path, capsys, monkeypatch, text, reason
):
    def refuse(*args, **kwargs):
        raise ValueError(text)

    monkeypatch.setattr(keras.models, "load_model", refuse)
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    assert fm.main(["predict", str(model_path), str(good)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {model_path}: not a usable Keras model file {reason}"], err


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux's /proc")
def test_a_model_file_that_cannot_be_read_is_one_line(tmp_path, capsys):
    # Reading the start of /proc/self/mem fails (EIO), as root too, as a bad disk would.
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    assert fm.main(["predict", "/proc/self/mem", str(good)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/proc/self/mem: cannot be read (" in err[0], err


# A model trained in bf16, used where bf16 is not native.


def in_bf16(model_path, path):
    """The model as the default run saves it where the CPU or GPU computes bf16 natively."""
    model = fm.build_model("bfloat16")
    model.set_weights(keras.models.load_model(model_path, compile=False).get_weights())
    model.save(path)
    return path


def compute_dtypes(model):
    return {layer.dtype_policy.compute_dtype for layer in [model, *model.layers]}


def test_a_bf16_model_computes_in_float32_where_bf16_is_not_native(
    model_path, tmp_path, monkeypatch
):
    bf16 = in_bf16(model_path, tmp_path / "bf16.keras")
    monkeypatch.setattr(models, "find_gpus", lambda: [])
    monkeypatch.setattr(models, "cpu_info", lambda: ("CPU", {"avx2", "avx512f", "avx512_bf16"}))
    kept = models.load_trained_model(bf16)  # the model and its softmax layer compute in float32
    assert compute_dtypes(kept) == {"bfloat16", "float32"}
    monkeypatch.setattr(models, "cpu_info", lambda: ("CPU", {"avx2", "avx512f"}))
    assert compute_dtypes(models.load_trained_model(bf16)) == {"float32"}


@pytest.mark.slow
def test_a_model_trained_in_bf16_predicts_on_an_avx2_cpu(model_path, tmp_path):
    # A model from a machine with native bf16, used on a laptop: oneDNN has no bf16 convolutions
    # for AVX2 CPUs, so in bf16 it would fail; in float32 it answers as a float32 model does.
    # Fresh processes (oneDNN reads its setting as TensorFlow starts), side by side.
    bf16 = in_bf16(model_path, tmp_path / "bf16.keras")
    small, _ = as_picture_files(framed_items(np.array([3]))[0], tmp_path, "x")
    avx2 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # any machine's oneDNN then computes as an AVX2 CPU's
    both = [start_program("predict", model, small, env=avx2) for model in (bf16, model_path)]
    (out, err), (float32, _) = [process.communicate(timeout=300) for process in both]
    # A loaded machine may take 10 s or more: then a progress line, and nothing else.
    assert both[0].returncode == 0, err[-2000:]
    assert all(" photos, " in line for line in err.splitlines()), err[-2000:]
    assert out == float32 and out.startswith(f"{small}: ")
