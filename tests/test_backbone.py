"""finetune --backbone: an ImageNet network sees the colour photos; predict takes its models."""

import csv
import json

import numpy as np
import pytest
from conftest import ROOT, SHOP_PHOTOS, assert_clean_failure, run_program
from PIL import Image

import fashion_mnist_cnn as fm

keras = fm.start_tensorflow_quietly()

KERAS_MODELS = ROOT.parent / "shared" / "keras-models"
needs_weights = pytest.mark.skipif(
    not KERAS_MODELS.is_dir(), reason="../shared/keras-models absent"
)
# No internet, whatever the machine has: every download fails at once.
OFFLINE = {key: "http://127.0.0.1:9" for key in ("http_proxy", "https_proxy", "HTTPS_PROXY")}
COLOURS = [(200, 30, 30), (30, 60, 200), (40, 160, 60)]  # a colour and a shape per class


def keras_home(tmp_path, weights=True):
    """A Keras cache of its own: with the two networks' files (links), or empty."""
    home = tmp_path / "keras-home"
    (home / "models").mkdir(parents=True)
    for file in KERAS_MODELS.glob("*.h5") if weights else []:
        (home / "models" / file.name).symlink_to(file)
    return {"KERAS_HOME": str(home)} | OFFLINE


def product(label, seed):
    """A colour product shot of class 0, 1 or 2: a red disc, a blue bar, a green frame."""
    rng = np.random.default_rng(seed)
    photo = np.full((180 + rng.integers(0, 60), 160, 3), 245, np.uint8)
    y, x = np.mgrid[: photo.shape[0], :160]
    cy, cx = photo.shape[0] // 2 + rng.integers(-10, 10), 80 + rng.integers(-10, 10)
    shape = [
        (y - cy) ** 2 + (x - cx) ** 2 < 45**2,
        (abs(y - cy) < 60) & (abs(x - cx) < 15),
        (abs(y - cy) < 50) & (abs(x - cx) < 50) & ~((abs(y - cy) < 35) & (abs(x - cx) < 35)),
    ][label]
    photo[shape] = np.clip(np.array(COLOURS[label]) + rng.integers(-20, 20, 3), 0, 255)
    return photo


def product_folder(folder, per_class):
    for label in range(3):
        for n in range(per_class):
            path = folder / fm.CLASS_NAMES[label].replace("/", "-") / f"{n:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(product(label, seed=100 * label + n)).save(path, quality=90)
    return folder


def test_colour_preparation_keeps_the_whole_photo_square_on_its_background(tmp_path):
    photo = np.full((300, 150, 3), (30, 90, 160), np.uint8)  # tall, on a blue background
    photo[100:200, 50:100] = (250, 240, 10)
    Image.fromarray(photo).save(tmp_path / "tall.png")
    prepared = fm.prepare_colour(tmp_path / "tall.png")
    assert prepared.shape == (224, 224, 3) and prepared.dtype == np.uint8
    assert (prepared[:, :40] == (30, 90, 160)).all()  # the sides: the photo's own background
    assert np.abs(prepared[112, 112].astype(int) - (250, 240, 10)).max() < 10  # item centred


@pytest.mark.parametrize("step", [0, 2, 5])  # 2: as faint as an item gets
def test_both_routes_call_the_same_photos_blank(tmp_path, step):
    photo = np.full((120, 90, 3), 200, np.uint8)
    photo[40:80, 30:60] += np.uint8(step)
    Image.fromarray(photo).save(tmp_path / "p.png")
    outcomes = []
    for prepare in (fm.prepare_image, fm.prepare_colour):
        try:
            prepare(tmp_path / "p.png")
            outcomes.append("prepared")
        except fm.UserError as error:
            assert "a blank photo" in str(error)
            outcomes.append("blank")
    assert outcomes == ["blank" if step == 0 else "prepared"] * 2


