"""Typed, frozen settings per stage, resolved in one place.

Precedence: explicit value (CLI flag / API argument) > ``KILN_<FIELD>`` environment variable > config file
(TOML, one table per stage: ``[optimize]``, ``[bench]`` ...) > default. The resolved settings are saved into
every artifact and report a stage produces.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from kiln.errors import ConfigError, did_you_mean

S = TypeVar("S")


@dataclass(frozen=True)
class ExportSettings:
    """How ``kiln export`` converts and checks a model."""

    opset: int | None = None  # None: the exporter's own default (opset_for)
    parity_atol: float = 1e-4
    parity_rtol: float = 1e-3
    parity_samples: int = 8
    exporter: str = "dynamo"

    def opset_for(self, exporter: str) -> int:
        """The opset an export writes: the one set, or the exporter's default (PyTorch's dynamo exporter writes
        18 and up; TorchScript, skl2onnx and the Hugging Face path 17)."""
        return self.opset if self.opset is not None else (18 if exporter == "dynamo" else 17)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.opset is not None and self.opset < 1:
            raise ConfigError(f"opset is {self.opset}; it must be >= 1, e.g. 17", setting="opset", value=self.opset)
        for name in ("parity_atol", "parity_rtol"):
            value = getattr(self, name)
            if not value >= 0:  # a negative tolerance fails every export; NaN passes no comparison at all
                raise ConfigError(f"{name} is {value:g}; it must be >= 0, e.g. 1e-4", setting=name, value=value)
        if self.parity_samples < 1:
            raise ConfigError(f"parity_samples is {self.parity_samples}; it must be >= 1, e.g. 8")


@dataclass(frozen=True)
class OptimizeSettings:
    """How ``kiln optimize`` searches for a faster variant.

    ``max_accuracy_drop`` is relative (0.01 = the variant keeps >= 99% of the parent's task accuracy; a negative
    value demands an improvement); ``min_cosine`` is the guard for embedding models (mean cosine against the parent
    on a real corpus). ``objective`` is what the search maximises within that budget: ``"speed"`` (throughput at
    ``target_batch_size``, and the variant must really be faster here) or ``"size"`` (the smallest file, e.g. for
    edge deployment; speed is still measured and reported).
    """

    max_accuracy_drop: float = 0.01
    min_cosine: float = 0.99
    batch_sizes: tuple[int, ...] = (1, 32)
    target_batch_size: int = 32
    time_budget_s: float = 600.0
    recipes: tuple[str, ...] = ()
    eval_samples: int = 512
    measure_repeats: int = 5
    min_speedup: float = 1.03
    objective: str = "speed"

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.objective not in ("speed", "size"):
            raise ConfigError(
                f'objective "{self.objective}" is unknown; use "speed" or "size"', objective=self.objective
            )
        if not -1.0 < self.max_accuracy_drop <= 1.0:
            raise ConfigError(
                f"max_accuracy_drop {self.max_accuracy_drop:g} is outside (-1, 1]; it is a relative drop, e.g. 0.01",
                max_accuracy_drop=self.max_accuracy_drop,
            )
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(
                f"min_cosine {self.min_cosine:g} is outside [-1, 1]; e.g. 0.99", min_cosine=self.min_cosine
            )
        if self.measure_repeats < 1 or self.eval_samples < 1 or self.target_batch_size < 1:
            raise ConfigError(
                "measure_repeats, eval_samples and target_batch_size must be >= 1 "
                f"(got {self.measure_repeats}, {self.eval_samples}, {self.target_batch_size})"
            )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch_sizes {list(self.batch_sizes)} must be positive integers, e.g. 1,32")
        if not 0 < self.time_budget_s < math.inf:
            raise ConfigError(
                f"time_budget_s is {self.time_budget_s:g}; it must be a positive, finite number of seconds, e.g. 600",
                setting="time_budget_s",
            )
        if not 1.0 <= self.min_speedup < math.inf:
            raise ConfigError(
                f"min_speedup is {self.min_speedup:g}; it must be >= 1 (the search keeps only variants really faster "
                'than their parent; to prefer smaller ones whatever their speed, use objective "size")',
                setting="min_speedup",
            )


@dataclass(frozen=True)
class BenchSettings:
    """How ``kiln bench`` measures engines in-process."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup_runs: int = 3
    runs: int = 15
    include_torch: bool = True
    samples: int = 256
    report_dir: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)


