"""fashion_shop/sorting.py: predict --sort-into puts a copy of each photo into its class folder
(unsure/ where a calibrated model is not sure), never undoes what a person moved or put there,
lists what it cannot count, says which model sorted, continues after a stop; finetune then
learns from the corrected folders and counts the corrections.

The models here are untrained ones made sure of some photos and not of others (their last layer
sharpened): what they answer does not matter, only that it varies. In-process runs (fm.main)
wherever the process itself is not under test."""

import csv
import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import links_to, main_here, start_program, wait_until
from photo_helpers import framed_items, refused_at_once, sharpened_model
from PIL import Image

import fashion_mnist_cnn as fm
from fashion_shop import catalogue, models, sorting
from fashion_shop.folders import names_no_class
from fashion_shop.photos import THUMBNAIL, thumbnail_name

keras = fm.start_tensorflow_quietly()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A model whose probabilities are calibrated, as far as its name declares."""
    return sharpened_model(tmp_path_factory.mktemp("model") / "calibrated.keras")


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """A model that is not calibrated, as a training run's (the 28x28 routes)."""
    return sharpened_model(tmp_path_factory.mktemp("model") / "model.keras", calibrated=False)


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


def summary(out):
    """predict's last line: Sorted into DIR/: ..."""
    (line,) = [line for line in out.splitlines() if line.startswith("Sorted into")]
    return line


def test_every_photo_goes_to_its_class_folder_as_a_copy_and_the_csv_says_where(
    model_path, tmp_path, capsys
):
    photos = shop(tmp_path / "photos", [0, 3, 5, 7, 9, 1, 2, 4])
    twin = shop(tmp_path / "more", [2], seed=9)[0]  # another photo named item0.png
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", twin, "--sort-into", out) == 0
    line = summary(capsys.readouterr().out)
    rows = rows_of(out)
    assert [row["path"] for row in rows] == [str(p) for p in [*sorted(photos), twin]]
    assert {row["model"] for row in rows} == {sorting.model_id(model_path)}
    unsure = [float(row["probability"]) < sorting.UNSURE_BELOW for row in rows]
    assert 0 < sum(unsure) < len(rows)  # the default --unsure, for a calibrated model
    for row, marked in zip(rows, unsure):
        where = Path(row["sorted_as"])
        assert where.parts[0] == sorting.class_folder(row["class"])
        assert (sorting.UNSURE in where.parts) == marked
        thumbnail = Image.open(out / sorting.THUMBNAILS / thumbnail_name(row["path"]))
        assert max(thumbnail.size) <= THUMBNAIL  # made by the preparing processes
    # Each photo's own name; a photo whose name another has gets name-2.
    assert [Path(row["sorted_as"]).name for row in rows] == [p.name for p in photos] + [
        "item0-2.png"
    ]
    # Copies: editing a sorted photo leaves the original as it was.
    for row in rows:
        placed, original = out / row["sorted_as"], Path(row["path"])
        assert placed.read_bytes() == original.read_bytes()
        assert not os.path.samefile(placed, original) and placed.stat().st_nlink == 1
        assert placed.stat().st_mtime == original.stat().st_mtime  # as shutil.copy2 keeps it
    before = photos[0].read_bytes()
    with open(out / rows[0]["sorted_as"], "r+b") as edited:  # as an image editor saves in place
        edited.write(b"rotated")
    assert photos[0].read_bytes() == before
    # The summary: the photos seen, those to check, and the share right it expects.
    probabilities = [float(row["probability"]) for row in rows]
    as_sorted = sum(probabilities) / len(rows)
    checked = (sum(unsure) + sum(p for p, u in zip(probabilities, unsure) if not u)) / len(rows)
    assert line.startswith(
        f"Sorted into {out}/: 9 photos: 9 classified now, 0 there before, 0 outside the class "
        f"folders; {sum(unsure)} to check (in the unsure folders), expected {as_sorted:.0%} "
        f"right as sorted and {checked:.0%} once checked; review page"
    ), line
    page = (out / sorting.PAGE_NAME).read_text()
    assert f'id="expected">{as_sorted:.0%}<' in page and '<svg id="figure"' in page
    assert models.declared_kind(model_path).calibrated


