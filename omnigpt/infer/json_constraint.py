"""Constrained decoding for JSON (`response_format` json_object and json_schema).

A byte-level pushdown automaton accepts exactly the JSON texts that satisfy a schema (a practical subset of
JSON Schema, below). Before each sampled token the engine asks which vocabulary tokens keep the text
acceptable; every other token's logit becomes -inf. So the output always parses and validates, provided it
finishes: near the end of the token budget the constraint forces the shortest valid completion.

Supported schema keywords: type (object, array, string, number, integer, boolean, null, or a list of those),
properties, required, additionalProperties (objects with properties are strict: no other keys, as in
OpenAI's strict mode; objects without properties take any keys), items, minItems, maxItems, minLength,
maxLength, enum, const, anyOf/oneOf (when the alternatives start with different characters: a string and a
number, an object and null, ...), $ref into #/$defs or #/definitions (recursion included). Annotations
(title, description, default, examples, format, ...) are ignored; other validation keywords (pattern,
minimum, ...) are refused with SchemaError rather than silently not enforced.

Token masks: a byte trie of the vocabulary is walked with the automaton, pruning a whole subtree at the first
rejected byte; masks are cached per automaton state. Inside a plain string (the hot case) the tokens that
cannot leave the string ("pure" string content) are allowed wholesale and only the others are walked.

State legend: a state is (frames, ws): a tuple of frames (innermost last) and the count of whitespace bytes
just read. Frames are small tuples whose first item is a tag (VAL, OBJ, ARR, STR, KEY, NUM, LIT, DONE).
States are immutable and hashable, so they key the mask cache.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

# ---- schema compilation ----------------------------------------------------------------------------------


class SchemaError(ValueError):
    """The schema is invalid or uses a feature this constraint cannot enforce."""


@dataclass(frozen=True)
class Node:
    kind: str  # any | object | array | string | number | integer | boolean | null | enum | union
    props: tuple[tuple[bytes, int], ...] = ()  # object: (JSON-escaped key bytes, value node id)
    required: frozenset = frozenset()  # object: escaped key bytes
    free: bool = False  # object: any keys allowed, values of node `items`
    items: int = -1  # array item node; free object's value node
    min_items: int = 0
    max_items: int | None = None
    min_length: int = 0  # string, in characters
    max_length: int | None = None
    literals: tuple[bytes, ...] = ()  # enum: compact JSON text of each allowed value
    options: tuple[int, ...] = ()  # union alternatives

    @property
    def tracks_length(self) -> bool:
        return self.kind == "string" and (self.min_length > 0 or self.max_length is not None)


IGNORED_KEYWORDS = {
    "title", "description", "default", "examples", "format", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "strict", "name", "$defs", "definitions", "contentEncoding", "contentMediaType",
}
HANDLED_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "minLength",
    "maxLength", "enum", "const", "anyOf", "oneOf", "$ref",
}
DIGITS = frozenset(b"0123456789")
NUMBER_START = frozenset(b"-0123456789")
WHITESPACE = frozenset(b" \t\n\r")


def _literal(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _key_bytes(name: str) -> bytes:
    """A property name as it appears between the quotes in JSON text."""
    return json.dumps(name, ensure_ascii=False)[1:-1].encode()


class JsonGrammar:
    """A schema compiled into a graph of Nodes (ids index self.nodes; $ref cycles are just edges)."""

    def __init__(self, schema: dict | None = None, max_whitespace: int = 16):
        """schema None: any JSON object (response_format json_object)."""
        self.nodes: list[Node | None] = []
        self.max_whitespace = max_whitespace
        self._root_schema = schema if schema is not None else {"type": "object"}
        self._ref_ids: dict[str, int] = {}
        self._unions: list[tuple[int, str]] = []
        self.any_id = self._add(None)  # filled below: any JSON value, used by free objects and arrays
        self._string_key_id = self._add(Node("string"))
        self.nodes[self.any_id] = Node("union", options=tuple(self._add(n) for n in (
            Node("object", free=True, items=self.any_id), Node("array", items=self.any_id), Node("string"),
            Node("number"), Node("boolean"), Node("null"))))
        if not isinstance(self._root_schema, dict):
            raise SchemaError("the schema must be a JSON object")
        self.root = self._compile(self._root_schema, "#")
        self.first = self._first_byte_sets()
        self._check_unions()
        if self.first[self.root] != frozenset(b"{"):
            raise SchemaError("the root of the schema must be an object (type: object)")
        self.min_len = self._min_lengths()
        if float("inf") in self.min_len:
            raise SchemaError("the schema has no finite instance (a required property recurses forever)")
        self.start = (((VAL, self.root),), 0)

    def _add(self, node: Node | None) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    # -- compile ---------------------------------------------------------------------------------------
    def _compile(self, s, where: str) -> int:
        if s is True or s == {}:
            return self.any_id
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema must be an object")
        unknown = set(s) - HANDLED_KEYWORDS - IGNORED_KEYWORDS
        if unknown:
            raise SchemaError(f"{where}: unsupported schema keyword(s) {sorted(unknown)} (cannot be enforced)")
        if "$ref" in s:
            return self._ref(s["$ref"], where)
        if "const" in s:
            return self._add(Node("enum", literals=(_literal(s["const"]),)))
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            return self._add(Node("enum", literals=tuple(dict.fromkeys(_literal(v) for v in s["enum"]))))
        for key in ("anyOf", "oneOf"):
            if key in s:
                if not isinstance(s[key], list) or not s[key]:
                    raise SchemaError(f"{where}: {key} must be a non-empty list")
                rest = {k: v for k, v in s.items() if k != key}
                alts = [self._compile({**rest, **alt} if isinstance(alt, dict) else alt, f"{where}/{key}/{i}")
                        for i, alt in enumerate(s[key])]
                return self._union(alts, where)
        kind = s.get("type")
        if isinstance(kind, list):
            if not kind:
                raise SchemaError(f"{where}: type must not be an empty list")
            return self._union([self._compile({**s, "type": k}, where) for k in kind], where)
        if kind is None:
            kind = "object" if "properties" in s else "array" if "items" in s else None
            if kind is None:
                return self.any_id
        if kind == "object":
            return self._object(s, where)
        if kind == "array":
            items = self._compile(s.get("items", True), f"{where}/items")
            lo, hi = self._int(s, "minItems", where, 0), self._int(s, "maxItems", where, None)
            return self._add(Node("array", items=items, min_items=lo, max_items=hi))
        if kind == "string":
            lo, hi = self._int(s, "minLength", where, 0), self._int(s, "maxLength", where, None)
            return self._add(Node("string", min_length=lo, max_length=hi))
        if kind in ("number", "integer", "boolean", "null"):
            return self._add(Node(kind))
        raise SchemaError(f"{where}: unknown type {kind!r}")

    @staticmethod
    def _int(s: dict, key: str, where: str, default):
        v = s.get(key, default)
        if v is not default and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise SchemaError(f"{where}: {key} must be a non-negative integer")
        return v

    def _object(self, s: dict, where: str) -> int:
        props = s.get("properties")
        extra = s.get("additionalProperties", True)
        if not props:
            value = self._compile(extra if isinstance(extra, dict) else True, f"{where}/additionalProperties")
            return self._add(Node("object", free=True, items=value))
        if not isinstance(props, dict):
            raise SchemaError(f"{where}: properties must be an object")
        required = s.get("required", [])
        if not isinstance(required, list) or any(r not in props for r in required):
            raise SchemaError(f"{where}: required must list names from properties")
        node_id = self._add(None)  # reserve first: properties may refer back to this object
        compiled = tuple((_key_bytes(k), self._compile(v, f"{where}/properties/{k}")) for k, v in props.items())
        self.nodes[node_id] = Node("object", props=compiled, required=frozenset(_key_bytes(r) for r in required))
        return node_id

    def _ref(self, ref: str, where: str) -> int:
        if ref in self._ref_ids:
            return self._ref_ids[ref]
        target = self._root_schema
        if ref != "#":
            parts = ref.split("/")
            if parts[0] != "#" or len(parts) != 3 or parts[1] not in ("$defs", "definitions"):
                raise SchemaError(f"{where}: unsupported $ref {ref!r} (use #/$defs/NAME)")
            target = self._root_schema.get(parts[1], {}).get(parts[2])
            if target is None:
                raise SchemaError(f"{where}: $ref {ref!r} points nowhere")
        # A placeholder union of one that becomes the target once compiled: refs may be recursive.
        slot = self._add(None)
        self._ref_ids[ref] = slot
        self.nodes[slot] = Node("union", options=(self._compile(target, ref),))
        return slot

    def _union(self, alts: list[int], where: str) -> int:
        flat: list[int] = []
        for a in alts:
            n = self.nodes[a]
            flat.extend(n.options if n is not None and n.kind == "union" else [a])
        if len(flat) == 1:
            return flat[0]
        node_id = self._add(Node("union", options=tuple(flat)))
        self._unions.append((node_id, where))  # checked once every $ref is compiled
        return node_id

    def _first_byte_sets(self) -> list[frozenset]:
        """The bytes each node's JSON text can start with (fixed point: unions may refer to themselves)."""
        simple = {
            "object": frozenset(b"{"), "array": frozenset(b"["), "string": frozenset(b'"'), "number": NUMBER_START,
            "integer": NUMBER_START, "boolean": frozenset(b"tf"), "null": frozenset(b"n"),
        }
        first = [simple.get(n.kind, frozenset()) if n.kind != "enum" else frozenset(lit[0] for lit in n.literals)
                 for n in self.nodes]
        changed = True
        while changed:
            changed = False
            for i, n in enumerate(self.nodes):
                if n.kind == "union":
                    new = frozenset().union(*(first[o] for o in n.options))
                    if new != first[i]:
                        first[i], changed = new, True
        return first

    def _check_unions(self) -> None:
        for node_id, where in self._unions:
            seen: set[int] = set()
            for o in self.nodes[node_id].options:
                if seen & self.first[o]:
                    raise SchemaError(f"{where}: anyOf/oneOf/type alternatives must start differently "
                                      "(e.g. a string and a number, an object and null); these overlap")
                seen |= self.first[o]

    # -- shortest instances ----------------------------------------------------------------------------
    def _min_lengths(self) -> list[float]:
        """Length of each node's shortest JSON text, by fixed-point iteration (handles recursion)."""
        inf = float("inf")
        best = [inf] * len(self.nodes)
        changed = True
        while changed:
            changed = False
            for i, n in enumerate(self.nodes):
                new = self._node_min_len(n, best)
                if new < best[i]:
                    best[i], changed = new, True
        return best

    @staticmethod
    def _node_min_len(n: Node, best: list[float]) -> float:
        if n.kind == "object":
            if n.free:
                return 2
            req = [(k, v) for k, v in n.props if k in n.required]
            return 2 + sum(len(k) + 3 + best[v] for k, v in req) + max(0, len(req) - 1)
        if n.kind == "array":
            return 2 + n.min_items * best[n.items] + max(0, n.min_items - 1)
        if n.kind == "string":
            return 2 + n.min_length
        if n.kind in ("number", "integer"):
            return 1
        if n.kind in ("boolean", "null"):
            return 4
        if n.kind == "enum":
            return min(len(lit) for lit in n.literals)
        return min(best[o] for o in n.options)  # union

    def min_text(self, node_id: int) -> bytes:
        n = self.nodes[node_id]
        if n.kind == "object":
            if n.free:
                return b"{}"
            return b"{" + b",".join(self._member(k, v) for k, v in n.props if k in n.required) + b"}"
        if n.kind == "array":
            return b"[" + b",".join([self.min_text(n.items)] * n.min_items) + b"]"
        if n.kind == "string":
            return b'"' + b"a" * n.min_length + b'"'
        if n.kind in ("number", "integer"):
            return b"0"
        if n.kind == "boolean":
            return b"true"
        if n.kind == "null":
            return b"null"
        if n.kind == "enum":
            return min(n.literals, key=len)
        return self.min_text(min(n.options, key=lambda o: self.min_len[o]))

    def _member(self, key: bytes, value: int) -> bytes:
        return b'"' + key + b'":' + self.min_text(value)

    # -- the automaton ---------------------------------------------------------------------------------
    def accepts(self, text: bytes, state=None):
        """Feed bytes; the state after them, or None if some byte is rejected."""
        state = self.start if state is None else state
        for b in text:
            state = self.step(state, b)
            if state is None:
                return None
        return state

    @staticmethod
    def is_done(state) -> bool:
        return state[0][-1][0] == DONE

    def step(self, state, b: int):
        """The state after byte b, or None if b cannot come next."""
        frames, ws = state
        while True:
            top = frames[-1]
            tag = top[0]
            if tag == STR:
                return self._step_string(frames, top, b)
            if tag == KEY:
                return self._step_key(frames, top, b)
            if tag == LIT:
                alts = tuple(a for a in top[1] if len(a) > top[2] and a[top[2]] == b)
                if alts:
                    m = top[2] + 1
                    frames = frames[:-1] + ((LIT, alts, m),)
                    return (self._pop(frames) if all(len(a) == m for a in alts) else frames), 0
                if any(len(a) == top[2] for a in top[1]):  # a shorter alternative ended here: b is the parent's
                    frames = self._pop(frames)
                    continue
                return None
            if tag == NUM:
                nxt = NUMBER_STEPS[top[2]].get(b)
                if nxt is not None and not (top[1] and nxt in (N_DOT, N_E)):
                    return frames[:-1] + ((NUM, top[1], nxt),), 0
                if top[2] in NUMBER_TERMINAL:  # the number ended; b belongs to the parent
                    frames = self._pop(frames)
                    continue
                return None
            if b in WHITESPACE:  # between tokens of an object or an array, before a value, after the document
                return (frames, ws + 1) if ws < self.max_whitespace else None
            if tag == DONE:
                return None
            if tag == VAL:
                return self._start_value(frames[:-1], top[1], b)
            if tag == OBJ:
                return self._step_object(frames, top, b)
            return self._step_array(frames, top, b)  # ARR

    def _pop(self, frames):
        """A value just ended: drop its frame; the root value ending finishes the document."""
        return frames[:-1] if len(frames) > 1 else ((DONE,),)

    def _start_value(self, below, node_id: int, b: int):
        n = self.nodes[node_id]
        while n.kind == "union":
            for o in n.options:
                if b in self.first[o]:
                    node_id, n = o, self.nodes[o]
                    break
            else:
                return None
        kind = n.kind
        if kind == "object" and b == ord("{"):
            return below + ((OBJ, node_id, O_FIRST, frozenset(), -1),), 0
        if kind == "array" and b == ord("["):
            return below + ((ARR, node_id, A_FIRST, 0),), 0
        if kind == "string" and b == ord('"'):
            return below + ((STR, node_id, 0, 0, 0, 0, 0),), 0
        if kind in ("number", "integer") and b in NUMBER_START:
            phase = N_SIGN if b == ord("-") else N_ZERO if b == ord("0") else N_INT
            return below + ((NUM, kind == "integer", phase),), 0
        literals = {"boolean": (b"true", b"false"), "null": (b"null",), "enum": n.literals}.get(kind)
        if literals:
            alts = tuple(a for a in literals if a[0] == b)
            if not alts:
                return None
            frames = below + ((LIT, alts, 1),)
            return (self._pop(frames) if all(len(a) == 1 for a in alts) else frames), 0
        return None

    def _step_object(self, frames, top, b: int):
        _, node_id, phase, seen, value_node = top
        n = self.nodes[node_id]
        below = frames[:-1]
        if phase in (O_FIRST, O_NEXT) and b == ord('"'):
            if n.free:  # any key: read it as a string, then expect ':' and a value of node `items`
                return below + ((OBJ, node_id, O_COLON, seen, n.items), (STR, self._string_key_id, 0, 0, 0, 0, 0)), 0
            if len(seen) == len(n.props):
                return None
            return frames + ((KEY, b""),), 0
        if b == ord("}") and phase in (O_FIRST, O_AFTER) and n.required <= seen:
            return self._pop(frames), 0
        if phase == O_COLON and b == ord(":"):
            return below + ((OBJ, node_id, O_AFTER, seen, -1), (VAL, value_node)), 0
        if phase == O_AFTER and b == ord(",") and (n.free or len(seen) < len(n.props)):
            return below + ((OBJ, node_id, O_NEXT, seen, -1),), 0
        return None

    def _step_key(self, frames, top, b: int):
        """A property name of a schema object: it must grow into a name not used yet."""
        obj = frames[-2]
        _, node_id, _, seen, _ = obj
        prefix = top[1]
        props = self.nodes[node_id].props
        if b == ord('"'):
            for k, v in props:
                if k == prefix and k not in seen:
                    return frames[:-2] + ((OBJ, node_id, O_COLON, seen | {k}, v),), 0
            return None
        grown = prefix + bytes((b,))
        if any(k.startswith(grown) and k not in seen for k, _ in props):
            return frames[:-1] + ((KEY, grown),), 0
        return None

    def _step_array(self, frames, top, b: int):
        _, node_id, phase, count = top
        n = self.nodes[node_id]
        below = frames[:-1]
        if b == ord("]") and phase in (A_FIRST, A_AFTER) and count >= n.min_items:
            return self._pop(frames), 0
        if phase == A_AFTER and b == ord(","):
            return (below + ((ARR, node_id, A_NEXT, count),), 0) if n.max_items is None or count < n.max_items else None
        if phase in (A_FIRST, A_NEXT) and (n.max_items is None or count < n.max_items):
            return self._start_value(below + ((ARR, node_id, A_AFTER, count + 1),), n.items, b)
        return None

    def _step_string(self, frames, top, b: int):
        _, node_id, esc, need, lo, hi, length = top
        below = frames[:-1]
        if need:  # inside a multi-byte UTF-8 character
            if not lo <= b <= hi:
                return None
            return below + ((STR, node_id, 0, need - 1, 0x80, 0xBF, length),), 0
        if esc == 1:  # after a backslash
            if b == ord("u"):
                return below + ((STR, node_id, 2, 0, 0, 0, length),), 0
            return (below + ((STR, node_id, 0, 0, 0, 0, length),), 0) if b in ESCAPABLE else None
        if esc:  # \uXXXX: esc 2..5 while reading the four hex digits
            if b not in HEX:
                return None
            return below + ((STR, node_id, 0 if esc == 5 else esc + 1, 0, 0, 0, length),), 0
        n = self.nodes[node_id]
        if b == ord('"'):
            return (self._pop(frames), 0) if length >= n.min_length else None
        if b < 0x20:  # control characters must be escaped
            return None
        if n.tracks_length:
            if n.max_length is not None and length >= n.max_length:
                return None
            length += 1
        if b == ord("\\"):
            return below + ((STR, node_id, 1, 0, 0, 0, length),), 0
        if b < 0x80:
            return (frames if not n.tracks_length else below + ((STR, node_id, 0, 0, 0, 0, length),)), 0
        lead = UTF8_LEADS.get(b)
        if lead is None:
            return None
        return below + ((STR, node_id, 0, lead[0], lead[1], lead[2], length),), 0

    # -- shortest completion ---------------------------------------------------------------------------
    def completion(self, state) -> bytes:
        """The shortest bytes that finish the document from this state (b"" when done)."""
        frames = state[0]
        out = []
        while frames[-1][0] != DONE:
            text, frames = self._close_top(frames)
            out.append(text)
        return b"".join(out)

    def _close_top(self, frames):
        top = frames[-1]
        tag = top[0]
        if tag == VAL:
            return self.min_text(top[1]), self._pop(frames)
        if tag == STR:
            _, node_id, esc, need, lo, _, length = top
            text = (bytes((lo,)) + b"\x80" * (need - 1) if need else b"n" if esc == 1 else b"0" * (6 - esc) if esc else b"")
            return text + b"a" * max(0, self.nodes[node_id].min_length - length) + b'"', self._pop(frames)
        if tag == NUM:
            return (b"0" if top[2] not in NUMBER_TERMINAL else b""), self._pop(frames)
        if tag == LIT:
            return min((a[top[2]:] for a in top[1]), key=len), self._pop(frames)
        if tag == KEY:  # finish the name that costs least (with its value), then continue after the value
            _, node_id, _, seen, _ = frames[-2]
            k, v = min(((k, v) for k, v in self.nodes[node_id].props if k.startswith(top[1]) and k not in seen),
                       key=lambda kv: len(kv[0]) + self.min_len[kv[1]])
            return k[len(top[1]):] + b'":' + self.min_text(v), frames[:-2] + ((OBJ, node_id, O_AFTER, seen | {k}, -1),)
        if tag == OBJ:
            return self._close_object(top), self._pop(frames)
        return self._close_array(top), self._pop(frames)  # ARR

    def _close_object(self, top) -> bytes:
        _, node_id, phase, seen, value_node = top
        n = self.nodes[node_id]
        if phase == O_COLON:  # key read (and already in seen), value missing
            head = b":" + self.min_text(value_node)
            phase = O_AFTER
        else:
            head = b""
        if n.free:
            members = [b'"":' + self.min_text(n.items)] if phase == O_NEXT else []
        else:
            missing = [(k, v) for k, v in n.props if k in n.required and k not in seen]
            if phase == O_NEXT and not missing:  # after a comma a member must follow: the cheapest one left
                left = [(k, v) for k, v in n.props if k not in seen]
                missing = [min(left, key=lambda kv: len(kv[0]) + self.min_len[kv[1]])]
            members = [self._member(k, v) for k, v in missing]
        sep = b"," if phase == O_AFTER and members else b""
        return head + sep + b",".join(members) + b"}"

    def _close_array(self, top) -> bytes:
        _, node_id, phase, count = top
        n = self.nodes[node_id]
        need = max(n.min_items - count, 1 if phase == A_NEXT else 0)
        items = [self.min_text(n.items)] * need
        sep = b"," if phase == A_AFTER and items else b""
        return sep + b",".join(items) + b"]"


