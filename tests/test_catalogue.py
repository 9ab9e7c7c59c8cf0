"""fashion_shop/catalogue.py: a catalogue's CSV, its rows written as photos are done, stopping
and --resume, refusing other files, progress lines, and names that are not UTF-8."""

import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    PROGRAM,
    assert_clean_failure,
    links_to,
    run_program,
    start_program,
    wait_until,
)
from photo_helpers import a_bag, photo_folder, refused_at_once, small_shop, write_photo

import fashion_mnist_cnn as fm
import fashion_shop.predict
from fashion_shop import catalogue

keras = fm.start_tensorflow_quietly()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """An untrained model: what it predicts does not matter here, only that it is the same."""
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    fm.build_model("float32").save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """20 photos in class folders, a PNG copy of one, and a file that is not a picture."""
    return small_shop(tmp_path_factory.mktemp("shop") / "photos")


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.reader(file))


def predict(*args):
    return fm.main(["predict", *map(str, args)])


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(fashion_shop.predict, "PREDICT_BATCH", 4)


@pytest.fixture(scope="module")
def uninterrupted(model_path, photos, tmp_path_factory):
    table = tmp_path_factory.mktemp("whole") / "all.csv"
    assert predict(model_path, photos, "--csv", table) == 1  # the broken photo
    return read_csv(table)


def test_rows_are_written_as_photos_are_done(
    model_path, photos, uninterrupted, small_batches, monkeypatch, tmp_path, capsys
):
    table, seen = tmp_path / "out.csv", []
    classify = fashion_shop.predict.classify_batches

    def watching(model, prepared):
        for batch in classify(model, prepared):
            seen.append(len(read_csv(table)) - 1)  # rows already on disk before this batch
            yield batch

    monkeypatch.setattr(fashion_shop.predict, "classify_batches", watching)
    assert predict(model_path, photos, "--csv", table) == 1
    assert seen == [0, 4, 8, 12, 16, 20]  # every batch's rows flushed before the next
    assert read_csv(table) == uninterrupted
    out, err = capsys.readouterr()
    assert out.startswith("Classified 21 of 22 photos in ") and "1 could not be read" in out
    assert err.strip().endswith("zz-broken.jpg: not a PNG or JPEG image")
    broken = [row for row in uninterrupted if row[0].endswith("zz-broken.jpg")]
    assert broken[0][1:4] == ["", "", ""] and "not a PNG or JPEG" in broken[0][4]


def test_sigterm_finishes_the_batch_and_resume_gives_the_uninterrupted_rows(
    model_path, photos, uninterrupted, small_batches, monkeypatch, tmp_path, capsys
):
    table, classify = tmp_path / "out.csv", fashion_shop.predict.classify_batches

    def terminated_during_the_second_batch(model, prepared):
        for n, batch in enumerate(classify(model, prepared)):
            if n == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    terminated = terminated_during_the_second_batch
    monkeypatch.setattr(fashion_shop.predict, "classify_batches", terminated)
    assert predict(model_path, photos, "--csv", table) == 128 + signal.SIGTERM
    assert read_csv(table) == uninterrupted[: 1 + 8]  # the batch under way was finished
    err = capsys.readouterr().err
    assert "Terminated: finishing this batch" in err
    assert "Stopped after 8 of 22 photos" in err and "--resume" in err

    monkeypatch.setattr(fashion_shop.predict, "classify_batches", classify)
    assert predict(model_path, photos, "--csv", table, "--resume") == 1  # the broken photo
    assert read_csv(table) == uninterrupted
    assert "8 were in it already" in capsys.readouterr().out
    assert predict(model_path, photos, "--csv", table, "--resume") == 1  # nothing left to do
    assert read_csv(table) == uninterrupted


def test_resume_drops_a_row_cut_off_by_a_kill(model_path, photos, uninterrupted, tmp_path):
    table = tmp_path / "out.csv"
    with open(table, "w", newline="") as file:
        csv.writer(file).writerows(uninterrupted[:6])
    text = table.read_text()
    table.write_text(text + uninterrupted[6][0][:15])  # killed while writing a row
    assert predict(model_path, photos, "--csv", table, "--resume") == 1
    assert read_csv(table) == uninterrupted


def test_without_resume_an_existing_csv_is_replaced(model_path, photos, uninterrupted, tmp_path):
    table = tmp_path / "out.csv"
    csv_of_another_folder(table, uninterrupted)  # an earlier run's rows
    assert predict(model_path, photos, "--csv", table) == 1
    assert read_csv(table) == uninterrupted


