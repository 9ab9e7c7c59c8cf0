"""`fashion_mnist_cnn.py predict`: classify photos and folders, a whole catalogue included.

Photos are prepared on every core in order, a few batches ahead (so memory stays flat, and
while TensorFlow loads), classified a batch at a time, and their rows written as they are done.
"""

import collections
import contextlib
import itertools
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fashion_mnist_cnn import (
    CLASS_NAMES,
    ArgumentParser,
    UserError,
    cpu_cores,
    share_of_one,
    start_tensorflow_quietly,
    stop_gracefully,
)
from fashion_shop import catalogue, photos, review_page, sorting
from fashion_shop.models import (
    Kind,
    check_model_file,
    class_probabilities,
    declared_kind,
    kind_of,
    load_trained_model,
)

PREDICT_BATCH = 64  # photos per model call and per flush of the CSV
PREPARE_CHUNK = 8  # photos per task sent to a preparing process: fewer, cheaper hand-overs
BATCHES_AHEAD = 16  # prepared or being prepared: at 784 bytes a photo, the window costs nothing


def is_url(location):
    """gs://..., s3://...: cloud storage, which only --runner reaches, through Beam's file
    systems (a Path never holds "://")."""
    return "://" in str(location)


def location(text):
    """A path on this machine, or a URL as given."""
    return text if is_url(text) else Path(text)


def parse_predict_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py predict",
        description="Classify your own pictures with a model.keras from a training or "
        "fine-tuning run. Product photos of any size and background, PNG or JPEG: each is "
        "brought to what the model was trained on, as Fashion-MNIST was made from Zalando's.",
    )
    parser.add_argument(
        "model",
        type=location,
        help="a model.keras written by a run (for real product photos, train it with --arch "
        "improved --augment: about 67%% of them right, against the default run's 57%%; a "
        "model from finetune --backbone mobilenet_v2 on 10 / 40 labelled photos a class: 81%% "
        "/ 89%%)",
    )
    parser.add_argument(
        "paths",
        type=location,
        nargs="+",
        metavar="path",
        help="PNG or JPEG files, and folders: every PNG and JPEG under them, in sorted order; "
        'with --runner, also quoted patterns ("photos/*/*.jpg": their PNGs and JPEGs) and gs:// '
        "or s3:// files, folders (ending in /) and patterns",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--csv",
        type=location,
        metavar="FILE",
        help="write one row per image to FILE as they are done (replacing FILE if predict "
        "wrote it; any other file is left alone), and print a summary instead of a line per image",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the --csv FILE of a stopped run: images already in it are skipped",
    )
    sort = parser.add_argument_group("sorting a catalogue into class folders")
    sort.add_argument(
        "--sort-into",
        type=Path,
        metavar="DIR",
        help="put a copy of every photo into DIR/<class>/ (a copy-on-write clone where the "
        f"file system has them), into DIR/<class>/{sorting.UNSURE}/ where the model is unsure, "
        f"with DIR/{sorting.CSV_NAME} (unless --csv) and a review page, DIR/{sorting.PAGE_NAME}; "
        "run again to add photos or refresh the page after moving photos to correct them "
        "(photos sorted already are skipped, and what a person moved or put there is never "
        "touched)",
    )
    sort.add_argument(
        "--unsure",
        type=share_of_one,
        metavar="P",
        help="with --sort-into: mark photos whose top probability is under P. Default, for a "
        f"model whose probabilities are calibrated (finetune --backbone's): {sorting.UNSURE_BELOW}"
        ", about a quarter of real shop photos, holding four fifths of the mistakes. A model "
        "that is not calibrated (a 28x28 one, sure of many of its mistakes) marks none unless "
        "P is given: every photo goes to its class folder, the page shows each class least sure "
        "first and promises no share right",
    )
    sort.add_argument(
        "--link",
        action="store_true",
        help="with --sort-into: put hard links to the photos there (symbolic links where the "
        "disk has none) instead of copies: no room taken, but editing a sorted photo then edits "
        "the original",
    )
    sort.add_argument(
        "--reclassify",
        action="store_true",
        help="with --sort-into: classify the photos sorted already again, moving those still "
        "where predict put them (never those a person moved)",
    )
    beam = parser.add_argument_group("a catalogue past one machine: Apache Beam")
    beam.add_argument(
        "--runner",
        metavar="RUNNER",
        help="classify as an Apache Beam pipeline (pip install -r requirements-beam.txt), the "
        "same rows as without it: DirectRunner here, writing --csv FILE whole; DataflowRunner, "
        "FlinkRunner or SparkRunner on a cluster, writing shards (rows-00000-of-000NN.csv for "
        "--csv rows.csv). Beam's own options follow predict's (--project=..., --temp_location=...)",
    )
    args, args.beam_options = parser.parse_known_args(argv)
    with_runner = args.runner is not None
    if with_runner and not args.runner.strip():
        parser.error("--runner needs the name of one of Beam's runners (DirectRunner here)")
    if args.beam_options and not with_runner:
        parser.error(f"unrecognized arguments: {' '.join(args.beam_options)}")
    if with_runner and not args.csv:
        parser.error("--runner writes its rows to --csv FILE: give the FILE")
    if with_runner and (args.json or args.resume or args.sort_into):
        parser.error("--json, --resume and --sort-into work on this machine: leave out --runner")
    if args.resume and not (args.csv or args.sort_into):
        parser.error("--resume continues a --csv FILE: give the FILE")
    if (args.unsure is not None or args.reclassify or args.link) and not args.sort_into:
        parser.error("--unsure, --reclassify and --link sort into a folder: give --sort-into DIR")
    return args


