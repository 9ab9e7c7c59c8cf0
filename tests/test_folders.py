"""fashion_shop/folders.py: class folders as finetune reads them, and photos prepared in the
main process with a bad one reported in one line."""

import numpy as np
import pytest
from conftest import distinct_images
from photo_helpers import photo_folder, write_photo

import fashion_mnist_cnn as fm
from fashion_shop import folders


@pytest.mark.parametrize(
    "name, expected",
    [
        ("T-shirt-top", "T-shirt/top"),
        ("t_shirt_top", "T-shirt/top"),
        ("tshirt top", "T-shirt/top"),
        ("ankle boot", "Ankle boot"),
        ("ANKLE_BOOT", "Ankle boot"),
        ("Sneaker", "Sneaker"),
        ("Sneakers", "Sneaker"),  # a catalogue's folders are plural as often as not
        ("Dresses", "Dress"),
        ("ankle boots", "Ankle boot"),
        ("T-shirts", "T-shirt/top"),  # either half of T-shirt/top
        ("Tops", "T-shirt/top"),
        ("Shirts", "Shirt"),
    ],
)
def test_class_folders_match_ignoring_case_spaces_punctuation_and_plurals(tmp_path, name, expected):
    (tmp_path / name).mkdir()
    write_photo(tmp_path / name / "a.jpg", distinct_images(np.array([0]))[0])
    [(_, label)] = folders.find_labelled_photos(tmp_path)
    assert fm.CLASS_NAMES[label] == expected


def test_photos_come_sorted_with_their_class_and_hidden_files_are_left_out(tmp_path):
    photo_folder(tmp_path, per_class=2, classes=[7, 1])
    (tmp_path / "Sneaker" / ".DS_Store").write_text("a file manager's")
    (tmp_path / ".hidden").mkdir()
    found = folders.find_labelled_photos(tmp_path)
    assert [label for _, label in found] == [7, 7, 1, 1]  # by folder name
    assert [path.parent.name for path, _ in found] == ["Sneaker"] * 2 + ["Trouser"] * 2


def test_a_photo_that_cannot_be_prepared_is_one_user_error(tmp_path):
    good = write_photo(tmp_path / "good.jpg", distinct_images(np.array([3]))[0])
    (tmp_path / "bad.jpg").write_text("not a picture")
    assert folders.prepare_photos([good], "fashion-mnist").shape == (1, 28, 28)
    with pytest.raises(fm.UserError, match="bad.jpg: not a PNG or JPEG image"):
        folders.prepare_photos([good, tmp_path / "bad.jpg"], "fashion-mnist")