@pytest.mark.parametrize("named", ["a photo", "the model", "another table"])
def test_a_csv_naming_a_file_predict_did_not_write_leaves_it_alone(
    model_path, photos, tmp_path, capsys, named
):
    """`--csv *.jpg` in a shell names the first photo; a slip can name the model."""
    photo, model = tmp_path / "photo.jpg", tmp_path / "model.keras"
    photo.write_bytes(a_bag(photos).read_bytes())
    model.write_bytes(model_path.read_bytes())
    table = {"a photo": photo, "the model": model, "another table": tmp_path / "prices.csv"}[named]
    if named == "another table":
        table.write_text("sku,price\n1,9.99\n")
    before = table.read_bytes()
    assert predict(model, photo, "--csv", table) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a CSV written by predict" in err[0], err
    assert table.read_bytes() == before


def write_rows(path, rows):
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows(rows)


def csv_of_another_folder(path, rows):
    write_rows(path, [rows[0]] + [[r[0].replace("photos", "elsewhere"), *r[1:]] for r in rows[1:3]])


@pytest.mark.parametrize(
    "damage, message",
    [
        (csv_of_another_folder, "not among the photos given"),
        (lambda path, rows: path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary\n"), "not written"),
        (lambda path, rows: path.write_text("name,label\na.jpg,Bag\n"), "not written by predict"),
        (lambda path, rows: path.write_text(",".join(rows[0]) + "\nx.jpg,Hat,1\n"), "damaged"),
        (lambda path, rows: path.write_text(",".join(rows[0]) + '\n"a.jpg\n'), "damaged"),
        (lambda path, rows: write_rows(path, [rows[0], rows[1], rows[1]]), "twice"),
    ],
)
def test_a_csv_that_cannot_be_continued_is_refused_and_left_alone(
    model_path, photos, uninterrupted, tmp_path, capsys, damage, message
):
    table = tmp_path / "out.csv"
    damage(table, uninterrupted)
    before = table.read_bytes()
    assert predict(model_path, photos, "--csv", table, "--resume") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--resume" in err[0], err
    assert table.read_bytes() == before


def test_resume_from_a_csv_that_is_a_folder_is_one_clear_line(model_path, photos, tmp_path):
    (tmp_path / "out.csv").mkdir()
    result = run_program("predict", model_path, photos, "--csv", tmp_path / "out.csv", "--resume")
    assert_clean_failure(result, "--resume", "cannot be read as a csv")
    assert (tmp_path / "out.csv").is_dir()


def test_a_csv_that_cannot_be_read_is_not_replaced(tmp_path, monkeypatch):
    table = tmp_path / "prices.csv"
    table.write_text("sku,price\n")

    def denied(self, *args, **kwargs):  # as for a file another user keeps to themselves
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(fm.UserError, match="cannot be read .Permission denied."):
        catalogue.refuse_to_replace_other_files(table)


def test_resume_from_a_csv_that_cannot_be_read_is_one_clear_line(tmp_path, monkeypatch):
    table = tmp_path / "out.csv"
    table.write_text(",".join(catalogue.CSV_HEADER) + "\n")

    def denied(self):  # as for a file another user keeps to themselves
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(fm.UserError, match="cannot be read as a CSV .Permission denied."):
        catalogue.read_rows_done(table, [])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_under_the_csv_is_one_clear_line(model_path, photos, capsys):
    assert predict(model_path, photos, "--csv", "/dev/full") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0].lower() and "--resume" in err[0]


@pytest.mark.parametrize(
    "where, reason",
    [("no/such.csv", "No such file or directory"), ("photos", "Is a directory")],
    ids=["in no folder", "a folder"],
)
def test_predict_csv_that_cannot_be_written_is_one_line_at_once(
    model_path, tmp_path, monkeypatch, capsys, where, reason
):
    photos = photo_folder(tmp_path / "photos", per_class=1, classes=[2])
    table = tmp_path / where
    line = refused_at_once(monkeypatch, capsys, "predict", model_path, photos, "--csv", table)
    assert line == f"error: --csv {table}: cannot write there ({reason})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


NEVER_ENDS = """
import sys
from pathlib import Path
from fashion_mnist_cnn import UserError
from fashion_shop import catalogue
catalogue.refuse_to_replace_other_files(Path("/dev/zero"))  # written to, as the user asked
try:
    catalogue.read_rows_done(Path("/dev/zero"), [])
except UserError as error:
    sys.exit(str(error))
"""


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_csv_that_never_ends_is_never_read_whole():
    """Read whole, /dev/zero would fill the memory: under a 1 GB limit, a MemoryError."""
    result = subprocess.run(
        [sys.executable, "-c", NEVER_ENDS],
        capture_output=True, text=True, timeout=60, cwd=PROGRAM.parent,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30)),
    )  # fmt: skip
    assert_clean_failure(result, "--resume: /dev/zero cannot be read as a CSV (not a file)")