# frame tags
VAL, OBJ, ARR, STR, KEY, NUM, LIT, DONE = range(8)
# object phases: after '{', after a key (expect ':'), after a value, after ','
O_FIRST, O_COLON, O_AFTER, O_NEXT = range(4)
# array phases: after '[', after a value, after ','
A_FIRST, A_AFTER, A_NEXT = range(3)
# number phases: after '-', a leading 0, integer digits, after '.', fraction digits, after 'e', after the
# exponent's sign, exponent digits
N_SIGN, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
NUMBER_TERMINAL = frozenset({N_ZERO, N_INT, N_FRAC, N_EXP})
NUMBER_STEPS = {
    N_SIGN: {**{d: N_INT for d in DIGITS}, ord("0"): N_ZERO},
    N_ZERO: {ord("."): N_DOT, ord("e"): N_E, ord("E"): N_E},
    N_INT: {**{d: N_INT for d in DIGITS}, ord("."): N_DOT, ord("e"): N_E, ord("E"): N_E},
    N_DOT: {d: N_FRAC for d in DIGITS},
    N_FRAC: {**{d: N_FRAC for d in DIGITS}, ord("e"): N_E, ord("E"): N_E},
    N_E: {**{d: N_EXP for d in DIGITS}, ord("+"): N_ESIGN, ord("-"): N_ESIGN},
    N_ESIGN: {d: N_EXP for d in DIGITS},
    N_EXP: {d: N_EXP for d in DIGITS},
}
ESCAPABLE = frozenset(b'"\\/bfnrt')
HEX = frozenset(b"0123456789abcdefABCDEF")
# UTF-8 lead byte -> (continuation bytes, allowed range of the first continuation byte): no overlongs, no surrogates
UTF8_LEADS = {
    **{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF), **{b: (2, 0x80, 0xBF) for b in range(0xE1, 0xED)}, 0xED: (2, 0x80, 0x9F),
    0xEE: (2, 0x80, 0xBF), 0xEF: (2, 0x80, 0xBF),
    0xF0: (3, 0x90, 0xBF), 0xF1: (3, 0x80, 0xBF), 0xF2: (3, 0x80, 0xBF), 0xF3: (3, 0x80, 0xBF), 0xF4: (3, 0x80, 0x8F),
}


