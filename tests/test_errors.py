"""kiln.errors: one hierarchy, data in fields, did-you-mean suggestions."""

from __future__ import annotations

import json

import pytest

from kiln import errors


@pytest.mark.parametrize(
    ("error", "parent"),
    [
        (errors.ConfigError, errors.KilnError),
        (errors.InvalidInput, errors.KilnError),
        (errors.ModelNotFound, errors.KilnError),
        (errors.UnknownFormat, errors.InvalidInput),
        (errors.ArtifactError, errors.KilnError),
        (errors.IntegrityError, errors.ArtifactError),
        (errors.ExportError, errors.KilnError),
        (errors.UnsupportedOpError, errors.ExportError),
        (errors.ParityError, errors.ExportError),
        (errors.CalibrationError, errors.InvalidInput),
        (errors.AccuracyBudgetError, errors.KilnError),
        (errors.Overloaded, errors.KilnError),
        (errors.KilnError, Exception),
    ],
)
def test_hierarchy(error: type[Exception], parent: type[Exception]) -> None:
    assert issubclass(error, parent)


def test_every_public_error_is_a_kiln_error() -> None:
    public = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(public) >= 13
    assert all(issubclass(cls, errors.KilnError) for cls in public)


def test_error_carries_message_and_details() -> None:
    exc = errors.InvalidInput('input "x" has shape [3]; expected [3, 4]', input="x", expected=[3, 4], received=[3])
    assert str(exc) == 'input "x" has shape [3]; expected [3, 4]'
    assert exc.message == str(exc)
    assert exc.details == {"input": "x", "expected": [3, 4], "received": [3]}
    assert json.loads(json.dumps(exc.details)) == exc.details
    assert exc.args == ('input "x" has shape [3]; expected [3, 4]',)


def test_error_without_details() -> None:
    assert errors.Overloaded("queue full; retry later").details == {}


def test_errors_are_catchable_as_their_parent() -> None:
    with pytest.raises(errors.ExportError, match="worst element"):
        raise errors.ParityError("output 0: worst element differs by 0.3 > atol 1e-4", output=0)


def test_did_you_mean_suggests_the_closest_choice() -> None:
    assert errors.did_you_mean("input_id", ["attention_mask", "input_ids"]) == ' (did you mean "input_ids"?)'
    assert errors.did_you_mean("runz", iter(["runs", "samples"])) == ' (did you mean "runs"?)'


def test_did_you_mean_never_suggests_the_value_itself() -> None:
    # a model in the repository but not loaded: "model "strs" is not served here (did you mean "strs"?)"
    assert errors.did_you_mean("strs", ["strs", "iris"]) == ""
    assert errors.did_you_mean("digit", ["digit", "digits"]) == ' (did you mean "digits"?)'


def test_did_you_mean_is_empty_when_nothing_is_close() -> None:
    assert errors.did_you_mean("resnet", ["digits", "minilm"]) == ""
    assert errors.did_you_mean("x", []) == ""
