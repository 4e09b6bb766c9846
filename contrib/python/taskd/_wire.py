"""JSON for the worker protocol's lines, straight from CPython's `_json` accelerator.

The `json` package imports `re` (and through it `enum`, `functools`, the regular expression
compiler) only to skip whitespace and for its pure-Python fallback: about 1 MiB of anonymous
memory in every worker process for nothing a worker uses. Its C scanner and encoder need
none of it, so a worker that serves tasks uses them directly, with the same options as
`json.loads` and `json.dumps(separators=(",", ":"))`. Where `_json` is missing or differs
(another interpreter), `json` itself is used.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

_WHITESPACE = " \t\n\r"


def _default(o: Any) -> Any:
    # json.JSONEncoder.default's error, word for word.
    raise TypeError("Object of type %s is not JSON serializable" % o.__class__.__name__)


def _c_codec() -> tuple[Callable[[Any], str], Callable[[str], Any]]:
    from _json import encode_basestring_ascii, make_encoder, make_scanner

    def encode(obj: Any) -> str:
        # A fresh encoder per call, as json.dumps makes one: its circular-reference marks
        # are left behind when encoding fails half-way.
        chunks = make_encoder({}, _default, encode_basestring_ascii, None, ":", ",", False, False, True)(obj, 0)
        return "".join(chunks)

    class _Context:
        # What json.JSONDecoder() hands its scanner: strict, no hooks, float and int as they are.
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__

    scan = make_scanner(_Context())

    def decode(s: str) -> Any:
        start = len(s) - len(s.lstrip(_WHITESPACE))
        try:
            obj, end = scan(s, start)
        except StopIteration as e:
            raise ValueError("Expecting value: char %d" % e.value) from None
        if s[end:].strip(_WHITESPACE):
            raise ValueError("Extra data: char %d" % end)
        return obj

    # The accelerator's calling convention is CPython's own: check it before relying on it.
    if encode({"a": [1, 2.5, "é", None, True]}) != '{"a":[1,2.5,"\\u00e9",null,true]}':
        raise ImportError("unexpected _json encoder")
    if decode(' {"a": [1, 2.5, "\\u00e9", null, true]}\n') != {"a": [1, 2.5, "é", None, True]}:
        raise ImportError("unexpected _json scanner")
    return encode, decode


def _json_codec() -> tuple[Callable[[Any], str], Callable[[str], Any]]:
    import json

    return json.JSONEncoder(separators=(",", ":")).encode, json.JSONDecoder().decode


try:
    encode, decode = _c_codec()
except (ImportError, TypeError, ValueError, AttributeError):
    encode, decode = _json_codec()
