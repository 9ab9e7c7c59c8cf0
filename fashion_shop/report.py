"""`fashion_mnist_cnn.py report`: figures of what a trained model learned, drawn from a finished
training run's folder: its training curves, its confusion matrix on the test set, and the test
images it got most confidently wrong."""

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from fashion_mnist_cnn import (
    CLASS_NAMES,
    EVAL_BATCH_SIZE,
    ArgumentParser,
    HelpFormatter,
    UserError,
    batches,
    evaluate,
    first_sentence,
    load_fashion_mnist,
    save_figure,
    start_tensorflow_quietly,
    use_windows,
)
from fashion_shop.models import check_model_file

FIGURES = ["training_curves.png", "confusion_matrix.png", "mistakes.png"]


# ----------------------------------------------------------------------------------------------
# The figures (finetune draws its confusion matrix with plot_confusion_matrix too).


def plot_training_curves(history):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ["accuracy", "loss"]):
        ax.plot(epochs, history[metric], "o-", label="training")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "o-", label="validation")
        ax.set(xlabel="epoch", title=metric.capitalize())
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves")
    return fig


def plot_confusion_matrix(confusion):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(confusion, cmap="Blues")
    for (true, predicted), count in np.ndenumerate(confusion):
        colour = "white" if count > confusion.max() / 2 else "black"
        ax.text(predicted, true, count, ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(10), CLASS_NAMES)
    title = f"Confusion matrix on the test set ({confusion.sum():,} images)"
    ax.set(xlabel="Predicted class", ylabel="True class", title=title)
    return fig


def plot_mistakes(images, labels, probabilities, count=16):
    """Where to look for confusable classes (shirt or T-shirt?) and for doubtful labels."""
    import matplotlib.pyplot as plt

    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)  # the most confident first:
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:count]
    rows = max(1, math.ceil(len(worst) / 4))
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, worst):
        ax.imshow(images[index], cmap="binary")
        guess = f"{CLASS_NAMES[predicted[index]]} {probabilities[index, predicted[index]]:.0%}"
        title = f"#{index}: {guess}\ntrue: {CLASS_NAMES[labels[index]]}"
        ax.set_title(title, fontsize=9, color="tab:red")
    title = "Most confident mistakes on the test set: predicted (confidence), true class"
    fig.suptitle(title if len(worst) else "No mistakes on the test set")
    return fig


# ----------------------------------------------------------------------------------------------
# The command: the run folder checked (before TensorFlow), its model tested again on the test
# data, which must give the run's own test scores, then the figures.

# Relative: in a new process with other thread counts the loss came out the same to the last
# bit (10,000 test images); the margin is for another machine's rounding.
SAME_LOSS = 1e-4


def parse_report_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py report",
        usage="%(prog)s RUN [--data-dir DIR] [--no-show]",
        description="Draw what a trained model learned into its run folder: "
        f"{', '.join(FIGURES)} (the test images it got most confidently wrong).",
        formatter_class=HelpFormatter,
    )
    run = "a finished training run's folder (runs/<time>/)"
    parser.add_argument("run", type=Path, metavar="RUN", help=run)
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the Fashion-MNIST files the run was trained on (default: the run's own --data-dir, "
        "as its metrics.json says, or the download)",
    )
    parser.add_argument("--no-show", action="store_true", help="never open a figure window")
    return parser.parse_args(argv)


