"""`predict --sort-into DIR`: each photo put into DIR/<class>/, or DIR/<class>/unsure/ where the
model is not sure, as finetune reads class folders. A person corrects the catalogue by moving
files; predict never moves back, removes or overwrites what a person moved or put there."""

import errno
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fashion_mnist_cnn import CLASS_NAMES, UserError, atomic_path
from fashion_shop.folders import CSV_NAME, PAGE_NAME, class_key, folder_names  # noqa: F401 (DIR's names)
from fashion_shop.photos import IMAGE_SUFFIXES

# A subfolder rather than a mark in the file name: file managers list folders before files,
# so each class shows its unsure photos first, and every photo keeps its own name.
UNSURE = "unsure"
UNSURE_BELOW = 0.8  # default --unsure: cross-validated on the shop photos (benchmarks/README)
THUMBNAILS = ".thumbnails"


def class_folder(name):
    """The folder a class's photos go to: its name, "/" being no file name's ("T-shirt-top")."""
    return name.replace("/", "-")


def open_folder(folder):
    """The --sort-into folder, made if need be; refused in one line if it cannot be."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--sort-into {folder}: a file, not a folder")
    try:
        (folder / THUMBNAILS).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"--sort-into {folder}: cannot write there ({error.strerror})") from None


def is_sorted_catalogue(folder):
    """Whether folder was written by predict --sort-into (its CSV has the sorted_as column)."""
    from fashion_shop.catalogue import SORTED_HEADER

    try:
        with open(folder / CSV_NAME, encoding="utf-8", errors="replace") as file:
            return file.readline().rstrip("\r\n") == ",".join(SORTED_HEADER)
    except OSError:
        return False


def scan(folder):
    """Every photo in the class folders as they are now: file name -> (class index, path
    relative to folder), wherever a person moved it, in whatever class folder they made."""
    classes = {word: index for index, name in enumerate(CLASS_NAMES) for word in folder_names(name)}
    found = {}
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith(".") or not sub.is_dir() or class_key(sub.name) not in classes:
            continue
        for path in sorted(sub.rglob("*")):
            photo = path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
            if photo and (path.is_file() or path.is_symlink()):
                found.setdefault(
                    path.name, (classes[class_key(sub.name)], path.relative_to(folder))
                )
    return found


def same_photo(path, source):
    """Whether path holds the photo at source: a link to it, or a copy of it."""
    try:
        return os.path.samefile(path, source) or filecmp.cmp(path, source, shallow=False)
    except OSError:
        return False


class Sorter:
    """Puts classified photos into the folder, a batch at a time: it keeps, across batches, the
    names in use and how files can be put there (hard links, else symbolic links, else copies)."""

    def __init__(self, folder, unsure_below, earlier):
        self.folder, self.unsure_below = folder, unsure_below
        self.now = scan(folder)  # every name in use, and where that photo is
        self.earlier = earlier  # photo -> where an earlier run put it, for those classified again
        self.way = "hard links"

    def place(self, result):
        """Where the photo of one result goes, relative to the folder ("" for none), put there."""
        if "error" in result:
            return ""
        source, top = Path(result["image"]), result["top3"][0]
        unsure = top["probability"] < self.unsure_below
        where = Path(class_folder(top["class"]), *[UNSURE] * unsure)
        if self.earlier.get(result["image"]):  # placed by an earlier run (not unreadable then)
            return self.place_again(source, self.earlier[result["image"]], where)
        for name in self.names(source.name):
            if name not in self.now:
                self.put(source, self.folder / where / name)
                self.now[name] = (CLASS_NAMES.index(top["class"]), where / name)
                return str(where / name)
            if same_photo(self.folder / self.now[name][1], source):
                return str(self.now[name][1])  # put there by a run that was stopped before its row

    @staticmethod
    def names(name):
        """The photo's own name, then name-2, name-3, ... for another photo of the same name."""
        stem, suffix = os.path.splitext(name)
        yield name
        for n in range(2, sys.maxsize):
            yield f"{stem}-{n}{suffix}"

    def place_again(self, source, before, where):
        """A photo classified again: moved to its new folder if it is still where predict put
        it; left where a person moved it (or gone, if they removed it)."""
        before = Path(before)
        if same_photo(self.folder / before, source):
            if before.parent == where or (self.folder / where / before.name).exists():
                return str(before)  # there already, or a person's file of that name is there
            (self.folder / where).mkdir(parents=True, exist_ok=True)
            os.replace(self.folder / before, self.folder / where / before.name)
            return str(where / before.name)
        moved = self.now.get(before.name)
        return str(moved[1]) if moved else ""

    def put(self, source, destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                if self.way == "hard links":
                    os.link(source, destination)
                elif self.way == "symbolic links":
                    os.symlink(source.resolve(), destination)
                else:
                    with atomic_path(destination) as partial:
                        shutil.copy2(source, partial)
                return
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT) or self.way == "copies":
                    raise UserError(
                        f"--sort-into {self.folder}: cannot put {source} there "
                        f"({error.strerror or error}); once that is mended, the same command "
                        "goes on"
                    ) from None
                self.way = "symbolic links" if self.way == "hard links" else "copies"
                print(
                    f"note: {error.strerror or error} for {destination.parent}: photos go in as "
                    f"{self.way}",
                    file=sys.stderr,
                )


def corrections(rows, now):
    """How many sorted photos a person moved to another class than predict's answer."""
    answers = {Path(row[5]).name: row[1] for row in rows if row[5]}
    return sum(
        CLASS_NAMES[label] != answers[name] for name, (label, _) in now.items() if name in answers
    )