# ---- vocabulary side -------------------------------------------------------------------------------------


@dataclass
class _TrieNode:
    children: dict = field(default_factory=dict)  # byte -> _TrieNode
    ids: list = field(default_factory=list)  # tokens whose bytes end here


def _is_pure_string_content(data: bytes) -> bool:
    """Bytes that, inside a JSON string, neither end it nor start an escape, and are whole UTF-8 characters:
    from a plain string state such a token leads back to the same state."""
    if not data or b'"' in data or b"\\" in data or any(c < 0x20 for c in data):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class TokenVocab:
    """The tokenizer's text tokens as bytes, organised for mask computation. Build once per tokenizer."""

    def __init__(self, token_bytes: list[bytes], mask_size: int):
        """token_bytes[i]: bytes of token i (text tokens only); mask_size: the model's vocabulary size."""
        self.mask_size = mask_size
        self.token_bytes = token_bytes
        self.trie = _TrieNode()  # every token
        self.impure_trie = _TrieNode()  # tokens that are not pure string content
        pure = torch.zeros(mask_size, dtype=torch.bool)
        for i, data in enumerate(token_bytes):
            if not data:
                continue
            is_pure = _is_pure_string_content(data)
            pure[i] = is_pure
            for trie in (self.trie,) if is_pure else (self.trie, self.impure_trie):
                node = trie
                for c in data:
                    node = node.children.setdefault(c, _TrieNode())
                node.ids.append(i)
        self.pure_string_mask = pure

    @classmethod
    def from_tokenizer(cls, tok, mask_size: int) -> "TokenVocab":
        return cls([tok.token_bytes(i) for i in range(tok.n_text)], mask_size)


