"""`fashion_mnist_cnn.py finetune`: adapt a trained model to a shop's own labelled photos, or
with --backbone train a new last layer on an ImageNet network for them, and list the photos
that are probably in the wrong folder (doubtful.csv)."""

import functools
from pathlib import Path

import numpy as np

from fashion_mnist_cnn import (
    BATCH_SIZE,
    CLASS_NAMES,
    SEED,
    ArgumentParser,
    HelpFormatter,
    UserError,
    add_run_folder_options,
    batches,
    check_out_dir,
    compile_model,
    confusion_matrix,
    file_sha256,
    fingerprint,
    finish_run,
    open_run,
    per_class_accuracy,
    positive_int,
    save_figure,
    seed_value,
    share_of_one,
    share_or_zero,
    start_tensorflow_quietly,
    train_run,
    use_windows,
)
from fashion_shop import sorting
from fashion_shop.backbone import (
    BACKBONES,
    MIN_CALIBRATED,
    best_temperature,
    build_transfer_model,
    calibrate,
    feature_batches,
    out_of_fold_logits,
    photo_features,
)
from fashion_shop.catalogue import read_rows_done
from fashion_shop.doubts import DOUBTFUL_NAME, write_doubtful
from fashion_shop.folders import each_class_shuffled, find_labelled_photos, prepare_photos
from fashion_shop.models import (
    CALIBRATED,
    TUNED_NAME,
    check_model_file,
    class_probabilities,
    declared_kind,
    is_model_file,
    kind_of,
    load_trained_model,
)
from fashion_shop.predict import PREDICT_BATCH
from fashion_shop.report import plot_confusion_matrix

# Chosen on real shop photos, each photo mirrored at random as shops show shoes pointing either
# way (benchmarks/README.md).
FINETUNE_EPOCHS = 120
FINETUNE_LEARNING_RATE = 0.001  # with --backbone too
FINETUNE_HOLDOUT = 0.2  # share of each class's photos kept back to measure on
BACKBONE_EPOCHS = 100  # the new layer alone learns fast: 100 epochs of 400 photos take seconds


def parse_finetune_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py finetune",
        description="Adapt a trained model to your own labelled photos, or with --backbone "
        "train one for them on a network pre-trained on ImageNet (better on real photos). "
        "FOLDER holds one subfolder per class, named after it (case, spaces, punctuation and "
        "plurals ignored: t-shirt_top or Tops, Ankle boots); classes without photos may be left "
        "out.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "model", type=Path, nargs="?", help="a model.keras written by a run (not with --backbone)"
    )
    parser.add_argument("folder", type=Path, help="the labelled photos, a subfolder per class")
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        help="instead of MODEL, Keras' ImageNet network of that name sees the colour photos "
        "and a new last layer is trained (weights downloaded once into the Keras cache); the "
        "run folder's doubtful.csv lists the photos whose folder it doubts, for review --queue",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        help=f"epochs (default: {FINETUNE_EPOCHS}, or {BACKBONE_EPOCHS} with --backbone)",
    )
    parser.add_argument(
        "--learning-rate", type=share_of_one, default=FINETUNE_LEARNING_RATE, help="Adam's rate"
    )
    parser.add_argument(
        "--holdout",
        type=share_or_zero,
        default=FINETUNE_HOLDOUT,
        help="share of each class's photos held out to measure before and after (0: tune on "
        "all of them, measure nothing)",
    )
    parser.add_argument(
        "--include-unsure",
        action="store_true",
        help="tune on the photos in the class folders' unsure/ subfolders too: a sorted "
        "catalogue's unchecked guesses, left out by default (never held out)",
    )
    parser.add_argument("--seed", type=seed_value, default=SEED, help="random seed")
    add_run_folder_options(parser, "the new model and metrics", "-finetune")
    args = parser.parse_args(argv)
    if args.backbone and args.model:
        parser.error("--backbone trains a new model on the photos: leave out MODEL")
    if not args.backbone and not args.model:
        parser.error("give the MODEL to adapt and the FOLDER of photos, or --backbone NAME FOLDER")
    if args.epochs is None:
        args.epochs = BACKBONE_EPOCHS if args.backbone else FINETUNE_EPOCHS
    return args


