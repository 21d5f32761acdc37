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
from kiln.train.distributed import error_path, write_error
from kiln.train.runner import train
from kiln.train.settings import TrainSettings


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    settings = resolve(TrainSettings, spec["train"], environ={})
    export_settings = resolve(ExportSettings, spec["export"], environ={})
    try:
        train(settings, export_settings=export_settings, result_file=Path(spec["result"]))
    except KilnError as exc:
        # a worker process's entry point, like the CLI: exit code 2, and the error left for the parent, which
        # raises it as its own (torchrun's traceback of the failed worker is not shown)
        write_error(error_path(Path(spec["result"]), os.environ.get("RANK", "0")), exc)
        _leave_process_group(finished=False)
        return 2
    _leave_process_group(finished=True)
    return 0


def _leave_process_group(*, finished: bool) -> None:
    """Tear the process group down (through Accelerate's state, which set it up) before the interpreter does.

    Left to interpreter exit, gloo's threads can be destroyed while still joinable, and the process aborts
    ("terminate called without an active exception", exit -6) after a run that succeeded: seen once in the
    two-process test. After a finished run the ranks first meet at a barrier, so none leaves while another is
    still in its last collective.
    """
    import torch.distributed as dist
    from accelerate.state import PartialState

    if not (dist.is_available() and dist.is_initialized()):
        return  # never set up: PartialState() here would start a rendezvous
    state = PartialState()
    if finished:
        state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
