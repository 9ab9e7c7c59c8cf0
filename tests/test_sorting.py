"""fashion_shop/sorting.py: predict --sort-into puts each photo into its class folder (unsure/
where the model is not sure), never undoes what a person moved or put there, continues after a
stop; finetune then learns from the corrected folders and counts the corrections."""

import csv
import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_failure, links_to, run_program, start_program, wait_until
from photo_helpers import framed_items, framed_items_model, refused_at_once
from PIL import Image

import fashion_mnist_cnn as fm
from fashion_shop import catalogue, sorting
from fashion_shop.photos import THUMBNAIL, thumbnail_name

keras = fm.start_tensorflow_quietly()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A model trained on framed items as predict prepares them: sure of most, not of all."""
    return framed_items_model(tmp_path_factory)


def shop(folder, labels, seed=5, prefix="item"):
    """Photos of framed items, one per label, as files named <prefix><n>.png in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, image in enumerate(framed_items(np.array(labels), seed=seed)):
        paths.append(folder / f"{prefix}{n}.png")
        Image.fromarray(np.kron(image, np.ones((4, 4), np.uint8))).save(paths[-1])
    return paths


def sort(model, *args):
    return fm.main(["predict", str(model), *map(str, args)])


def rows_of(folder):
    with open(
        folder / sorting.CSV_NAME, newline="", encoding="utf-8", errors="surrogateescape"
    ) as f:
        return list(csv.DictReader(f))


def test_every_photo_goes_to_its_class_folder_as_a_link_and_the_csv_says_where(
    model_path, tmp_path, capsys
):
    photos = shop(tmp_path / "photos", [0, 3, 5, 7, 9, 1])
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out, "--unsure", 0.999) == 0
    assert "Sorted into" in capsys.readouterr().out
    rows = rows_of(out)
    assert [row["path"] for row in rows] == [str(p) for p in sorted(photos)]
    for row in rows:
        where = Path(row["sorted_as"])
        unsure = float(row["probability"]) < 0.999
        assert where.parts[0] == sorting.class_folder(row["class"])
        assert (sorting.UNSURE in where.parts) == unsure
        assert where.name == Path(row["path"]).name  # its own name
        assert os.path.samefile(out / where, row["path"])  # a hard link: no extra room
        assert (out / where).stat().st_nlink == 2
        thumbnail = Image.open(out / sorting.THUMBNAILS / thumbnail_name(row["path"]))
        assert max(thumbnail.size) <= THUMBNAIL  # made by the preparing processes
    assert (out / sorting.PAGE_NAME).is_file()
    assert len({row["class"] for row in rows}) > 1


def test_photos_of_the_same_name_get_names_of_their_own(model_path, tmp_path):
    first = shop(tmp_path / "a", [2])
    second = shop(tmp_path / "b", [2], seed=9)
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "a", tmp_path / "b", "--sort-into", out) == 0
    placed = sorted(Path(row["sorted_as"]).name for row in rows_of(out))
    assert placed == ["item0-2.png", "item0.png"]
    assert {row["path"] for row in rows_of(out)} == {str(first[0]), str(second[0])}