def hold_out_photos(labels, holdout, seed, tune_only=None):
    """Indices to fine-tune on and to measure on: each class's share held out, fixed by the
    seed, at least one photo of each class on each side (none held out with holdout 0). Per
    class, unlike training's split_validation: a shop's classes may have a few photos each.
    tune_only marks photos never held out (unchecked guesses: no measure of the model)."""
    everything = np.arange(len(labels))
    if holdout == 0:
        return everything, np.array([], int)
    tune_only = np.zeros(len(labels), bool) if tune_only is None else tune_only
    checked = everything[~tune_only]
    tune, held_out = everything[tune_only].tolist(), []
    for label, members in each_class_shuffled(labels[checked], seed):
        members = checked[members]
        if len(members) < 2:
            checked_ones = " checked" if tune_only.any() else ""
            raise UserError(
                f"too few photos for the hold-out: {CLASS_NAMES[label]} has {len(members)}"
                f"{checked_ones}; each class folder needs 2 or more (more than 10 to learn "
                "much), or --holdout 0 tunes on all of them and measures nothing"
            )
        n_held = min(max(1, round(len(members) * holdout)), len(members) - 1)
        held_out += members[:n_held].tolist()
        tune += members[n_held:].tolist()
    return np.array(sorted(tune)), np.array(sorted(held_out))


def photo_accuracy(model, images, labels):
    """Accuracy overall and per class present, and the confusion matrix, on prepared photos,
    classified as predict does."""
    predicted = np.concatenate(
        [
            class_probabilities(model, images[i : i + PREDICT_BATCH]).argmax(axis=1)
            for i in range(0, len(images), PREDICT_BATCH)
        ]
    )
    confusion = confusion_matrix(labels, predicted)
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "per_class": per_class_accuracy(confusion, only_present=True),
        "confusion": confusion,
    }


def accuracy_report(result):
    """What metrics.json keeps of photo_accuracy's result (None: nothing was measured)."""
    return result and {key: result[key] for key in ("accuracy", "per_class")}


def is_unchecked(path, folder):
    """Whether a photo is in a class folder's unsure/ subfolder: there predict --sort-into puts
    the answers it is unsure of, and a person checking them moves each out."""
    return sorting.in_unsure(path.relative_to(folder))


def checked_by_a_person(folder):
    """Of a catalogue sorted by predict, its CSV in it: how many photos outside unsure/ a person
    checked (moved out of unsure/, or to another class, or put there), how many of those they
    corrected (their folder is not predict's answer), and how many are predict's sure answers
    as sorted; None where its CSV is elsewhere (--csv)."""
    if not (folder / sorting.CSV_NAME).is_file():
        return None
    rows, _ = read_rows_done(folder / sorting.CSV_NAME, [], sorted_into=folder)
    files = sorting.scan(folder)
    now, theirs = sorting.match(rows, files)
    answers = {row.path: row for row in rows}
    counts = {"checked": 0, "corrected": 0, "sure as sorted": 0}
    for rel in theirs:  # put there by a person
        counts["checked"] += not sorting.in_unsure(rel)
    for photo, rel in now.items():
        if rel is None or sorting.in_unsure(rel):
            continue
        row = answers[photo]
        if CLASS_NAMES[files[rel]] != row.answer:
            counts["corrected"] += 1
            counts["checked"] += 1
        elif sorting.in_unsure(row.sorted_as):
            counts["checked"] += 1
        else:
            counts["sure as sorted"] += 1
    return counts


def what_it_learns_from(folder, unchecked, counts, include_unsure):
    """One line: of a sorted catalogue, the photos a person checked or corrected and predict's
    sure answers; of any folder, the unchecked guesses in unsure/ and what becomes of them."""
    parts = []
    if counts is not None:
        parts.append(
            f"{counts['checked']:,} checked by a person ({counts['corrected']:,} of them "
            f"corrected), {counts['sure as sorted']:,} sure answers as predict sorted them"
        )
    if unchecked:
        fate = (
            "tuned on too (--include-unsure), never held out"
            if include_unsure
            else "left out (--include-unsure tunes on them too)"
        )
        parts.append(f"{unchecked:,} unchecked guesses in unsure/ {fate}")
    if parts:
        print(f"{'A sorted catalogue' if counts is not None else folder}: {', '.join(parts)}")


def photo_batches(images, labels, seed, epoch):
    """An epoch of the photos in an order drawn from (seed, epoch), each mirrored at random:
    shops show shoes pointing either way, Fashion-MNIST only left."""
    return batches(images, labels, BATCH_SIZE, epoch_key=(seed, epoch), augment=True)


