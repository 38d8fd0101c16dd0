"""The JSON automaton behind constrained decoding: it accepts exactly the valid documents, its token masks
agree with feeding each token's bytes, and its shortest completions always finish a valid document."""

import json

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnigpt.infer.json_constraint import JsonConstraintFactory, JsonGrammar, MaskCache, SchemaError, TokenVocab
from omnigpt.tokenizer.text import load_tokenizer

prop = settings(max_examples=200, deadline=None, derandomize=True, database=None)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "admin": {"type": "boolean"},
        "nick": {"type": ["string", "null"]},
        "color": {"enum": ["red", "green", "blue", 7, None]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "address": {"$ref": "#/$defs/address"},
        "tree": {"$ref": "#/$defs/node"},
        "extra": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
    "$defs": {
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"const": "12345"}},
                    "required": ["city"]},
        "node": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}},
    },
}


def done(grammar: JsonGrammar, text: bytes) -> bool:
    state = grammar.accepts(text)
    return state is not None and grammar.is_done(state)


VALID_OBJECTS = [
    b"{}", b'{"a":1}', b' { "a" : [ 1 , -2.5e+3 , 0.0, -0 , "x\\u00e9\\n\\"" , true , false , null , { } , [ ] ] } ',
    '{"ключ":"значение 世界 🎉"}'.encode(), b'{"a":{"b":{"c":[[[]]]}}}', b'{"":""}', b'{"e":1E5,"f":0.5e-1}',
]
INVALID = [
    b"[]", b'"str"', b"1", b'{"a":01}', b'{"a":1,}', b'{"a" 1}', b'{"a":"\x01"}', b'{"a":tru}', b'{"a":1}}',
    b'{"a":"\xff"}', b'{"a":-}', b'{"a":1.}', b'{"a":.5}', b"{'a':1}", b'{"a":"\\x"}', b'{"a":"\xed\xa0\x80"}',
    b'{"a":NaN}', b'{"a":1e}', b"{,}", b'{"a":[1,]}', b'{"a":"\xc0\xaf"}',
]


@pytest.mark.parametrize("text", VALID_OBJECTS)
def test_json_object_accepts_valid_objects(text):
    assert done(JsonGrammar(None), text)


