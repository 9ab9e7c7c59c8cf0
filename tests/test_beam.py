"""fashion_shop/beam.py: predict --runner, the catalogue as an Apache Beam pipeline: the rows of
predict --csv on the same photos (mirror averaging included), shards for a cluster, photos that
cannot be read as rows, and every refusal in one line before the pipeline starts."""

import csv
import errno
import io
import subprocess
import sys

import apache_beam
import numpy as np
import pytest
from apache_beam.io.aws import s3io
from apache_beam.io.gcp import gcsio
from conftest import PROGRAM, assert_clean_failure, main_here, program_env
from photo_helpers import SHOP_PHOTOS, photo_folder, refused_at_once, sharpened_model
from PIL import Image

import fashion_mnist_cnn as fm
import fashion_shop
from fashion_shop import beam, catalogue, predict

keras = fm.start_tensorflow_quietly()
ON_BEAM = ["--runner", "DirectRunner"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 28x28 model, and one of an --augment run, which predict shows each photo mirrored too."""
    folder = tmp_path_factory.mktemp("models")
    plain = sharpened_model(folder / "plain.keras", calibrated=False)
    keras.utils.set_random_seed(1)
    mirrored = fm.build_model("float32", mirrored=True)
    assert mirrored.name.endswith(fm.MIRRORED)
    mirrored.save(folder / "mirrored.keras")
    return {"plain": plain, "mirrored": folder / "mirrored.keras"}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A few dozen photos: generated ones in class folders, a file that is no picture, a blank
    placeholder, and two real shop photos of each class where ../shared has them."""
    folder = photo_folder(tmp_path_factory.mktemp("shop") / "photos", per_class=3)
    (folder / "Bag" / "zz-broken.jpg").write_text("not a picture")
    Image.new("RGB", (300, 400), (230, 225, 220)).save(folder / "Coat" / "blank.png")
    if SHOP_PHOTOS.is_dir():
        for real in sorted(SHOP_PHOTOS.iterdir()):
            for photo in sorted(real.iterdir())[:2]:
                (folder / "real" / real.name).mkdir(parents=True, exist_ok=True)
                (folder / "real" / real.name / photo.name).symlink_to(photo)
    return folder


@pytest.fixture(scope="module")
def runs(models, shop, tmp_path_factory):
    """For each model: predict --csv, and the same on Beam's DirectRunner, run once here."""
    out = tmp_path_factory.mktemp("runs")
    done = {}
    for name, model in models.items():
        predicted = main_here("predict", model, shop, "--csv", out / f"{name}-predict.csv")
        on_beam = main_here("predict", model, shop, "--csv", out / f"{name}-beam.csv", *ON_BEAM)
        done[name] = (predicted, on_beam, out / f"{name}-predict.csv", out / f"{name}-beam.csv")
    return done


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["plain", "mirrored"])
def test_beam_writes_the_csv_of_predict_byte_for_byte(runs, model):
    predicted, on_beam, predicted_csv, beam_csv = runs[model]
    assert predicted.returncode == on_beam.returncode == 1  # a photo could not be read
    assert beam_csv.read_bytes() == predicted_csv.read_bytes()
    summary = on_beam.stdout.strip()
    assert summary.startswith("Classified ") and summary.endswith(f"rows in {beam_csv}"), summary
    assert ", 2 could not be read; " in summary and "on DirectRunner" in summary
    assert on_beam.stderr == ""


@pytest.mark.slow
def test_photos_that_cannot_be_read_are_rows_with_their_error(runs, shop):
    _, _, _, beam_csv = runs["plain"]
    errors = {row["path"]: row["error"] for row in read_rows(beam_csv) if row["error"]}
    assert errors == {
        str(shop / "Bag" / "zz-broken.jpg"): f"{shop / 'Bag' / 'zz-broken.jpg'}: not a PNG or "
        "JPEG image",
        str(shop / "Coat" / "blank.png"): f"{shop / 'Coat' / 'blank.png'}: a blank photo, "
        "nothing in it stands out from its background",
    }


@pytest.mark.slow
def test_a_cluster_writes_shards_of_the_same_rows(runs, models, shop, tmp_path):
    """A cluster's runner writes FILE-00000-of-000NN.csv shards, each with predict's header; this
    is the same pipeline run here with shards, as a cluster would write them."""
    _, _, predicted_csv, _ = runs["plain"]
    options = beam.PipelineOptions([])
    with apache_beam.Pipeline(runner="DirectRunner", options=options) as pipeline:
        beam.build(pipeline, [shop], models["plain"], "fashion-mnist", tmp_path / "rows.csv", False)
    shards = sorted(tmp_path.glob("rows-*-of-*.csv"))
    header = (",".join(catalogue.CSV_HEADER) + "\r\n").encode()
    assert shards and all(shard.read_bytes().startswith(header) for shard in shards)
    rows = [row for shard in shards for row in read_rows(shard)]
    assert sorted(rows, key=lambda row: row["path"]) == sorted(
        read_rows(predicted_csv), key=lambda row: row["path"]
    )