def test_what_a_person_moved_or_put_there_stays_and_only_new_photos_are_classified(
    model_path, tmp_path
):
    shop(tmp_path / "photos", [0, 3, 5, 7])
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    first = {row["path"]: row for row in rows_of(out)}
    # A person corrects one photo, and puts a photo of their own in a folder.
    moved = out / next(iter(first.values()))["sorted_as"]
    other = next(c for c in fm.CLASS_NAMES if c != next(iter(first.values()))["class"])
    (out / sorting.class_folder(other)).mkdir(exist_ok=True)
    corrected = out / sorting.class_folder(other) / moved.name
    moved.rename(corrected)
    mine = out / "Bag" / "mine.png"
    mine.parent.mkdir(exist_ok=True)
    mine.write_bytes(b"not even a photo")
    # More photos, another run: only they are classified; nothing is moved back or replaced.
    shop(tmp_path / "photos", [1, 8], seed=7, prefix="more")
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    rows = rows_of(out)
    assert len(rows) == 6 and [r for r in rows if r["path"] in first] == list(first.values())
    assert corrected.is_file() and not moved.exists() and mine.read_bytes() == b"not even a photo"
    page = (out / sorting.PAGE_NAME).read_text()
    assert 'id="corrected">1<' in page and "put here by a person" in page
    # Classified again by another model: predict's own placements follow its answers, the
    # person's correction stays where they put it.
    keras.utils.set_random_seed(1)
    other_model = tmp_path / "other.keras"
    fm.build_model("float32").save(other_model)  # untrained: other answers
    assert sort(other_model, tmp_path / "photos", "--sort-into", out, "--reclassify") == 0
    assert corrected.is_file() and mine.read_bytes() == b"not even a photo"
    again = {row["path"]: row for row in rows_of(out)}
    assert len(rows_of(out)) == 6  # one row a photo again
    moved_by_predict = 0
    for path, row in again.items():
        if Path(path).name == moved.name:
            assert row["sorted_as"] == str(corrected.relative_to(out))
            continue
        assert (out / row["sorted_as"]).is_file()
        assert Path(row["sorted_as"]).parts[0] == sorting.class_folder(row["class"])
        moved_by_predict += row["sorted_as"] != first.get(path, row)["sorted_as"]
    assert moved_by_predict > 0


def test_a_photo_placed_by_a_run_stopped_before_its_row_is_not_placed_twice(model_path, tmp_path):
    (photo,) = shop(tmp_path / "photos", [4])
    out = tmp_path / "sorted"
    (out / "Coat").mkdir(parents=True)
    os.link(photo, out / "Coat" / photo.name)  # as a kill -9 between the link and its row
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    assert [row["sorted_as"] for row in rows_of(out)] == [f"Coat/{photo.name}"]
    assert sorted(p.name for p in out.rglob("*.png")) == [photo.name]


def refuse(errnos):
    """os.link or os.symlink failing with these errors, one after another."""
    errors = iter(errnos)

    def fail(*args, **kwargs):
        number = next(errors)
        raise OSError(number, os.strerror(number))

    return fail


def test_where_hard_links_cannot_be_made_symbolic_links_then_copies_are_said_once(
    model_path, tmp_path, monkeypatch, capsys
):
    photos = shop(tmp_path / "photos", [0, 3, 5])
    monkeypatch.setattr(os, "link", refuse([errno.EXDEV] * 3))
    out = tmp_path / "linked"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    assert capsys.readouterr().err.count("photos go in as symbolic links") == 1
    for row in rows_of(out):
        assert (out / row["sorted_as"]).is_symlink() and os.path.samefile(
            out / row["sorted_as"], row["path"]
        )
    monkeypatch.setattr(os, "symlink", refuse([errno.EPERM] * 3))
    out = tmp_path / "copied"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    assert capsys.readouterr().err.count("photos go in as copies") == 1
    placed = [out / row["sorted_as"] for row in rows_of(out)]
    assert [p.read_bytes() for p in placed] == [p.read_bytes() for p in sorted(photos)]
    assert not list(out.rglob(".*.partial*"))