def test_a_model_that_is_not_calibrated_marks_nothing_and_promises_no_share_right(
    plain_model, tmp_path, capsys
):
    """The 28x28 routes: their probabilities are not calibrated (99% sure of mistakes), so no
    unsure marks unless --unsure is given, no expected share right, and what to use instead."""
    shop(tmp_path / "photos", [0, 3, 5, 7, 9, 1])
    out = tmp_path / "sorted"
    assert not models.declared_kind(plain_model).calibrated
    assert sort(plain_model, tmp_path / "photos", "--sort-into", out) == 0
    line = summary(capsys.readouterr().out)
    assert "none marked to check" in line and "not calibrated" in line, line
    assert "finetune --backbone mobilenet_v2" in line and "expected" not in line
    assert all(sorting.UNSURE not in Path(row["sorted_as"]).parts for row in rows_of(out))
    assert len(rows_of(out)) == 6
    page = (out / sorting.PAGE_NAME).read_text()
    assert 'id="not-calibrated"' in page and "finetune --backbone mobilenet_v2" in page
    assert "<svg" not in page and 'id="expected"' not in page and 'id="to-check">0<' in page
    # Asked for, --unsure marks what is under it, and says so; still no share promised.
    argv = ["--sort-into", out, "--unsure", 0.7, "--reclassify"]
    assert sort(plain_model, tmp_path / "photos", *argv) == 0
    line = summary(capsys.readouterr().out)
    marked = sum(float(row["probability"]) < 0.7 for row in rows_of(out))
    assert 0 < marked < 6 and f"{marked} in the unsure folders, under --unsure 0.7" in line, line
    assert "not calibrated" in line and "expected" not in line
    assert "<svg" not in (out / sorting.PAGE_NAME).read_text()


def test_what_a_person_moved_or_put_there_stays_and_every_photo_is_counted(
    model_path, tmp_path, capsys
):
    shop(tmp_path / "photos", [0, 3, 5, 7, 2])
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    first = {row["path"]: row for row in rows_of(out)}
    rows = list(first.values())
    # A person corrects one photo, moves one into a misspelt folder and one out of the class
    # folders, and puts a photo of their own in a folder.
    moved = out / rows[0]["sorted_as"]
    other = next(c for c in fm.CLASS_NAMES if c != rows[0]["class"])
    (out / sorting.class_folder(other)).mkdir(exist_ok=True)
    corrected = out / sorting.class_folder(other) / moved.name
    moved.rename(corrected)
    (out / "Sandle").mkdir()
    misspelt = out / "Sandle" / Path(rows[1]["sorted_as"]).name
    (out / rows[1]["sorted_as"]).rename(misspelt)
    loose = out / Path(rows[2]["sorted_as"]).name
    (out / rows[2]["sorted_as"]).rename(loose)
    mine = out / "Bag" / "mine.png"
    mine.parent.mkdir(exist_ok=True)
    mine.write_bytes(b"not even a photo")
    # More photos, another run: only they are classified; nothing is moved back or replaced,
    # and every photo in the folder is counted, those outside the class folders listed.
    shop(tmp_path / "photos", [1, 8], seed=7, prefix="more")
    capsys.readouterr()
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    printed = capsys.readouterr().out
    rows = rows_of(out)
    assert len(rows) == 7 and [r for r in rows if r["path"] in first] == list(first.values())
    assert corrected.is_file() and not moved.exists() and mine.read_bytes() == b"not even a photo"
    assert misspelt.is_file() and loose.is_file()
    assert f"note: {names_no_class(out / 'Sandle')}; 1 photo is there" in printed, printed
    assert f"note: {out}: 1 photo is outside the class subfolders" in printed, printed
    assert summary(printed).startswith(
        f"Sorted into {out}/: 8 photos: 2 classified now, 4 there before, 2 outside the class "
        "folders;"
    ), printed  # 5 sorted + 2 new + the person's own, seen: 2 + 4 + 2
    page = (out / sorting.PAGE_NAME).read_text()
    assert 'id="corrected">1<' in page and "put here by a person" in page
    assert names_no_class(out / "Sandle") in page and 'data-folder="Sandle" data-count="1"' in page
    assert "6 photos sorted by class, 2 outside them" in page
    # Another model sorts nothing already there, and says so.
    other_model = sharpened_model(tmp_path / "other.keras", seed=1)
    assert sort(other_model, tmp_path / "photos", "--sort-into", out) == 0
    printed = capsys.readouterr().out
    assert f"note: 5 photos in {out}/ were sorted by another model ({model_path})" in printed
    assert "give their photos with --reclassify" in printed and "Classified 0 of 0" in printed
    assert summary(printed).startswith(f"Sorted into {out}/: 8 photos: 0 classified now, 6 there")
    # Classified again by it: predict's own placements follow its answers, the person's moves
    # stay where they put them, and the counts still add up.
    assert sort(other_model, tmp_path / "photos", "--sort-into", out, "--reclassify") == 0
    printed = capsys.readouterr().out
    assert "Classified 7 of 7 photos" in printed and "in it already" not in printed, printed
    assert "another model" not in printed
    assert summary(printed).startswith(
        f"Sorted into {out}/: 8 photos: 5 classified now, 1 there before, 2 outside"
    )
    assert corrected.is_file() and misspelt.is_file() and loose.is_file()
    assert mine.read_bytes() == b"not even a photo"
    again = {row["path"]: row for row in rows_of(out)}
    assert len(again) == 7  # one row a photo again
    assert again[rows[1]["path"]]["sorted_as"] == str(misspelt.relative_to(out))
    moved_by_predict = 0
    for path, row in again.items():
        if Path(path).name in (moved.name, misspelt.name, loose.name):
            continue
        assert (out / row["sorted_as"]).is_file()
        assert Path(row["sorted_as"]).parts[0] == sorting.class_folder(row["class"])
        moved_by_predict += row["sorted_as"] != first.get(path, row)["sorted_as"]
    assert moved_by_predict > 0


