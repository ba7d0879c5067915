"""The sentence-transformers side of `host/benches/embed.rs`.

Reads a JSON list of texts, encodes it with `SentenceTransformer(model_dir)` on the CPU with the
given thread count and batch size (after one warm-up call), and prints one JSON object with the
texts/s of every round. Runs in the bench-only virtualenv `.cache/bench-venv` (`make bench`).
"""

import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def main() -> None:
    texts_path, model_dir, threads, batch, rounds = sys.argv[1:6]
    torch.set_num_threads(int(threads))
    with open(texts_path, encoding="utf-8") as handle:
        texts = json.load(handle)
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:64], batch_size=int(batch))
    rates = []
    for _ in range(int(rounds)):
        start = time.perf_counter()
        model.encode(texts, batch_size=int(batch))
        rates.append(len(texts) / (time.perf_counter() - start))
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rates": rates}))


if __name__ == "__main__":
    main()