@contextlib.contextmanager
def preparing(paths, kind, thumbnails=None):
    """Start preparing the photos for a model of that kind on every core now (before TensorFlow
    loads, so the two overlap); gives a generator of (path, image, error) in the order given.
    With thumbnails, a folder, each photo's thumbnail is written there too. Processes, not
    threads: TensorFlow's import holds the GIL meanwhile."""
    chunks = (paths[i : i + PREPARE_CHUNK] for i in range(0, len(paths), PREPARE_CHUNK))
    # forkserver: workers forked from a clean process, never from one running TensorFlow, with
    # the preparation already imported.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["__main__", photos.__name__])
    workers = max(1, min(cpu_cores(), math.ceil(len(paths) / PREPARE_CHUNK)))
    pool = ProcessPoolExecutor(workers, context, photos.leave_signals_to_the_main_process)
    ahead = (BATCHES_AHEAD + 1) * PREDICT_BATCH // PREPARE_CHUNK
    pending = collections.deque()

    def submit_next():
        for chunk in itertools.islice(chunks, 1):
            task = pool.submit(photos.prepare_chunk, chunk, kind.photos, thumbnails)
            pending.append((chunk, task))

    def in_order():
        try:
            while pending:
                chunk, future = pending.popleft()
                submit_next()
                for path, (image, error) in zip(chunk, future.result()):
                    yield path, image, error
        except BrokenProcessPool:
            raise UserError(
                "a process preparing the photos was killed (out of memory?): run again; with "
                "--csv, add --resume to keep the rows done"
            ) from None

    try:
        for _ in range(ahead):
            submit_next()
        yield in_order()
    finally:
        # Always, and waiting here rather than at exit: a pool still closing down while Python
        # exits races it (a "Bad file descriptor" traceback after the run's last line).
        pool.shutdown(wait=True, cancel_futures=True)


def top_three(probabilities):
    top = np.argsort(probabilities)[::-1][:3]
    return [{"class": CLASS_NAMES[i], "probability": float(probabilities[i])} for i in top]


def batch_probabilities(model, images):
    """The class probabilities of prepared photos, asked of the model PREDICT_BATCH at a time,
    a batch cut short filled up with blank images: TensorFlow's kernels round differently at
    other batch sizes, so this way a photo gets the same answer in whatever batch it comes
    (predict's, after --resume, or RunInference's on Beam)."""
    images = np.stack(images)
    answers = []
    for start in range(0, len(images), PREDICT_BATCH):
        batch = images[start : start + PREDICT_BATCH]
        filled = np.zeros((PREDICT_BATCH, *batch.shape[1:]), batch.dtype)
        filled[: len(batch)] = batch
        answers.append(class_probabilities(model, filled)[: len(batch)])
    return np.concatenate(answers)