@pytest.mark.parametrize(
    "failure, message",
    [
        ([errno.EACCES], "cannot put"),  # no link, no symbolic link, no copy
        ([errno.ENOSPC], "no space left on device"),
    ],
    ids=["no way to put a photo", "a full disk"],
)
def test_a_photo_that_cannot_be_put_there_is_one_line_and_the_same_command_goes_on(
    model_path, tmp_path, monkeypatch, capsys, failure, message
):
    shop(tmp_path / "photos", [0, 3, 5])
    out = tmp_path / "sorted"
    (out / "Bag").mkdir(parents=True)
    (out / "Bag" / "theirs.jpg").write_bytes(b"a person's")
    monkeypatch.setattr(os, "link", refuse(failure * 9))
    monkeypatch.setattr(os, "symlink", refuse(failure * 9))
    monkeypatch.setattr(sorting.shutil, "copy2", refuse(failure * 9))
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1].lower() and "the same command goes on" in err[-1], err
    assert (out / "Bag" / "theirs.jpg").read_bytes() == b"a person's"
    monkeypatch.undo()
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    assert len(rows_of(out)) == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "a file, not a folder"),
        (lambda tmp: Path("/proc/no-such/sorted"), "cannot write there"),
        (
            lambda tmp: (
                (tmp / "d").mkdir()
                or (tmp / "d" / "predictions.csv").write_text("a,b\n")
                and tmp / "d"
            ),
            "was not written by predict",
        ),
    ],
    ids=["a file", "not writable", "another CSV there"],
)
def test_a_folder_that_cannot_be_sorted_into_is_one_line_at_once(
    model_path, tmp_path, monkeypatch, capsys, make, message
):
    shop(tmp_path / "photos", [1])
    out = make(tmp_path)
    argv = ["predict", model_path, tmp_path / "photos", "--sort-into", out]
    assert message in refused_at_once(monkeypatch, capsys, *argv)


def test_unsure_and_reclassify_need_a_folder_to_sort_into(model_path, tmp_path):
    for option in (["--unsure", "0.5"], ["--reclassify"]):
        result = run_program("predict", model_path, tmp_path, *option)
        assert result.returncode == 2 and "give --sort-into DIR" in result.stderr


def test_a_file_name_that_is_not_utf8_is_sorted_and_shown(model_path, tmp_path):
    folder = tmp_path / "photos"
    (photo,) = shop(folder, [6])
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9.png")
    os.rename(photo, odd)
    out = tmp_path / "sorted"
    result = run_program("predict", model_path, folder, "--sort-into", out)
    assert result.returncode == 0, result.stderr
    (row,) = rows_of(out)
    assert row["path"] == odd and Path(row["sorted_as"]).name == "caf\udce9.png"
    assert os.path.samefile(out / row["sorted_as"], odd)
    assert "caf%E9.png" in (out / sorting.PAGE_NAME).read_text()


def test_a_photo_deleted_between_runs_stays_sorted(model_path, tmp_path):
    photos = shop(tmp_path / "photos", [0, 7])
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    photos[0].unlink()
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    assert len(rows_of(out)) == 2
    assert all((out / row["sorted_as"]).is_file() for row in rows_of(out))  # a hard link keeps it


def test_sigterm_mid_sort_leaves_folders_csv_and_page_agreeing_and_the_same_command_goes_on(
    model_path, tmp_path
):
    folder = links_to(shop(tmp_path, [8])[0], tmp_path / "catalogue", 1500, ".png")
    out = tmp_path / "sorted"
    process = start_program("predict", model_path, folder, "--sort-into", out)
    wait_until(process, lambda: (out / sorting.CSV_NAME).exists() and len(rows_of(out)) > 0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "the same command sorts the rest" in err
    rows = rows_of(out)
    assert 0 < len(rows) < 1500
    placed = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert placed == sorted(row["sorted_as"] for row in rows)  # no photo without its row
    page = (out / sorting.PAGE_NAME).read_text()
    assert page.count("<figure") == len(rows)
    result = run_program("predict", model_path, folder, "--sort-into", out)
    assert result.returncode == 0, result.stderr
    assert sorted(Path(row["path"]).name for row in rows_of(out)) == sorted(
        p.name for p in folder.iterdir()
    )
    assert (out / sorting.PAGE_NAME).read_text().count("<figure") == 1500


def test_finetune_learns_from_the_corrected_folders_and_counts_the_corrections(
    model_path, tmp_path
):
    shop(tmp_path / "photos", [0, 0, 3, 3, 5, 5, 7, 7])
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out, "--unsure", 0.999) == 0
    rows = rows_of(out)
    for row in rows[:2]:  # a person moves two photos to other classes
        where = out / row["sorted_as"]
        other = "Bag" if row["class"] != "Bag" else "Coat"
        (out / other).mkdir(exist_ok=True)
        where.rename(out / other / where.name)
    result = run_program(
        "finetune", model_path, out, "--epochs", "2", "--holdout", "0", "--out-dir", tmp_path / "t"
    )
    assert result.returncode == 0, result.stderr
    assert "2 of 8 photos corrected by a person" in result.stdout
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["corrected_by_a_person"] == 2 and metrics["photos_tuned_on"] == 8


