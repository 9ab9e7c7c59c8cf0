"""fashion_shop/predict.py: the predict command: photos and folders classified, --json, bad
images reported in place, the preparing processes, colour models, and refused models."""

import csv
import itertools
import json
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    PROGRAM,
    ROOT,
    SHARED,
    assert_clean_failure,
    main_here,
    program_env,
    run_program,
)
from photo_helpers import (
    a_bag,
    as_picture_files,
    colour_model,
    framed_items,
    framed_items_model,
    photo_folder,
    product_folder,
    refused_at_once,
    small_shop,
    train_model,
)
from PIL import Image

import fashion_mnist_cnn as fm
import fashion_shop.predict
from fashion_shop.models import Kind, scale_pixels
from fashion_shop.photos import prepare_colour
from fashion_shop.predict import preparing

keras = fm.start_tensorflow_quietly()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A model trained on items as predict prepares them, as a real one is on Fashion-MNIST."""
    return framed_items_model(tmp_path_factory)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """20 photos in class folders, a PNG copy of one bag, and a file that is not a picture."""
    return small_shop(tmp_path_factory.mktemp("shop") / "photos")


def predict_json(capsys, *args):
    code = fm.main(["predict", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_small_grey_and_large_light_rgb_of_one_item_agree(model_path, tmp_path, capsys):
    labels = np.arange(10)
    images = framed_items(labels, seed=5)
    files = []
    for label, image in zip(labels, images):
        files += as_picture_files(image, tmp_path, f"item{label}")
    code, results, err = predict_json(capsys, model_path, *files)
    assert code == 0 and err == ""
    classes = [r["top3"][0]["class"] for r in results]
    assert classes[0::2] == classes[1::2]  # small and large versions agree, item by item
    assert sum(c == fm.CLASS_NAMES[label] for c, label in zip(classes[0::2], labels)) >= 8


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/fashion-mnist absent")
def test_real_test_images_as_photos_keep_their_class(tmp_path, capsys):
    (x_train, y_train), (x_test, y_test) = fm.load_fashion_mnist(SHARED / "sample")
    model = train_model(x_train, y_train, 8, tmp_path / "real.keras")
    capsys.readouterr()  # the loader's note about unofficial data
    picks = [0, 35, 65, 95, 125, 155, 185, 215, 245, 275]  # one item of each class
    files = []
    for index in picks:
        files += as_picture_files(x_test[index], tmp_path, f"real{index}")
    code, results, _ = predict_json(capsys, model, *files)
    classes = [r["top3"][0]["class"] for r in results]
    agree = sum(a == b for a, b in zip(classes[0::2], classes[1::2]))
    assert code == 0 and agree >= 8, classes


def test_prints_top_three_per_image(model_path, tmp_path, capsys):
    small, _ = as_picture_files(framed_items(np.array([3]))[0], tmp_path, "x")
    assert fm.main(["predict", str(model_path), str(small)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{small}: ") and line.count("%") == 3


def test_json_has_three_probabilities_per_image(model_path, tmp_path, capsys):
    small, big = as_picture_files(framed_items(np.array([7]))[0], tmp_path, "x")
    code, results, _ = predict_json(capsys, model_path, small, big)
    assert code == 0 and [r["image"] for r in results] == [str(small), str(big)]
    for result in results:
        probabilities = [c["probability"] for c in result["top3"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert all(c["class"] in fm.CLASS_NAMES for c in result["top3"])


def test_predict_takes_folders_recursively_in_sorted_order_and_writes_csv(model_path, tmp_path):
    photos = photo_folder(tmp_path / "photos", per_class=1, classes=[1, 7])
    (tmp_path / "photos" / "notes.txt").write_text("not an image: not picked up from a folder")
    (tmp_path / "empty").mkdir()
    table = tmp_path / "out.csv"
    result = main_here("predict", model_path, photos, tmp_path / "empty", "--csv", table)
    expected = sorted(str(p) for p in photos.rglob("*.jpg"))
    assert result.returncode == 1  # the empty folder is reported
    assert result.stdout.startswith("Classified 2 of 3 photos in ")  # the rows are in the CSV
    empty = f"error: {tmp_path / 'empty'}: a folder with no PNG or JPEG images in it"
    assert result.stderr.strip() == empty
    rows = list(csv.DictReader(table.open()))
    assert [r["path"] for r in rows] == [*expected, str(tmp_path / "empty")]
    for row in rows[:2]:
        assert row["class"] in fm.CLASS_NAMES and 0 < float(row["probability"]) <= 1
        assert row["top3"].count("%") == 3 and row["error"] == ""
    assert rows[2]["class"] == "" and "no PNG or JPEG" in rows[2]["error"]


def test_the_same_photo_named_twice_is_classified_once(model_path, shop, capsys):
    code, results, _ = predict_json(capsys, model_path, shop / "Bag", a_bag(shop))
    assert code == 1 and len(results) == 4  # 2 photos, 1 copy, 1 broken


def png_claiming_size(path, width, height):
    """A tiny PNG whose header claims width x height pixels: a decompression bomb."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def bad_images(folder):
    (folder / "notes.png").write_text("this is text, not a picture")
    Image.new("L", (64, 64), 128).save(folder / "whole.png")
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:60])
    Image.new("L", (40, 40)).save(folder / "picture.gif")
    Image.new("RGB", (300, 400), (230, 225, 220)).save(folder / "blank.jpg")  # a placeholder
    return {
        "missing.png": "no such image file",
        "notes.png": "not a png or jpeg",
        "truncated.png": "damaged image",
        "bomb.png": "pillow's safety limit",
        "half-bomb.png": "pillow's safety limit",
        "picture.gif": "expected png or jpeg",
        "blank.jpg": "a blank photo",
    }