@pytest.mark.slow
def test_a_pattern_on_this_machine_gives_the_rows_of_predict_on_its_files(models, shop, tmp_path):
    """A quoted glob, as Beam's file systems match it here: the rows of predict given the files
    the shell would have given it."""
    files = sorted(shop.glob("*/*.jpg"))
    assert len(files) > 10 and shop / "Bag" / "zz-broken.jpg" in files
    predicted = main_here("predict", models["plain"], *files, "--csv", tmp_path / "predict.csv")
    pattern = shop / "*" / "*.jpg"
    on_beam = main_here("predict", models["plain"], pattern, "--csv", tmp_path / "b.csv", *ON_BEAM)
    assert predicted.returncode == on_beam.returncode == 1, on_beam.stderr
    assert (tmp_path / "b.csv").read_bytes() == (tmp_path / "predict.csv").read_bytes()


def test_a_photo_in_cloud_storage_is_prepared_from_its_bytes_as_predict_prepares_it(shop):
    photo = sorted((shop / "Dress").iterdir())[0]
    source = io.BytesIO(photo.read_bytes())
    _, image, error = beam.photos.prepare_photo(f"gs://shop/{photo.name}", "fashion-mnist", source)
    assert error is None and np.array_equal(image, beam.photos.prepare_image(photo))
    _, _, error = beam.photos.prepare_photo("gs://shop/x.jpg", "colour", io.BytesIO(b"no"))
    assert error == "gs://shop/x.jpg: not a PNG or JPEG image"


# Refused in one line, exit 1, before the pipeline starts (and before TensorFlow loads, where
# the mistake is no model's).


def damaged(folder):
    """A model file cut short: the first half of a real one."""
    model = folder / "cut.keras"
    real = sharpened_model(folder / "whole.keras", calibrated=False)
    model.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    return model


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.keras", "no such model file"),
        (damaged, "not a Keras model file, or a damaged one"),
    ],
    ids=["a missing model", "a damaged model"],
)
def test_a_model_missing_or_damaged_is_one_line(shop, tmp_path, make, message):
    result = main_here("predict", make(tmp_path), shop, "--csv", tmp_path / "rows.csv", *ON_BEAM)
    assert_clean_failure(result, message)
    assert result.returncode == 1 and not (tmp_path / "rows.csv").exists()


HEAVY = ("start_tensorflow_quietly", "load_trained_model", "create_runner")


def refused(monkeypatch, capsys, *argv, heavy=HEAVY):
    """The one line of predict --runner refusing argv, before Beam's runner or TensorFlow."""
    for name in heavy:
        monkeypatch.setattr(beam, name, lambda *a, **k: pytest.fail("refused too late"))
    return refused_at_once(monkeypatch, capsys, "predict", *argv, *ON_BEAM)


def test_a_path_that_names_no_photo_is_one_line(models, shop, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photo")
    csv_path = tmp_path / "rows.csv"
    heavy = ("start_tensorflow_quietly", "load_trained_model")
    for path, message in [
        (tmp_path / "gone", "gone: no such photo or folder"),
        (tmp_path / "empty", "empty: a folder with no PNG or JPEG images in it"),
        (shop / "*" / "*.gif", "*.gif: matches no file"),
    ]:
        argv = [models["plain"], shop, path, "--csv", csv_path]
        assert refused(monkeypatch, capsys, *argv, heavy=heavy).endswith(message)
    assert not csv_path.exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "no-such-folder" / "rows.csv", "cannot write there"),
        (lambda d: d, "cannot write there (Is a directory)"),
        (lambda d: Image.new("L", (8, 8)).save(d / "a.png") or d / "a.png", "not a CSV written"),
    ],
    ids=["in a missing folder", "a folder", "a photo"],
)
def test_a_csv_that_cannot_be_written_is_one_line(
    models, shop, tmp_path, monkeypatch, capsys, make, message
):
    out = make(tmp_path)
    before = out.read_bytes() if out.is_file() else None
    argv = [models["plain"], shop, "--csv", out]
    line = refused(monkeypatch, capsys, *argv, heavy=HEAVY[:2])
    assert message in line
    assert (out.read_bytes() if out.is_file() else None) == before