def classify_batches(model, prepared):
    """(path, image, error) -> lists of results, a batch at a time: {"image", "top3"} for each
    photo, {"image", "error"} for each that could not be read."""
    while batch := list(itertools.islice(prepared, PREDICT_BATCH)):
        images = [image for _, image, error in batch if error is None]
        probabilities = iter(batch_probabilities(model, images) if images else [])
        yield [
            {"image": str(path), "error": error}
            if error
            else {"image": str(path), "top3": top_three(next(probabilities))}
            for path, _, error in batch
        ]


def predict_images(model, paths):
    """Top three classes per image; unreadable images are reported in place of a result."""
    with preparing(paths, kind_of(model)) as prepared:
        return [result for batch in classify_batches(model, prepared) for result in batch]


def print_result(result, each_line):
    """An error on stderr (returns 1), or the top three on stdout if each_line (returns 0)."""
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
        return 1
    if each_line:
        top = ", ".join(f"{c['class']} {c['probability']:.1%}" for c in result["top3"])
        print(f"{result['image']}: {top}", flush=True)
    return 0


class Catalogue(NamedTuple):
    """Where predict's answers go and what is done already: read once, before any work."""

    csv: Path | None  # --csv FILE, or DIR's CSV with --sort-into
    sort_into: Path | None
    unsure_below: float | None  # with --sort-into: photos under it are marked (None: none are)
    json: bool  # the results printed as JSON at the end
    rows: list  # the rows done: a stopped run's (--resume), or a sorted folder's, each photo's last
    rows_bytes: int | None  # the CSV's bytes that hold them, kept (0: new; None: to rewrite)
    again: set  # the photos sorted already that are classified once more (--reclassify)
    link: bool = False  # --link: photos linked into DIR rather than copied
    model: str = ""  # with --sort-into: the model's id in DIR's record (sorting.record_model)

    @property
    def each_line(self):
        """A line per photo on stdout, as without a CSV or JSON."""
        return not (self.json or self.csv)


class Outcome(NamedTuple):
    """What classify_catalogue did."""

    results: list  # kept for --json only
    done: int  # photos classified, those that could not be read included
    errors: int  # photos that could not be read
    stop_signal: int | None  # the signal that stopped the run, if one did
    rows: list  # the rows written, kept with --sort-into for the review page


def read_catalogue(args, paths):
    """The Catalogue of this run, its --csv and --sort-into checked: one that cannot be
    written or continued is refused here, before the photos are prepared or TensorFlow loads."""
    rows, rows_bytes, again = [], 0, set()
    csv_path = args.csv
    if args.sort_into:
        sorting.open_folder(args.sort_into)
        csv_path = args.csv or args.sort_into / sorting.CSV_NAME
        rows, rows_bytes = catalogue.read_rows_done(csv_path, paths, sorted_into=args.sort_into)
        given = {str(path) for path in paths}
        # Classified again, a photo gets a new row after its old one: the last one counts.
        again = {row.path for row in rows if row.path in given} if args.reclassify else set()
    elif args.csv and args.resume:
        rows, rows_bytes = catalogue.read_rows_done(args.csv, paths)
    elif args.csv:
        catalogue.refuse_to_replace_other_files(args.csv)
    if csv_path:
        catalogue.refuse_unwritable(csv_path)
    return Catalogue(
        csv_path, args.sort_into, args.unsure, args.json, rows, rows_bytes, again, args.link
    )


def sorting_model(state, path, calibrated):
    """With --sort-into, the model recorded in DIR, and --unsure's default for it: marks only
    where its probabilities are calibrated."""
    if not state.sort_into:
        return state
    unsure_below = state.unsure_below
    if unsure_below is None and calibrated:
        unsure_below = sorting.UNSURE_BELOW
    ident = sorting.record_model(state.sort_into, path, calibrated)
    return state._replace(unsure_below=unsure_below, model=ident)