def calibrated_temperature(head, features, labels, unseen, args):
    """Make the new layer's probabilities say how often it is right, so that predict's unsure
    marks and the review page's figure can be trusted: the temperature found by
    cross-validation on the tuned photos; with it, the scores that the folds' layers give the
    tuned photos, then the held-out ones (features `unseen`, or None), none of them learned by
    the layer that scores it. (None, None), and said, where they are too few (then no photo is
    doubted either)."""
    if len(labels) < MIN_CALIBRATED:
        print(
            f"Probabilities left as trained, no doubtful.csv: {len(labels)} photos are too "
            f"few to calibrate them on ({MIN_CALIBRATED} or more)"
        )
        return None, None
    logits = out_of_fold_logits(
        features, labels, args.seed, args.epochs, args.learning_rate, unseen
    )
    temperature = best_temperature(logits[: len(labels)], labels)
    calibrate(head, temperature)
    print(
        f"Probabilities calibrated: temperature {temperature:.2f}, found by cross-validation "
        "on the tuned photos"
    )
    return temperature, logits


def list_doubtful(run, folder, photos, probabilities):
    """doubtful.csv in the run folder, said in a line with the command that checks it; none (an
    earlier run's removed) without probabilities. The number of photos listed, or None."""
    path = run.out_dir / DOUBTFUL_NAME
    if probabilities is None:
        path.unlink(missing_ok=True)
        return None
    count = write_doubtful(path, folder, photos, probabilities)
    photos_doubted = f"{count} photo{'s' * (count != 1)}" if count else "No photos"
    check = f" (check them: review {folder} --queue {path})" if count else " lists none"
    print(f"{photos_doubted} whose folder the model doubts: {path}{check}")
    return count


def refuse_a_backbone_model(path, kind):
    """Without --backbone, finetune tunes a 28x28 model: a colour one is refused."""
    if kind is not None and kind.photos == "colour":
        raise UserError(
            f"{path}: a model from finetune --backbone; to add photos, run finetune --backbone "
            "again on all of them (it takes a minute)"
        )


def refuse_swapped(args):
    """`finetune FOLDER MODEL`: predict's kind of hint, before anything else is read."""
    model, folder = args.model, args.folder
    if model and model.is_dir() and folder.is_file() and is_model_file(folder):
        raise UserError(
            f"{model}: a folder, not a model file; MODEL comes first, then FOLDER: "
            f"finetune {folder} {model}"
        )


def labelled_photos(args):
    """(photos, which of them are unchecked guesses, the catalogue's counts or None), the
    unchecked left out unless --include-unsure; refused if nothing is left."""
    catalogue_folder = sorting.is_sorted_catalogue(args.folder)  # predict --sort-into's
    found = find_labelled_photos(args.folder, sorted_catalogue=catalogue_folder)
    unchecked = np.array([is_unchecked(path, args.folder) for path, _ in found], bool)
    counts = checked_by_a_person(args.folder) if catalogue_folder else None
    if not found:  # a sorted catalogue's class folders, every one emptied
        raise UserError(f"{args.folder}: no PNG or JPEG photos in its class folders")
    if args.include_unsure:
        return found, unchecked, counts
    if unchecked.all():  # find_labelled_photos refuses a folder without photos: some are here
        raise UserError(
            f"{args.folder}: all {len(found):,} photos are unchecked guesses in unsure/ folders; "
            "check them (move each to its class folder, out of unsure/), or --include-unsure "
            "tunes on them as they are"
        )
    return [photo for photo, no in zip(found, unchecked) if not no], unchecked, counts


