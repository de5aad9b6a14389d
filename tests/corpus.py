"""The small corpus the training, checkpoint and sharding tests train on: pangrams, 40 times over
(5,000 bytes)."""

import pathlib


TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! "
) * 40


def write_corpus(folder: str | pathlib.Path, name: str = "corpus.txt") -> str:
    """`TEXT` written to `folder/name` (the folder made if needed); returns the path."""
    path = pathlib.Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TEXT)
    return str(path)