def classify_catalogue(model, prepared, state, progress):
    """Classify the prepared photos a batch at a time, writing each batch's rows to the CSV and
    printing its lines as it is done, until the last batch or a stop signal (which lets the
    batch under way finish); with --sort-into, each photo is put in its class folder before its
    row is written."""
    results, rows, done, errors = [], [], 0, 0
    sorter = None
    if state.sort_into:
        sorter = sorting.Sorter(
            state.sort_into, state.unsure_below, state.rows, state.again, state.link
        )
    write = contextlib.nullcontext()
    if state.csv:
        header = catalogue.SORTED_HEADER if sorter else catalogue.CSV_HEADER
        rows_bytes = state.rows_bytes
        if rows_bytes is None:  # a sorted folder's CSV from before the model column
            rows_bytes = catalogue.rewrite(state.csv, header, state.rows)
        write = catalogue.predictions_csv(state.csv, rows_bytes, header)
    stopping = stop_gracefully(then="finishing this batch, then stopping", file=sys.stderr)
    with write as write_rows, stopping as stop:
        for batch in classify_batches(model, prepared):
            for result in batch if sorter else []:
                result["sorted_as"] = sorter.place(result)
                result["model"] = state.model
            batch_rows = [catalogue.result_row(result) for result in batch]
            if write_rows:
                write_rows(batch_rows)
            errors += sum(print_result(result, state.each_line) for result in batch)
            results += batch if state.json else []
            rows += batch_rows if sorter else []
            done += len(batch)
            if progress:
                progress(done)
            if stop["signal"]:
                break
    return Outcome(results, done, errors, stop["signal"], rows)


def photos_count(n):
    return f"{n:,} photo{'s' * (n != 1)}"


def finish_sorting(state, outcome, model_path):
    """The review page written from every row, the sorted folder's and this run's, and the
    folder as it is now, and the summary: the photos seen (classified now, there before, and
    outside the class folders, each such folder listed), what to check and how right it is
    expected to be; after --reclassify, the CSV rewritten with each photo's last row only."""
    rows = list({row.path: row for row in [*state.rows, *outcome.rows]}.values())
    if state.again and outcome.stop_signal is None:
        catalogue.rewrite(state.csv, catalogue.SORTED_HEADER, rows)
    models = sorting.read_models(state.sort_into)
    view = review_page.overview(state.sort_into, rows, models)
    review_page.write_page(state.sort_into, view, state.unsure_below)
    out = sys.stderr if state.json else sys.stdout  # stdout holds the JSON alone
    for where, away in view.outside.items():
        line = sorting.outside_line(state.sort_into, where, [rel for rel, _ in away])
        print(f"note: {line}", file=out)
    others = [row for _, _, row in view.photos if row and row.model != state.model]
    unrecorded = [row for row in others if not row.model]  # sorted before models were recorded
    if unrecorded:
        print(
            f"note: {photos_count(len(unrecorded))} in {state.sort_into}/ "
            f"{'was' if len(unrecorded) == 1 else 'were'} sorted by an earlier version that did "
            f"not record its model; if that was not {model_path}, give their photos with "
            "--reclassify to classify them again with it",
            file=out,
        )
    others = [row for row in others if row.model]
    if others:
        record = models.get(others[0].model, {})
        which = record.get("path", "a model not recorded")  # .models.json lost or damaged
        which += ", and others" * (len({row.model for row in others}) > 1)
        print(
            f"note: {photos_count(len(others))} in {state.sort_into}/ "
            f"{'was' if len(others) == 1 else 'were'} sorted by another model ({which}), not "
            f"{model_path}, and keep its answers; to classify them again with it, give their "
            "photos with --reclassify",
            file=out,
        )
    now = {Path(row.sorted_as) for row in outcome.rows if row.sorted_as}
    placed = sum(rel in now for _, rel, _ in view.photos)
    before, away = len(view.photos) - placed, view.total - len(view.photos)
    counts = (
        f"{photos_count(view.total)}: {placed:,} classified now, {before:,} there before, "
        f"{away:,} outside the class folders"
    )
    page = state.sort_into / sorting.PAGE_NAME
    if view.not_calibrated:
        marked = "none marked to check"
        if view.to_check:
            asked = f", under --unsure {state.unsure_below}" * (state.unsure_below is not None)
            marked = f"{view.to_check:,} in the {sorting.UNSURE} folders{asked}"
        told = f"{marked}: {review_page.not_calibrated_line(view.not_calibrated)}"
    else:
        told = f"{view.to_check:,} to check (in the {sorting.UNSURE} folders)"
        if view.expected:
            as_sorted, checked = view.expected
            told += f", expected {as_sorted:.0%} right as sorted and {checked:.0%} once checked"
    print(f"Sorted into {state.sort_into}/: {counts}; {told}; review page {page}", file=out)


