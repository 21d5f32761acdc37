"""Bar of the foundation issue: Kiln's chosen MiniLM variant vs sentence-transformers encode() on PyTorch fp32.

Same run, same machine, interleaved (A, B, C, A, B, C ...) after a warm-up, medians reported:

  A  sentence-transformers ``encode(texts, batch_size=32)``, PyTorch fp32 (it sorts texts by length itself)
  B  Kiln's chosen variant (``kiln optimize``'s search), ONNX Runtime, Kiln's tokenizer + length-sorted batches
  C  Kiln's FP32 export, same pipeline as B (what the ONNX conversion alone gives)

Texts: real English paragraphs (Python's ``pydoc_data.topics``) in natural order and natural lengths, taken
from a slice the optimizer never evaluated on. Fidelity of B and C is measured against A's embeddings.

    python bench/optimize_minilm.py                 # export + optimize into a temp repo, then compare
    python bench/optimize_minilm.py --repo kiln-repo # reuse kiln-repo/minilm (fp32 = v1, variant = latest)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln import artifact as artifacts
from kiln._utils import package_versions
from kiln.config import OptimizeSettings
from kiln.data import CALIBRATION_TEXTS, TEXT_EVAL_OFFSET, english_corpus
from kiln.fidelity import embedding_fidelity
from kiln.runtime import OrtEngine, probe, text_encoder_for


def unseen_texts(limit: int) -> list[str]:
    """Corpus paragraphs in natural order that the search neither calibrated nor evaluated on."""
    seen_from = TEXT_EVAL_OFFSET - CALIBRATION_TEXTS
    seen_to = TEXT_EVAL_OFFSET + OptimizeSettings().eval_samples
    return (english_corpus(seen_from) + english_corpus(offset=seen_to))[:limit]


def prepare(repo: Path | None, workdir: Path) -> tuple[artifacts.Artifact, artifacts.Artifact, dict[str, Any]]:
    from kiln.export import bundled_minilm_path, export
    from kiln.optimize import optimize

    if repo is not None and (repo / "minilm").is_dir():
        fp32 = artifacts.load(repo / "minilm", 1)
        chosen = artifacts.load(repo / "minilm")
        return fp32, chosen, {"source": str(repo / "minilm"), "chosen_recipe": _recipe(chosen)}
    fp32 = export(bundled_minilm_path(), out=workdir, name="minilm")
    started = time.perf_counter()
    result = optimize(fp32)
    search_s = time.perf_counter() - started
    if result.chosen is None:
        sys.exit("the search chose no variant; see its table")
    return (
        fp32,
        result.chosen,
        {
            "search_s": search_s,
            "chosen_recipe": _recipe(result.chosen),
            "search": [c.to_dict() | {"passes": None} for c in result.candidates],
        },
    )


def _recipe(art: artifacts.Artifact) -> str:
    transforms = art.manifest.provenance.get("transforms", [])
    return str(transforms[-1]["name"]) if transforms else "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=None)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "optimize_minilm.json")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from kiln.export import bundled_minilm_path

    console = Console(width=150)
    texts = unseen_texts(args.texts)
    lengths = [len(t.split()) for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        fp32, chosen, search = prepare(args.repo, Path(tmp))
        st_model = SentenceTransformer(str(bundled_minilm_path()), device="cpu")
        kiln_variant = text_encoder_for(chosen, OrtEngine(chosen.model_path, name="kiln-variant"))
        kiln_fp32 = text_encoder_for(fp32, OrtEngine(fp32.model_path, name="kiln-fp32"))
        runners = {
            "sentence-transformers (PyTorch fp32)": lambda: st_model.encode(
                texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True
            ),
            f"kiln {chosen.name} v{chosen.version} ({_recipe(chosen)})": lambda: kiln_variant.encode(
                texts, args.batch_size
            ),
            f"kiln {fp32.name} v{fp32.version} (fp32 ONNX)": lambda: kiln_fp32.encode(texts, args.batch_size),
        }
        outputs = {name: np.asarray(run()) for name, run in runners.items()}  # warm-up + fidelity outputs
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)

    baseline = next(iter(runners))
    reference = outputs[baseline]
    base_rate = len(texts) / statistics.median(seconds[baseline])
    rows = []
    for name in runners:
        rate = len(texts) / statistics.median(seconds[name])
        rows.append(
            {
                "engine": name,
                "sentences_per_s": rate,
                "ratio_vs_sentence_transformers": rate / base_rate,
                "median_s": statistics.median(seconds[name]),
                "seconds": seconds[name],
                **embedding_fidelity(reference, outputs[name]),
            }
        )
    table = Table(title=f"MiniLM, {len(texts)} real English texts, batch {args.batch_size}, medians of {args.repeats}")
    for column in ("engine", "sentences/s", "vs ST", "mean cos", "worst cos", "top-10 overlap"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for row in rows:
        table.add_row(
            row["engine"],
            f"{row['sentences_per_s']:.1f}",
            f"{row['ratio_vs_sentence_transformers']:.2f}x",
            f"{row['mean_cosine']:.4f}",
            f"{row['worst_cosine']:.4f}",
            f"{row['top10_overlap']:.3f}",
        )
    console.print(table)
    hardware = probe()
    console.print(
        f"hardware: {hardware['cpu']}, {hardware['usable_cores']} cores, torch threads {torch.get_num_threads()}, "
        f"int8_fast={hardware['int8_fast']}; words/text median {int(np.median(lengths))}, max {max(lengths)}"
    )
    result = {
        "benchmark": "optimize_minilm",
        "texts": len(texts),
        "corpus": "pydoc_data.topics paragraphs the search never saw (natural order)",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "rows": rows,
        "search": search,
        "hardware": hardware,
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions("kiln", "torch", "onnxruntime", "sentence-transformers", "transformers"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