@pytest.mark.parametrize("text", INVALID)
def test_json_object_rejects_invalid_text(text):
    assert not done(JsonGrammar(None), text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@prop
@given(value=st.dictionaries(st.text(max_size=6), json_values, max_size=5), indent=st.sampled_from([None, 1, 2]),
       ascii_only=st.booleans())
def test_every_serialised_object_is_accepted_and_its_prefixes_complete(value, indent, ascii_only):
    g = JsonGrammar(None)
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    assert done(g, text)
    for cut in range(0, len(text), max(1, len(text) // 7)):
        state = g.accepts(text[:cut])
        assert state is not None and not g.is_done(state)
        rest = g.completion(state)
        assert done(g, text[:cut] + rest)
        json.loads(text[:cut] + rest)


SCHEMA_VALID = [
    {"name": "bo", "age": 3, "tags": ["x"], "address": {"city": "Paris"}},
    {"tags": ["a", "b", "c"], "age": -12, "name": "é世界", "address": {"zip": "12345", "city": ""}, "height": 1.5e3,
     "admin": False, "nick": None, "color": 7, "tree": {"children": [{"children": []}, {}]}, "extra": {"k": 1}},
    {"name": "x", "age": 0, "tags": ["q"], "address": {"city": "c"}, "nick": "n", "color": None, "extra": {}},
]
SCHEMA_INVALID = [
    {"name": "", "age": 3, "tags": ["x"], "address": {"city": "P"}},  # minLength
    {"name": "toolongname", "age": 3, "tags": ["x"], "address": {"city": "P"}},  # maxLength
    {"name": "b", "age": 3.5, "tags": ["x"], "address": {"city": "P"}},  # integer
    {"name": "b", "age": 3, "tags": [], "address": {"city": "P"}},  # minItems
    {"name": "b", "age": 3, "tags": ["1", "2", "3", "4"], "address": {"city": "P"}},  # maxItems
    {"name": "b", "age": 3, "tags": ["x"]},  # required
    {"name": "b", "age": 3, "tags": ["x"], "address": {"city": "P"}, "other": 1},  # additional
    {"name": "b", "age": 3, "tags": ["x"], "address": {"city": "P", "zip": "1"}},  # const
    {"name": "b", "age": 3, "tags": ["x"], "address": {"city": "P"}, "color": "pink"},  # enum
    {"name": "b", "age": 3, "tags": ["x"], "address": {"city": "P"}, "extra": {"k": "v"}},  # additionalProperties type
    {"name": "b", "age": 3, "tags": [1], "address": {"city": "P"}},  # items type
]


@pytest.mark.parametrize("value", SCHEMA_VALID)
def test_schema_accepts_what_validates(value):
    jsonschema.validate(value, SCHEMA)
    g = JsonGrammar(SCHEMA)
    assert done(g, json.dumps(value, ensure_ascii=False).encode())
    assert done(g, json.dumps(value, indent=2).encode())


@pytest.mark.parametrize("value", SCHEMA_INVALID)
def test_schema_rejects_what_does_not_validate(value):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(value, SCHEMA)
    assert not done(JsonGrammar(SCHEMA), json.dumps(value).encode())


def test_duplicate_keys_are_refused_for_schema_objects():
    assert not done(JsonGrammar(SCHEMA), b'{"name":"a","name":"b","age":1,"tags":["x"],"address":{"city":"c"}}')


@pytest.mark.parametrize("value", SCHEMA_VALID)
def test_shortest_completion_from_every_prefix_validates(value):
    g = JsonGrammar(SCHEMA)
    text = json.dumps(value, ensure_ascii=False).encode()
    for cut in range(len(text)):
        state = g.accepts(text[:cut])
        full = text[:cut] + g.completion(state)
        assert done(g, full), full
        jsonschema.validate(json.loads(full), SCHEMA)


@pytest.mark.parametrize("schema, match", [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}}, "pattern"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 3}}}, "minimum"),
    ({"type": "array"}, "root"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}, {"type": "number"}]}}}, "start differently"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "points nowhere"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"], "$defs": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/a"}}, "required": ["b"]}}}, "finite"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "unknown type"),
])
def test_schemas_that_cannot_be_enforced_are_refused(schema, match):
    with pytest.raises(SchemaError, match=match):
        JsonGrammar(schema)


@pytest.fixture(scope="module", params=["bpe", "cl100k_base"])
def vocab(request, tmp_path_factory):
    if request.param == "bpe":
        from omnigpt.serve.checkpoint import load_for_serving
        from omnigpt.serve.testing import make_tiny_checkpoint

        tok = load_for_serving(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))).tokenizer
        return tok, TokenVocab.from_tokenizer(tok, tok.vocab_size + 7)
    tok = load_tokenizer(request.param)
    return tok, TokenVocab.from_tokenizer(tok, tok.vocab_size)


PREFIXES = [b"", b" {", b'{"', b'{"na', b'{"name":', b'{"name":"ab', b'{"name":"a\\', b'{"name":"a\\u0',
            b'{"name":"\xe4', b'{"name":"x","age":1', b'{"name":"x","age":-', b'{"name":"x","tags":[',
            b'{"name":"x","tags":["a"', b'{"name":"x","color":"gr', b'{"name":"x","height":1.5e']


@pytest.mark.parametrize("schema", [None, SCHEMA], ids=["json_object", "schema"])
def test_token_masks_agree_with_feeding_token_bytes(vocab, schema):
    tok, v = vocab
    masks = MaskCache(JsonGrammar(schema), v)
    g = masks.grammar
    sample = range(0, tok.n_text, max(1, tok.n_text // 3000))  # every token of a small vocabulary, a sample of a big one
    for prefix in PREFIXES:
        state = g.accepts(prefix)
        if state is None:
            continue
        mask = masks.mask(state)
        assert mask.shape == (v.mask_size,) and not mask[tok.n_text:].any()  # specials and padding never
        expected = torch.tensor([g.accepts(tok.token_bytes(i), state) is not None for i in sample])
        assert torch.equal(mask[list(sample)], expected), prefix
        assert mask.any()


def test_factory_shares_grammars_between_requests(vocab):
    _, v = vocab
    f = JsonConstraintFactory(v)
    a, b = f.make(SCHEMA), f.make(json.loads(json.dumps(SCHEMA)))
    assert a.masks is b.masks and a.state == b.state and a is not b