@dataclass(frozen=True)
class ServeSettings:
    """How ``kiln serve`` runs a repository.

    ``max_queue_delay_ms`` is the longest a request waits for batch-mates, and the batcher waits at all only where
    its learned batch cost says a fuller batch makes a row markedly cheaper (a GPU, not two CPU cores); with
    ``p99_target_ms`` set it also shortens that wait so a full batch still meets the target. ``grpc_port`` 0 turns
    gRPC off. ``overload_status`` is what an overloaded server answers over HTTP: 503 (with Retry-After) or 429.
    ``body_timeout_s`` is the longest an HTTP request body may pause between two reads (nginx's
    ``client_body_timeout``): a client that stalls part-way gets a 408 and its connection closed, instead of holding
    it, and a graceful shutdown, open.
    """

    http_port: int = 8000
    grpc_port: int = 8001
    host: str = "127.0.0.1"
    models: tuple[str, ...] = ()
    batching: bool = True
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    p99_target_ms: float | None = None
    max_queue_rows: int = 1024
    default_timeout_ms: float | None = None
    instances: int | None = None
    sessions: int | None = None
    intra_op_threads: int | None = None
    max_request_bytes: int = 16 * 1024 * 1024
    max_rows_per_request: int = 256
    overload_status: int = 503
    api_keys: tuple[str, ...] = ()
    admin_enabled: bool = False
    admin_keys: tuple[str, ...] = ()
    version_policy_latest: int = 1
    drain_timeout_s: float = 30.0
    body_timeout_s: float = 10.0
    warmup: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.overload_status not in (429, 503):
            raise ConfigError(
                f"overload_status {self.overload_status} is not allowed; use 503 (with Retry-After) or 429",
                overload_status=self.overload_status,
            )
        if self.intra_op_threads is not None and self.intra_op_threads < 1:  # -3 started a server as it was
            raise ConfigError(
                f"intra_op_threads is {self.intra_op_threads}; it must be >= 1 (or unset: chosen from the cores)",
                setting="intra_op_threads",
            )
        if self.http_port and self.http_port == self.grpc_port:  # refused at bind, as "the port is in use"
            raise ConfigError(
                f"http_port and grpc_port are both {self.http_port}; give them different ports (grpc_port 0 turns "
                "gRPC off)",
                setting="grpc_port",
            )
        if any(not model.strip() for model in self.models):
            raise ConfigError(f"models holds an empty name ({list(self.models)}); name each model to serve")
        if self.instances is not None and self.instances < 1:
            raise ConfigError(f"instances is {self.instances}; it must be >= 1 (or unset: one per core on a CPU)")
        if self.sessions is not None and self.sessions < 1:
            raise ConfigError(
                f"sessions is {self.sessions}; it must be >= 1 (or unset: one ONNX Runtime session per instance)"
            )
        for name in (
            "max_batch_size",
            "max_queue_rows",
            "max_rows_per_request",
            "max_request_bytes",
            "version_policy_latest",  # 0 and -1 served one version while the settings said otherwise
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} is {getattr(self, name)}; it must be >= 1", setting=name)
        if not 0 < self.body_timeout_s < math.inf:
            raise ConfigError(
                f"body_timeout_s is {self.body_timeout_s:g}; it must be a positive, finite number of seconds",
                setting="body_timeout_s",
            )
        if not 0 <= self.max_queue_delay_ms < math.inf:
            raise ConfigError(f"max_queue_delay_ms is {self.max_queue_delay_ms:g}; it must be >= 0 and finite, e.g. 5")
        # a negative default timeout answered every request 503 "retry later", blaming a timeout no client sent
        for name, example in (("default_timeout_ms", "1000"), ("p99_target_ms", "200")):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(
                    f"{name} is {value:g}; it must be a positive, finite number of milliseconds, e.g. {example} "
                    "(or unset)",
                    setting=name,
                )
        if not 0 <= self.drain_timeout_s < math.inf:
            raise ConfigError(
                f"drain_timeout_s is {self.drain_timeout_s:g}; it must be >= 0 and finite seconds, e.g. 30",
                setting="drain_timeout_s",
            )
        for name, flag in (("api_keys", "--api-key"), ("admin_keys", "--admin-key")):
            if any(not key.strip() for key in getattr(self, name)):  # `--api-key "$KEY"`, KEY unset: nobody got in
                raise ConfigError(
                    f"{name} ({flag}, KILN_{name.upper()}) holds an empty key; every key must be non-empty: is the "
                    "shell variable that held it set?",
                    setting=name,
                )
        if not 0 <= self.http_port < 65536 or not 0 <= self.grpc_port < 65536:
            raise ConfigError(f"ports must be in 0..65535 (got http {self.http_port}, grpc {self.grpc_port})")


# Every table a config file may hold, one per stage: ``[load]`` is ``kiln bench --url``'s, ``[train]`` ``kiln train``'s.
STAGE_TABLES = ("export", "optimize", "bench", "load", "serve", "train")


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)  # "<class 'int'>" -> "int"