def test_a_photo_placed_by_a_run_stopped_before_its_row_is_not_placed_twice(model_path, tmp_path):
    (photo,) = shop(tmp_path / "photos", [4])
    out = tmp_path / "sorted"
    (out / "Coat").mkdir(parents=True)
    shutil.copy2(photo, out / "Coat" / photo.name)  # as a kill -9 between the copy and its row
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    assert [row["sorted_as"] for row in rows_of(out)] == [f"Coat/{photo.name}"]
    assert sorted(p.name for p in out.rglob("*.png")) == [photo.name]


def refuse(errnos):
    """A call failing with these errors, one after another."""
    errors = iter(errnos)

    def fail(*args, **kwargs):
        number = next(errors)
        raise OSError(number, os.strerror(number))

    return fail


def test_links_only_when_asked_for_hard_then_symbolic_then_copies_said_once(
    model_path, tmp_path, monkeypatch, capsys
):
    photos = shop(tmp_path / "photos", [0, 3, 5])
    out = tmp_path / "hard"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out, "--link") == 0
    for row in rows_of(out):
        assert os.path.samefile(out / row["sorted_as"], row["path"])  # no extra room
    link = os.link
    monkeypatch.setattr(os, "link", refuse([errno.EXDEV] * 3))
    out = tmp_path / "linked"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out, "--link") == 0
    assert capsys.readouterr().err.count("photos go in as symbolic links") == 1
    for row in rows_of(out):
        assert (out / row["sorted_as"]).is_symlink() and os.path.samefile(
            out / row["sorted_as"], row["path"]
        )
    monkeypatch.setattr(os, "symlink", refuse([errno.EPERM] * 3))
    monkeypatch.setattr(os, "link", refuse([errno.EXDEV] * 3 + [errno.EPERM] * 3))  # nor a copy's
    out = tmp_path / "copied"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out, "--link") == 0
    assert capsys.readouterr().err.count("photos go in as copies") == 1
    placed = [out / row["sorted_as"] for row in rows_of(out)]
    assert [p.read_bytes() for p in placed] == [p.read_bytes() for p in sorted(photos)]
    assert all(p.stat().st_nlink == 1 for p in placed)
    assert not list(out.rglob(".*.partial*"))
    monkeypatch.setattr(os, "link", link)


