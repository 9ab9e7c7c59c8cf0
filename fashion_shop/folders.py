"""Class folders: a shop's photos in one folder per class, as finetune reads them and predict
--sort-into fills them; and photos prepared in the main process, a bad one in one line."""

import numpy as np

from fashion_mnist_cnn import CLASS_NAMES, UserError
from fashion_shop.photos import IMAGE_SUFFIXES, PREPARATIONS, PhotoError


def class_key(name):
    """A class or folder name without case, spaces or punctuation: "T-shirt/top" -> "tshirttop"."""
    return "".join(c for c in name.lower() if c.isalnum())


def folder_names(name):
    """The folder names, as keys, that mean a class: its name, plural too ("Sneakers", "Ankle
    boots", "Dresses"), and for T-shirt/top either half ("T-shirts", "Tops")."""
    keys = {class_key(part) for part in (name, *name.split("/"))}
    return {word for key in keys for word in (key, key + ("es" if key.endswith("s") else "s"))}


# Every folder name that means a class, as a key -> that class's index.
FOLDER_CLASSES = {
    key: index for index, name in enumerate(CLASS_NAMES) for key in folder_names(name)
}


def class_folder(name):
    """The folder a class's photos go to: its name, "/" being no file name's ("T-shirt-top")."""
    return name.replace("/", "-")


def folder_class(name):
    """The class index a folder's name means, or None: the one reading of class folders, for
    finetune and for predict --sort-into's catalogue alike."""
    return FOLDER_CLASSES.get(class_key(name))


def class_folder_in(folder, label):
    """The subfolder of folder that holds class label's photos: the first whose name means it
    (one a person named, "coats" say), else class_folder's name for it (made by the move)."""
    for sub in sorted(folder.iterdir()):
        if not sub.name.startswith(".") and sub.is_dir() and folder_class(sub.name) == label:
            return sub
    return folder / class_folder(CLASS_NAMES[label])


# What predict --sort-into writes beside the class folders it fills.
CSV_NAME, PAGE_NAME = "predictions.csv", "index.html"
CATALOGUE_FILES = {CSV_NAME, PAGE_NAME}


def names_no_class(subfolder):
    """What finetune and the sort say of a folder whose name is no class's (a typo, say)."""
    return (
        f"{subfolder}: names no class; the class folders are (case, spaces, punctuation and "
        f"plurals ignored): {', '.join(CLASS_NAMES)}"
    )


def find_labelled_photos(folder, sorted_catalogue=False):
    """(path, class index) of every photo in FOLDER's class subfolders, sorted; anything that
    could mislabel or silently drop a photo is refused with one line. A catalogue sorted by
    predict may hold its CSV and page too, and class folders a person emptied."""
    own_files = CATALOGUE_FILES if sorted_catalogue else set()
    if not folder.is_dir():
        problem = "not a folder" if folder.exists() else "no such folder"
        raise UserError(f"{folder}: {problem}")
    entries = sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in own_files
    )
    loose = [p for p in entries if p.is_file()]
    if loose:
        raise UserError(f"{loose[0]}: a file outside the class subfolders has no label")
    if not entries:
        raise UserError(
            f"{folder}: no class subfolders; put each class's photos in a subfolder named after "
            f"it, e.g. {folder / 'sneaker'}"
        )
    photos = []
    for subfolder in entries:
        label = folder_class(subfolder.name)
        if label is None:
            raise UserError(names_no_class(subfolder))
        files = sorted(
            p for p in subfolder.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            raise UserError(
                f"{others[0]}: not a PNG or JPEG; fine-tuning refuses it rather than skip it "
                "(move it out of the class folders)"
            )
        if not files and not sorted_catalogue:
            raise UserError(f"{subfolder}: no PNG or JPEG photos in this class folder")
        photos += [(path, label) for path in files]
    return photos


def prepare_photos(paths, photos):
    """The photos prepared as `photos` names (a key of PREPARATIONS): a bad one stops us here."""
    try:
        return np.stack([PREPARATIONS[photos](path) for path in paths])
    except PhotoError as error:
        raise UserError(str(error)) from None


def each_class_shuffled(labels, seed):
    """(label, its photos' indices in an order drawn from the seed) for each class present, in
    turn: how finetune splits labelled photos so that every part holds every class."""
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):
        yield label, rng.permutation(np.flatnonzero(labels == label))