def test_the_csv_of_a_sorted_folder_keeps_earlier_runs_photos(tmp_path):
    table = tmp_path / "predictions.csv"
    row = catalogue.Row(
        "/elsewhere/a.jpg", "Bag", 0.9, (("Bag", 0.9), ("Coat", 0.05)), "", "Bag/a.jpg"
    )
    catalogue.rewrite(table, catalogue.SORTED_HEADER, [row])
    assert (
        table.read_text().splitlines()[1]
        == "/elsewhere/a.jpg,Bag,0.9000,Bag 90.0%; Coat 5.0%,,Bag/a.jpg"
    )
    rows, _ = catalogue.read_rows_done(table, [Path("/new/b.jpg")], sorted_into=tmp_path)
    assert rows == [row]


def test_a_file_that_appears_under_a_photos_name_is_never_overwritten(
    model_path, tmp_path, monkeypatch
):
    (photo,) = shop(tmp_path / "photos", [2])
    link, calls = os.link, []

    def someone_first(source, destination, **kwargs):
        calls.append(destination)
        if len(calls) == 1:  # a person's file of that name, just in time
            Path(destination).write_bytes(b"a person's")
        return link(source, destination, **kwargs)

    monkeypatch.setattr(os, "link", someone_first)
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    monkeypatch.undo()
    (row,) = rows_of(out)
    assert Path(row["sorted_as"]).name == "item0-2.png"  # the next name, not theirs
    theirs = out / Path(row["sorted_as"]).parent / "item0.png"
    assert theirs.read_bytes() == b"a person's"


def test_a_photo_gone_since_it_was_read_is_an_error_and_nothing_is_left(
    model_path, tmp_path, monkeypatch, capsys
):
    photos = shop(tmp_path / "photos", [2, 6])
    link = os.link

    def gone(source, destination, **kwargs):
        if Path(source) == photos[0]:
            Path(source).unlink()
        return link(source, destination, **kwargs)

    monkeypatch.setattr(os, "link", gone)
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 1
    assert "no such image file" in capsys.readouterr().err
    rows = {row["path"]: row for row in rows_of(out)}
    assert rows[str(photos[0])]["error"] and not rows[str(photos[0])]["sorted_as"]
    assert (out / rows[str(photos[1])]["sorted_as"]).is_file()
    assert [p.name for p in out.rglob("*.png")] == [photos[1].name]  # no link left dangling


def test_a_catalogue_inside_the_photos_it_sorts_is_not_sorted_into_itself(model_path, tmp_path):
    shop(tmp_path / "photos", [0, 5])
    out = tmp_path / "photos" / "sorted"
    for _ in range(2):
        assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    assert len(rows_of(out)) == 2 and len(list(out.rglob("*.png"))) == 2


def test_a_class_folder_that_is_a_file_is_one_line_and_stays(model_path, tmp_path):
    shop(tmp_path / "photos", [1, 1, 1])
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    (label,) = {row["class"] for row in rows_of(out)}
    shutil.rmtree(out / sorting.class_folder(label))
    (out / sorting.class_folder(label)).write_text("a person's file")
    shop(tmp_path / "photos", [1], seed=8, prefix="new")
    result = run_program("predict", model_path, tmp_path / "photos", "--sort-into", out)
    assert_clean_failure(result, "cannot make")
    assert (out / sorting.class_folder(label)).read_text() == "a person's file"