class MaskCache:
    """Allowed-token masks per automaton state for one (grammar, vocabulary) pair, least recently used out."""

    def __init__(self, grammar: JsonGrammar, vocab: TokenVocab, max_states: int = 4096):
        self.grammar, self.vocab, self.max_states = grammar, vocab, max_states
        self._masks: OrderedDict = OrderedDict()

    def mask(self, state) -> torch.Tensor:
        m = self._masks.get(state)
        if m is None:
            m = self._compute(state)
            self._masks[state] = m
            if len(self._masks) > self.max_states:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(state)
        return m

    def _compute(self, state) -> torch.Tensor:
        mask = torch.zeros(self.vocab.mask_size, dtype=torch.bool)
        top = state[0][-1]
        trie = self.vocab.trie
        if top[0] == STR and top[2] == 0 and top[3] == 0 and not self.grammar.nodes[top[1]].tracks_length:
            mask |= self.vocab.pure_string_mask  # plain string content: these tokens all keep the state
            trie = self.vocab.impure_trie
        step = self.grammar.step
        allowed: list[int] = []
        todo = [(trie, state)]
        while todo:
            node, st = todo.pop()
            for b, child in node.children.items():
                nxt = step(st, b)
                if nxt is None:
                    continue
                allowed.extend(child.ids)
                if child.children:
                    todo.append((child, nxt))
        if allowed:
            mask[torch.tensor(allowed, dtype=torch.long)] = True
        return mask