def test_a_copy_falls_back_where_the_kernel_cannot_copy(tmp_path, monkeypatch):
    """os.copy_file_range clones where the file system can (Btrfs, XFS); where the kernel has
    no such copy between these files, Python copies."""
    source = tmp_path / "a.jpg"
    source.write_bytes(bytes(range(256)) * 1000)
    sorting.copy_exclusively(source, tmp_path / "b.jpg")
    assert (tmp_path / "b.jpg").read_bytes() == source.read_bytes()
    monkeypatch.setattr(os, "copy_file_range", refuse([errno.EXDEV] * 2))
    sorting.copy_exclusively(source, tmp_path / "c.jpg")
    assert (tmp_path / "c.jpg").read_bytes() == source.read_bytes()
    with pytest.raises(FileExistsError):  # never onto a file that is there
        sorting.copy_exclusively(source, tmp_path / "c.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_photo_that_cannot_be_put_there_is_one_line_and_the_same_command_goes_on(
    model_path, tmp_path, monkeypatch, capsys
):
    shop(tmp_path / "photos", [0, 3, 5])
    out = tmp_path / "sorted"
    (out / "Bag").mkdir(parents=True)
    (out / "Bag" / "theirs.jpg").write_bytes(b"a person's")
    for failure, message in [(errno.EACCES, "cannot put"), (errno.ENOSPC, "no space left")]:
        monkeypatch.setattr(sorting, "copy_file", refuse([failure] * 9))
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


def test_unsure_reclassify_and_link_need_a_folder_to_sort_into(model_path, tmp_path):
    for option in (["--unsure", "0.5"], ["--reclassify"], ["--link"]):
        result = main_here("predict", model_path, tmp_path, *option)
        assert result.returncode == 2 and "give --sort-into DIR" in result.stderr


def test_a_file_name_that_is_not_utf8_is_sorted_and_shown(model_path, tmp_path):
    folder = tmp_path / "photos"
    (photo,) = shop(folder, [6])
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9.png")
    os.rename(photo, odd)
    out = tmp_path / "sorted"
    assert sort(model_path, folder, "--sort-into", out) == 0
    (row,) = rows_of(out)
    assert row["path"] == odd and Path(row["sorted_as"]).name == "caf\udce9.png"
    assert (out / row["sorted_as"]).read_bytes() == Path(odd).read_bytes()
    assert "caf%E9.png" in (out / sorting.PAGE_NAME).read_text()


@pytest.mark.slow
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
    assert sort(model_path, folder, "--sort-into", out) == 0  # the rest: in this process
    assert sorted(Path(row["path"]).name for row in rows_of(out)) == sorted(
        p.name for p in folder.iterdir()
    )
    assert (out / sorting.PAGE_NAME).read_text().count("<figure") == 1500


def test_finetune_learns_from_the_corrected_folders_and_counts_the_corrections(
    plain_model, tmp_path
):
    shop(tmp_path / "photos", [0, 0, 3, 3, 5, 5, 7, 7])
    out = tmp_path / "sorted"
    assert sort(plain_model, tmp_path / "photos", "--sort-into", out) == 0  # nothing unsure
    rows = rows_of(out)
    for row in rows[:2]:  # a person moves two photos to other classes
        where = out / row["sorted_as"]
        other = "Bag" if row["class"] != "Bag" else "Coat"
        (out / other).mkdir(exist_ok=True)
        where.rename(out / other / where.name)
    result = main_here(
        "finetune", plain_model, out, "--epochs", "1", "--holdout", "0", "--out-dir", tmp_path / "t"
    )
    assert result.returncode == 0, result.stderr
    assert "corrected" in result.stdout
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["corrected_by_a_person"] == 2


