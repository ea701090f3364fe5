"""Metadata filters: compile a Mongo-like filter once into a predicate over one metadata dict.

Grammar:
    filter    := None | callable(metadata) -> bool | {clause, ...}         (clauses are ANDed)
    clause    := "field": literal                                          (equality)
               | "field": {"$eq"|"$ne"|"$in"|"$nin"|"$gt"|"$gte"|"$lt"|"$lte": value, ...}
               | "$and": [filter, ...] | "$or": [filter, ...] | "$not": filter

Semantics chosen on purpose:
- A missing key never matches, except under `$ne` and `$nin`: "not equal to x" holds for a document
  that has no value at all, as in MongoDB. Write `{"$and": [{"k": {"$ne": x}}, ...]}` with an `$in`
  or a `$gte` on the key when the key must exist.
- `True` and `1` are different values (JSON keeps them apart; Python's `True == 1` would not).
- Range operators compare numbers with numbers and strings with strings; any other pairing
  (a string against a number, a missing or null value) is a non-match, never a crash.
- `{}` matches everything; an empty `$and`/`$or` list is an error (ambiguous, as in MongoDB).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, Union

from ..errors import InvalidInputError

Predicate = Callable[[dict], bool]
Filter = Union[None, Predicate, Mapping[str, Any]]

_RANGE_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}
_FIELD_OPS = ("$eq", "$ne", "$in", "$nin", *_RANGE_OPS)
_LOGICAL_OPS = ("$and", "$or", "$not")
_MISSING = object()


def compile_filter(filter: Filter) -> Predicate:  # noqa: A002 - the public name users pass
    """Validate `filter` now and return a predicate `metadata -> bool`.

    Raises InvalidInputError naming the bad piece of the filter.
    """
    return _compile(filter, "filter")


def _compile(spec: Any, path: str) -> Predicate:
    if spec is None:
        return _match_all
    if isinstance(spec, Mapping):
        return _compile_dict(spec, path)
    if callable(spec):
        return _wrap_callable(spec, path)
    raise InvalidInputError(
        f"{path} must be None, a dict or a callable(metadata) -> bool, got {type(spec).__name__}: {spec!r}"
    )


def _match_all(metadata: dict) -> bool:
    return True


def _wrap_callable(fn: Callable[[dict], Any], path: str) -> Predicate:
    def predicate(metadata: dict) -> bool:
        try:
            return bool(fn(metadata))
        except Exception as exc:  # a user's predicate may raise anything; report it as bad input
            raise InvalidInputError(f"{path} (a callable) raised {type(exc).__name__}: {exc}") from exc

    return predicate


def _compile_dict(spec: Mapping[str, Any], path: str) -> Predicate:
    preds = [_compile_clause(key, value, f"{path}[{key!r}]") for key, value in spec.items()]
    return _all_of(preds)


def _compile_clause(key: Any, value: Any, path: str) -> Predicate:
    if not isinstance(key, str):
        raise InvalidInputError(f"{path}: filter keys must be strings, got {type(key).__name__}")
    if key in ("$and", "$or"):
        return _compile_logical_list(key, value, path)
    if key == "$not":
        inner = _compile(value, path)
        return lambda metadata: not inner(metadata)
    if key.startswith("$"):
        raise InvalidInputError(
            f"{path}: unknown operator {key!r} at the top of a filter; expected a field name "
            f"or one of {list(_LOGICAL_OPS)}"
        )
    return _compile_field(key, value, path)


def _compile_logical_list(key: str, value: Any, path: str) -> Predicate:
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidInputError(f"{path}: {key} needs a non-empty list of filters, got {value!r}")
    preds = [_compile(sub, f"{path}[{i}]") for i, sub in enumerate(value)]
    return _all_of(preds) if key == "$and" else _any_of(preds)


def _all_of(preds: list[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    return lambda metadata: all(p(metadata) for p in preds)


def _any_of(preds: list[Predicate]) -> Predicate:
    return lambda metadata: any(p(metadata) for p in preds)


def _compile_field(field: str, value: Any, path: str) -> Predicate:
    if _is_operator_dict(value, path):
        tests = [_compile_op(op, arg, f"{path}[{op!r}]") for op, arg in value.items()]
    else:
        tests = [_compile_op("$eq", value, path)]

    def predicate(metadata: dict) -> bool:
        actual = metadata.get(field, _MISSING)
        return all(test(actual) for test in tests)

    return predicate


def _is_operator_dict(value: Any, path: str) -> bool:
    """A dict whose keys all start with '$' holds operators; one without any is a literal value."""
    if not isinstance(value, Mapping) or not value:
        return False
    is_op = [isinstance(k, str) and k.startswith("$") for k in value]
    if all(is_op):
        return True
    if any(is_op):
        raise InvalidInputError(
            f"{path}: mixes operators and plain keys {list(value)}; use only operators such as "
            f"{{'$gte': 3, '$lt': 9}}, or only plain keys to match a dict value"
        )
    return False


def _compile_op(op: str, arg: Any, path: str) -> Callable[[Any], bool]:
    """Test of one operator against one field's value (`_MISSING` when the key is absent)."""
    if op in ("$eq", "$ne"):
        _check_literal(arg, path)
        if op == "$eq":
            return lambda actual: actual is not _MISSING and _equal(actual, arg)
        return lambda actual: actual is _MISSING or not _equal(actual, arg)
    if op in ("$in", "$nin"):
        choices = _check_choices(arg, path)
        if op == "$in":
            return lambda actual: actual is not _MISSING and any(_equal(actual, c) for c in choices)
        return lambda actual: actual is _MISSING or not any(_equal(actual, c) for c in choices)
    if op in _RANGE_OPS:
        _check_orderable(arg, path)
        compare = _RANGE_OPS[op]
        return lambda actual: _comparable(actual, arg) and compare(actual, arg)
    raise InvalidInputError(f"{path}: unknown operator {op!r}; expected one of {list(_FIELD_OPS)}")


def _check_literal(value: Any, path: str) -> None:
    """Filter values must be JSON-like, like the metadata they are compared with."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_literal(item, f"{path}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise InvalidInputError(f"{path}: dict keys must be strings, got {k!r}")
            _check_literal(item, f"{path}[{k!r}]")
        return
    raise InvalidInputError(
        f"{path}: cannot compare metadata with a {type(value).__name__} ({value!r}); "
        f"use None, bool, int, float, str, list or dict"
    )


def _check_choices(arg: Any, path: str) -> tuple[Any, ...]:
    if not isinstance(arg, (list, tuple, set, frozenset)):
        raise InvalidInputError(f"{path} needs a list of values, got {type(arg).__name__}: {arg!r}")
    choices = tuple(arg)
    for i, item in enumerate(choices):
        _check_literal(item, f"{path}[{i}]")
    return choices


def _check_orderable(arg: Any, path: str) -> None:
    if isinstance(arg, bool) or not isinstance(arg, (int, float, str)):
        raise InvalidInputError(f"{path} needs a number or a string, got {type(arg).__name__}: {arg!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _comparable(a: Any, b: Any) -> bool:
    return (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b
