"""The small JSON Schema validator used by the json_schema domain."""

import pytest

from hybridmoe.tasks.json_schema import validate

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "size": {"type": "string", "enum": ["small", "large"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_conforming_instances():
    assert validate({"name": "Ada", "age": 31}, SCHEMA) == []
    assert validate({"name": "Ada", "age": 31, "size": "small", "tags": ["a"], "active": False}, SCHEMA) == []


@pytest.mark.parametrize(
    "instance, where",
    [
        ([], "expected object"), ({"age": 3}, "missing required 'name'"), ({"name": "A", "age": 3, "x": 1}, "'x'"),
        ({"name": "A", "age": True}, "$.age: expected integer"), ({"name": "A", "age": 3.5}, "$.age"),
        ({"name": "A", "age": 121}, "maximum"), ({"name": "", "age": 1}, "length"),
        ({"name": "A", "age": 1, "size": "x"}, "one of"), ({"name": "A", "age": 1, "tags": ["a", "b", "c"]}, "items"),
        ({"name": "A", "age": 1, "tags": [1]}, "$.tags[0]"), ({"name": "A", "age": 1, "active": 1}, "boolean"),
    ],
)  # fmt: skip
def test_violations_are_named(instance, where):
    errors = validate(instance, SCHEMA)
    assert errors and any(where in e for e in errors), errors


def test_unsupported_keywords_are_an_error():
    with pytest.raises(ValueError, match="pattern"):
        validate("a", {"type": "string", "pattern": "a+"})
