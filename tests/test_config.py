"""kiln.config.resolve: precedence, file keys, types. The environment is always passed as ``environ=``."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiln.bench.load import LoadSettings
from kiln.config import (
    BenchSettings,
    ExportSettings,
    OptimizeSettings,
    ServeSettings,
    check_variables,
    resolve,
    settings_dict,
)
from kiln.errors import ConfigError
from kiln.train.settings import TrainSettings


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kiln.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_when_nothing_is_given() -> None:
    assert resolve(BenchSettings, environ={}) == BenchSettings()


def test_precedence_override_over_env_over_file_over_default(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, "[bench]\nruns = 10\nwarmup_runs = 4\nsamples = 100\n")
    environ = {"KILN_RUNS": "20", "KILN_WARMUP_RUNS": "5"}

    settings = resolve(BenchSettings, {"runs": 30}, config_file=config_file, environ=environ)

    assert settings.runs == 30  # override beats env and file
    assert settings.warmup_runs == 5  # env beats file
    assert settings.samples == 100  # file beats default
    assert settings.batch_sizes == (1, 8, 32)  # default


def test_none_override_means_not_given() -> None:
    settings = resolve(BenchSettings, {"runs": None}, environ={"KILN_RUNS": "7"})
    assert settings.runs == 7


def test_env_values_are_coerced_to_the_field_types() -> None:
    environ = {
        "KILN_RUNS": "20",
        "KILN_INCLUDE_TORCH": "false",
        "KILN_REPORT_DIR": "reports",
        "KILN_BATCH_SIZES": "1,8,32",
    }
    settings = resolve(BenchSettings, environ=environ)
    assert settings.runs == 20 and isinstance(settings.runs, int)
    assert settings.include_torch is False
    assert settings.report_dir == "reports"
    assert settings.batch_sizes == (1, 8, 32)


def test_env_variables_without_kiln_prefix_are_ignored() -> None:
    assert resolve(BenchSettings, environ={"RUNS": "99", "KILN_RUNZ": "99"}).runs == BenchSettings().runs


def test_tuples_parse_from_comma_lists() -> None:
    assert resolve(OptimizeSettings, {"batch_sizes": "1,8,32"}, environ={}).batch_sizes == (1, 8, 32)
    assert resolve(OptimizeSettings, {"batch_sizes": " 4 , 16 ,"}, environ={}).batch_sizes == (4, 16)
    recipes = resolve(OptimizeSettings, environ={"KILN_RECIPES": "int8-dynamic,fp16"}).recipes
    assert recipes == ("int8-dynamic", "fp16")
    keys = resolve(ServeSettings, environ={"KILN_API_KEYS": "alpha,beta"})
    assert keys.api_keys == ("alpha", "beta")


def test_numbers_parse_from_strings() -> None:
    settings = resolve(OptimizeSettings, environ={"KILN_MIN_SPEEDUP": "2", "KILN_EVAL_SAMPLES": "64"})
    assert settings.min_speedup == 2.0 and isinstance(settings.min_speedup, float)
    assert settings.eval_samples == 64
    assert resolve(ServeSettings, environ={"KILN_INTRA_OP_THREADS": "4"}).intra_op_threads == 4
    assert resolve(ServeSettings, environ={"KILN_P99_TARGET_MS": "150"}).p99_target_ms == 150.0


def test_file_lists_become_tuples_and_ints_become_floats(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, "[optimize]\nbatch_sizes = [1, 16]\nmax_accuracy_drop = 0\n")
    settings = resolve(OptimizeSettings, config_file=config_file, environ={})
    assert settings.batch_sizes == (1, 16)
    assert settings.max_accuracy_drop == 0.0 and isinstance(settings.max_accuracy_drop, float)


def test_file_section_defaults_to_the_stage_name_and_can_be_chosen(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, "[bench]\nruns = 3\n[ci]\nruns = 4\n[optimize]\nmeasure_repeats = 9\n")
    assert resolve(BenchSettings, config_file=config_file, section="ci", environ={}).runs == 4
    stages_only = write_toml(tmp_path, "[bench]\nruns = 3\n[optimize]\nmeasure_repeats = 9\n")
    assert resolve(BenchSettings, config_file=stages_only, environ={}).runs == 3
    assert resolve(OptimizeSettings, config_file=stages_only, environ={}).measure_repeats == 9


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("[laod]\nrates = [10]\n", r'unknown table \[laod\] \(did you mean "load"\?\)'),
        ("runs = 3\n[bench]\nsamples = 8\n", r'unknown top-level key "runs"'),
    ],
)
def test_unknown_table_or_top_level_key_in_config_file_is_refused(tmp_path: Path, text: str, what: str) -> None:
    config_file = write_toml(tmp_path, text)
    with pytest.raises(ConfigError, match=what + r".*tables \[export\], \[optimize\], \[bench\], \[load\]") as info:
        resolve(BenchSettings, config_file=config_file, environ={})
    assert info.value.details["key"] in ("laod", "runs")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[bench]\nbatch_sizes = 8\n", (8,)),  # a scalar for a list setting is a list of one
        ("[bench]\nruns = 10.0\n", 10),  # an integral float for an int setting is that int
    ],
)
def test_file_values_of_a_near_type_are_converted(tmp_path: Path, text: str, expected: object) -> None:
    settings = resolve(BenchSettings, config_file=write_toml(tmp_path, text), environ={})
    value = settings.batch_sizes if "batch_sizes" in text else settings.runs
    assert value == expected and type(value) is type(expected)


def test_a_load_rate_as_a_number_is_a_list_of_one_float(tmp_path: Path) -> None:
    from kiln.bench import LoadSettings

    config_file = write_toml(tmp_path, "[load]\nrates = 40\n")
    rates = resolve(LoadSettings, config_file=config_file, section="load", environ={}).rates
    assert rates == (40.0,) and isinstance(rates[0], float)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("[bench]\nruns = 10.5\n", r'"runs" has value 10.5; it must be of type int'),
        ("[bench]\nruns = true\n", r'"runs" has value True; it must be of type int'),
        ("[bench]\ninclude_torch = 1\n", r'"include_torch" has value 1; it must be of type bool'),
        ("[bench]\nreport_dir = 3\n", r'"report_dir" has value 3; it must be of type str \| None'),
        ("[bench]\nbatch_sizes = [1, 2.5]\n", r'"batch_sizes" has value \[1, 2.5\]; it must be of type tuple\[int'),
        ('[optimize]\nmin_cosine = "high"\n', r'"min_cosine" has value \'high\'; it must be of type float'),
    ],
)
def test_file_values_of_the_wrong_type_name_the_setting_the_type_and_the_file(
    tmp_path: Path, text: str, what: str
) -> None:
    config_file = write_toml(tmp_path, text)
    cls = OptimizeSettings if "[optimize]" in text else BenchSettings
    with pytest.raises(ConfigError, match=what + r'.*fix \[(bench|optimize)\] \w+ in the config file ".*kiln.toml"'):
        resolve(cls, config_file=config_file, environ={})


def test_typo_in_config_file_key_suggests_the_right_one(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, "[bench]\nrusn = 3\n")
    with pytest.raises(ConfigError, match=r'sets unknown key "rusn" \(did you mean "runs"\?\); known keys: ') as info:
        resolve(BenchSettings, config_file=config_file, environ={})
    assert info.value.details["key"] == "rusn"


def test_unknown_override_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r'unknown setting "warmup_run" \(did you mean "warmup_runs"\?\)'):
        resolve(BenchSettings, {"warmup_run": 2}, environ={})


def test_bad_env_type_names_the_setting_and_the_variable() -> None:
    with pytest.raises(ConfigError, match=r'setting "runs" has value \'many\'; it must be of type int.*KILN_RUNS'):
        resolve(BenchSettings, environ={"KILN_RUNS": "many"})


def test_bad_bool_names_the_setting() -> None:
    with pytest.raises(ConfigError, match='setting "include_torch"'):
        resolve(BenchSettings, environ={"KILN_INCLUDE_TORCH": "maybe"})


def test_bad_tuple_item_names_the_setting() -> None:
    with pytest.raises(ConfigError, match='setting "batch_sizes"'):
        resolve(BenchSettings, {"batch_sizes": "1,eight"}, environ={})


def test_bad_type_in_config_file_names_the_setting(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, '[bench]\nruns = "lots"\n')
    with pytest.raises(ConfigError, match='setting "runs"'):
        resolve(BenchSettings, config_file=config_file, environ={})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(BenchSettings, config_file=tmp_path / "absent.toml", environ={})


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        resolve(BenchSettings, config_file=write_toml(tmp_path, "[bench\n"), environ={})


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[bench\] must be a table"):
        resolve(BenchSettings, config_file=write_toml(tmp_path, "bench = 3\n"), environ={})


def test_settings_are_frozen_and_serialise_to_json_types() -> None:
    settings = resolve(BenchSettings, {"runs": 5}, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.runs = 6  # type: ignore[misc]
    as_dict = settings_dict(settings)
    assert as_dict["runs"] == 5
    assert as_dict["batch_sizes"] == [1, 8, 32]


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ('[train]\nhidden_sizes = "64"\n', "hidden_sizes"),  # was silently (64,)
        ('[train]\nhidden_sizes = "64,32"\n', "hidden_sizes"),  # was silently (64, 32)
        ('[train]\nhidden_sizes = ["64"]\n', "hidden_sizes"),
        ('[bench]\nruns = "10"\n', "runs"),
        ('[bench]\ninclude_torch = "false"\n', "include_torch"),
        ('[load]\nrates = "40"\n', "rates"),
    ],
)
def test_a_quoted_number_bool_or_list_in_the_config_file_is_refused_with_the_toml_rule(
    tmp_path: Path, text: str, setting: str
) -> None:
    from kiln.bench import LoadSettings
    from kiln.train.settings import TrainSettings

    section = text[1 : text.index("]")]
    cls = {"train": TrainSettings, "bench": BenchSettings, "load": LoadSettings}[section]
    config_file = write_toml(tmp_path, text)
    with pytest.raises(
        ConfigError, match=rf'setting "{setting}" has value .*; it must be of type .*written without quotes; fix \['
    ):
        resolve(cls, config_file=config_file, section=section, environ={})


def test_a_list_where_one_string_goes_is_refused_without_the_quotes_hint(tmp_path: Path) -> None:
    # `target = ["a", "b"]` was told that lists are written without quotes, which they were not
    from kiln.train.settings import TrainSettings

    config_file = write_toml(tmp_path, '[train]\ntarget = ["alcohol", "malic_acid"]\n')
    with pytest.raises(ConfigError, match=r"type str; write one quoted value such as \"name\", not a list; fix") as err:
        resolve(TrainSettings, config_file=config_file, section="train", environ={})
    assert "without quotes" not in str(err.value)


def test_a_string_in_the_config_file_is_still_a_list_of_one_for_a_list_of_strings(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, '[serve]\nmodels = "minilm"\napi_keys = ["k1", "k2"]\n')
    settings = resolve(ServeSettings, config_file=config_file, environ={})
    assert settings.models == ("minilm",) and settings.api_keys == ("k1", "k2")


@pytest.mark.parametrize(
    ("environ", "text"),
    [
        ({"KILN_MAX_QUEUE_DELAY_MS": "nan"}, None),  # slipped past `max_queue_delay_ms < 0`
        ({}, "[serve]\nmax_queue_delay_ms = nan\n"),
        ({"KILN_MAX_QUEUE_DELAY_MS": "inf"}, None),
        ({}, "[serve]\nmax_queue_delay_ms = inf\n"),
    ],
)
def test_nan_and_infinity_are_refused_for_every_number_setting(
    tmp_path: Path, environ: dict[str, str], text: str | None
) -> None:
    config_file = write_toml(tmp_path, text) if text else None
    with pytest.raises(ConfigError, match=r'"max_queue_delay_ms" has value .*(nan|inf).*NaN and infinity are not'):
        resolve(ServeSettings, config_file=config_file, environ=environ)


@pytest.mark.parametrize(
    "build",
    [  # lr = inf trained into a NaN loss; parity_rtol = inf passed an export whose outputs differed by 0.96
        lambda: TrainSettings(dataset="iris", lr=math.inf),
        lambda: ExportSettings(parity_rtol=math.inf),
        lambda: resolve(ExportSettings, {"parity_atol": "inf"}, environ={}),
    ],
)
def test_infinity_is_refused_where_a_rule_let_it_through(build: Callable[[], object]) -> None:
    with pytest.raises(ConfigError, match=r"has value .*inf.*; NaN and infinity are not values any setting takes"):
        build()


def test_a_config_file_that_is_a_directory_or_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is a directory; pass a TOML file"):
        resolve(BenchSettings, config_file=tmp_path, environ={})
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[bench]\nreport_dir = "r\xe9sultats"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r'latin1.toml" is not UTF-8 text .*save it as UTF-8'):
        resolve(BenchSettings, config_file=latin1, environ={})


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"time_budget_s": -5.0}, "time_budget_s is -5"),
        ({"time_budget_s": float("inf")}, '"time_budget_s" has value inf'),
        ({"min_speedup": 0.5}, 'min_speedup is 0.5; it must be >= 1 .* use objective "size"'),
    ],
)
def test_optimize_budget_and_speedup_outside_their_rules_are_refused(changes: dict[str, float], named: str) -> None:
    # a budget of -5 s skipped every recipe as "spent"; a min_speedup below 1 kept variants slower than their parent
    with pytest.raises(ConfigError, match=named):
        OptimizeSettings(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("parity_atol", -1.0, r"parity_atol is -1; it must be >= 0"),  # accepted, then every export failed its gate
        (
            "parity_rtol",
            float("nan"),
            r"\"parity_rtol\" has value nan; .*NaN and infinity are not values any setting takes",
        ),
        ("parity_samples", 0, r"parity_samples is 0; it must be >= 1"),
    ],
)
def test_export_tolerances_out_of_range_are_refused(field: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExportSettings(**{field: value})  # type: ignore[arg-type]


def test_a_version_policy_below_one_is_refused() -> None:
    # --latest-versions 0 and -1 served one version while the server's settings reported 0 or -1
    for value in (0, -1):
        with pytest.raises(ConfigError, match=rf"version_policy_latest is {value}; it must be >= 1"):
            ServeSettings(version_policy_latest=value)


@pytest.mark.parametrize(
    ("build", "message"),
    [  # each was a TypeError inside a rule ("'<' not supported between 'str' and 'int'"), or passed as another type
        (lambda: ServeSettings(max_batch_size="32"), r'"max_batch_size" has value \'32\'; it must be of type int; in'),
        (lambda: BenchSettings(runs=True), r'"runs" has value True; it must be of type int; fix the BenchSettings'),
        (lambda: OptimizeSettings(batch_sizes="1,32"), r'"batch_sizes" has value \'1,32\'; it must be of type tuple'),
        (lambda: ExportSettings(parity_atol="1e-4"), r'"parity_atol" has value \'1e-4\'; it must be of type float'),
        (lambda: LoadSettings(rates=[10, "x"]), r'"rates" has value \[10, \'x\'\]; it must be of type tuple'),
        (lambda: TrainSettings(dataset="digits", epochs="five"), r'"epochs" has value \'five\'; it must be of type'),
        (lambda: TrainSettings(dataset="digits", track="no"), r'"track" has value \'no\'; it must be of type bool'),
        (lambda: TrainSettings(dataset="digits", lr=True), r'"lr" has value True; it must be of type float; fix'),
    ],
)
def test_settings_built_in_python_are_type_checked_like_flags(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_settings_built_in_python_store_values_in_their_declared_types() -> None:
    train = TrainSettings(dataset="digits", lr=1, epochs=3.0, checkpoint_dir=Path("ck"), hidden_sizes=[32])  # type: ignore[arg-type]
    assert (train.lr, train.epochs, train.checkpoint_dir, train.hidden_sizes) == (1.0, 3, "ck", (32,))
    assert (type(train.lr), type(train.epochs)) == (float, int)
    assert json.loads(json.dumps(settings_dict(train)))["checkpoint_dir"] == "ck"  # a Path would not serialise
    assert OptimizeSettings(batch_sizes=[1, 32]).batch_sizes == (1, 32)  # type: ignore[arg-type]
    assert LoadSettings(rates=(20, 40)).rates == (20.0, 40.0)
    assert ServeSettings(p99_target_ms=None).p99_target_ms is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [  # each started a server that then misbehaved: every request 503 "retry later", or no client let in
        ({"default_timeout_ms": -3.0}, r"default_timeout_ms is -3; it must be a positive, finite number of milli"),
        ({"p99_target_ms": 0.0}, r"p99_target_ms is 0; it must be a positive, finite number of milliseconds"),
        ({"drain_timeout_s": -1.0}, r"drain_timeout_s is -1; it must be >= 0 and finite"),
        ({"max_queue_delay_ms": math.inf}, r'"max_queue_delay_ms" has value inf; it must be of type float; NaN'),
        ({"api_keys": ("ok", "")}, r"api_keys \(--api-key, KILN_API_KEYS\) holds an empty key"),
        ({"admin_keys": (" ",)}, r"admin_keys \(--admin-key, KILN_ADMIN_KEYS\) holds an empty key"),
        ({"intra_op_threads": -3}, r"intra_op_threads is -3; it must be >= 1"),
        ({"http_port": 9000, "grpc_port": 9000}, r"http_port and grpc_port are both 9000; give them different"),
        ({"models": ("",)}, r"models holds an empty name"),
    ],
)
def test_serve_settings_that_would_start_a_broken_server_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeSettings(**changes)


def test_a_kiln_variable_close_to_a_setting_is_refused_and_others_are_left_alone() -> None:
    with pytest.raises(ConfigError, match=r"variable KILN_API_KEY is not a Kiln setting \(did you mean KILN_API_KEYS"):
        check_variables({"KILN_API_KEY": "k"}, [ServeSettings])
    check_variables({"KILN_API_KEYS": "k", "KILN_MY_OWN_THING": "1", "API_KEY": "k"}, [ServeSettings])


def test_a_library_function_given_settings_of_another_type_says_which_it_takes() -> None:
    # export_model(..., settings={"opset": 17}) was "'dict' object has no attribute 'opset_for'"
    from kiln.config import check_settings_object

    with pytest.raises(ConfigError, match=r"settings is a dict, not ExportSettings; pass ExportSettings\(\.\.\.\)"):
        check_settings_object({"opset": 17}, ExportSettings)
    assert check_settings_object(None, BenchSettings) == BenchSettings()


def test_numpy_scalars_are_taken_as_the_numbers_they_are() -> None:
    # np.int64(4) from a grid search was "it must be of type int"
    import numpy as np

    settings = ExportSettings(parity_samples=np.int64(4), parity_atol=np.float32(1e-3))  # type: ignore[arg-type]
    assert (settings.parity_samples, type(settings.parity_samples)) == (4, int)
    assert BenchSettings(batch_sizes=(np.int64(1), 8)).batch_sizes == (1, 8)  # type: ignore[arg-type]
    assert ServeSettings(batching=np.bool_(False)).batching is False  # type: ignore[arg-type]