def test_the_csv_of_a_sorted_folder_keeps_earlier_runs_photos_and_earlier_versions_rows(
    model_path, tmp_path, capsys
):
    table = tmp_path / "predictions.csv"
    row = catalogue.Row(
        "/elsewhere/a.jpg", "Bag", 0.9, (("Bag", 0.9), ("Coat", 0.05)), "", "Bag/a.jpg", "abc"
    )
    catalogue.rewrite(table, catalogue.SORTED_HEADER, [row])
    assert (
        table.read_text().splitlines()[1]
        == "/elsewhere/a.jpg,Bag,0.9000,Bag 90.0%; Coat 5.0%,,Bag/a.jpg,abc"
    )
    rows, _ = catalogue.read_rows_done(table, [Path("/new/b.jpg")], sorted_into=tmp_path)
    assert rows == [row]
    # A folder sorted before the model was recorded: its rows kept, the CSV given the column,
    # and its photos said to be sorted by a model it did not record.
    photos = shop(tmp_path / "photos", [1, 2])
    out = tmp_path / "sorted"
    assert sort(model_path, photos[0], "--sort-into", out) == 0
    lines = (out / sorting.CSV_NAME).read_text().splitlines()
    earlier = [line.rpartition(",")[0] for line in lines]  # without the model column
    (out / sorting.CSV_NAME).write_text("\n".join(earlier) + "\n")
    capsys.readouterr()
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    printed = capsys.readouterr().out
    assert "1 photo in" in printed and "an earlier version that did not record its model" in printed
    assert "another model" not in printed
    rows = rows_of(out)
    assert [row["path"] for row in rows] == [str(p) for p in photos]
    assert [row["model"] for row in rows] == ["", sorting.model_id(model_path)]


def test_a_file_that_appears_under_a_photos_name_is_never_overwritten(
    model_path, tmp_path, monkeypatch
):
    (photo,) = shop(tmp_path / "photos", [2])
    copy, calls = sorting.copy_file, []

    def someone_first(source, partial):
        calls.append(partial)
        if len(calls) == 1:  # a person's file of that name, just in time
            Path(partial).with_name(photo.name).write_bytes(b"a person's")
        return copy(source, partial)

    monkeypatch.setattr(sorting, "copy_file", someone_first)
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    monkeypatch.undo()
    (row,) = rows_of(out)
    assert Path(row["sorted_as"]).name == "item0-2.png"  # the next name, not theirs
    theirs = out / Path(row["sorted_as"]).parent / "item0.png"
    assert theirs.read_bytes() == b"a person's"
    assert (out / row["sorted_as"]).read_bytes() == photo.read_bytes()


def test_a_photo_gone_since_it_was_read_is_an_error_and_nothing_is_left(
    model_path, tmp_path, monkeypatch, capsys
):
    photos = shop(tmp_path / "photos", [2, 6])
    copy = sorting.copy_file

    def gone(source, partial):
        if Path(source) == photos[0]:
            Path(source).unlink()
        return copy(source, partial)

    monkeypatch.setattr(sorting, "copy_file", gone)
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 1
    assert "no such image file" in capsys.readouterr().err
    rows = {row["path"]: row for row in rows_of(out)}
    assert rows[str(photos[0])]["error"] and not rows[str(photos[0])]["sorted_as"]
    assert (out / rows[str(photos[1])]["sorted_as"]).is_file()
    assert [p.name for p in out.rglob("*.png")] == [photos[1].name]  # no partial copy left


def test_a_catalogue_inside_the_photos_it_sorts_is_not_sorted_into_itself(model_path, tmp_path):
    shop(tmp_path / "photos", [0, 5])
    out = tmp_path / "photos" / "sorted"
    for _ in range(2):
        assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    assert len(rows_of(out)) == 2 and len(list(out.rglob("*.png"))) == 2


def test_a_class_folder_that_is_a_file_is_one_line_and_stays(model_path, tmp_path, capsys):
    shop(tmp_path / "photos", [1, 1, 1])
    out = tmp_path / "sorted"
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 0
    (label,) = {row["class"] for row in rows_of(out)}
    shutil.rmtree(out / sorting.class_folder(label))
    (out / sorting.class_folder(label)).write_text("a person's file")
    shop(tmp_path / "photos", [1], seed=8, prefix="new")
    capsys.readouterr()
    assert sort(model_path, tmp_path / "photos", "--sort-into", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot make" in err[0], err
    assert (out / sorting.class_folder(label)).read_text() == "a person's file"