def on_beam(args):
    """--runner: the pipeline of fashion_shop/beam.py, where Apache Beam is installed."""
    try:
        from fashion_shop import beam
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("apache_beam"):
            raise
        raise UserError(
            "--runner needs Apache Beam, which is not installed: pip install -r "
            "requirements-beam.txt"
        ) from None
    return beam.main(args)


def main(argv):
    """model and outputs checked -> photos prepared on every core while TensorFlow loads ->
    classified a batch at a time -> rows written (and photos sorted) and progress shown as they
    are done -> a summary."""
    args = parse_predict_args(argv)
    if args.runner is not None:
        return on_beam(args)
    start = time.perf_counter()
    for given in [args.model, *args.paths, args.csv]:
        if is_url(given):
            raise UserError(
                f"{given}: predict reads and writes this machine's files; add --runner to "
                "reach cloud storage through Apache Beam"
            )
    check_model_file(args.model, args.paths)
    paths = photos.find_images(args.paths)
    if args.sort_into:  # a catalogue's photos by their full paths, never the catalogue's own
        inside = args.sort_into.absolute()
        paths = [path.absolute() for path in paths]
        paths = [path for path in paths if not path.is_relative_to(inside)]
    state = read_catalogue(args, paths)
    if sys.stdout is None and (state.json or state.each_line):  # started with stdout closed
        raise UserError("stdout is closed, where predict prints its answers; give --csv FILE")
    done_before = {row.path for row in state.rows} - state.again
    todo = [path for path in paths if str(path) not in done_before]
    on_terminal = sys.stderr.isatty()
    quiet = state.each_line and on_terminal and sys.stdout.isatty()  # the lines show progress
    declared = declared_kind(args.model) or Kind("fashion-mnist", mirrored=False)
    thumbnails = args.sort_into / sorting.THUMBNAILS if args.sort_into else None
    with preparing(todo, declared, thumbnails) as prepared:
        start_tensorflow_quietly()
        model = load_trained_model(args.model)
        if kind_of(model).photos != declared.photos:
            raise UserError(f"{args.model}: its config and its model disagree on the input")
        state = sorting_model(state, args.model.absolute(), kind_of(model).calibrated)
        progress = None
        if todo and not quiet:
            progress = catalogue.show_progress(len(todo), on_terminal, start)
        outcome = classify_catalogue(model, prepared, state, progress)
    seconds = time.perf_counter() - start
    done, errors = outcome.done, outcome.errors
    if state.json:
        print(json.dumps(outcome.results, indent=2))
    elif state.csv:
        kept = len(state.rows) - len(state.again)  # a photo classified again is counted once
        before = f"; {kept:,} {'was' if kept == 1 else 'were'} in it already" if kept else ""
        print(
            f"Classified {done - errors:,} of {done:,} photos in {seconds:.1f} s "
            f"({catalogue.per_second(done, seconds)}), {errors:,} could not be read; "
            f"rows in {state.csv}{before}"
        )
    if state.sort_into:
        finish_sorting(state, outcome, args.model)
    if outcome.stop_signal:
        line = f"Stopped after {done:,} of {len(todo):,} photos"
        if state.sort_into:
            line += ": the photos so far are sorted; the same command sorts the rest"
        elif state.csv:
            line += f": rows so far are in {state.csv}; add --resume to classify the rest"
        print(f"{line}.", file=sys.stderr)
        return 128 + outcome.stop_signal
    given = {str(path) for path in paths}
    return 1 if errors or any(row.error for row in state.rows if row.path in given) else 0
