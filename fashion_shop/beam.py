"""`predict MODEL PATH... --csv FILE --runner RUNNER [Beam's options]`: predict as an Apache Beam
pipeline, for a catalogue past one machine (Dataflow, Flink, Spark), with predict's rows:

    the PATHs -> each photo once, at its first place (a shuffle, which also spreads the photos
    over a cluster's workers) -> prepared by predict's own code (photos.prepare_photo) ->
    RunInference, batched, over the model file (PhotoModelHandler) -> predict's rows -> one CSV
    in predict's order, written whole (a runner on this machine), or CSV shards (a cluster's)
"""

import contextlib
import csv
import io
import logging
import shutil
import tempfile
import time
from pathlib import Path


def beam_about_itself(record):
    """Beam's warnings on its root logger say what it cannot do for itself, not for predict:
    its import says it has no BigQuery clients, and each batch that it cannot measure its
    memory (it looks for PyTorch first: Beam 2.78)."""
    return "apache_beam" not in record.pathname or record.levelno >= logging.ERROR


logging.getLogger().addFilter(beam_about_itself)  # before Beam's import, which warns

import apache_beam as beam  # noqa: E402
from apache_beam.io.aws import s3io  # noqa: E402
from apache_beam.io.filesystem import CompressionTypes  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.io.gcp import gcsio  # noqa: E402
from apache_beam.metrics import Metrics, MetricsFilter  # noqa: E402
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions  # noqa: E402
from apache_beam.runners.runner import create_runner  # noqa: E402

from fashion_mnist_cnn import (  # noqa: E402
    UserError,
    choose_onednn,
    cpu_info,
    first_sentence,
    start_tensorflow_quietly,
)
from fashion_shop import catalogue, photos  # noqa: E402
from fashion_shop.models import check_model_file, kind_of, load_trained_model  # noqa: E402
from fashion_shop.predict import PREDICT_BATCH, batch_probabilities, is_url, top_three  # noqa: E402

COUNTERS = "fashion_shop"  # the namespace of the photos counted on the workers
GLOB = "*?["  # a PATH with one of these is a pattern of Beam's file systems


# ----------------------------------------------------------------------------------------------
# The photos a PATH names, and a model file, wherever they are


def matched(given):
    """A PATH that Beam's file systems match: a URL, or a pattern on this machine (quoted, as
    "photos/*/*.jpg") that is no file's name as it is."""
    return is_url(given) or (any(c in str(given) for c in GLOB) and not Path(given).exists())


def wanted(pattern):
    """A PATH as Beam's file systems match it: a folder URL (ending in /) as everything under it."""
    pattern = str(pattern)
    return pattern + "**" if pattern.endswith("/") else pattern


def photos_named(given):
    """The photos a PATH names, in predict's order: a path on this machine as predict takes it
    (a folder: every PNG and JPEG under it, sorted); a URL or a pattern by Beam's file systems
    (a folder or a pattern: its PNGs and JPEGs, sorted; a file: itself)."""
    if not matched(given):
        return [str(path) for path in photos.find_images([given])]
    given = str(given)
    found = sorted(match.path for match in FileSystems.match([wanted(given)])[0].metadata_list)
    if wanted(given) == given and not any(c in given for c in GLOB):
        return found
    return [path for path in found if path.lower().endswith(photos.IMAGE_SUFFIXES)]


def refuse_matching_nothing(given):
    """One line, before the pipeline starts, for a PATH that names no photo."""
    if matched(given):
        try:
            found = FileSystems.match([wanted(given)], limits=[1])[0].metadata_list
        except (OSError, ValueError) as error:  # no file system for its scheme, no access
            raise UserError(f"{given}: cannot be listed ({first_sentence(error)})") from None
        if not found:
            raise UserError(f"{given}: matches no file")
    elif not given.exists():
        raise UserError(f"{given}: no such photo or folder")
    elif given.is_dir() and next(photos.images_under(given), None) is None:
        raise UserError(f"{given}: a folder with no PNG or JPEG images in it")


def file_here(location, folder):
    """A file on this machine: a path as it is, a URL copied into folder first."""
    if not is_url(location):
        return location
    copy = Path(folder) / location.rpartition("/")[2]
    with (
        FileSystems.open(location, compression_type=CompressionTypes.UNCOMPRESSED) as source,
        open(copy, "wb") as target,
    ):
        shutil.copyfileobj(source, target)
    return copy


