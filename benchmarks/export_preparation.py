"""How often a --backbone model's export, which prepares photos in its own graph, gives
predict's answer, on real photos decoded three ways an app might decode them.

    python benchmarks/export_preparation.py MODEL ../shared/product-photos/shop

Exports MODEL (a `finetune --backbone` model.keras) with the program's own command into a
temporary folder, then for every photo compares predict's answer (the Keras model on
fashion_shop/photos.py's preparation, as `predict` computes it) with the LiteRT file's, fed:

- the photo decoded as predict decodes it, to fit in 224x224 (Pillow's thumbnail, BOX);
- the photo decoded at its full size (upright, RGB), the graph shrinking it;
- the photo enlarged 4 times and saved as a JPEG (a camera-sized photo), decoded at full size,
  against predict on that enlarged file.

Prints, for each, the share of photos with the same top class and the largest and median
difference of the ten probabilities.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fashion_mnist_cnn as fm  # noqa: E402
from fashion_shop.models import class_probabilities, load_trained_model  # noqa: E402
from fashion_shop.photos import DECODED, find_images, open_picture, prepare_colour  # noqa: E402


def full_size(path):
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a finetune --backbone model.keras")
    parser.add_argument("photos", type=Path, nargs="+", help="photos and folders")
    args = parser.parse_args()
    fm.choose_onednn(fm.cpu_info()[1])
    fm.start_tensorflow_quietly()
    from ai_edge_litert.interpreter import Interpreter

    model = load_trained_model(args.model)
    photos = find_images(args.photos)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        command = [sys.executable, str(ROOT / "fashion_mnist_cnn.py"), "export", str(args.model)]
        command += ["--format", "litert", "--out-dir", str(scratch / "export")]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        name = json.loads((scratch / "export" / "model.json").read_text())["name"]
        runner = Interpreter(str(scratch / "export" / f"{name}.tflite")).get_signature_runner()

        def exported(photo):
            return runner(images=photo[None])["probabilities"][0]

        def predicted(path):
            return class_probabilities(model, prepare_colour(path)[None])[0]

        ways = {"decoded to fit, as predict does": [], "decoded at full size": []}
        ways["enlarged 4x (JPEG), at full size"] = []
        for n, path in enumerate(photos):
            answer = predicted(path)
            fit = np.asarray(open_picture(path, fit=DECODED))
            ways["decoded to fit, as predict does"].append((answer, exported(fit)))
            ways["decoded at full size"].append((answer, exported(full_size(path))))
            big = Image.fromarray(full_size(path))
            big = big.resize((big.width * 4, big.height * 4), Image.Resampling.BICUBIC)
            enlarged = scratch / f"{n}.jpg"
            big.save(enlarged, quality=95)
            pair = (predicted(enlarged), exported(full_size(enlarged)))
            ways["enlarged 4x (JPEG), at full size"].append(pair)
            enlarged.unlink()
    print(f"{args.model} ({name}), {len(photos)} photos, the .tflite against predict:")
    print("| fed | same top class | largest difference | median difference |")
    print("| --- | --- | --- | --- |")
    for way, pairs in ways.items():
        answers, got = (np.array(side) for side in zip(*pairs))
        same = np.mean(answers.argmax(1) == got.argmax(1))
        difference = np.abs(answers - got).max(axis=1)
        print(f"| {way} | {same:.1%} | {difference.max():.3f} | {np.median(difference):.4f} |")


if __name__ == "__main__":
    main()
