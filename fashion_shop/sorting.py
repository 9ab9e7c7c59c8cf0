"""`predict --sort-into DIR`: each photo put into DIR/<class>/, or DIR/<class>/unsure/ where the
model is not sure, as finetune reads class folders. A person corrects the catalogue by moving
files; predict never moves back, removes or overwrites what a person moved or put there, and
says what it cannot count (a photo outside the class folders). The photos are copies (or
copy-on-write clones where the file system has them): editing a sorted photo never changes the
original. Hard or symbolic links only with --link."""

import errno
import filecmp
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fashion_mnist_cnn import UserError, atomic_path, file_sha256
from fashion_shop.folders import (
    CATALOGUE_FILES,
    CSV_NAME,  # noqa: F401 (DIR's CSV, named for predict)
    PAGE_NAME,
    class_folder,
    class_folder_in,
    folder_class,
    names_no_class,
)
from fashion_shop.photos import IMAGE_SUFFIXES

# A subfolder rather than a mark in the file name: file managers list folders before files,
# so each class shows its unsure photos first, and every photo keeps its own name.
UNSURE = "unsure"
# Default --unsure, for a model whose probabilities are calibrated: cross-validated on the shop
# photos (benchmarks/README). A model that is not calibrated marks nothing unless asked.
UNSURE_BELOW = 0.8
THUMBNAILS = ".thumbnails"
# Which model sorted each photo (the CSV's model column) -> its file and whether it is
# calibrated. Hidden, as the thumbnails are: finetune reads the class folders alone.
MODELS = ".models.json"
# Where a link cannot be made at all (another disk, a file system without them), not where
# one photo is the trouble: those errors say so for that photo.
NO_LINKS_HERE = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
# Where the kernel cannot copy between two files itself (another disk on an old kernel, a file
# system without it): copied through Python instead.
NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def in_unsure(rel):
    """Whether a photo, by its path relative to the sorted folder, is in a class's unsure/."""
    return UNSURE in Path(rel).parts[1:-1]


def checked_place(folder, rel, label):
    """Where a person's check puts the photo at rel: class label's folder (out of unsure/),
    under the photo's own name, by which match() finds a moved photo; relative to folder."""
    return (class_folder_in(folder, label) / Path(rel).name).relative_to(folder)


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
    """Whether folder was sorted by predict --sort-into (it has the page and its thumbnails)."""
    return (folder / PAGE_NAME).is_file() and (folder / THUMBNAILS).is_dir()


def scan(folder):
    """Every photo in the class folders as they are now, wherever a person moved it and in
    whatever class folder they made: path relative to folder -> class index."""
    found = {}
    for sub in sorted(folder.iterdir()):
        label = folder_class(sub.name)
        if sub.name.startswith(".") or not sub.is_dir() or label is None:
            continue
        for path in sorted(sub.rglob("*")):
            if is_photo(path) and (path.is_file() or path.is_symlink()):
                found[path.relative_to(folder)] = label
    return found


def is_photo(path):
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def outside_classes(folder):
    """The photos a sort cannot count as any class's: in a folder whose name is no class's (a
    typo: "Sandle"), or loose in the folder itself; {that folder, relative (Path(".") for
    the folder itself): its photos, relative to folder}."""
    found = {}
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith(".") or sub.name in CATALOGUE_FILES:
            continue
        if sub.is_dir() and folder_class(sub.name) is None:
            photos = [p for p in sorted(sub.rglob("*")) if is_photo(p) and not p.is_dir()]
            if photos:
                found[sub.relative_to(folder)] = [p.relative_to(folder) for p in photos]
        elif not sub.is_dir() and is_photo(sub):
            found.setdefault(Path("."), []).append(sub.relative_to(folder))
    return found


def outside_line(folder, where, photos):
    """The sort's line for photos outside the class folders, in finetune's words."""
    one = len(photos) == 1
    count = f"{len(photos):,} photo{'s' * (not one)} {'is' if one else 'are'}"
    if where == Path("."):
        return (
            f"{folder}: {count} outside the class subfolders, with no label (e.g. "
            f"{photos[0].name}); move {'it' if one else 'them'} into a class folder"
        )
    return f"{names_no_class(folder / where)}; {count} there, in no class until moved into one"


def model_id(path):
    """How the CSV's model column names a model file: the start of its sha256."""
    return file_sha256(path)[:12]