class JsonConstraint:
    """One sequence's progress through a grammar: the engine asks for a mask, then reports the token chosen."""

    def __init__(self, masks: MaskCache):
        self.masks = masks
        self.grammar = masks.grammar
        self.state = self.grammar.start

    @property
    def done(self) -> bool:
        return self.grammar.is_done(self.state)

    def allowed(self) -> torch.Tensor:
        return self.masks.mask(self.state)

    def advance(self, token_id: int) -> None:
        state = self.grammar.accepts(self.masks.vocab.token_bytes[token_id], self.state)
        if state is None:
            raise ValueError(f"token {token_id} breaks the JSON constraint")
        self.state = state

    def completion(self) -> bytes:
        return self.grammar.completion(self.state)


class JsonConstraintFactory:
    """Compiled grammars and their mask caches, shared across requests with the same schema."""

    def __init__(self, vocab: TokenVocab, max_grammars: int = 64):
        self.vocab = vocab
        self.max_grammars = max_grammars
        self._caches: OrderedDict[str, MaskCache] = OrderedDict()
        self._lock = threading.Lock()  # the server validates schemas on worker threads, the engine uses them

    def make(self, schema: dict | None) -> JsonConstraint:
        """schema None: any JSON object. Raises SchemaError for schemas it cannot enforce."""
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            cache = self._caches.get(key)
            if cache is None:
                cache = MaskCache(JsonGrammar(schema), self.vocab)
                self._caches[key] = cache
                if len(self._caches) > self.max_grammars:
                    self._caches.popitem(last=False)
            else:
                self._caches.move_to_end(key)
        return JsonConstraint(cache)
