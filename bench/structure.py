"""How the search benchmark's synthetic images compare with real CNN features, neighbour-wise.

    python manage.py evaluate_suggestions --library ../shared/data/feedme-dev/manifest.jsonl \\
        --holdout 0.3 --cache /tmp/evalcache          # once: the real vectors, by SHA-256
    python -m bench.structure /tmp/evalcache/tflite-*.npz

An ANN engine's recall depends on how a library's points sit among their neighbours, not on
its size alone: a topic of images spread isotropically in 512 dimensions has no near
neighbours (every image about as far from every other), and defeats every engine as uniform
noise does. This prints, for the real vectors and for each structure of ``bench.search``
(``STRUCTURES``), the statistics that decide it:

- local intrinsic dimension (Levina–Bickel maximum likelihood over the 20 nearest neighbours,
  median over points): how many dimensions the neighbourhood of a point really spans;
- the cosine to the 1st, 10th and 50th nearest neighbour (medians), and the gap between the
  1st and the 50th: how much nearer the nearest are than the rest.

The synthetic sample has ~300 images a topic, as the benchmark's libraries (``topics_for``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

NEIGHBOURS = 20
PER_TOPIC = 300


def neighbourhood(matrix: np.ndarray, k: int = NEIGHBOURS) -> dict[str, float]:
    """The statistics above for the rows of ``matrix`` (normalised here), all pairs exact."""
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    nearest = -np.sort(-sims, axis=1)[:, : max(k, 50)]
    distances = np.sqrt(np.maximum(2 - 2 * nearest[:, :k], 1e-12))
    lid = -1 / np.mean(np.log(distances[:, :-1] / distances[:, -1:]), axis=1)
    return {
        "points": int(len(matrix)),
        "dim": int(matrix.shape[1]),
        "intrinsic_dimension": float(np.median(lid)),
        "cosine_1st": float(np.median(nearest[:, 0])),
        "cosine_10th": float(np.median(nearest[:, 9])),
        "cosine_50th": float(np.median(nearest[:, 49])),
        "gap_1st_50th": float(np.median(nearest[:, 0] - nearest[:, 49])),
    }


def synthetic(structure: str, topics: int = 10, seed: int = 0) -> np.ndarray:
    """``topics × PER_TOPIC`` images of one of ``bench.search``'s structures."""
    from bench.rebuild_worker import TopicModel
    from bench.search import COSINE, DIM, STRUCTURES

    rank, isotropic = STRUCTURES[structure]
    model = TopicModel.make(topics, DIM, seed, COSINE, rank, isotropic)
    rng = np.random.default_rng([seed, 1])
    return model.draw(np.repeat(np.arange(topics), PER_TOPIC), rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "vectors",
        type=Path,
        nargs="?",
        help="an evaluate_suggestions --cache file (.npz with a 'vectors' array)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = parser.parse_args()

    from bench.search import STRUCTURES

    rows = {}
    if args.vectors is not None:
        with np.load(args.vectors, allow_pickle=False) as data:
            # The extractor key up to its options ("|" would also break the table).
            name = f"real: {str(data['key']).split('|')[0]}"
            rows[name] = neighbourhood(data["vectors"].astype(np.float32))
    for structure in STRUCTURES:
        rows[f"synthetic: {structure}"] = neighbourhood(synthetic(structure))
    if args.json:
        print(json.dumps(rows))
        return
    print("| vectors | points × dim | intrinsic dim. | cos 1st | 10th | 50th | gap 1st–50th |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['points']} × {row['dim']} | {row['intrinsic_dimension']:.1f} "
            f"| {row['cosine_1st']:.3f} | {row['cosine_10th']:.3f} | {row['cosine_50th']:.3f} "
            f"| {row['gap_1st_50th']:.3f} |"
        )


if __name__ == "__main__":
    main()
