"""A catalogue's CSV of answers, written as photos are done and continued after a stop, and
the progress shown meanwhile."""

import contextlib
import csv
import errno
import io
import os
import sys
import tempfile
import time
from typing import NamedTuple

from fashion_mnist_cnn import CLASS_NAMES, UserError, atomic_path

CSV_HEADER = ["path", "class", "probability", "top3", "error"]
# With --sort-into: where the photo went, in DIR, and which model answered (sorting.model_id).
SORTED_HEADER = [*CSV_HEADER, "sorted_as", "model"]
EARLIER_SORTED_HEADER = SORTED_HEADER[:-1]  # a folder sorted before the model was recorded
# A file name that is not UTF-8 (copied from an old system) goes into the CSV as its own bytes,
# as `ls` shows it, and --resume reads it back to the same path.
FILE_NAME_BYTES = "surrogateescape"
PROGRESS_EVERY = 10  # seconds between progress lines when stderr is not a terminal


class Row(NamedTuple):
    """A photo's row of the CSV, its numbers as the CSV keeps them: what predict answered, or
    why the photo could not be read."""

    path: str
    answer: str  # the class column: the likeliest class ("" for a photo not read)
    probability: float | None  # its probability, to 4 decimals (None for a photo not read)
    top3: tuple  # ((class, probability), ...) likeliest first, to 0.1%; () for a photo not read
    error: str = ""
    sorted_as: str = ""  # with --sort-into: where the photo went, relative to DIR ("" nowhere)
    model: str = ""  # with --sort-into: the model that answered, by sorting.model_id ("" unknown)

    def columns(self):
        """The row as the CSV's columns, by name."""
        return {
            "path": self.path,
            "class": self.answer,
            "probability": "" if self.probability is None else f"{self.probability:.4f}",
            "top3": "; ".join(f"{name} {probability:.1%}" for name, probability in self.top3),
            "error": self.error,
            "sorted_as": self.sorted_as,
            "model": self.model,
        }


def result_row(result):
    """A result's row, its numbers rounded as the CSV keeps them (so that the row read back
    from the CSV is equal)."""
    top = [(answer["class"], answer["probability"]) for answer in result.get("top3", [])]
    return Row(
        result["image"],
        top[0][0] if top else "",
        round(top[0][1], 4) if top else None,
        tuple((name, round(probability * 100, 1) / 100) for name, probability in top),
        result.get("error", ""),
        result.get("sorted_as", ""),
        result.get("model", ""),
    )


def parse_row(header, fields):
    """The row of a CSV line's fields, or None where they are not a whole row (a line cut short
    by a stop, or edited): a class with its probability, or an error."""
    if len(fields) != len(header):
        return None
    columns = dict(zip(header, fields))
    answered = columns["class"] in CLASS_NAMES and is_probability(columns["probability"])
    if not ((answered and not columns["error"]) or (columns["class"] == "" and columns["error"])):
        return None
    try:
        top3 = tuple(shown_answer(shown) for shown in columns["top3"].split("; ") if shown)
    except ValueError:
        return None
    probability = float(columns["probability"]) if answered else None
    sorted_as, model = columns.get("sorted_as", ""), columns.get("model", "")
    return Row(
        columns["path"], columns["class"], probability, top3, columns["error"], sorted_as, model
    )


def shown_answer(shown):
    """("Ankle boot", 0.031) from the top3 column's "Ankle boot 3.1%"."""
    name, _, percent = shown.rpartition(" ")
    if not percent.endswith("%"):
        raise ValueError(shown)
    return name, float(percent[:-1]) / 100


def read_rows_done(path, paths, sorted_into=None):
    """The rows that an interrupted run left in the CSV at path, checked against the photos to
    classify now; (rows, bytes that hold them whole). A row cut off by the stop is left out.
    The CSV of a --sort-into folder also keeps the rows of earlier runs' photos, and of a photo
    classified again, the last row counts; one written before the model column (bytes None)
    is rewritten with it before rows are added."""

    def refuse(reason):
        if sorted_into:
            raise UserError(
                f"--sort-into {sorted_into}: {path} {reason}; sort into another folder, or give "
                "another --csv"
            )
        raise UserError(
            f"--resume: {path} {reason}; give another --csv, or leave out --resume to replace it"
        )

    header = SORTED_HEADER if sorted_into else CSV_HEADER

    if not path.exists():
        return [], 0  # stopped before its first row: nothing to skip
    if not path.is_file():  # a folder, or a device that never ends (/dev/zero)
        refuse("cannot be read as a CSV (not a file)")
    try:
        data = path.read_bytes()
    except OSError as error:
        refuse(f"cannot be read as a CSV ({error.strerror or error})")
    rows_end = data.rfind(b"\n") + 1  # a row cut off after its last newline is left out
    try:
        text = data[:rows_end].decode(errors=FILE_NAME_BYTES)
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        refuse(f"is damaged ({error})")
    earlier = bool(sorted_into) and lines[:1] == [EARLIER_SORTED_HEADER]
    if lines[:1] != [header] and not earlier:
        refuse("was not written by predict (its first line is not " + ",".join(header) + ")")
    header = EARLIER_SORTED_HEADER if earlier else header
    rows, wanted, seen = [], {str(p) for p in paths}, set()
    for number, fields in enumerate(lines[1:], start=2):
        row = parse_row(header, fields)
        if row is None:
            refuse(f"is damaged at line {number}")
        if row.path not in wanted and not sorted_into:
            refuse(f"lists {row.path}, which is not among the photos given: it is another run's")
        if row.path in seen and not sorted_into:
            refuse(f"lists {row.path} twice")
        seen.add(row.path)
        rows.append(row)
    if sorted_into:
        rows = list({row.path: row for row in rows}.values())
    return rows, None if earlier else rows_end


