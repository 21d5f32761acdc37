"""The served model repository: which versions are loaded, and swapping them without dropping a request.

A load builds the new versions' engines and warms them up on a worker thread while the old versions keep
serving; only when the new ones are warm does one assignment make them visible, after which the versions that
left the policy (latest-N) drain their queues and close. A request that already holds an old version finishes
on it; a new request sees the new set. ``kiln.artifact.load`` verifies every model file's sha256 on the way in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import artifact as artifacts
from kiln.errors import InvalidInput, KilnError, ModelNotFound, did_you_mean
from kiln.serve.batcher import Batcher, BatchPolicy
from kiln.serve.metrics import ModelMetrics, ServerMetrics
from kiln.serve.model import ServedModel

logger = logging.getLogger(__name__)


@dataclass
class LoadedVersion:
    model: ServedModel
    batcher: Batcher
    metrics: ModelMetrics
    load_s: float  # build + warm-up

    @property
    def version(self) -> int:
        return self.model.version


@dataclass
class _Failure:
    version: int | None
    reason: str


class ModelRepository:
    """Loads, serves and swaps versions of the models in one repository directory.

    Example:
        >>> repo = ModelRepository(Path("kiln-repo"), policy, ServerMetrics())  # doctest: +SKIP
        >>> await repo.load("minilm")  # doctest: +SKIP
        [2]
        >>> repo.get("minilm").model.version  # doctest: +SKIP
        2
    """

    def __init__(
        self,
        root: Path,
        policy: BatchPolicy,
        metrics: ServerMetrics,
        *,
        latest_versions: int = 1,
        instances: int | None = None,
        sessions: int | None = None,
        intra_op_threads: int | None = None,
        warmup: bool = True,
    ) -> None:
        if not root.is_dir():
            what = "is a file, not a directory" if root.exists() else "does not exist"
            raise ModelNotFound(f'model repository "{root}" {what}; pass a directory made by `kiln export`')
        self.root = root
        self.policy = policy
        self.metrics = metrics
        self.latest_versions = max(1, latest_versions)
        self.instances = instances
        self.sessions = sessions
        self.intra_op_threads = intra_op_threads
        self.warmup = warmup
        self._served: dict[str, dict[int, LoadedVersion]] = {}
        self._failures: dict[str, _Failure] = {}
        self._unloaded_on_request: set[str] = set()  # a SIGHUP leaves these alone until a load over the API
        self._lock = asyncio.Lock()

    # -- queries (synchronous: no await between finding a version and queueing on it) ---------------------------
    def get(self, name: str, version: str | int | None = None) -> LoadedVersion:
        """The loaded version ``version`` of ``name`` (the newest loaded when ``None``)."""
        served = self._served.get(name)
        if not served:
            known = sorted(set(self._served) | set(artifacts.list_models(self.root)))
            state = "" if name not in known else " (it is in the repository but not loaded; load it first)"
            raise ModelNotFound(
                f'model "{name}" is not served here{did_you_mean(name, known)}{state}; '
                f"served models: {', '.join(sorted(self._served)) or 'none'}",
                model=name,
            )
        if version is None or version == "":
            return served[max(served)]
        number = _version_number(name, version)
        if number not in served:
            raise ModelNotFound(
                f'model "{name}" has no loaded version {version}; loaded versions: {sorted(served)}',
                model=name,
                version=str(version),
            )
        return served[number]

    def served(self) -> dict[str, dict[int, LoadedVersion]]:
        return self._served

    def served_versions(self, name: str) -> list[LoadedVersion]:
        self.get(name)  # raises ModelNotFound with a suggestion
        return [self._served[name][v] for v in sorted(self._served[name])]

    def index(self) -> list[dict[str, Any]]:
        """Every model in the repository directory and every loaded version, with its state."""
        entries: list[dict[str, Any]] = []
        for name in sorted(set(artifacts.list_models(self.root)) | set(self._served) | set(self._failures)):
            loaded = self._served.get(name, {})
            for version in sorted(loaded):
                entries.append({"name": name, "version": str(version), "state": "READY", "reason": ""})
            failure = self._failures.get(name)
            if failure is not None:
                failed = "" if failure.version is None else str(failure.version)
                entries.append({"name": name, "version": failed, "state": "UNAVAILABLE", "reason": failure.reason})
            elif not loaded:
                entries.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"})
        return entries

    # -- control ------------------------------------------------------------------------------------------------
    async def load(self, name: str) -> list[int]:
        """Load (or reload) the latest-N versions of ``name``; returns the versions now served.

        The previous versions keep serving until the new ones are warm. A version already loaded and still in
        the policy is kept as it is (not rebuilt).
        """
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ModelNotFound(f'"{name}" is not a model name; a model is a directory directly inside the repository')
        self._unloaded_on_request.discard(name)
        async with self._lock:
            wanted = artifacts.versions(self.root / name)[-self.latest_versions :]
            if not wanted:
                known = artifacts.list_models(self.root)
                raise ModelNotFound(
                    f'model "{name}" is not in repository "{self.root}"{did_you_mean(name, known)}; '
                    f"available: {', '.join(known) or 'none'}",
                    model=name,
                )
            current = self._served.get(name, {})
            fresh: dict[int, LoadedVersion] = {}
            for version in wanted:
                if version in current:
                    continue
                try:
                    fresh[version] = await asyncio.to_thread(self._build, name, version)
                except BaseException as exc:  # cancelled too (a signal during start-up): close what was built
                    if isinstance(exc, Exception):
                        self._record_failure(name, version, exc)
                    for loaded in fresh.values():
                        self.metrics.forget(name, loaded.version)
                        await loaded.batcher.close()
                    raise
            for loaded in fresh.values():
                loaded.batcher.start()
            keep = {v: lv for v, lv in current.items() if v in wanted}
            self._served = {**self._served, name: {**keep, **fresh}}  # one assignment: the swap
            self._failures.pop(name, None)
            retired = [lv for v, lv in current.items() if v not in wanted]
            for loaded in retired:  # in the lock: a load of the same version must bind fresh series
                self.metrics.forget(name, loaded.version)
        for loaded in retired:
            await loaded.batcher.close()
            logger.info("unloaded %s version %d", name, loaded.version)
        return sorted(self._served[name])

    async def unload(self, name: str, *, requested: bool = True) -> None:
        """Stop serving ``name``: new requests are refused at once; queued and running ones finish.

        ``requested``: an operator's unload (over the API), which a SIGHUP does not undo; not one because the
        model's directory is gone, which a SIGHUP undoes when it is back.
        """
        async with self._lock:
            if name not in self._served:
                raise ModelNotFound(
                    f'model "{name}" is not loaded{did_you_mean(name, self._served)}; '
                    f"loaded: {', '.join(sorted(self._served)) or 'none'}",
                    model=name,
                )
            retired = self._served[name]
            self._served = {k: v for k, v in self._served.items() if k != name}
            for version in retired:  # in the lock: a load of the same version must bind fresh series
                self.metrics.forget(name, version)
        if requested:
            self._unloaded_on_request.add(name)
        logger.info("unloaded %s versions %s", name, sorted(retired))
        for loaded in retired.values():
            await loaded.batcher.close()

    async def reload(self, models: Sequence[str] = ()) -> None:
        """Bring the repository's models to their latest-N versions on disk (SIGHUP), as Triton's poll mode does.

        ``models`` are the ones to serve (``--models``; empty: every model directory). A served model is
        reloaded; one of them not served (its directory is new, or back) is loaded, unless an operator unloaded
        it over the API. A model that fails keeps serving its loaded versions (the failure is logged and shows in
        ``index``); the reload goes on with the others. A model whose directory is gone from the repository is
        unloaded (queued and running requests finish); one whose directory is there but holds no version (a copy
        in progress, say) keeps serving.
        """
        on_disk = artifacts.list_models(self.root)
        wanted = [m for m in (models or on_disk) if m in on_disk and m not in self._unloaded_on_request]
        for name in [*self._served, *(m for m in wanted if m not in self._served)]:
            if not (self.root / name).exists():
                logger.warning("model %s is no longer in repository %s; unloading it", name, self.root)
                await self.unload(name, requested=False)
                continue
            if name not in self._served:
                logger.info("model %s is in repository %s and not served; loading it", name, self.root)
            try:
                await self.load(name)
            except Exception as exc:  # one model's failure must not stop the others' reload
                logger.error("reload of %s failed, the loaded versions keep serving: %s", name, _reason(exc))

    async def drain(self) -> None:
        for served in list(self._served.values()):
            for loaded in served.values():
                await loaded.batcher.drain()

    async def close(self) -> None:
        served, self._served = self._served, {}
        for versions in served.values():
            for loaded in versions.values():
                await loaded.batcher.close()

    def _record_failure(self, name: str, version: int, exc: Exception) -> None:
        """Remember why ``version`` of ``name`` did not load, for ``index``; log a non-Kiln error with its trace."""
        self._failures[name] = _Failure(version, _reason(exc))
        if not isinstance(exc, KilnError):  # not a failure Kiln expects: a bug, or the machine (memory, device)
            logger.error("loading %s version %d failed unexpectedly", name, version, exc_info=exc)
        else:  # a load over the API answered its 409 and left no line in the log
            logger.error("loading %s version %d failed: %s", name, version, _reason(exc))

    def _build(self, name: str, version: int) -> LoadedVersion:
        started = time.perf_counter()
        artifact = artifacts.load(self.root / name, version)
        model = ServedModel(
            artifact, instances=self.instances, sessions=self.sessions, intra_op_threads=self.intra_op_threads
        )
        if self.warmup:
            model.warmup(self.policy.max_batch_size)
        metrics = self.metrics.for_model(name, version)
        batcher = Batcher(model, self.policy, metrics)
        load_s = time.perf_counter() - started
        fixed, per_unit, _ = model.cost.coefficients
        logger.info(
            "loaded %s version %d in %.2f s (warm-up included); batch cost: %.2f ms + %.3f ms/%s",
            name,
            version,
            load_s,
            fixed * 1e3,
            per_unit * 1e3,
            "token" if model.is_text else "row",  # a tensor model's rows have length 1
        )
        if model.coupled_ops:
            logger.info(
                "%s version %d: its operators %s make a row's output depend on its batch-mates, so requests run "
                "one by one, never merged",
                name,
                version,
                ", ".join(model.coupled_ops),
            )
        return LoadedVersion(model, batcher, metrics, load_s)


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, KilnError) else f"{type(exc).__name__}: {exc}"


def _version_number(name: str, version: str | int) -> int:
    # NOTE: not int(version) alone: it takes "1_0" (10), " 2", "+2" and "٢" (Arabic-Indic 2), so a malformed
    # version would be served by another one. A version is what names its directory: ASCII digits.
    if isinstance(version, int) or (version.isascii() and version.isdigit()):
        return int(version)
    raise InvalidInput(  # the client's malformed value: 400 / INVALID_ARGUMENT, as Triton answers (was a 404)
        f'model "{name}" version "{version}" is not a version number; versions are 1, 2, 3 ...',
        model=name,
        version=str(version),
    )