def main(argv):
    """MODEL checked -> photos (unchecked guesses left out) -> hold-out -> model (yours, or an
    ImageNet network with a new last layer) -> accuracy before -> fine-tune -> calibrate
    (--backbone) -> accuracy after -> photos probably in the wrong folder (--backbone) -> save."""
    args = parse_finetune_args(argv)
    refuse_swapped(args)
    if args.model:  # what its file says, before the photos are prepared or TensorFlow loads
        check_model_file(args.model)
        refuse_a_backbone_model(args.model, declared_kind(args.model))
    check_out_dir(args.out_dir, args.overwrite, args.resume)
    photos, unchecked, counts = labelled_photos(args)
    tuned_photos = "colour" if args.backbone else "as photographed"
    images = prepare_photos([path for path, _ in photos], tuned_photos)
    labels = np.array([label for _, label in photos])
    guesses = unchecked if args.include_unsure else None
    tune, held_out = hold_out_photos(labels, args.holdout, args.seed, guesses)
    keras = start_tensorflow_quietly()
    keras.utils.set_random_seed(args.seed)
    if args.backbone:
        model, learner = build_transfer_model(args.backbone)
    else:
        model = learner = load_trained_model(args.model)
        refuse_a_backbone_model(args.model, kind_of(model))
    options = {
        "model": args.backbone or file_sha256(args.model),
        "photo folder": fingerprint(images, labels),
        "--learning-rate": args.learning_rate,
        "--holdout": args.holdout,
        "--seed": args.seed,
    }
    run = open_run(args, "finetune", options, suffix="-finetune")
    use_windows(False)  # the confusion matrix is saved, never shown
    what = f"a new last layer on {args.backbone} (ImageNet)" if args.backbone else "the model"
    what_it_learns_from(args.folder, int(unchecked.sum()), counts, args.include_unsure)
    print(
        f"Fine-tuning {what} on {len(tune)} photos, measuring on {len(held_out)} held out, "
        f"{len(np.unique(labels))} classes"
    )
    measure = len(held_out) > 0
    before = None  # a new last layer knows nothing yet: nothing to measure
    if measure and not args.backbone:  # the photos as predict shows them to this model
        shown_as = kind_of(model).photos
        shown = images[held_out]  # a model tuned before sees them as they were prepared
        if shown_as != tuned_photos:
            shown = prepare_photos([photos[i][0] for i in held_out], shown_as)
        before = photo_accuracy(model, shown, labels[held_out])
        print(f"Accuracy on the held-out photos before: {before['accuracy']:.4f}")
    compile_model(learner, keras.optimizers.Adam(args.learning_rate))
    if args.backbone:  # what the backbone sees in each photo, then in each mirror image
        features = photo_features(model, images[tune])
        epoch_data = functools.partial(
            feature_batches, features, np.tile(labels[tune], 2), args.seed
        )
    else:
        epoch_data = functools.partial(photo_batches, images[tune], labels[tune], args.seed)
    progress, stop_signal = train_run(learner, run, epoch_data, None, args.epochs)
    temperature = probabilities = None
    if args.backbone and stop_signal is None:  # the held-out photos, for doubtful.csv
        unseen = photo_features(model, images[held_out], mirrored=False) if measure else None
        temperature, scores = calibrated_temperature(learner, features, labels[tune], unseen, args)
    if not args.backbone:  # so that predict, and "after", show it photos as it was tuned on
        model.name = TUNED_NAME
    elif temperature is not None:  # so that predict trusts its probabilities
        model.name += CALIBRATED
    after = photo_accuracy(model, images[held_out], labels[held_out]) if measure else None
    if after:
        print(f"Accuracy on the held-out photos after:  {after['accuracy']:.4f}")
        save_figure(plot_confusion_matrix(after["confusion"]), run.out_dir / "confusion_matrix.png")
    else:
        print("No photos held out (--holdout 0): nothing measured")
    if temperature is not None:  # every photo, as the calibrated model sees one it never learned
        scores = scores[np.argsort(np.concatenate([tune, held_out]))]  # in the photos' order
        probabilities = np.asarray(keras.ops.softmax(scores / temperature), np.float64)
    doubtful = list_doubtful(run, args.folder, photos, probabilities)
    counted = np.bincount(labels, minlength=10)
    results = {
        "before": accuracy_report(before),
        "after": accuracy_report(after),
        "photos": {CLASS_NAMES[c]: int(counted[c]) for c in range(10) if counted[c]},
        "photos_tuned_on": len(tune),
        "photos_held_out": len(held_out),
        "unchecked_in_unsure": int(unchecked.sum()),
        "unchecked_tuned_on": bool(args.include_unsure and unchecked.any()),
        # Which photos it was tuned on, by their prepared pixels: export --photos measures
        # only the others.
        "tuned_photos": sorted(fingerprint(image)[:16] for image in images[tune]),
        "temperature": temperature,
        "doubtful": doubtful,  # photos listed in doubtful.csv (None: no list)
    }
    if counts is not None:
        results["checked_by_a_person"] = counts["checked"]
        results["corrected_by_a_person"] = counts["corrected"]
        results["sure_as_sorted"] = counts["sure as sorted"]
    details = {"config": vars(args) | {"keras": keras.__version__}}
    figure = ", history.csv and confusion_matrix.png" if after else " and history.csv"
    saved = f"model.keras, metrics.json{', doubtful.csv' * (doubtful is not None)}{figure}"
    return finish_run(run, model, progress, stop_signal, results, details, saved)