def is_probability(text):
    try:
        return 0 <= float(text) <= 1
    except ValueError:
        return False


def rewrite(path, header, rows):
    """The CSV at path replaced, whole, by these rows; returns its size in bytes."""
    with (
        atomic_path(path) as partial,
        partial.open("w", newline="", encoding="utf-8", errors=FILE_NAME_BYTES) as file,
    ):
        writer = csv.DictWriter(file, header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row.columns() for row in rows)
    return path.stat().st_size


def refuse_to_replace_other_files(path):
    """--csv replaces its file; refused if that file holds anything but predict's rows (a photo
    or the model, named by a slip of the shell: `--csv *.jpg`)."""
    header = ",".join(CSV_HEADER).encode()
    if not path.is_file():
        return  # nothing to lose (a folder is reported when the CSV is opened; /dev/null is fine)
    try:
        with path.open("rb") as file:
            first_line = file.readline(len(header) + 2).rstrip(b"\r\n")
    except OSError as error:
        raise UserError(f"--csv {path}: cannot be read ({error.strerror})") from None
    if first_line and first_line != header:
        raise UserError(
            f"--csv {path}: not a CSV written by predict, so it is left as it is; give another "
            "--csv, or remove that file first"
        )


def refuse_unwritable(path):
    """--csv refused in one line, before any work, where it cannot be written; nothing is
    changed (a device such as /dev/null, or a pipe, is tried once it is written)."""
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if path.is_file():
            os.close(os.open(path, os.O_WRONLY))  # opened, not emptied
        elif not path.exists():
            tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as error:
        raise UserError(f"--csv {path}: cannot write there ({error.strerror})") from None


@contextlib.contextmanager
def predictions_csv(path, resume_from=None, header=CSV_HEADER):
    """A function that writes rows to the CSV at path and flushes them. resume_from: bytes of
    an interrupted run's rows to keep (a row cut off after them is dropped); else the file is
    replaced."""
    try:
        if resume_from:
            file = path.open("r+", newline="", encoding="utf-8", errors=FILE_NAME_BYTES)
            file.truncate(resume_from)
            file.seek(resume_from)
        else:
            file = path.open("w", newline="", encoding="utf-8", errors=FILE_NAME_BYTES)
    except OSError as error:
        raise UserError(f"--csv {path}: cannot write there ({error.strerror})") from None
    writer = csv.DictWriter(file, header, extrasaction="ignore")

    def flushed(write, *rows):
        try:
            write(*rows)
            file.flush()
        except OSError as error:  # the disk is full, say: the rows written so far stay whole
            raise UserError(
                f"--csv {path}: cannot write there ({error.strerror}); once there is room, add "
                "--resume to classify the rest"
            ) from None

    try:
        if not resume_from:
            flushed(writer.writeheader)
        yield lambda rows: flushed(writer.writerows, (row.columns() for row in rows))
    finally:
        with contextlib.suppress(OSError):  # what could not be written has been reported
            file.close()


def per_second(done, seconds):
    """'145 a second', or '0.5 a second' for a few photos (TensorFlow's start dominates)."""
    rate = done / seconds if seconds > 0 else 0.0
    return f"{rate:,.{0 if rate >= 10 else 1}f} a second"


def progress_text(done, total, seconds):
    rate = done / seconds if seconds > 0 else 0.0
    left = (total - done) / rate if rate else 0.0
    clock = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
    when = f"{clock.removeprefix('0:')} left" if done < total else f"done in {seconds:.0f} s"
    return f"{done:,}/{total:,} photos, {per_second(done, seconds)}, {when}"


def show_progress(total, on_terminal, start):
    """A function to call with the photos done so far: on a terminal, a bar rewritten in place;
    elsewhere (a log), a line every PROGRESS_EVERY seconds and one at the end. On stderr, as
    stdout holds the results (which is why not Keras' Progbar)."""
    last = [start]

    def update(done):
        now = time.perf_counter()
        seconds = now - start
        if on_terminal:
            filled = round(30 * done / max(total, 1))
            bar = "=" * filled + " " * (30 - filled)
            end = "\n" if done == total else ""
            print(f"\r[{bar}] {progress_text(done, total, seconds)}", end=end, file=sys.stderr)
        elif now - last[0] >= PROGRESS_EVERY or (done == total and last[0] > start):
            last[0] = now  # (a run too short for a line does not get a last one either)
            print(progress_text(done, total, seconds), file=sys.stderr)
        sys.stderr.flush()

    return update
