"""fashion_shop/backbone.py: finetune --backbone: an ImageNet network sees the colour photos and
a new last layer learns them, its probabilities calibrated (and its name saying so) where the
photos are enough; predict takes its models; without the weights, one line.

In this process (conftest.main_here) wherever the process itself is not under test, with this
process's Keras cache pointed at a folder of the test's own."""

import csv
import json
import re
import urllib.error
import zipfile
from pathlib import Path

import keras.src.backend.config as keras_config
import keras.src.utils.file_utils as keras_files
import numpy as np
import pytest
from conftest import ROOT, main_here, run_program
from photo_helpers import SHOP_PHOTOS, product_folder

import fashion_mnist_cnn as fm
from fashion_shop.backbone import BACKBONES, best_temperature, calibrate, new_head
from fashion_shop.doubts import DOUBTFUL_HEADER
from fashion_shop.finetune import FINETUNE_HOLDOUT, hold_out_photos
from fashion_shop.folders import class_folder, find_labelled_photos
from fashion_shop.models import CALIBRATED, declared_kind

KERAS_MODELS = ROOT.parent / "shared" / "keras-models"
needs_weights = pytest.mark.skipif(
    not KERAS_MODELS.is_dir(), reason="../shared/keras-models absent"
)
# No internet, whatever the machine has: every download fails at once.
OFFLINE = {key: "http://127.0.0.1:9" for key in ("http_proxy", "https_proxy", "HTTPS_PROXY")}


