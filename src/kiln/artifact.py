"""Read, write and verify model artifacts and repositories.

Layout (Triton-compatible)::

    <repository>/<model-name>/config.pbtxt
    <repository>/<model-name>/<version>/model.onnx
    <repository>/<model-name>/<version>/kiln.json
    <repository>/<model-name>/<version>/assets/...

A version is written into a temp directory, fsynced and renamed into place, so a crash never leaves a
half-written version, and an existing version is never overwritten.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln._utils import atomic_directory, atomic_write_text, sha256_file
from kiln.errors import ArtifactError, IntegrityError, InvalidInput, KilnError, ModelNotFound
from kiln.types import Signature

MANIFEST_FILE = "kiln.json"
MODEL_FILE = "model.onnx"
ASSETS_DIR = "assets"
FORMAT = "kiln.artifact/1"

V2_TO_TRITON = {  # KServe V2 datatype -> Triton's model-config type
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


@dataclass
class Manifest:
    """The content of ``kiln.json``: everything Kiln knows about one version."""

    name: str
    signature: Signature
    task: str = "generic"
    version: int = 0
    created_at: str = ""
    model: dict[str, Any] = field(default_factory=dict)  # file, sha256, size_bytes
    preprocessing: dict[str, Any] = field(default_factory=dict)  # e.g. {"kind": "text", "tokenizer": ...}
    postprocessing: dict[str, Any] = field(default_factory=dict)  # e.g. {"labels": [...]}
    provenance: dict[str, Any] = field(default_factory=dict)  # source, parent, transforms, versions
    checks: dict[str, Any] = field(default_factory=dict)  # parity, fidelity
    benchmarks: list[dict[str, Any]] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    eval_data: dict[str, Any] = field(default_factory=dict)  # held-out set in assets, for the accuracy guard

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "task": self.task,
            "signature": self.signature.to_dict(),
            "model": self.model,
            "preprocessing": self.preprocessing,
            "postprocessing": self.postprocessing,
            "provenance": self.provenance,
            "checks": self.checks,
            "benchmarks": self.benchmarks,
            "hardware": self.hardware,
            "settings": self.settings,
            "eval_data": self.eval_data,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise ArtifactError(
                f'manifest format is {data.get("format")!r}; this Kiln reads "{FORMAT}"; re-export the model',
                format=data.get("format"),
            )
        return cls(
            name=data["name"],
            version=int(data["version"]),
            created_at=data.get("created_at", ""),
            task=data.get("task", "generic"),
            signature=Signature.from_dict(data["signature"]),
            model=data.get("model", {}),
            preprocessing=data.get("preprocessing", {}),
            postprocessing=data.get("postprocessing", {}),
            provenance=data.get("provenance", {}),
            checks=data.get("checks", {}),
            benchmarks=data.get("benchmarks", []),
            hardware=data.get("hardware", {}),
            settings=data.get("settings", {}),
            eval_data=data.get("eval_data", {}),
        )


@dataclass(frozen=True)
class Artifact:
    """One version of one model on disk."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def assets_dir(self) -> Path:
        return self.path / ASSETS_DIR

    @property
    def repository(self) -> Path:
        return self.path.parent.parent

    def check_in_its_model_directory(self) -> None:
        """A new version of this model goes to ``repository/name``: that must be the directory this version is in.

        Raises:
            ArtifactError: a model directory copied or renamed (``cp -r m m-exp``), whose kiln.json still names
                the old model: ``kiln optimize m-exp`` wrote its variant into ``m``.
        """
        folder = self.path.parent
        if folder.name != self.name:
            raise ArtifactError(
                f'"{self.path}" is a version of model "{self.name}" (its {MANIFEST_FILE}), in a directory named '
                f'"{folder.name}" (copied or renamed?); a new version would go to "{self.repository / self.name}". '
                f'Set "name": "{folder.name}" in the {MANIFEST_FILE} of each version of "{folder}", or pass the '
                f"model's own directory",
                path=str(self.path),
                model=self.name,
            )

    @property
    def sha256(self) -> str:
        return str(self.manifest.model["sha256"])

    def ref(self) -> dict[str, Any]:
        """How a child artifact names this one as its parent."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def versions(model_dir: Path) -> list[int]:
    """Complete versions of a model, ascending (temp directories of in-flight writes are ignored).

    Raises:
        ModelNotFound: the directory's name is longer than the file system allows.
        ArtifactError: the directory cannot be read (permissions, I/O).
    """
    try:
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and _is_version_name(p.name))
    except OSError as exc:
        raise _unreadable(model_dir, exc) from exc


def _is_version_name(name: str) -> bool:
    """A version's directory is named by its number as ``write`` writes it: ASCII digits, no leading zero.

    NOTE: ``str.isdigit`` takes "²" (which ``int`` refuses: every request to the model was a 500) and "٣" (read as
    3); "007" is int 7 but lives at "007", where version 7 would not be found.
    """
    return name.isascii() and name.isdigit() and (name == "0" or not name.startswith("0"))


def list_models(repository: Path) -> list[str]:
    try:
        if not repository.is_dir():
            return []
        return sorted(p.name for p in repository.iterdir() if p.is_dir() and versions(p))
    except OSError as exc:
        raise _unreadable(repository, exc) from exc


def _unreadable(path: Path, exc: OSError) -> KilnError:
    """The Kiln error for an ``OSError`` met while reading ``path`` from a repository."""
    if exc.errno == errno.ENAMETOOLONG:
        # NOTE: a name from a request (e.g. the model of a load call) lands here; show its start, not all of it.
        name = path.name if len(path.name) <= 64 else f"{path.name[:60]}…"
        return ModelNotFound(
            f'"{name}" is {len(path.name)} characters, longer than the file system allows ({exc.strerror}), so '
            f'nothing of that name can exist in "{path.parent}"; check the name',
            path=str(path),
        )
    return ArtifactError(
        f'"{path}" cannot be read ({exc.strerror or exc}); check that it exists and that the server\'s user may '
        "read it",
        path=str(path),
    )


def load(path: Path | str, version: int | None = None, *, verify: bool = True) -> Artifact:
    """Load an artifact from a version directory, a model directory (latest version) or a manifest path.

    Raises:
        ModelNotFound: nothing loadable at ``path``.
        IntegrityError: ``verify`` and the model file's sha256 differs from the manifest's.

    Example:
        >>> art = load("kiln-repo/minilm")  # doctest: +SKIP
        >>> art.version, art.manifest.task  # doctest: +SKIP
        (3, 'embedding')
    """
    path = Path(path)
    if path.name == MANIFEST_FILE:
        path = path.parent
    try:
        exists, is_version = path.exists(), (path / MANIFEST_FILE).is_file()
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    if not exists:
        raise ModelNotFound(f'"{path}" does not exist; pass a model directory or a version directory', path=str(path))
    if not is_version:
        found = versions(path)
        models = [] if found else list_models(path)
        if models:  # a repository: "holds no Kiln artifact" sent the user looking for one
            raise ModelNotFound(
                f'"{path}" is a model repository (models: {", ".join(models[:8])}{" ..." if len(models) > 8 else ""}); '
                f'pass one of its model directories, e.g. "{path / models[0]}"',
                path=str(path),
            )
        if not found:
            raise ModelNotFound(
                f'"{path}" holds no Kiln artifact (no {MANIFEST_FILE} and no numbered version directories); '
                "create one with `kiln export`",
                path=str(path),
            )
        if version is None:
            version = found[-1]
        elif version not in found:
            raise ModelNotFound(
                f'model "{path.name}" has no version {version}; it has versions {found}',
                model=path.name,
                version=version,
            )
        path = path / str(version)
    manifest = _read_manifest(path / MANIFEST_FILE)
    if version is not None and manifest.version != version and not is_version:  # a version copied by hand, say
        raise ArtifactError(
            f'"{path}" holds a {MANIFEST_FILE} of version {manifest.version}, not of version {version}, its '
            f'directory (copied from another version?); set "version": {version} in it, or remove the directory',
            path=str(path),
            version=version,
        )
    if version is not None and manifest.version != version:
        raise ModelNotFound(
            f'"{path}" holds version {manifest.version}, not version {version}; pass the model directory instead',
            version=version,
        )
    artifact = Artifact(path=path, manifest=manifest)
    if verify:
        verify_integrity(artifact)
    return artifact


def _read_manifest(manifest_path: Path) -> Manifest:
    fix = "restore it or export the model again"
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ArtifactError(
            f'"{manifest_path}" is missing; every version directory holds its manifest beside {MODEL_FILE}: {fix}',
            path=str(manifest_path),
        ) from exc
    except OSError as exc:
        raise _unreadable(manifest_path, exc) from exc
    except ValueError as exc:  # UnicodeDecodeError
        raise ArtifactError(f'"{manifest_path}" is not UTF-8 text ({exc}); {fix}', path=str(manifest_path)) from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(
            f'"{manifest_path}" is not a valid Kiln manifest ({exc}); {fix}', path=str(manifest_path)
        ) from exc
    if not isinstance(data, dict):
        raise ArtifactError(
            f'"{manifest_path}" holds {_json_kind(data)}, not a JSON object; a Kiln manifest is an object with '
            f'"format", "name", "version" and "signature": {fix}',
            path=str(manifest_path),
        )
    try:
        manifest = Manifest.from_dict(data)
        if not isinstance(manifest.model, dict):  # read by verify_integrity and every engine
            raise TypeError(f'"model" is {_json_kind(manifest.model)}, not an object')
    except KilnError:
        raise
    except KeyError as exc:
        raise ArtifactError(
            f'"{manifest_path}" is not a valid Kiln manifest (it has no {exc} field); {fix}', path=str(manifest_path)
        ) from exc
    except (AttributeError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f'"{manifest_path}" is not a valid Kiln manifest ({exc}); {fix}', path=str(manifest_path)
        ) from exc
    return manifest


def _json_kind(value: Any) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def verify_integrity(artifact: Artifact) -> None:
    model_path = artifact.model_path
    try:
        present = model_path.is_file()
        actual = sha256_file(model_path) if present else ""
    except OSError as exc:
        raise _unreadable(model_path, exc) from exc
    if not present:
        raise ModelNotFound(f'"{model_path}" is missing; the artifact is incomplete', path=str(model_path))
    expected = artifact.manifest.model.get("sha256")
    if not isinstance(expected, str) or not expected:  # "its manifest records None…"
        raise ArtifactError(
            f'"{artifact.path / MANIFEST_FILE}" records no sha256 of {MODEL_FILE} (model.sha256), so the file cannot '
            "be verified: restore the manifest or export the model again",
            path=str(artifact.path),
        )
    if expected != actual:
        raise IntegrityError(
            f'"{model_path}" has sha256 {actual[:16]}…, but its manifest records {str(expected)[:16]}…; the file was '
            "changed after export: restore it or export the model again",
            path=str(model_path),
            expected=expected,
            actual=actual,
        )


def check_model_name(name: str, fix: str = "choose another, e.g. digits-mlp") -> None:
    """Refuse a model name that is not one plain directory of a repository (it is also the name clients call).

    Raises:
        InvalidInput: empty, starting with ".", or holding a path separator: the versions would land outside the
            repository, in a model nested in another, or hidden from its index.
    """
    if not name.strip() or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise InvalidInput(
            f'model name "{name}" is not a valid name; it becomes a directory of the repository (and the name '
            f'clients call), so it must be non-empty, must not start with "." or hold "/" or "\\"; {fix}',
            name=name,
        )


def write(
    repository: Path | str,
    manifest: Manifest,
    model_file: Path,
    *,
    assets: dict[str, Path | bytes] | None = None,
    max_batch_size: int = 64,
) -> Artifact:
    """Write ``model_file`` and ``manifest`` as the next version of ``manifest.name`` in ``repository``.

    The version number, creation time and model hash are filled in here. ``assets`` maps a relative path under
    ``assets/`` to a file/directory to copy or bytes to write. Returns the loaded (verified) artifact.
    """
    check_model_name(manifest.name)
    repository = Path(repository)
    manifest = dataclasses.replace(manifest)  # the caller's object stays as it was
    model_dir = repository / manifest.name
    for _attempt in range(100):
        existing = versions(model_dir)
        manifest.version = (existing[-1] + 1) if existing else 1
        final = model_dir / str(manifest.version)
        try:
            with atomic_directory(final) as tmp:
                shutil.copyfile(model_file, tmp / MODEL_FILE)
                manifest.model = {
                    "file": MODEL_FILE,
                    "sha256": sha256_file(tmp / MODEL_FILE),
                    "size_bytes": (tmp / MODEL_FILE).stat().st_size,
                }
                manifest.created_at = datetime.now(UTC).isoformat(timespec="seconds")
                for rel, content in (assets or {}).items():
                    target = tmp / ASSETS_DIR / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if isinstance(content, bytes):
                        target.write_bytes(content)
                    elif content.is_dir():
                        shutil.copytree(content, target)
                    else:
                        shutil.copyfile(content, target)
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError:
            if final.is_dir():  # another writer took this version number first; take the next one
                continue
            if final.exists():  # a file of that name: no writer will move it, and every retry met it
                raise ArtifactError(
                    f'"{final}" is a file where version {manifest.version} of model "{manifest.name}" would go; move '
                    "or remove it (a model directory holds only version directories and config.pbtxt)",
                    path=str(final),
                ) from None
            raise
        break
    else:
        raise ArtifactError(f'could not allocate a new version under "{model_dir}"', path=str(model_dir))
    atomic_write_text(model_dir / "config.pbtxt", triton_config(manifest, max_batch_size))
    return load(final)


def triton_dims(shape: tuple[int, ...], batched: bool) -> dict[str, Any]:
    """A tensor's ``dims`` in a Triton model config, without the batch axis when ``batched``.

    A tensor of the batch axis alone (a classifier's label, a text input) is ``dims: [1]`` reshaped to ``[]``, as
    Triton writes it: ``dims: [1]`` alone reads as ``[-1, 1]``, and Triton refuses the model for the mismatch.
    """
    dims = list(shape[1:] if batched else shape)
    return {"dims": dims} if dims else {"dims": [1], "reshape": {"shape": []}}


def triton_config(manifest: Manifest, max_batch_size: int) -> str:
    """A Triton ``config.pbtxt`` for the ONNX Runtime backend.

    Triton's dims exclude the batch axis when ``max_batch_size > 0``; we batch only when every tensor's first axis
    is dynamic. Text models take raw strings in Kiln but token ids in Triton (tokenisation is Kiln's), so the
    config always describes the ONNX graph itself.
    """
    tensors = list(manifest.signature.inputs) + list(manifest.signature.outputs)
    batched = max_batch_size > 0 and all(t.shape and t.shape[0] == -1 for t in tensors)

    def block(kind: str, specs: Any) -> list[str]:
        lines = [f"{kind} ["]
        entries = []
        for spec in specs:
            dims = triton_dims(spec.shape, batched)
            reshape = "\n    reshape: { shape: [ ] }" if "reshape" in dims else ""
            entries.append(
                f'  {{\n    name: "{spec.name}"\n    data_type: {V2_TO_TRITON[spec.dtype]}\n'
                f"    dims: [ {', '.join(str(d) for d in dims['dims'])} ]{reshape}\n  }}"
            )
        lines.append(",\n".join(entries))
        lines.append("]")
        return lines

    lines = [
        f'name: "{manifest.name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size if batched else 0}",
        *block("input", manifest.signature.inputs),
        *block("output", manifest.signature.outputs),
        "version_policy: { all { } }",
    ]
    if batched:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 2000 }")
    return "\n".join(lines) + "\n"
