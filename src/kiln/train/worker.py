"""``python -m kiln.train.worker SPEC.json``: one rank of a data-parallel run (torchrun starts one per process).

Not imported by ``kiln.train``, so ``python -m`` runs it fresh (see :mod:`kiln.train.distributed`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kiln.config import ExportSettings, resolve
from kiln.errors import KilnError
from kiln.train.distributed import error_path, leave_process_group, step_reporter, write_error
from kiln.train.runner import train
from kiln.train.settings import TrainSettings


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    settings = resolve(TrainSettings, spec["train"], environ={})
    export_settings = resolve(ExportSettings, spec["export"], environ={})
    rank = os.environ.get("RANK", "0")
    try:
        on_step = step_reporter() if rank == "0" else None  # the parent draws its progress bar from rank 0's steps
        train(settings, export_settings=export_settings, on_step=on_step, result_file=Path(spec["result"]))
    except KilnError as exc:
        # a worker process's entry point, like the CLI: exit code 2, and the error left for the parent, which
        # raises it as its own (torchrun's traceback of the failed worker is not shown)
        write_error(error_path(Path(spec["result"]), rank), exc)
        leave_process_group(finished=False)
        return 2
    leave_process_group(finished=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