@pytest.mark.slow
def test_a_failure_while_writing_leaves_the_csv_as_it_was(
    models, shop, tmp_path, monkeypatch, runs
):
    """The disk fills as the rows are written: the CSV there before stays whole, no part of the
    new one is left, and the failure is one line."""
    out = tmp_path / "rows.csv"
    _, _, predicted_csv, _ = runs["plain"]
    out.write_bytes(predicted_csv.read_bytes()[:200])  # an earlier run's rows (cut short)
    before = out.read_bytes()

    def disk_full(self, rows):
        self.writerow(next(iter(rows)))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full)
    result = main_here("predict", models["plain"], shop, "--csv", out, *ON_BEAM)
    assert_clean_failure(result, "the pipeline failed on DirectRunner", "no space left")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_workrs=3"], "--num_workrs: an option of neither predict nor Beam"),
        (["--runner", "NoSuchRunner"], "--runner NoSuchRunner: not one of Beam's runners"),
        (["--direct_num_workers=abc"], "argument --direct_num_workers: invalid int value: 'abc'"),
        (["--direct_running_mode=nonsense"], "argument --direct_running_mode: invalid choice"),
    ],
    ids=["a misspelt option", "an unknown runner", "a bad number", "a bad choice"],
)
def test_beams_options_and_runner_are_checked(models, shop, tmp_path, capsys, extra, message):
    code = fm.main(
        ["predict", str(models["plain"]), str(shop), "--csv", str(tmp_path / "r.csv")]
        + ON_BEAM
        + extra
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_a_cluster_is_refused_this_machines_paths(models, shop, tmp_path, monkeypatch, capsys):
    argv = [models["plain"], shop, "--csv", tmp_path / "r.csv", "--runner", "DataflowRunner"]
    monkeypatch.setattr(beam, "load_trained_model", lambda *a: pytest.fail("refused too late"))
    assert fm.main(["predict", *map(str, argv)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "a path on this machine, which DataflowRunner's workers cannot read" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runner", "DirectRunner"], "--runner writes its rows to --csv FILE"),
        (["--csv", "r.csv", "--runner", "DirectRunner", "--json"], "leave out --runner"),
        (["--project=shop"], "unrecognized arguments: --project=shop"),
        (["--csv", "r.csv", "--runner", ""], "--runner needs the name of one of Beam's runners"),
    ],
    ids=["no --csv", "--json", "Beam's option without --runner", "an empty --runner"],
)
def test_the_arguments_are_checked_before_beam(argv, message):
    result = main_here("predict", "model.keras", "photos", *argv)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_without_apache_beam_runner_says_what_to_install(models, shop, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as where it is not installed
    monkeypatch.delitem(sys.modules, "fashion_shop.beam")
    monkeypatch.delattr(fashion_shop, "beam")
    result = main_here("predict", models["plain"], shop, "--csv", tmp_path / "r.csv", *ON_BEAM)
    assert_clean_failure(result, "pip install -r requirements-beam.txt")


def test_predict_without_runner_refuses_cloud_storage_in_one_line(models, tmp_path):
    result = main_here("predict", models["plain"], "gs://shop/photos/")
    assert_clean_failure(result, "gs://shop/photos/: predict reads and writes this machine's")


@pytest.mark.parametrize(
    "scheme, installed, extras",
    [("gs", (gcsio, "GCS_INSTALLED"), "gcp"), ("s3", (s3io, "BOTO3_INSTALLED"), "aws")],
)
def test_cloud_storage_without_beams_extras_says_what_to_install(
    shop, tmp_path, monkeypatch, capsys, scheme, installed, extras
):
    monkeypatch.setattr(*installed, False)  # as where apache-beam's extras are not installed
    argv = [f"{scheme}://shop/model.keras", shop, "--csv", tmp_path / "r.csv"]
    line = refused(monkeypatch, capsys, *argv, heavy=HEAVY[:2])
    assert f"{scheme}://shop/model.keras: " in line
    assert line.endswith(f"pip install 'apache-beam[{extras}]'")


def test_a_runner_here_is_refused_a_csv_in_cloud_storage(models, shop, monkeypatch, capsys):
    argv = [models["plain"], shop, "--csv", "gs://shop/rows.csv"]
    line = refused(monkeypatch, capsys, *argv, heavy=HEAVY[:2])
    assert line.startswith("error: --csv gs://shop/rows.csv: DirectRunner writes its CSV on this")


def test_one_test_says_what_a_url_is():
    assert beam.is_url is predict.is_url
    assert predict.is_url("gs://shop/a.jpg") and not predict.is_url(predict.location("a.jpg"))


DISK_FULL = """
import csv, errno, runpy, sys
def disk_full(self, rows):
    raise OSError(errno.ENOSPC, "No space left on device")
csv.DictWriter.writerows = disk_full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_failed_pipeline_is_one_line_on_the_command_line(models, shop, tmp_path):
    """Beam logs a worker's failure with its traceback, which only the program's own stderr
    shows (pytest's log handlers take it in this process): the disk fills as the CSV is
    written, in a process of its own."""
    argv = [PROGRAM, "predict", models["plain"], shop / "Bag", "--csv", tmp_path / "r.csv"]
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL, *map(str, argv), *ON_BEAM],
        capture_output=True,
        text=True,
        timeout=300,
        env=program_env(),
    )
    assert_clean_failure(result, "the pipeline failed on DirectRunner", "no space left")
    assert not (tmp_path / "r.csv").exists()