def test_progress_off_a_terminal_is_a_line_now_and_then_on_stderr(
    model_path, photos, small_batches, monkeypatch, capsys
):
    monkeypatch.setattr(catalogue, "PROGRESS_EVERY", 0)  # a line after every batch
    assert predict(model_path, photos, "--json") == 1
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 22  # stdout holds the results alone
    progress = [line for line in err.splitlines() if " photos, " in line]
    assert progress[0].startswith("4/22 photos, ") and progress[0].endswith(" left")
    assert progress[-1].startswith("22/22 photos, ") and " a second, done in " in progress[-1]
    assert len(progress) == 6


def photo_named_in_latin_1(photos, folder):
    """A photo whose file name is not UTF-8 (b'\xe9' is Latin-1's e acute), where the file
    system allows it (Linux does; macOS does not)."""
    folder.mkdir()
    path = folder / os.fsdecode("sac-\xe0-main-\xe9t\xe9.jpg".encode("latin-1"))
    try:
        path.write_bytes(a_bag(photos).read_bytes())
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system keeps only UTF-8 names")
    return path


def test_a_file_name_that_is_not_utf8_is_written_and_resumed_as_it_is(
    model_path, photos, tmp_path, capsys
):
    photo = photo_named_in_latin_1(photos, tmp_path / "old")
    table = tmp_path / "out.csv"
    assert predict(model_path, photo.parent, "--csv", table) == 0
    assert os.fsencode(photo) in table.read_bytes()  # the name's own bytes, as ls shows them
    assert predict(model_path, photo.parent, "--csv", table, "--resume") == 0
    assert "1 was in it already" in capsys.readouterr().out


def test_a_file_name_that_is_not_utf8_is_printed_where_the_output_must_be_utf8(
    model_path, photos, tmp_path, monkeypatch
):
    """As under PYTHONIOENCODING=utf-8:strict, or a locale of UTF-8 alone: stdout strict."""
    photo = photo_named_in_latin_1(photos, tmp_path / "old")
    written = io.BytesIO()
    strict = io.TextIOWrapper(written, encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", strict)
    assert predict(model_path, photo) == 0
    assert written.getvalue().startswith(os.fsencode(photo) + b": ")  # the name's own bytes


def test_a_rate_of_a_few_photos_a_second_keeps_a_decimal():
    assert catalogue.per_second(1, 2.2) == "0.5 a second"
    assert catalogue.per_second(1000, 6.9) == "145 a second"


def test_a_short_run_prints_no_progress(model_path, photos, capsys):
    assert predict(model_path, a_bag(photos)) == 0
    out, err = capsys.readouterr()
    assert out.count("%") == 3 and err == ""


def start_on_a_catalogue(model_path, tmp_path, count=1500):
    """predict started on count photos (links to one shot: a large catalogue without writing
    the files), once its first rows are in the CSV; returns the process, folder and CSV."""
    shot = write_photo(tmp_path / "shot.jpg", np.full((28, 28), 200, np.uint8), size=700)
    folder = links_to(shot, tmp_path / "catalogue", count, ".jpg")
    table = tmp_path / "out.csv"
    process = start_program("predict", model_path, folder, "--csv", table)
    wait_until(process, lambda: table.exists() and len(table.read_text().splitlines()) > 1)
    return process, folder, table


def cmdline(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def children(pid):
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_sigterm_to_the_program_leaves_a_valid_csv_and_resume_completes_it(model_path, tmp_path):
    """As a user's scheduler stops it: a real SIGTERM to the process, mid-catalogue (of 400
    photos: the preparing processes, 2 s of them ahead, are not done before the first rows)."""
    process, folder, table = start_on_a_catalogue(model_path, tmp_path, 400)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    rows = read_csv(table)
    assert rows[0] == catalogue.CSV_HEADER and 1 < len(rows) - 1 < 400, len(rows)
    names = [str(folder / f"{n:04d}.jpg") for n in range(400)]
    assert [row[0] for row in rows[1:]] == names[: len(rows) - 1]  # in order, none cut off
    assert "Traceback" not in err and "add --resume to classify the rest" in err

    assert predict(model_path, folder, "--csv", table, "--resume") == 0  # in this process
    rows = read_csv(table)
    assert [row[0] for row in rows[1:]] == names
    assert len({row[1] for row in rows[1:]}) == 1  # the same shot, the same class


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_a_preparing_process_killed_is_one_clear_line_and_the_rows_done_stay(model_path, tmp_path):
    process, folder, table = start_on_a_catalogue(model_path, tmp_path)
    (server,) = [p for p in children(process.pid) if b"forkserver" in cmdline(p)]
    for pid in children(server):  # the preparing processes, as the OOM killer would
        os.kill(pid, signal.SIGKILL)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: a process preparing the photos was")
    rows = read_csv(table)
    names = [str(folder / f"{n:04d}.jpg") for n in range(1500)]
    assert rows[0] == catalogue.CSV_HEADER
    assert [row[0] for row in rows[1:]] == names[: len(rows) - 1]