def test_the_model_file_says_which_photos_it_takes(tmp_path):
    colour = keras.Sequential([keras.Input((224, 224, 3)), keras.layers.Flatten()])
    colour.save(tmp_path / "colour.keras")
    inputs = keras.Input((224, 224, 3))  # a functional model says it in another place
    keras.Model(inputs, keras.layers.Flatten()(inputs)).save(tmp_path / "functional.keras")
    (tmp_path / "text.keras").write_text("not a model")
    assert fm.declared_preparation(tmp_path / "colour.keras") is fm.prepare_colour
    assert fm.declared_preparation(tmp_path / "functional.keras") is fm.prepare_colour
    assert fm.declared_preparation(tmp_path / "text.keras") is None
    assert fm.declared_preparation(tmp_path / "missing.keras") is None


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    """A small untrained model of a --backbone model's shape: photos 224x224x3 -> 10 classes."""
    path = tmp_path_factory.mktemp("colour") / "model.keras"
    keras.utils.set_random_seed(0)
    layers = [
        keras.Input((224, 224, 3)),
        keras.layers.Conv2D(4, 8, strides=8, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ]
    keras.Sequential(layers).save(path)
    return path


def test_predict_prepares_colour_photos_for_a_colour_model(colour_model, tmp_path, capsys):
    photos = product_folder(tmp_path / "photos", per_class=2)
    (tmp_path / "photos" / "Trouser" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.new("RGB", (200, 300), (240, 240, 240)).save(photos / "Trouser" / "blank.png")
    rows = tmp_path / "rows.csv"
    assert fm.main(["predict", str(colour_model), str(photos), "--csv", str(rows)]) == 1
    with open(rows, newline="") as file:
        table = list(csv.DictReader(file))
    errors = {fm.Path(row["path"]).name: row["error"] for row in table if row["error"]}
    assert len(table) == 8 and errors.keys() == {"broken.jpg", "blank.png"}
    assert "a blank photo" in errors["blank.png"]  # as for a 28x28 model: named by neither
    # The rows are what the model says of each photo prepared in colour, in order.
    model = keras.models.load_model(colour_model)
    good = [row for row in table if not row["error"]]
    images = np.stack([fm.prepare_colour(fm.Path(row["path"])) for row in good])
    expected = model.predict(fm.scale_pixels(images), verbose=0)
    for row, probabilities in zip(good, expected):
        assert row["class"] == fm.CLASS_NAMES[int(np.argmax(probabilities))]
        assert float(row["probability"]) == pytest.approx(probabilities.max(), abs=1e-4)


def test_a_model_unlike_its_config_is_refused_in_one_line(
    colour_model, tmp_path, monkeypatch, capsys
):
    photos = product_folder(tmp_path / "photos", per_class=1)
    monkeypatch.setattr(fm, "declared_preparation", lambda path: fm.prepare_image)
    rows = tmp_path / "rows.csv"
    assert fm.main(["predict", str(colour_model), str(photos), "--csv", str(rows)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its config and its model disagree" in err[0], err
    assert not rows.exists()  # nothing written: the photos were prepared for another model


def test_finetune_without_backbone_refuses_a_colour_model(colour_model, tmp_path):
    photos = product_folder(tmp_path / "photos", per_class=2)
    out = tmp_path / "out"
    result = run_program("finetune", colour_model, photos, "--out-dir", out)
    assert_clean_failure(result, "a model from finetune --backbone", "run finetune --backbone")
    assert not out.exists()


@needs_weights
@pytest.mark.parametrize("backbone", sorted(fm.BACKBONES))
def test_backbone_learns_the_photos_and_predict_uses_its_model(backbone, tmp_path):
    photos = product_folder(tmp_path / "photos", per_class=8)
    out = tmp_path / "run"
    env = keras_home(tmp_path)
    result = run_program(
        "finetune", "--backbone", backbone, photos, "--holdout", "0.25", "--epochs", "40",
        "--out-dir", out, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # TensorFlow's and Keras' notes stay hidden
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"] is None and metrics["photos_held_out"] == 6
    assert metrics["after"]["accuracy"] == 1.0  # colour and shape: plain to an ImageNet network
    assert metrics["config"]["backbone"] == backbone and metrics["epochs_completed"] == 40
    assert (out / "confusion_matrix.png").is_file()
    # predict loads it in safe mode and prepares the photos in colour for it.
    tests = product_folder(tmp_path / "new", per_class=3)  # the same seeds: made alike
    result = run_program("predict", out / "model.keras", tests, "--json", env=env)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert len(results) == 9
    for r in results:  # each photo in its class's folder
        assert r["top3"][0]["class"].replace("/", "-") == fm.Path(r["image"]).parent.name


@needs_weights
def test_backbone_with_holdout_zero_tunes_on_every_photo(tmp_path):
    photos = product_folder(tmp_path / "photos", per_class=3)
    out = tmp_path / "run"
    result = run_program(
        "finetune", "--backbone", "mobilenet", photos, "--holdout", "0", "--epochs", "2",
        "--out-dir", out, env=keras_home(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "nothing measured" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["photos_tuned_on"] == 9 and metrics["after"] is None
    assert (out / "model.keras").is_file() and not (out / "confusion_matrix.png").exists()


@pytest.mark.parametrize("cache", ["empty", "damaged"])
def test_without_the_weights_and_offline_one_line_says_where_to_put_them(tmp_path, cache):
    photos = product_folder(tmp_path / "photos", per_class=2)
    env = keras_home(tmp_path, weights=False)
    file = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    if cache == "damaged":  # a file of the right name is checked, not trusted
        (tmp_path / "keras-home" / "models" / file).write_bytes(b"\x89HDF\r\n" + bytes(1000))
    out = tmp_path / "run"
    result = run_program(
        "finetune", "--backbone", "mobilenet_v2", photos, "--out-dir", out, env=env
    )
    assert_clean_failure(
        result, f"could not download {file}", "put that file", "keras-home/models/"
    )
    assert not (out / "model.keras").exists()


@needs_weights
@pytest.mark.skipif(not SHOP_PHOTOS.is_dir(), reason="../shared/product-photos absent")
def test_real_shop_photos_are_learned(tmp_path):
    out = tmp_path / "run"
    argv = ["finetune", "--backbone", "mobilenet_v2", SHOP_PHOTOS, "--out-dir", out]
    result = run_program(*argv, env=keras_home(tmp_path))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # 96 real photos it never saw, 10 classes: chance is 10%, the Fashion-MNIST model 44%.
    assert metrics["photos_held_out"] == 96 and metrics["after"]["accuracy"] >= 0.75