def read_models(folder):
    """DIR's record of the models that sorted it: {id: {"path", "calibrated"}}; an unreadable
    record is an empty one (its photos then count as sorted by a model not recorded)."""
    try:
        models = json.loads((folder / MODELS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return models if isinstance(models, dict) else {}


def record_model(folder, path, calibrated):
    """The model about to sort into folder, added to its record; returns its id."""
    models, ident = read_models(folder), model_id(path)
    models[ident] = {"path": str(path), "calibrated": bool(calibrated)}
    with atomic_path(folder / MODELS) as partial:
        partial.write_text(json.dumps(models, indent=2) + "\n", encoding="utf-8")
    return ident


def match(rows, files):
    """Each sorted row's photo as it is now: {row's photo: its path now, or None if a person
    removed it}, and the files no row accounts for (a person's own, or a stopped run's). A
    photo is where the row says, or else the one file of its name that no row is at."""
    at = {Path(row.sorted_as): row.path for row in rows if row.sorted_as}
    by_name = {}
    for rel in files:
        if rel not in at:
            by_name.setdefault(rel.name, []).append(rel)
    now = {}
    for rel, photo in at.items():
        if rel in files:
            now[photo] = rel
        else:
            moved = by_name.get(rel.name, [])
            now[photo] = moved.pop(0) if moved else None
    claimed = set(now.values())
    return now, [rel for rel in files if rel not in claimed]


def same_photo(path, source):
    """Whether path holds the photo at source: a link to it, or a copy of it."""
    try:
        return os.path.samefile(path, source) or filecmp.cmp(path, source, shallow=False)
    except OSError:
        return False


class Sorter:
    """Puts classified photos into the folder, a batch at a time: it keeps, across batches, the
    names in use and how files can be put there (copies; with link, hard links, else symbolic
    links, else copies). unsure_below None marks no photo unsure."""

    def __init__(self, folder, unsure_below, rows, again=(), link=False):
        self.folder, self.unsure_below = folder, unsure_below
        files = scan(folder)
        # A photo a person moved outside the class folders is still theirs to move: found there.
        outside = {rel: None for photos in outside_classes(folder).values() for rel in photos}
        self.where_now, unclaimed = match(rows, {**files, **outside})
        self.again = set(again)  # the photos classified once more (--reclassify)
        self.sorted_as = {row.path: Path(row.sorted_as) for row in rows if row.sorted_as}
        self.names_in_use = {rel.name for rel in files} | {Path(row.sorted_as).name for row in rows}
        self.leftovers = {}  # files no row accounts for, by name: perhaps a stopped run's links
        for rel in unclaimed:
            if rel in files:
                self.leftovers.setdefault(rel.name, []).append(rel)
        self.next_number = {}
        self.way = "hard links" if link else "copies"

    def place(self, result):
        """Put the photo of one result where it goes; returns that place, relative to the folder
        ("" for none). A photo gone since it was prepared becomes an error."""
        if "error" in result:
            return ""
        source, top = Path(result["image"]), result["top3"][0]
        unsure = self.unsure_below is not None and top["probability"] < self.unsure_below
        where = Path(class_folder(top["class"]), *[UNSURE] * unsure)
        if result["image"] in self.again:
            return self.place_again(result["image"], where)
        for rel in self.leftovers.get(source.name, []):
            if same_photo(self.folder / rel, source):  # linked by a run stopped before its row
                self.leftovers[source.name].remove(rel)
                return str(rel)
        while True:
            name = self.free_name(source.name)
            try:
                self.put(source, self.folder / where / name)
                return str(where / name)
            except FileExistsError:
                continue  # a file of that name came meanwhile, or differs only in case
            except FileNotFoundError:
                if source.exists():
                    raise
                result["error"] = f"{source}: no such image file (gone since it was read)"
                del result["top3"]
                return ""

    def free_name(self, name):
        """The photo's own name, or name-2, name-3, ... where another photo has it; taken."""
        stem, suffix = os.path.splitext(name)
        candidate, n = name, self.next_number.get(name, 2)
        while candidate in self.names_in_use:
            candidate, n = f"{stem}-{n}{suffix}", n + 1
        self.next_number[name] = n
        self.names_in_use.add(candidate)
        return candidate

    def place_again(self, photo, where):
        """A photo classified again: moved to its new folder if it is still where predict put
        it; left where a person moved it (or gone, if they removed it)."""
        before = self.where_now.get(photo)
        if before is None:
            return ""
        moved_by_a_person = before != self.sorted_as[photo]
        if moved_by_a_person or before.parent == where:
            return str(before)
        destination = self.folder / where / before.name
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.folder / before, destination)  # never onto a file that is there
            os.unlink(self.folder / before)
        except FileExistsError:
            return str(before)  # a file of that name is there: the photo stays where it is
        except OSError:
            return str(before)  # no links on this disk: left where it was sorted before
        return str(where / before.name)

    def put(self, source, destination):
        """source copied (or linked) to destination, which must not exist yet."""
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(
                f"--sort-into {self.folder}: cannot make {destination.parent} ({error.strerror})"
            ) from None
        while True:
            try:
                if self.way == "hard links":
                    os.link(source, destination)
                elif self.way == "symbolic links":
                    os.symlink(source.resolve(), destination)
                else:
                    copy_exclusively(source, destination)
                return
            except (FileExistsError, FileNotFoundError):
                raise
            except OSError as error:
                if self.way == "copies" or error.errno not in NO_LINKS_HERE:
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


def copy_exclusively(source, destination):
    """A copy of source at destination, never onto a file that is there, and never seen half
    written: filled under a hidden name, then put there (a hard link to it where the disk has
    them, else a name claimed first, then renamed onto)."""
    partial = destination.with_name(f".{destination.stem}.partial{destination.suffix}")
    claimed = False
    try:
        copy_file(source, partial)
        try:
            os.link(partial, destination)  # fails, rather than replaces, if a file is there
            return
        except OSError as error:
            if error.errno not in NO_LINKS_HERE:
                raise
        # Claimed with O_EXCL first: os.replace alone would replace a file put there meanwhile.
        os.close(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        claimed = True
        os.replace(partial, destination)
    except BaseException:
        if claimed:
            destination.unlink(missing_ok=True)
        raise
    finally:
        partial.unlink(missing_ok=True)


def copy_file(source, destination):
    """source's bytes, times and mode at destination: by os.copy_file_range where the kernel
    has it (a clone where the file system can), else by shutil.copyfile; then shutil.copystat."""
    with open(source, "rb") as reading, open(destination, "wb") as writing:
        try:
            while os.copy_file_range(reading.fileno(), writing.fileno(), 1 << 30):
                pass
        except (AttributeError, OSError) as error:  # AttributeError: no such call (macOS)
            if getattr(error, "errno", errno.ENOSYS) not in NO_KERNEL_COPY:
                raise
            reading.seek(0)
            writing.seek(0)
            writing.truncate()
            shutil.copyfileobj(reading, writing)
    shutil.copystat(source, destination)