def test_bad_images_are_reported_and_the_rest_still_classified(model_path, tmp_path, capsys):
    expected = bad_images(tmp_path)
    png_claiming_size(tmp_path / "bomb.png", 30_000, 30_000)  # past 2x Pillow's limit: error
    png_claiming_size(tmp_path / "half-bomb.png", 10_000, 10_000)  # past 1x: only a warning
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    names = [
        "missing.png",
        "notes.png",
        str(good),
        "truncated.png",
        "bomb.png",
        "half-bomb.png",
        "picture.gif",
        "blank.jpg",
    ]
    code = fm.main(["predict", str(model_path), *[str(tmp_path / n) for n in names]])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.strip().startswith(f"{good}: ") and len(out.strip().splitlines()) == 1
    errors = err.strip().splitlines()
    assert len(errors) == len(expected)
    for line, (name, message) in zip(errors, expected.items()):
        assert name in line and message in line.lower(), line


@pytest.mark.slow
def test_predict_as_a_command(model_path, tmp_path):
    small, _ = as_picture_files(framed_items(np.array([2]))[0], tmp_path, "x")
    result = run_program("predict", model_path, small)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith(f"{small}: ")
    assert_clean_failure(main_here("predict", model_path, tmp_path / "gone.png"), "no such image")


def test_a_model_refused_by_the_package_is_one_line_from_the_script(model_path, tmp_path):
    """The script run as a program is one module, which the package imports too: the package's
    UserError is the one main() reports, in one line, with code 1 (from a second copy of the
    script, it would have been a traceback)."""
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    result = run_program("predict", good, model_path)
    assert_clean_failure(result, "comes first")
    assert result.returncode == 1 and result.stdout == ""


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.keras", "no such model file"),
        (lambda d: d, "a folder, not a model file"),
        (lambda d: as_picture_files(framed_items(np.array([1]))[0], d, "photo")[0], "comes first"),
    ],
    ids=["a missing model", "a folder", "a photo for the model"],
)
def test_a_model_file_that_is_no_model_is_refused_at_once(
    tmp_path, monkeypatch, capsys, make, message
):
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    argv = ["predict", make(tmp_path), good]
    assert message in refused_at_once(monkeypatch, capsys, *argv)


@pytest.mark.parametrize("json_too", [False, True], ids=["lines", "--json"])
def test_answers_for_a_closed_stdout_are_refused_at_once(
    model_path, tmp_path, monkeypatch, capsys, json_too
):
    """As the shell starts a command with `>&-`: Python's print() then writes nothing, and the
    answers would be lost after all the work."""
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    monkeypatch.setattr(sys, "stdout", None)
    argv = ["predict", model_path, good, *["--json"] * json_too]
    assert "stdout is closed" in refused_at_once(monkeypatch, capsys, *argv)


def test_resume_needs_a_csv():
    result = main_here("predict", "model.keras", "photos", "--resume")
    assert result.returncode == 2 and "--resume continues a --csv FILE" in result.stderr


def test_help_gives_the_figures_the_readme_gives():
    """README's table: predict with the default run's model, with an --arch improved --augment
    one, and with a finetune --backbone one (benchmarks/README.md measures each)."""
    table = (ROOT / "README.md").read_text().splitlines()

    def figures(start):
        (row,) = [line for line in table if line.startswith(start)]
        return row.split("|")[2].strip().strip("*")

    default, improved = figures("| `predict` with the default run's model").split("; ")
    backbone = figures("| **`finetune --backbone mobilenet_v2`**, 10 / 40")
    text = " ".join(main_here("predict", "--help").stdout.split())
    assert f"about {improved} of them right, against the default run's {default}" in text, text
    assert f"mobilenet_v2 on 10 / 40 labelled photos a class: {backbone})" in text, text


