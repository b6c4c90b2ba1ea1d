"""JSON output against a schema: write the JSON object a given schema describes, filled with given values.

Difficulty 1: two fields (string, integer, boolean); 2: three or four, with enums and decimals; 3: four or five,
with an array of strings and a nested object. Every field is required and no other is allowed, so the expected
object is fully determined. Reward (partial credit, documented): 0 when the reply is not JSON (a fenced block is
accepted) or breaks the schema; 0.5 when it satisfies the schema with some value other than the one given; 1 when it
is the expected object.

The schemas use a small subset of JSON Schema, checked by `validate` here (`jsonschema` is not a dependency of this
package): type, properties, required, additionalProperties (false), items, minItems, maxItems, enum, minimum,
maximum, minLength, maxLength.
"""

from __future__ import annotations

import json
import random
import re

from .base import Domain, Task
from .common import NAMES, assistant, made_up_name, made_up_word, user

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "minimum",
    "maximum", "minLength", "maxLength", "description",
}  # fmt: skip


def validate(instance, schema: dict, path: str = "$") -> list[str]:
    """The ways `instance` breaks `schema` (empty when it conforms), each naming the place, e.g. "$.age: ..."."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"schema at {path} uses {sorted(unknown)}, which this validator does not support")
    kind = schema.get("type")
    if kind is not None and not _TYPES[kind](instance):
        return [f"{path}: expected {kind}, got {type(instance).__name__}"]
    errors = []
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} is below the minimum {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{path}: {instance} is above the maximum {schema['maximum']}")
    if isinstance(instance, str) and not schema.get("minLength", 0) <= len(instance) <= schema.get("maxLength", 1e9):
        errors.append(f"{path}: the string's length {len(instance)} is out of bounds")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0) or len(instance) > schema.get("maxItems", len(instance)):
            errors.append(f"{path}: {len(instance)} items is out of bounds")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: missing required {key!r}" for key in schema.get("required", []) if key not in instance]
        if schema.get("additionalProperties", True) is False:
            errors += [f"{path}: {key!r} is not allowed" for key in instance if key not in properties]
        for key, sub in properties.items():
            if key in instance:
                errors += validate(instance[key], sub, f"{path}.{key}")
    return errors


def _same(a, b) -> bool:
    """JSON equality that tells true from 1."""
    if isinstance(a, bool) or isinstance(b, bool) or type(a) is str or type(b) is str or a is None or b is None:
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) in (int, float) and type(b) in (int, float) and a == b


COLORS = ["red", "green", "blue", "yellow", "black", "white"]
SIZES = ["small", "medium", "large"]


def _field(rng: random.Random, name: str):
    """(schema, value) of one field."""
    if name in ("name", "owner"):
        return {"type": "string"}, rng.choice(NAMES)
    if name in ("city", "code"):
        return {"type": "string"}, made_up_name(rng, rng.randint(2, 3))
    if name == "age":
        return {"type": "integer", "minimum": 0, "maximum": 120}, rng.randint(1, 99)
    if name in ("score", "count", "year", "level"):
        return {"type": "integer"}, rng.randint(1, 2030)
    if name in ("active", "verified", "public"):
        return {"type": "boolean"}, rng.random() < 0.5
    if name == "price":
        return {"type": "number", "minimum": 0}, rng.randint(1, 99999) / 100
    if name == "color":
        return {"type": "string", "enum": COLORS}, rng.choice(COLORS)
    if name == "size":
        return {"type": "string", "enum": SIZES}, rng.choice(SIZES)
    if name == "tags":
        schema = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}
        return schema, [made_up_word(rng, rng.randint(1, 2)) for _ in range(rng.randint(1, 3))]
    if name == "address":
        city, zip_code = made_up_name(rng, 2), rng.randint(10000, 99999)
        return _object({"city": {"type": "string"}, "zip": {"type": "integer"}}), {"city": city, "zip": zip_code}
    raise ValueError(f"no field {name!r}")


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


WIDE = ["city", "code", "score", "count", "year", "level"]  # many values each: every task has one or more
SIMPLE = [*WIDE, "name", "owner", "age", "active", "verified", "public"]
RICHER = ["price", "color", "size"]
LEVELS = {1: (2, 2, []), 2: (3, 4, RICHER), 3: (4, 5, RICHER + ["tags", "address"])}  # fields, extra kinds


def _say(name: str, value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{name} {k} is {json.dumps(v)}" for k, v in value.items())
    return f"{name} is {json.dumps(value)}"


def extract_json(completion: str) -> str:
    match = re.search(r"```[ \t]*(?:json)?[ \t]*\n(.*?)```", completion, re.DOTALL | re.IGNORECASE)
    return (match.group(1) if match else completion).strip()


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class JsonSchema(Domain):
    name = "json_schema"
    description = "write the JSON object a schema describes, with the given values"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        fewest, most, extra = LEVELS[difficulty]
        n = rng.randint(fewest, most)
        names = [rng.choice(WIDE)]
        names += rng.sample(extra, rng.randint(1, 2)) if extra else []
        names += rng.sample([f for f in SIMPLE if f not in names], n - len(names))
        rng.shuffle(names)
        fields = {name: _field(rng, name) for name in names}
        schema = _object({name: s for name, (s, _) in fields.items()})
        expected = {name: v for name, (_, v) in fields.items()}
        values = "; ".join(_say(name, v) for name, v in expected.items())
        schema_text = json.dumps(schema, separators=(",", ":"))
        question = f"Write a JSON object that matches this schema:\n{schema_text}\nValues: {values}."
        reasoning = "Fields: " + ", ".join(f"{name} ({s['type']})" for name, (s, _) in fields.items()) + "."
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(question)],
            answer={"schema": schema, "expected": expected}, solution=[assistant(json.dumps(expected), reasoning)],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        try:
            obj = json.loads(extract_json(completion), parse_constant=_no_constant)
        except (ValueError, RecursionError):  # not JSON (JSONDecodeError is a ValueError), NaN, too deep
            return 0.0
        if validate(obj, task.answer["schema"]):
            return 0.0
        return 1.0 if _same(obj, task.answer["expected"]) else 0.5