def keras_home(folder, weights=True):
    """A Keras cache of its own: with the two networks' files (links), or empty."""
    (folder / "models").mkdir(parents=True)
    for file in KERAS_MODELS.glob("*.h5") if weights else []:
        (folder / "models" / file.name).symlink_to(file)
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """This process's Keras cache, as a machine's after its first download: Keras reads
    KERAS_HOME once, at its import, so its own setting is pointed there for the module."""
    home = keras_home(tmp_path_factory.mktemp("keras-home"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras_config, "_KERAS_DIR", str(home))
        patch.setenv("KERAS_HOME", str(home))
        yield home


def doubtful_rows(out):
    """doubtful.csv's rows, its header checked: as review --queue reads it."""
    with (out / "doubtful.csv").open(newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == DOUBTFUL_HEADER
    for row in rows[1:]:  # probabilities as predict's CSV gives them
        assert all(re.fullmatch(r"[01]\.\d{4}", number) for number in row[3:]), row
    return [dict(zip(DOUBTFUL_HEADER, row)) for row in rows[1:]]


def is_calibrated(model_path):
    """Whether the model's name declares its probabilities calibrated (models.CALIBRATED)."""
    name = json.loads(zipfile.ZipFile(model_path).read("config.json"))["config"]["name"]
    assert declared_kind(model_path).calibrated == name.endswith(CALIBRATED)
    return name.endswith(CALIBRATED)


@pytest.mark.slow
@needs_weights
def test_a_new_process_calibrates_enough_photos_quietly_and_says_so_in_the_name(tmp_path):
    """The one run in a new process: TensorFlow's and Keras' notes stay hidden there."""
    photos = product_folder(tmp_path / "photos", per_class=17)  # 51: enough to calibrate
    out = tmp_path / "run"
    env = {"KERAS_HOME": str(keras_home(tmp_path / "keras-home"))} | OFFLINE
    result = run_program(
        "finetune", "--backbone", "mobilenet", photos, "--holdout", "0", "--epochs", "2",
        "--out-dir", out, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # TensorFlow's and Keras' notes stay hidden
    assert "nothing measured" in result.stdout and "Probabilities calibrated" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["photos_tuned_on"] == 51 and metrics["after"] is None
    assert metrics["temperature"] is not None
    assert not (out / "confusion_matrix.png").exists()
    # Its photos that it doubts are in their folder, listed for review.
    assert len(doubtful_rows(out)) == metrics["doubtful"]
    assert f"whose folder the model doubts: {out / 'doubtful.csv'}" in result.stdout
    # predict trusts its probabilities by its name alone.
    assert is_calibrated(out / "model.keras")


@pytest.mark.slow
@needs_weights
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backbone_learns_the_photos_and_predict_uses_its_model(backbone, weights, tmp_path):
    photos = product_folder(tmp_path / "photos", per_class=8)
    out = tmp_path / "run"
    result = main_here(
        "finetune", "--backbone", backbone, photos, "--holdout", "0.25", "--epochs", "40",
        "--out-dir", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"] is None and metrics["photos_held_out"] == 6
    assert metrics["after"]["accuracy"] == 1.0  # colour and shape: plain to an ImageNet network
    assert metrics["config"]["backbone"] == backbone and metrics["epochs_completed"] == 40
    # 18 tuned photos are too few to calibrate on: so said, in its output and in its name.
    assert metrics["temperature"] is None and "too few to calibrate" in result.stdout
    assert not is_calibrated(out / "model.keras")
    # Nor are they enough to doubt a photo's folder: said in the same line.
    assert "no doubtful.csv" in result.stdout and metrics["doubtful"] is None
    assert not (out / "doubtful.csv").exists()
    assert (out / "confusion_matrix.png").is_file()
    # predict loads it in safe mode and prepares the photos in colour for it.
    tests = product_folder(tmp_path / "new", per_class=3)  # the same seeds: made alike
    result = main_here("predict", out / "model.keras", tests, "--json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert len(results) == 9
    for r in results:  # each photo in its class's folder
        assert class_folder(r["top3"][0]["class"]) == Path(r["image"]).parent.name


@pytest.mark.parametrize("cache", ["empty", "damaged"])
def test_without_the_weights_and_offline_one_line_says_where_to_put_them(
    tmp_path, monkeypatch, cache
):
    photos = product_folder(tmp_path / "photos", per_class=2)
    home = keras_home(tmp_path / "keras-home", weights=False)
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))
    monkeypatch.setenv("KERAS_HOME", str(home))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno 111] Connection refused")

    monkeypatch.setattr(keras_files, "urlretrieve", offline)
    file = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    if cache == "damaged":  # a file of the right name is checked, not trusted
        (home / "models" / file).write_bytes(b"\x89HDF\r\n" + bytes(1000))
    out = tmp_path / "run"
    result = main_here("finetune", "--backbone", "mobilenet_v2", photos, "--out-dir", out)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    for fragment in (f"could not download {file}", "put that file", "keras-home/models/"):
        assert fragment in line, line
    assert not (out / "model.keras").exists()


@pytest.mark.slow
@needs_weights
@pytest.mark.skipif(not SHOP_PHOTOS.is_dir(), reason="../shared/product-photos absent")
def test_real_shop_photos_are_learned(weights, tmp_path):
    # The first 25 photos of each class (all 478 take twice as long, for the same lesson).
    shop = tmp_path / "shop"
    for folder in sorted(SHOP_PHOTOS.iterdir()):
        if folder.is_dir():
            (shop / folder.name).mkdir(parents=True)
            for photo in sorted(folder.iterdir())[:25]:
                (shop / folder.name / photo.name).symlink_to(photo)
    # A bag in a trousers' photo's place, among those held out, and trousers in a bag's, among
    # those tuned on: the same names, so the same split.
    found = find_labelled_photos(shop)
    tune, held_out = hold_out_photos(np.array([c for _, c in found]), FINETUNE_HOLDOUT, fm.SEED)
    trouser, bag = fm.CLASS_NAMES.index("Trouser"), fm.CLASS_NAMES.index("Bag")
    in_trouser = [found[i][0] for i in held_out if found[i][1] == trouser][-1]
    in_bag = [found[i][0] for i in tune if found[i][1] == bag][-1]
    bag_photo, trouser_photo = in_bag.resolve(), in_trouser.resolve()
    for link, photo in ((in_trouser, bag_photo), (in_bag, trouser_photo)):
        link.unlink()
        link.symlink_to(photo)
    out = tmp_path / "run"
    result = main_here("finetune", "--backbone", "mobilenet_v2", shop, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # 50 real photos it never saw, 10 classes: chance is 10%, the Fashion-MNIST model 44%.
    assert metrics["photos_held_out"] == 50 and metrics["after"]["accuracy"] >= 0.75
    # Cross-validated on the 200 tuned photos, the new layer is found too sure of itself.
    assert 1.1 < metrics["temperature"] < 3 and "Probabilities calibrated" in result.stdout
    assert is_calibrated(out / "model.keras")
    # Both swapped photos are doubted, each for what it shows.
    rows = {row["photo"]: row for row in doubtful_rows(out)}
    assert rows[f"Trouser/{in_trouser.name}"]["model_class"] == "Bag"
    assert rows[f"Bag/{in_bag.name}"]["model_class"] == "Trouser"
    assert float(rows[f"Bag/{in_bag.name}"]["folder_probability"]) < 0.1


@pytest.mark.parametrize("sureness", [3.0, 0.5])
def test_the_temperature_undoes_over_and_under_confidence(sureness):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 4000)
    # Unit noise, the true class 2 ahead: the true probabilities are softmax(2 x). Then made
    # too sure of themselves, or too shy.
    scores = rng.normal(size=(4000, 10))
    scores[np.arange(4000), labels] += 2.0
    honest = 2.0 * scores
    assert abs(best_temperature(honest, labels) - 1) < 0.1
    assert abs(best_temperature(honest * sureness, labels) / sureness - 1) < 0.1


def test_calibrating_the_new_layer_softens_its_probabilities_not_its_answers():
    head = new_head((16,))
    head.layers[-1].set_weights([np.random.default_rng(0).normal(size=(16, 10)), np.zeros(10)])
    features = np.random.default_rng(1).normal(size=(50, 16)).astype("float32")
    raw = head.predict_on_batch(features)
    calibrate(head, 2.0)
    calibrated = head.predict_on_batch(features)
    assert (calibrated.argmax(axis=1) == raw.argmax(axis=1)).all()
    assert (calibrated.max(axis=1) < raw.max(axis=1)).all()