@pytest.mark.parametrize(
    "order",
    [
        lambda model, photo: [photo, model],
        lambda model, photo: [photo.parent, model],
        lambda model, photo: [photo.parent, photo, model],
    ],
    ids=["PHOTO MODEL", "FOLDER MODEL", "FOLDER PHOTO MODEL"],
)
def test_photos_given_before_the_model_are_told_the_order(
    model_path, tmp_path, monkeypatch, capsys, order
):
    photo, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    line = refused_at_once(monkeypatch, capsys, "predict", *order(model_path, photo))
    assert line.endswith("; MODEL comes first, then the photos"), line


# The processes that prepare the photos, and a reader that stops reading.


@pytest.mark.parametrize("used", [0, 3], ids=["an error before any photo", "some photos"])
def test_the_preparing_processes_are_shut_down_before_predict_goes_on(shop, used):
    """Python's exit must find no pool still closing down: CPython 3.11 then writes to a pipe
    that the pool's thread may just have closed, a traceback after the run's last line."""
    before = set(threading.enumerate())
    with preparing(sorted(shop.rglob("*.jpg")), Kind("fashion-mnist", False)) as prepared:
        assert set(threading.enumerate()) > before  # the pool's threads, while it works
        list(itertools.islice(prepared, used))
    assert set(threading.enumerate()) <= before


@pytest.mark.slow
def test_a_reader_that_stops_reading_stops_predict_quietly(model_path, shop):
    """`predict MODEL folder | head -2`: once head has its lines, the next one has nowhere to
    go. The program stops as `cat` would: no traceback, the shell's code for SIGPIPE; lines and
    --json alike, the two run side by side."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has stopped reading
    try:
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(PROGRAM),
                    "predict",
                    str(model_path),
                    str(a_bag(shop)),
                    *output,
                ],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                env=program_env(),
            )  # fmt: skip
            for output in ([], ["--json"])
        ]
    finally:
        os.close(write_end)
    for process in processes:
        _, err = process.communicate(timeout=300)
        # A loaded machine may take 10 s or more: then a progress line, and nothing else.
        assert process.returncode == 141, err
        assert all(" photos, " in line for line in err.splitlines()), err


# Colour models (finetune --backbone's), and a model whose file says otherwise.


@pytest.fixture(scope="module")
def colour_model_path(tmp_path_factory):
    """A small untrained model of a --backbone model's shape: photos 224x224x3 -> 10 classes."""
    return colour_model(tmp_path_factory.mktemp("colour") / "model.keras")


def test_predict_prepares_colour_photos_for_a_colour_model(colour_model_path, tmp_path, capsys):
    photos = product_folder(tmp_path / "photos", per_class=2)
    (tmp_path / "photos" / "Trouser" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.new("RGB", (200, 300), (240, 240, 240)).save(photos / "Trouser" / "blank.png")
    rows = tmp_path / "rows.csv"
    assert fm.main(["predict", str(colour_model_path), str(photos), "--csv", str(rows)]) == 1
    with open(rows, newline="") as file:
        table = list(csv.DictReader(file))
    errors = {Path(row["path"]).name: row["error"] for row in table if row["error"]}
    assert len(table) == 8 and errors.keys() == {"broken.jpg", "blank.png"}
    assert "a blank photo" in errors["blank.png"]  # as for a 28x28 model: named by neither
    # The rows are what the model says of each photo prepared in colour, in order.
    model = keras.models.load_model(colour_model_path)
    good = [row for row in table if not row["error"]]
    images = np.stack([prepare_colour(Path(row["path"])) for row in good])
    expected = model.predict(scale_pixels(images), verbose=0)
    for row, probabilities in zip(good, expected):
        assert row["class"] == fm.CLASS_NAMES[int(np.argmax(probabilities))]
        assert float(row["probability"]) == pytest.approx(probabilities.max(), abs=1e-4)


def test_a_model_unlike_its_config_is_refused_in_one_line(
    colour_model_path, tmp_path, monkeypatch, capsys
):
    photos = product_folder(tmp_path / "photos", per_class=1)
    declared = Kind("fashion-mnist", mirrored=False)  # what a 28x28 model would declare
    monkeypatch.setattr(fashion_shop.predict, "declared_kind", lambda path: declared)
    rows = tmp_path / "rows.csv"
    assert fm.main(["predict", str(colour_model_path), str(photos), "--csv", str(rows)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its config and its model disagree" in err[0], err
    assert not rows.exists()  # nothing written: the photos were prepared for another model