def _scalar(raw: Any, kind: Any, *, parse_text: bool) -> Any:
    """``raw`` as a ``kind`` (bool, int, float or str): strings are parsed (where ``parse_text``), other values must
    already fit. NaN and infinity fit no setting: NaN slips past every rule (``nan < 0`` is false), and infinity past
    ``lr > 0`` or a tolerance ``>= 0`` (``parity_rtol = inf`` passed every export).

    Raises:
        ValueError: ``raw`` does not fit ``kind``.
    """
    if type(raw).__module__ == "numpy" and getattr(raw, "ndim", None) == 0:  # np.int64(4) from a grid search
        raw = raw.item()
    if isinstance(raw, str):
        if kind is str:
            return raw
        if not parse_text:  # a TOML string where a number or a bool goes: `runs = "10"` is a mistake, not 10
            raise ValueError(raw)
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        value = kind(raw) if kind in (int, float) else raw
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(raw)
        return value
    if kind is str or (kind is bool and not isinstance(raw, bool)):
        raise ValueError(raw)
    if kind in (int, float):
        # NOTE: bool is an int subclass; `runs = true` is a mistake, not 1.
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise ValueError(raw)
        if kind is int and isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError(raw)
            return int(raw)  # `runs = 10.0` means 10
        return kind(raw)
    return raw


_TOML_QUOTES = "; in TOML, numbers, true/false and lists such as [64, 32] are written without quotes"


def _coerce(
    name: str, raw: Any, annotation: Any, source: str, *, parse_text: bool = True, quoted_hint: str = _TOML_QUOTES
) -> Any:
    """``raw`` (from ``source``: a flag, a variable, a config file or a Python argument) as a value of the field's
    type.

    Flags and variables are text, parsed here (``"1,8,32"`` is a list); a config file's values are TOML-typed
    and Python's arguments typed (``parse_text=False``), so a quoted number or list there is refused, with
    ``quoted_hint``, rather than guessed at.
    """
    kind = annotation
    if get_origin(kind) in (Union, types.UnionType):  # `int | None`: None never gets here (it means "not given")
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    try:
        if get_origin(kind) is tuple:
            item_kind = get_args(kind)[0]
            if isinstance(raw, str) and (parse_text or item_kind is str):
                items: Any = [p.strip() for p in raw.split(",") if p.strip()]
            else:
                items = raw if isinstance(raw, list | tuple) else [raw]  # `rates = 40` means (40,)
            return tuple(_scalar(item, item_kind, parse_text=parse_text) for item in items)
        return _scalar(raw, kind, parse_text=parse_text)
    except ValueError as exc:
        hint = ""
        quoted = any(isinstance(item, str) for item in (raw if isinstance(raw, list) else [raw]))
        if kind is str and isinstance(raw, list | tuple):  # `target = ["a", "b"]`: quotes are not the mistake
            hint = '; write one quoted value such as "name", not a list'
        elif not parse_text and quoted:
            hint = quoted_hint
        elif _is_not_finite(raw):
            hint = "; NaN and infinity are not values any setting takes"
        raise ConfigError(
            f'setting "{name}" has value {raw!r}; it must be of type {_type_name(annotation)}{hint}; fix {source}',
            setting=name,
            value=raw,
            source=source,
        ) from exc


def check_field_types(settings: Any) -> None:
    """Make each field of a frozen settings dataclass hold a value of its type, or raise ConfigError naming it.

    Every settings class calls this from ``__post_init__``, so settings built in Python get the checks that
    ``resolve`` gives flags, variables and config files (``epochs="five"`` was a TypeError inside a rule, and
    ``runs=True`` passed as 1). What fits is stored in the field's own type: a whole float in an int field as the
    int, a list as a tuple, a path (``os.PathLike``) in a str field as its string.
    """
    source = f"the {type(settings).__name__}(...) argument"
    hints = get_type_hints(type(settings))
    for field_ in fields(settings):
        value, kind = getattr(settings, field_.name), hints[field_.name]
        if value is None and type(None) in get_args(kind):
            continue
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        hint = "; in Python, pass numbers and True/False unquoted"
        value = _coerce(field_.name, value, kind, source, parse_text=False, quoted_hint=hint)
        object.__setattr__(settings, field_.name, value)  # frozen: this is its construction


def _is_not_finite(raw: Any) -> bool:
    items = raw if isinstance(raw, list | tuple) else [raw]
    words = ("nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity")
    return any(
        (isinstance(item, float) and not math.isfinite(item))
        or (isinstance(item, str) and item.strip().lower() in words)
        for item in items
    )


