"""Product photos, prepared as each kind of model was trained on its images.

Imports no TensorFlow: the processes that prepare a catalogue's photos import only this module
(and from the training script, which imports NumPy alone, its file writer). How each step was
chosen: benchmarks/README.md.
"""

import errno
import functools
import hashlib
import math
import signal
import warnings

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from fashion_mnist_cnn import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COLOUR_SIZE = 224  # the colour photos' side: the input the ImageNet weights were made for
DECODED = COLOUR_SIZE  # every preparation starts from the photo decoded to fit in this square
THUMBNAIL = 160  # the review page's thumbnails fit in this square
ITEM_LEVEL = 13  # an item pixel stands out by 5% of full intensity, as Fashion-MNIST's were cut
SHOE_MEDIAN = 160  # the least median brightness of a prepared shoe or bag


class PhotoError(Exception):
    """A photo that cannot be prepared: the message names it and says why, in one line."""


def images_under(folder):
    """Every PNG and JPEG under a folder, as found (unsorted)."""
    return (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def find_images(paths):
    """The images named, each folder replaced by every PNG and JPEG under it, sorted, each image
    once; a folder with none stays, to be reported."""
    found = []
    for path in paths:
        inside = sorted(images_under(path)) if path.is_dir() else []
        found += inside or [path]
    return list(dict.fromkeys(found))  # a folder given inside another: its photos once


def open_picture(path, fit=None, source=None):
    """A PNG or JPEG as an upright RGB image (EXIF rotation honoured), or one clear error.
    With fit, it is shrunk to fit in fit x fit pixels as it is decoded (a JPEG at 1/2, 1/4 or
    1/8 of its size almost for free), so a large photo is never copied at full size. source:
    the photo's bytes as a file, for a path that is no local file (gs://...), named by path."""
    if source is None and path.is_dir():
        raise PhotoError(f"{path}: a folder with no PNG or JPEG images in it")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat any bomb as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if source is None else source) as image:
                if image.format not in ("PNG", "JPEG"):
                    raise PhotoError(f"{path}: a {image.format} image, expected PNG or JPEG")
                picture = image
                if image.mode in ("I", "I;16", "I;16B"):  # 16-bit grey, which Pillow clips
                    picture = image.convert("I").point(lambda v: v / 257).convert("L")
                if fit:
                    if image.mode in ("1", "P"):  # shrinking these would pick, not average
                        picture = image.convert("RGBA" if image.has_transparency_data else "RGB")
                    # reducing_gap 1: decoded at the smallest scale of at least fit px
                    picture.thumbnail((fit, fit), Image.Resampling.BOX, reducing_gap=1.0)
                upright = ImageOps.exif_transpose(picture)
                if upright.has_transparency_data:  # a cut-out: put it on white, not black
                    white = Image.new("RGBA", upright.size, "white")
                    return Image.alpha_composite(white, upright.convert("RGBA")).convert("RGB")
                return upright.convert("RGB")
    except FileNotFoundError:
        raise PhotoError(f"{path}: no such image file") from None
    except UnidentifiedImageError:
        raise PhotoError(f"{path}: not a PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PhotoError(f"{path}: too many pixels to be a photo (Pillow's safety limit)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise PhotoError(f"{path}: damaged image ({error})") from None


# ----------------------------------------------------------------------------------------------
# The item and its background


def border_pixels(pixels):
    """The colours of an (H, W, 3) photo's outer two rows and columns: its background, mostly."""
    edges = [pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:]]
    return np.concatenate([edge.reshape(-1, 3) for edge in edges])


def colour_distance(pixels, colour):
    """Each pixel's distance from a colour, 0-255: the root of the mean squared difference of
    its channels, exact where that is a whole number (a grey on a grey), so that the item map's
    whole numbers come out alike in any precision (export's written steps)."""
    difference = pixels - colour
    return np.sqrt(np.einsum("...k,...k->...", difference, difference) / 3)


def background_of(pixels):
    """The colour of an (H, W, 3) photo's border (its background, mostly) and that colour's own
    noise: 2.5x the border's median distance from it, robust to an item touching the border."""
    border = border_pixels(pixels)
    background = np.median(border, axis=0)
    return background, 2.5 * np.median(colour_distance(border, background))


def standing_out(path, pixels):
    """How far each pixel of an (H, W, 3) photo stands out from its background, less the
    background's noise, as uint8 (for a dark item on white, exactly the negative). A blank photo
    (a shop's placeholder) is one clear error rather than a confident answer about nothing."""
    background, noise = background_of(pixels)
    item = np.clip(colour_distance(pixels, background) - noise, 0, 255).astype(np.uint8)
    if not item.any():
        raise PhotoError(f"{path}: a blank photo, nothing in it stands out from its background")
    return item


def refuse_blank(path, picture):
    """standing_out's refusal, for the colour route, mostly without its map: a channel whose
    extreme lies sqrt(3) x (noise + 1) from the background settles it. Returns the background."""
    pixels = np.asarray(picture, np.float32)
    background, noise = background_of(pixels)
    extremes = np.array(picture.getextrema(), np.float32).T  # Pillow's: 8x numpy's min, max
    if not (np.abs(extremes - background) > np.sqrt(3) * (noise + 1)).any():
        standing_out(path, pixels)  # near blank: measured pixel by pixel
    return background


def median_box(mask):
    """The (left, top, right, bottom) box of a mask after a 3x3 median filter, which drops specks
    of noise; None if nothing is left. The median of 9 on/off pixels is on where 5 or more are,
    so counting them (edges repeated, as Pillow's filter does) gives the filter's result."""
    padded = np.pad(mask, 1, mode="edge").view(np.uint8)
    height, width = mask.shape
    count = sum(padded[i : i + height, j : j + width] for i in range(3) for j in range(3))
    kept = count >= 5
    rows, columns = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    if not rows.size:
        return None
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST's view: a garment off its model, a shoe level and pointing left


@functools.cache
def face_detector():
    """OpenCV's frontal-face Haar cascade, loaded once per process."""
    import cv2

    cv2.setNumThreads(1)  # one photo per process already keeps every core busy
    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def is_skin(ycbcr, face):
    """Whether a face's middle has a skin colour: the usual YCbCr bounds for every skin tone."""
    x, y, w, h = face
    middle = ycbcr[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4].reshape(-1, 3)
    blue, red = np.median(middle[:, 1:], axis=0)
    return 77 <= blue <= 127 and 133 <= red <= 173


def find_face(picture, box):
    """The largest skin-coloured frontal face where a model's head would be in a catalogue photo
    (x, y, width, height), or None: searched only in an item about as tall as wide or taller, in
    its box's top half, for faces a tenth to two fifths of its height, which keeps it cheap; the
    skin test keeps a face printed on a T-shirt or a bag from counting."""
    left, top, right, bottom = box
    height, width = bottom - top, right - left
    if 10 * height < 9 * width:  # a shoe or a bag, not a person
        return None
    area = (left + width // 10, top, right - width // 10, top + height // 2)
    grey = np.asarray(picture.crop(area).convert("L"))
    sizes = {"minSize": (max(16, height // 10),) * 2, "maxSize": (2 * height // 5,) * 2}
    found = face_detector().detectMultiScale(grey, 1.1, 5, **sizes)
    if not len(found):
        return None
    ycbcr = np.asarray(picture.convert("YCbCr"), np.float32)
    faces = [face + (area[0], area[1], 0, 0) for face in found]  # in the photo's coordinates
    skin = [face for face in faces if is_skin(ycbcr, face)]
    return tuple(int(v) for v in max(skin, key=lambda face: face[2] * face[3])) if skin else None


def garment_only(item, picture, face):
    """The item map of a garment worn by a model, with the model taken out: the head and hair
    above the chin, then every pixel whose colour the chest below the face does not have (arms,
    legs, trousers under a top)."""
    x, y, w, h = face
    item = item.copy()
    item[: y + h + h // 5, max(0, x - 3 * w // 10) : x + w + 3 * w // 10] = 0
    levels = np.moveaxis(np.asarray(picture) // 16, -1, 0)  # 16 levels a channel
    codes = np.ravel_multi_index(levels, (16, 16, 16))  # one number for each of 4,096 colours
    chest = codes[y + 13 * h // 10 : y + 3 * h, max(0, x - w // 4) : x + w + w // 4]
    in_chest = np.bincount(chest.ravel(), minlength=16**3) / max(1, chest.size)
    item[in_chest[codes] < 0.002] = 0
    return item


def levelled(item, box):
    """An item map turned so that a shoe or bag shot from above at an angle stands level, as
    Fashion-MNIST's side views do: the line through the lowest item pixel of each column (the
    middle 80% of them) made horizontal, when it slopes 3 to 30 degrees."""
    left, top, right, bottom = box
    mask = item[top:bottom, left:right] > ITEM_LEVEL
    columns = np.flatnonzero(mask.any(axis=0))
    if columns.size < 10:
        return item
    lowest = mask.shape[0] - 1 - np.argmax(mask[::-1, columns], axis=0)
    middle = slice(columns.size // 10, columns.size * 9 // 10)
    slope = np.polyfit(columns[middle], lowest[middle], 1)[0]
    angle = math.degrees(math.atan(slope))
    if not 3 <= abs(angle) <= 30:
        return item
    return np.asarray(Image.fromarray(item).rotate(angle, Image.Resampling.BILINEAR, expand=True))


def brightened(grey):
    """A prepared shoe or bag whose median (of pixels above 40) is below SHOE_MEDIAN, brightened
    by the gamma that puts it there: Fashion-MNIST's shoes and bags are lit, and a dim white
    sneaker on white looked like a sandal's straps to the model."""
    pixels = np.asarray(grey)
    item = pixels[pixels > 40]
    median = np.median(item) if item.size else SHOE_MEDIAN
    if median >= SHOE_MEDIAN:
        return grey
    gamma = np.log(SHOE_MEDIAN / 255) / np.log(median / 255)
    return grey.point(lambda v: round(255 * (v / 255) ** gamma))


def taller_end_right(image):
    """The prepared item mirrored if its left third stands clearly taller than its right third:
    Fashion-MNIST's shoes all point left, heel and shaft on the right; shops show either way."""
    heights = (image > 40).sum(axis=0)
    columns = np.flatnonzero(heights)
    if columns.size < 4:
        return image
    first, end = columns[0], columns[-1] + 1
    third = (end - first) // 3
    left, right = heights[first : first + third].mean(), heights[end - third : end].mean()
    return image[:, ::-1] if left > 1.15 * right else image


# ----------------------------------------------------------------------------------------------
# The three preparations, one for each kind of model (fashion_shop/models.py says which)


def prepare_image(path, fashion_mnist_view=True, picture=None):
    """A product photo -> uint8 28x28 as Fashion-MNIST's images were made from Zalando's: the
    item trimmed from its background (whatever its colour), its longest edge resized to 28,
    sharpened, stretched to 0-255, centred, light on dark. With fashion_mnist_view, it is first
    shown as Fashion-MNIST shows items: a worn garment off its model, a shoe or bag level.
    picture: the photo as open_picture(path, DECODED) gives it, if it was decoded already."""
    # BOX shrinking averages away sensor noise, too.
    if picture is None:
        picture = open_picture(path, fit=DECODED)
    item = standing_out(path, np.asarray(picture, np.float32))
    box = median_box(item > ITEM_LEVEL)  # trimmed as Fashion-MNIST's items were
    face = find_face(picture, box) if box and fashion_mnist_view else None
    if face is not None:  # worn by a model: Fashion-MNIST shows the garment alone
        item = garment_only(item, picture, face)
        box = median_box(item > ITEM_LEVEL)
    elif box and fashion_mnist_view and box[2] - box[0] > box[3] - box[1]:
        # Wider than tall: a shoe or a bag (under 2% of Fashion-MNIST's garments are).
        item = levelled(item, box)
        box = median_box(item > ITEM_LEVEL)
    grey = Image.fromarray(item)
    if box:
        grey = grey.crop(box)
    if face is not None and 4 * grey.width > 3 * grey.height:
        # Worn, arms down, a top is as wide as shoulders and arms; Fashion-MNIST's lie flat,
        # 3/4 as wide as tall, so that a worn jacket does not look like a bag.
        grey = grey.resize((3 * grey.height // 4, grey.height), Image.Resampling.BOX)
    # Longest edge to 28 (ImageOps.contain's rounding), and never under a pixel: a belt or a
    # strap may be 60 times longer than it is thick.
    longest = max(grey.size)
    size = tuple(max(1, round(side / longest * 28)) for side in grey.size)
    grey = grey.resize(size, Image.Resampling.LANCZOS)
    grey = grey.filter(ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0))
    top = max(float(np.percentile(np.asarray(grey), 99.5)), 1.0)
    grey = grey.point(lambda v: min(255, round(v * 255 / top)))
    if grey.width > grey.height:  # a shoe or a bag, as above
        grey = brightened(grey)
    return taller_end_right(np.asarray(ImageOps.pad(grey, (28, 28), color=0)))


def prepare_as_photographed(path, picture=None):
    """prepare_image with garments left on their models and shoes as they were shot: what a
    model tuned on a shop's own photos learned from (bare arms tell a T-shirt from a pullover)."""
    return prepare_image(path, fashion_mnist_view=False, picture=picture)


def prepare_colour(path, picture=None):
    """A product photo -> uint8 224x224x3 for a --backbone model: the whole photo in colour, as
    ImageNet's photos are seen, longest side 224, made square with its own background colour."""
    if picture is None:
        picture = open_picture(path, fit=DECODED)
    background = tuple(int(v) for v in refuse_blank(path, picture))
    size = (COLOUR_SIZE, COLOUR_SIZE)
    return np.asarray(ImageOps.pad(picture, size, Image.Resampling.BILINEAR, color=background))


PREPARATIONS = {
    "fashion-mnist": prepare_image,
    "as photographed": prepare_as_photographed,
    "colour": prepare_colour,
}


# ----------------------------------------------------------------------------------------------
# In the preparing processes


def thumbnail_name(path):
    """The review page's thumbnail of a photo: a name from its path, the same in every run."""
    return hashlib.sha1(str(path).encode(errors="surrogateescape")).hexdigest()[:20] + ".jpg"


def save_thumbnail(picture, path):
    """A small JPEG of the decoded photo, written whole or not at all."""
    small = picture.copy()
    small.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    with atomic_path(path) as partial:
        small.save(partial, "JPEG", quality=80)


def prepare_photo(path, photos, source=None):
    """(the photo decoded to fit, its image prepared as `photos` names, None), or (None, None,
    the reason it cannot be): predict's preparation of one photo, wherever it runs (here, or
    on a Beam worker, where source holds the bytes of a photo in cloud storage)."""
    try:
        picture = open_picture(path, fit=DECODED, source=source)
        return picture, PREPARATIONS[photos](path, picture=picture), None
    except PhotoError as error:
        return None, None, str(error)


def prepare_chunk(paths, photos, thumbnails=None):
    """(image, None) or (None, the reason) for each path, prepared as `photos` names; with
    thumbnails, a folder, each photo's thumbnail written there from the same decoded picture."""
    prepared = []
    for path in paths:
        picture, image, error = prepare_photo(path, photos)
        if thumbnails and picture is not None:
            try:
                save_thumbnail(picture, thumbnails / thumbnail_name(path))
            except OSError as failure:  # the page shows the photo itself instead
                if failure.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
        prepared.append((image, error))
    return prepared


def leave_signals_to_the_main_process():
    # Ctrl-C reaches the whole process group; the main process decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
