"""Tests of msa_core.filters.compile_filter."""

import pytest

from msa_core.errors import InvalidInputError
from msa_core.memory.filters import compile_filter

DOC = {"lang": "en", "year": 2021, "score": 0.5, "tags": ["a", "b"], "draft": False, "owner": None}


def match(flt, doc=DOC):
    return compile_filter(flt)(doc)


def test_none_and_empty_dict_match_all():
    assert match(None)
    assert match({})


def test_equality_and_implicit_and():
    assert match({"lang": "en"})
    assert match({"lang": "en", "year": 2021})
    assert not match({"lang": "en", "year": 2020})
    assert match({"tags": ["a", "b"]})
    assert match({"owner": None})


def test_bool_is_not_int():
    assert not match({"draft": 0})
    assert match({"draft": False})
    assert not match({"year": {"$in": [True]}}, {"year": 1})


def test_eq_ne():
    assert match({"year": {"$eq": 2021}})
    assert not match({"year": {"$ne": 2021}})
    assert match({"year": {"$ne": 2020}})
    assert match({"year": {"$eq": 2021.0}})


@pytest.mark.parametrize(
    "op,arg,expected",
    [("$gt", 2020, True), ("$gt", 2021, False), ("$gte", 2021, True), ("$lt", 2021, False),
     ("$lt", 2022, True), ("$lte", 2021, True), ("$lte", 2020.5, False)],
)
def test_range_ops(op, arg, expected):
    assert match({"year": {op: arg}}) is expected


def test_range_and_strings():
    assert match({"year": {"$gte": 2000, "$lt": 2022}})
    assert not match({"year": {"$gte": 2000, "$lt": 2021}})
    assert match({"lang": {"$gt": "de"}})


def test_incomparable_types_do_not_match():
    assert not match({"lang": {"$gt": 3}})
    assert not match({"year": {"$lt": "z"}})
    assert not match({"owner": {"$gte": 0}})
    assert not match({"draft": {"$lt": 1}})


def test_in_nin():
    assert match({"lang": {"$in": ["en", "fr"]}})
    assert not match({"lang": {"$in": ["de"]}})
    assert match({"lang": {"$nin": ["de"]}})
    assert not match({"lang": {"$nin": ["en"]}})
    assert not match({"lang": {"$in": []}})


def test_missing_key():
    for op, arg in [("$eq", 1), ("$in", [1]), ("$gt", 0), ("$gte", 0), ("$lt", 9), ("$lte", 9)]:
        assert not match({"nope": {op: arg}}), op
    assert not match({"nope": None})
    # Documented choice: "not equal" / "not in" hold for a document without the key.
    assert match({"nope": {"$ne": 1}})
    assert match({"nope": {"$nin": [1]}})


def test_logical_and_nesting():
    assert match({"$and": [{"lang": "en"}, {"year": {"$gt": 2000}}]})
    assert not match({"$and": [{"lang": "en"}, {"year": {"$gt": 2030}}]})
    assert match({"$or": [{"lang": "fr"}, {"year": 2021}]})
    assert not match({"$or": [{"lang": "fr"}, {"year": 1}]})
    assert match({"$not": {"lang": "fr"}})
    assert not match({"$not": {"lang": "en"}})
    nested = {"$or": [{"$and": [{"lang": "fr"}, {"year": 2021}]},
                      {"$not": {"$or": [{"score": {"$lt": 0.1}}, {"draft": True}]}}]}
    assert match(nested)
    assert match({"lang": "en", "$or": [{"year": 1}, {"score": 0.5}]})


def test_callable_filter():
    assert match(lambda m: m["year"] > 2000)
    assert not match(lambda m: m.get("nope") == 1)
    assert match({"$and": [lambda m: True, {"lang": "en"}]})


def test_callable_that_raises_is_invalid_input():
    pred = compile_filter(lambda m: m["missing"])
    with pytest.raises(InvalidInputError, match="KeyError"):
        pred(DOC)


@pytest.mark.parametrize(
    "bad,piece",
    [
        ({"year": {"$gtt": 3}}, "\\$gtt"),
        ({"$nor": [{"a": 1}]}, "\\$nor"),
        ({"lang": {"$in": "en"}}, "\\$in"),
        ({"lang": {"$nin": 3}}, "\\$nin"),
        ({"$and": {"a": 1}}, "\\$and"),
        ({"$or": []}, "\\$or"),
        ({"year": {"$gt": None}}, "\\$gt"),
        ({"year": {"$gt": True}}, "\\$gt"),
        ({"year": {"$gte": 1, "plain": 2}}, "mixes"),
        ({"year": object()}, "object"),
        ({"$and": [{"a": 1}, 5]}, "\\[1\\]"),
        ({1: "x"}, "strings"),
        ("lang == en", "str"),
        (42, "int"),
        (["a"], "list"),
    ],
)
def test_bad_filters_rejected_at_compile_time(bad, piece):
    with pytest.raises(InvalidInputError, match=piece):
        compile_filter(bad)


def test_nested_error_names_the_path():
    with pytest.raises(InvalidInputError) as err:
        compile_filter({"$or": [{"a": 1}, {"b": {"$between": [1, 2]}}]})
    assert "['$or'][1]['b']['$between']" in str(err.value)


def test_dict_value_without_operators_is_literal():
    assert match({"m": {"x": 1}}, {"m": {"x": 1}})
    assert not match({"m": {"x": 1}}, {"m": {"x": 2}})