def load_config_file(path: Path | None, section: str) -> dict[str, Any]:
    """The ``[section]`` table of a TOML config file (empty when there is no file).

    Every table of the file must be a stage's (``STAGE_TABLES``) or ``section``; there are no top-level keys.
    """
    if path is None:
        return {}
    if path.is_dir():
        raise ConfigError(f'config file "{path}" is a directory; pass a TOML file', path=str(path))
    if not path.is_file():
        raise ConfigError(f'config file "{path}" does not exist; pass an existing TOML file', path=str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f'config file "{path}" is not valid TOML ({exc}); fix the syntax', path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f'config file "{path}" is not UTF-8 text ({exc.reason} at byte {exc.start}); a TOML file is UTF-8: '
            "save it as UTF-8 or pass the right file",
            path=str(path),
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f'config file "{path}" cannot be read ({exc.strerror}); pass a readable file', path=str(path)
        ) from exc
    known = list(dict.fromkeys([*STAGE_TABLES, section]))
    for key, value in data.items():
        if key in known and not isinstance(value, dict):
            raise ConfigError(f'config file "{path}": [{key}] must be a table', path=str(path))
        if key not in known:
            what = f"table [{key}]" if isinstance(value, dict) else f'top-level key "{key}"'
            raise ConfigError(
                f'config file "{path}" has unknown {what}{did_you_mean(key, known)}; settings go in one of the '
                f"tables {', '.join(f'[{k}]' for k in known)}",
                path=str(path),
                key=key,
            )
    table: dict[str, Any] = data.get(section, {})
    return table


def resolve(
    cls: type[S],
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    section: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> S:
    """Build settings ``cls`` from overrides > ``KILN_*`` environment > config file > defaults.

    ``None`` values in ``overrides`` mean "not given" (a CLI flag left unset).

    Example:
        >>> resolve(BenchSettings, {"runs": 5}, environ={}).runs
        5
    """
    assert dataclasses.is_dataclass(cls)
    env = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    values: dict[str, Any] = {}

    section = section or cls.__name__.removesuffix("Settings").lower()
    file_values = load_config_file(config_file, section)
    for key, raw in file_values.items():
        if key not in known:
            raise ConfigError(
                f'config file "{config_file}" sets unknown key "{key}"{did_you_mean(key, known)}; '
                f"known keys: {', '.join(known)}",
                key=key,
            )
        source = f'[{section}] {key} in the config file "{config_file}"'
        values[key] = _coerce(key, raw, hints[key], source, parse_text=False)
    for key in known:
        env_value = env.get(f"KILN_{key.upper()}")
        if env_value is not None:
            values[key] = _coerce(key, env_value, hints[key], f"the KILN_{key.upper()} variable")
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in known:
            raise ConfigError(f'unknown setting "{key}"{did_you_mean(key, known)}', key=key)
        values[key] = _coerce(key, raw, hints[key], "the flag or argument")
    return cls(**values)


def check_settings_object(settings: Any, cls: type[S]) -> S:
    """``settings`` as passed to a library function: an instance of ``cls``, or None for its defaults.

    Raises:
        ConfigError: another type (a dict of settings was an AttributeError deep inside the stage).
    """
    if settings is None:
        return cls()
    if not isinstance(settings, cls):
        raise ConfigError(
            f"settings is a {type(settings).__name__}, not {cls.__name__}; pass {cls.__name__}(...), e.g. "
            f"{cls.__name__}(**your_dict)",
            settings_type=type(settings).__name__,
        )
    return settings


def check_variables(environ: Mapping[str, str], settings_classes: Iterable[type]) -> None:
    """Refuse a ``KILN_*`` variable that names no setting of ``settings_classes`` but is close to one.

    ``KILN_API_KEY`` (the flag's name, not the setting's ``api_keys``) was ignored without a word, and the server
    ran without authentication. A variable close to no setting (a user's own ``KILN_*``) is left alone.

    Raises:
        ConfigError: naming the variable and the closest setting's variable.
    """
    known = {f.name for cls in settings_classes for f in fields(cls)}
    for variable in sorted(environ):
        if not variable.startswith("KILN_") or variable[5:].lower() in known:
            continue
        close = difflib.get_close_matches(variable[5:].lower(), sorted(known), n=1, cutoff=0.75)
        if close:
            raise ConfigError(
                f"variable {variable} is not a Kiln setting (did you mean KILN_{close[0].upper()}?); Kiln reads "
                "KILN_<SETTING> for each setting's name: rename the variable, or unset it",
                variable=variable,
            )


def settings_dict(settings: Any) -> dict[str, Any]:
    """A JSON-ready dict of a settings object (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
