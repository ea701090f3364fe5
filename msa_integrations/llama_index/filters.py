"""LlamaIndex `MetadataFilters` -> msa filters, so the engine applies them before routing.

The comparison operators map one to one onto msa's dict filters (see msa_core/filters.py for their
semantics: a missing key matches only `!=` and `nin`; strings compare with strings and numbers with
numbers, any other pairing is a non-match). The list and text operators, which msa's dict grammar
has no word for, become small predicates over the metadata dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters

from msa_core.errors import InvalidInputError
from msa_core.memory.filters import Filter

# What adapters accept: LlamaIndex filters, or an msa filter (dict or callable) passed through as is.
FilterLike = Union[MetadataFilters, MetadataFilter, Mapping[str, Any], Callable[[dict], bool], None]

_OPS = {
    FilterOperator.EQ: "$eq",
    FilterOperator.NE: "$ne",
    FilterOperator.GT: "$gt",
    FilterOperator.GTE: "$gte",
    FilterOperator.LT: "$lt",
    FilterOperator.LTE: "$lte",
    FilterOperator.IN: "$in",
    FilterOperator.NIN: "$nin",
}
_PREDICATE_OPS = (FilterOperator.IS_EMPTY, FilterOperator.CONTAINS, FilterOperator.ANY, FilterOperator.ALL,
                  FilterOperator.TEXT_MATCH, FilterOperator.TEXT_MATCH_INSENSITIVE)
_SUPPORTED = [o.value for o in (*_OPS, *_PREDICATE_OPS)]
_MISSING = object()


def to_msa_filter(filters: FilterLike) -> Filter:
    """An msa filter equivalent to `filters` (None when nothing is filtered)."""
    if filters is None:
        return None
    if isinstance(filters, MetadataFilters):
        return _translate_group(filters, "filters")
    if isinstance(filters, MetadataFilter):
        return _translate_one(filters, "filter")
    if isinstance(filters, Mapping) or callable(filters):
        return filters  # already an msa filter; the engine validates it
    raise InvalidInputError(
        f"filters must be MetadataFilters, a MetadataFilter, an msa filter dict or a callable, "
        f"got {type(filters).__name__}: {filters!r}")


def combine(*filters: Filter) -> Filter:
    """All the given msa filters at once (None ones are skipped)."""
    present = [f for f in filters if f is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else {"$and": present}


def _translate_group(group: MetadataFilters, path: str) -> Filter:
    parts = [_translate_group(f, f"{path}.filters[{i}]") if isinstance(f, MetadataFilters)
             else _translate_one(f, f"{path}.filters[{i}]") for i, f in enumerate(group.filters)]
    if not parts:
        return None  # LlamaIndex stores treat an empty filter list as "no filter"
    condition = group.condition or FilterCondition.AND
    if condition == FilterCondition.AND:
        return parts[0] if len(parts) == 1 else {"$and": parts}
    if condition == FilterCondition.OR:
        return {"$or": parts}
    if condition == FilterCondition.NOT:  # LlamaIndex: none of the filters matches
        return {"$not": {"$or": parts}}
    raise InvalidInputError(f"{path}: unknown condition {condition!r}; use 'and', 'or' or 'not'")


def _translate_one(f: MetadataFilter, path: str) -> Filter:
    op = FilterOperator(f.operator)
    if op in _OPS:
        if op in (FilterOperator.IN, FilterOperator.NIN) and not isinstance(f.value, (list, tuple)):
            raise InvalidInputError(
                f"{path}: operator {op.value!r} on key {f.key!r} needs a list value, got {f.value!r}; "
                f"write value=[{f.value!r}]")
        return {f.key: {_OPS[op]: f.value}}
    return _predicate(f.key, op, f.value, path)


def _predicate(key: str, op: FilterOperator, value: Any, path: str) -> Callable[[dict], bool]:
    """Operators msa's dict grammar lacks, as predicates that never raise on odd metadata."""
    if op == FilterOperator.IS_EMPTY:
        return lambda m: m.get(key, _MISSING) in (_MISSING, None, "", [])
    if op == FilterOperator.CONTAINS:
        return lambda m: _is_list(m.get(key)) and value in m[key]
    if op in (FilterOperator.ANY, FilterOperator.ALL):
        wanted = _as_list(value, key, op, path)
        test = any if op == FilterOperator.ANY else all
        return lambda m: _is_list(m.get(key)) and test(v in m[key] for v in wanted)
    if op in (FilterOperator.TEXT_MATCH, FilterOperator.TEXT_MATCH_INSENSITIVE):
        if not isinstance(value, str):
            raise InvalidInputError(f"{path}: {op.value!r} on key {key!r} needs a string value, got {value!r}")
        if op == FilterOperator.TEXT_MATCH:
            return lambda m: isinstance(m.get(key), str) and value in m[key]
        low = value.lower()
        return lambda m: isinstance(m.get(key), str) and low in m[key].lower()
    raise InvalidInputError(f"{path}: operator {op.value!r} is not supported by msa; use one of {_SUPPORTED}")


def _is_list(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _as_list(value: Any, key: str, op: FilterOperator, path: str) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"{path}: {op.value!r} on key {key!r} needs a list value, got {value!r}")
    return list(value)