def read_metrics(run):
    """A finished training run's metrics.json, refused in one line for anything else."""
    if not run.is_dir():
        raise UserError(f"{run}: {'not a folder' if run.exists() else 'no such folder'}")
    path = run / "metrics.json"
    if (run / "backup" / "state.json").exists():  # stopped or still going: its model may change
        raise UserError(f"{run}: an unfinished run: the command that started it finishes it")
    if not path.is_file():
        raise UserError(f"{run}: no metrics.json, so not a training run's folder (runs/<time>/)")
    try:
        metrics = json.loads(path.read_text())
        finetune = "photos_tuned_on" in metrics  # finetune's metrics.json says how many
        if not finetune:
            scores = {key: float(metrics[key]) for key in ("test_accuracy", "test_loss")}
            history = metrics["history"]
            stopped_early = not history.get("loss")  # stopped before its first epoch began
            data_dir = metrics["config"]["data_dir"]
            data_dir = None if data_dir is None else Path(data_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        reason = f"no {error.args[0]}" if isinstance(error, KeyError) else first_sentence(error)
        raise UserError(f"{path}: damaged, not a training run's metrics ({reason})") from None
    if finetune:
        already = "its confusion_matrix.png is there already"
        raise UserError(f"{run}: a finetune run, which draws its own figures ({already})")
    if stopped_early:
        raise UserError(f"{run}: stopped before its first epoch: nothing to draw")
    check_curves(path, history)
    return scores, history, data_dir


def check_curves(path, history):
    """The curves plot_training_curves draws: numbers, one per epoch alike (else hand-edited)."""
    names = ["accuracy", "loss"]
    names += [f"val_{name}" for name in names if f"val_{name}" in history]
    try:
        shapes = {np.asarray(history[name], dtype=float).shape for name in names}
    except (KeyError, ValueError, TypeError):
        shapes = set()
    if len(shapes) != 1 or len(shapes.pop()) != 1:
        curves = f"{', '.join(names)} as numbers, one per epoch"
        raise UserError(f"{path}: damaged, its history does not hold {curves}")


def check_writable(run):
    """RUN takes new files, and each figure's name is free or a file (a figure replaced)."""
    try:
        tempfile.TemporaryFile(dir=run).close()
    except OSError as error:
        raise UserError(f"{run}: cannot write there ({error.strerror})") from None
    for path in (run / name for name in FIGURES):
        if path.exists() and not path.is_file():
            raise UserError(f"{path}: in the way of the figure, not a file; move it away")


def read_test_set(data_dir, given):
    """The test images and labels, from --data-dir, the run's own (which must still be there),
    or the download."""
    if not given and data_dir is not None and not data_dir.is_dir():
        trained_on = f"the run was trained on --data-dir {data_dir}, which is not a folder here"
        raise UserError(f"{trained_on}: pass --data-dir with the same four files")
    return load_fashion_mnist(data_dir)[1]


def load_model(path):
    """The run's model as it was saved (in its precision), so that it answers as it did."""
    keras = start_tensorflow_quietly()
    try:
        # safe_mode (the default, stated here on purpose) never runs code stored in the file.
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        reason = first_sentence(error)
        raise UserError(f"{path}: not a usable Keras model file ({reason})") from None
    if model.input_shape[1:] != (28, 28, 1) or model.output_shape[1:] != (10,):
        raise UserError(f"{path}: not a training run's model (28x28 images to 10 classes)")
    return model


def check_same_test_data(results, run_scores):
    """The model's test scores must be the run's: else the test images are others than the run's
    (the accuracy alone can be the same: 30 of 50 right on two generated test sets)."""
    accuracy, loss = results["test_accuracy"], results["test_loss"]
    run_accuracy, run_loss = run_scores["test_accuracy"], run_scores["test_loss"]
    if accuracy != run_accuracy or not math.isclose(loss, run_loss, rel_tol=SAME_LOSS):
        scores = f"test accuracy {accuracy:.4f} and loss {loss:.4f} on this test data"
        measured = f"the run measured {run_accuracy:.4f} and {run_loss:.4f}"
        other = "other test data (pass the --data-dir the run was trained on), or another device"
        other += " or precision than the run's"
        raise UserError(f"the model scores {scores}, {measured}: {other}")


def main(argv):
    """RUN and its metrics.json checked -> test data -> model -> its test accuracy and loss, which
    must be the run's -> the figures saved into RUN (and shown)."""
    args = parse_report_args(argv)
    run_scores, history, data_dir = read_metrics(args.run)
    check_model_file(args.run / "model.keras")
    check_writable(args.run)
    x_test, y_test = read_test_set(args.data_dir or data_dir, args.data_dir is not None)
    show = use_windows(not args.no_show)
    model = load_model(args.run / "model.keras")
    results = evaluate(model, batches(x_test, y_test, EVAL_BATCH_SIZE), y_test)
    check_same_test_data(results, run_scores)
    figures = [
        plot_training_curves(history),
        plot_confusion_matrix(results["confusion"]),
        plot_mistakes(x_test, y_test, results["probabilities"]),
    ]
    for figure, name in zip(figures, FIGURES):
        save_figure(figure, args.run / name)
    saved = f"{', '.join(FIGURES[:-1])} and {FIGURES[-1]} to {args.run}/"
    print(f"Saved {saved} (test accuracy {results['test_accuracy']:.4f}, as the run measured)")
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return 0