def checked_model(location):
    """The model's kind, from the model loaded here as predict loads it: a missing or damaged
    model is one line before any worker starts."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = file_here(location, folder)
        except OSError as error:
            raise UserError(f"{location}: cannot be read ({first_sentence(error)})") from None
        check_model_file(path)
        start_tensorflow_quietly()
        return kind_of(load_trained_model(path))


# ----------------------------------------------------------------------------------------------
# The pipeline's steps


def numbered_photos(numbered):
    """(photo, its place) for each photo of the PATH numbered so: (the PATH's number, the
    photo's among its photos), which orders the rows as predict does."""
    number, given = numbered
    for rank, photo in enumerate(photos_named(given)):
        yield photo, (number, rank)


def prepare(photo_at_place, preparation):
    """A photo prepared by predict's code as `preparation` names: ((photo, place), image), or
    the row of a photo that cannot be read, on the output "unreadable"."""
    photo, place = photo_at_place
    Metrics.counter(COUNTERS, "photos").inc()
    if not is_url(photo):
        _, image, error = photos.prepare_photo(Path(photo), preparation)
    else:
        try:
            with FileSystems.open(photo, compression_type=CompressionTypes.UNCOMPRESSED) as file:
                source = io.BytesIO(file.read())
            _, image, error = photos.prepare_photo(photo, preparation, source=source)
        except OSError as failure:  # Beam's BeamIOError included
            image, error = None, f"{photo}: cannot be read ({first_sentence(failure)})"
    if error:
        Metrics.counter(COUNTERS, "unreadable").inc()
        yield beam.pvalue.TaggedOutput("unreadable", (place, row_of(photo, error=error)))
    else:
        yield (photo, place), image


class PhotoModelHandler(ModelHandler):
    """A model file of ours for RunInference: loaded on each worker as predict loads it (its
    kind checked, float32 where bf16 is not native), answering a batch of prepared photos as
    predict does (a mirrored model: each photo and its mirror image, averaged; a batch asked
    as PREDICT_BATCH photos). Beam's own TFModelHandlerNumpy cannot: it imports tensorflow_hub
    (which brings Keras 2) and calls the model as it is."""

    def __init__(self, location):
        # Whole batches: each is asked of the model as PREDICT_BATCH photos whatever its size.
        super().__init__(min_batch_size=PREDICT_BATCH, max_batch_size=PREDICT_BATCH)
        self.location = location

    def load_model(self):
        choose_onednn(cpu_info()[1])  # as predict's process does, for the same numbers
        start_tensorflow_quietly()
        with tempfile.TemporaryDirectory() as folder:
            return load_trained_model(file_here(self.location, folder))

    def run_inference(self, batch, model, inference_args=None):
        return batch_probabilities(model, batch)

    def get_num_bytes(self, batch):
        return sum(image.nbytes for image in batch)  # Beam's default pickles the batch

    def get_metrics_namespace(self):
        return COUNTERS


def row_of(photo, probabilities=None, error=""):
    """predict's row of a photo: its answer, or why it could not be read."""
    if error:
        return catalogue.result_row({"image": photo, "error": error})
    return catalogue.result_row({"image": photo, "top3": top_three(probabilities)})


def answered_row(answer):
    (photo, place), probabilities = answer
    return place, row_of(photo, probabilities)


def csv_text(row=None):
    """A row as predict's CSV writes it (its header, without a row), line end included."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, catalogue.CSV_HEADER, extrasaction="ignore")
    writer.writerow(row.columns()) if row else writer.writeheader()
    return text.getvalue()


def write_in_order(rows, csv_path):
    """The rows in predict's order, written to csv_path whole: a temporary file renamed onto
    it, so that a failure never leaves half a CSV."""
    ordered = [row for _, row in sorted(rows, key=lambda placed: placed[0])]
    catalogue.rewrite(Path(csv_path), catalogue.CSV_HEADER, ordered)


def shards(csv_path):
    """A cluster's CSV: FILE's name with -00000-of-000NN before its suffix, one shard a worker's
    share, each with predict's header."""
    stem, dot, suffix = str(csv_path).rpartition(".")
    if "/" in suffix or not dot:
        stem, suffix = str(csv_path), ""
    return beam.io.WriteToText(
        stem,
        file_name_suffix=f".{suffix}" if suffix else "",
        header=csv_text(),
        append_trailing_newlines=False,
    )


def build(pipeline, given, model, preparation, csv_path, one_file):
    """The pipeline: PATHs -> each photo once -> prepared -> RunInference -> predict's rows."""
    prepared = (
        pipeline
        | "the PATHs" >> beam.Create(list(enumerate(given)))
        | "their photos" >> beam.FlatMap(numbered_photos)
        | "each photo once" >> beam.CombinePerKey(min)
        | "prepared" >> beam.FlatMap(prepare, preparation).with_outputs("unreadable", main="ok")
    )
    answered = (
        prepared.ok
        | "classified" >> RunInference(KeyedModelHandler(PhotoModelHandler(model)))
        | "answered" >> beam.Map(answered_row)
    )
    rows = (answered, prepared.unreadable) | "every row" >> beam.Flatten()
    if one_file:
        _ = (
            rows
            | "all rows" >> beam.combiners.ToList()
            | "one CSV" >> beam.Map(write_in_order, str(csv_path))
        )
    else:
        _ = rows | "as CSV" >> beam.Map(lambda placed: csv_text(placed[1])) | shards(csv_path)


# ----------------------------------------------------------------------------------------------
# The run


def runner_named(name):
    """Beam's runner of that name, or one line."""
    try:
        return create_runner(name)
    except ValueError:
        known = ", ".join(StandardOptions.KNOWN_RUNNER_NAMES)
        raise UserError(f"--runner {name}: not one of Beam's runners ({known})") from None
    except ImportError as error:  # DataflowRunner without apache-beam[gcp]
        raise UserError(f"--runner {name}: {first_sentence(error)}") from None


def pipeline_options(options):
    """Beam's options from the arguments predict does not know; one it does not know either is
    refused, where Beam would drop it with a warning (a misspelt --num_workers), and a value
    its parser refuses is its own line, without its parser's 130 lines of usage."""
    parsed = PipelineOptions(options)
    said = io.StringIO()
    logging.disable(logging.WARNING)  # Beam's own warning that it drops them: said below
    try:
        with contextlib.redirect_stderr(said):
            known = parsed.get_all_options()
    except SystemExit:  # argparse's usage, then "-: error: argument --name: what is wrong"
        raise UserError(said.getvalue().strip().splitlines()[-1].partition("error: ")[2]) from None
    finally:
        logging.disable(logging.NOTSET)
    unknown = parsed.get_all_options(retain_unknown_options=True).keys() - known.keys()
    if unknown:
        raise UserError(f"--{sorted(unknown)[0]}: an option of neither predict nor Beam")
    return parsed


def refuse_here_paths(args, one_file):
    """A cluster's workers cannot read this machine's files: the PATHs, the model and the CSV
    must be URLs (gs://, s3://). A runner here writes its one CSV here, renamed into place
    whole."""
    here = [given for given in [args.model, *args.paths, args.csv] if not is_url(given)]
    if here and not one_file:
        raise UserError(
            f"{here[0]}: a path on this machine, which {args.runner}'s workers cannot read; "
            "give cloud storage (gs://..., s3://...)"
        )
    if one_file and is_url(args.csv):
        raise UserError(
            f"--csv {args.csv}: {args.runner} writes its CSV on this machine; give a path here "
            "(a cluster's runner writes shards to cloud storage)"
        )


def refuse_missing_file_systems(locations):
    """One line for cloud storage whose client comes with Beam's extras: without them Beam
    says so only as it reads, in a 40-line traceback."""
    extras = {"gs": not gcsio.GCS_INSTALLED and "gcp", "s3": not s3io.BOTO3_INSTALLED and "aws"}
    for location in filter(is_url, locations):
        scheme = location.partition("://")[0]
        if extras.get(scheme):
            raise UserError(
                f"{location}: Beam reads {scheme}:// with its extras: "
                f"pip install 'apache-beam[{extras[scheme]}]'"
            )


def count(result, name):
    """A counter of the photos, added up over the workers."""
    counters = result.metrics().query(MetricsFilter().with_namespace(COUNTERS).with_name(name))
    return sum(counter.committed or 0 for counter in counters["counters"])


def run_to_the_end(pipeline, runner_name):
    """The pipeline's result once it is done; a failure (a worker's, as the runner reports it)
    is one line, which Beam's log would precede with the failure's traceback."""
    beam_log = logging.getLogger("apache_beam")
    level = beam_log.level
    beam_log.setLevel(logging.CRITICAL)
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except Exception as error:
        raise UserError(f"the pipeline failed on {runner_name}: {first_sentence(error)}") from None
    finally:
        beam_log.setLevel(level)
    return result


def main(args):
    """runner, options, PATHs, model and CSV checked -> the pipeline run -> a summary."""
    start = time.perf_counter()
    runner = runner_named(args.runner)
    options = pipeline_options(args.beam_options)
    FileSystems.set_options(options)  # S3's file system reads its settings there
    one_file = type(runner).__name__ in StandardOptions.LOCAL_RUNNERS
    refuse_here_paths(args, one_file)
    refuse_missing_file_systems([args.model, *args.paths, args.csv])
    for given in args.paths:
        refuse_matching_nothing(given)
    if not is_url(args.csv):
        catalogue.refuse_to_replace_other_files(args.csv)
        catalogue.refuse_unwritable(args.csv)
    preparation = checked_model(args.model).photos
    pipeline = beam.Pipeline(runner=runner, options=options)
    build(pipeline, args.paths, args.model, preparation, args.csv, one_file)
    result = run_to_the_end(pipeline, args.runner)
    seconds = time.perf_counter() - start
    done, errors = count(result, "photos"), count(result, "unreadable")
    where = args.csv if one_file else f"{args.csv} (shards)"
    print(
        f"Classified {done - errors:,} of {done:,} photos in {seconds:.1f} s "
        f"({catalogue.per_second(done, seconds)}) on {args.runner}, {errors:,} could not be read; "
        f"rows in {where}"
    )
    return 1 if errors else 0
