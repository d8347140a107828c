"""Go's wording for the plugin's error messages: imported only on error paths, never on a successful run.

Upstream's plugin is Go (flannel-io/cni-plugin on the reference library libcni), and its errors carry the texts
of Go's encoding/json, strconv and os packages. This module reproduces those texts so that an error reads the
same from either plugin:
- syntax_error: encoding/json's scanner (checkValid), e.g. `invalid character 'x' looking for beginning of value`,
  `unexpected end of JSON input`, `invalid character '[' exceeded max depth`;
- quote: strconv.Quote (the `%q` verb);
- strerror / path_error: an *os.PathError's text, `open /x: no such file or directory`;
- atoi / parse_uint32 / parse_version: strconv's *NumError texts, the reference library's version parsing;
and the rare paths of _fastjson's reader, which behaves as Go's decoder there: numbers beyond float64
(BigNumber), invalid UTF-8 and lone surrogates (U+FFFD), nesting too deep.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Quoted annotations instead of `from __future__ import annotations`: see conf.py.
_SPACE = frozenset(b" \t\r\n")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'bfnrt\\/"')
_SHORT = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}

# Parse states of the scanner's stack.
_OBJECT_KEY, _OBJECT_VALUE, _ARRAY_VALUE = range(3)


def quote(s: str) -> str:
    """strconv.Quote. Characters from undecodable bytes (surrogateescape, U+DC80..U+DCFF) come out as \\xNN,
    as Go prints the invalid bytes themselves."""
    out = ['"']
    for c in s:
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif c.isprintable():  # Go's IsPrint: letters, marks, numbers, punctuation, symbols, ASCII space
            out.append(c)
        elif c in _SHORT:
            out.append(_SHORT[c])
        else:
            o = ord(c)
            if o < 0x80:
                out.append(f"\\x{o:02x}")
            elif 0xDC80 <= o <= 0xDCFF:
                out.append(f"\\x{o - 0xDC00:02x}")
            elif 0xD800 <= o <= 0xDFFF:
                out.append("\\ufffd")  # Go strings hold no lone surrogates: they decode as U+FFFD
            elif o < 0x10000:
                out.append(f"\\u{o:04x}")
            else:
                out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


def quote_bytes(b: bytes) -> str:
    """`%q` of a []byte: the bytes as Go sees them, invalid UTF-8 as \\xNN."""
    return quote(b.decode("utf-8", "surrogateescape"))


def _quote_char(c: int) -> str:
    if c == 0x27:
        return "'\\''"
    if c == 0x22:
        return "'\"'"
    return "'" + quote(chr(c))[1:-1] + "'"  # a byte becomes the rune of its value, as string(byte) does


class _Stop(Exception):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


class _Scanner:
    """encoding/json's scanner, state for state (scanner.go): the same first error at the same byte."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.stack: list[int] = []
        self.step: Callable[[int], None] = self.begin_value
        self.end_top = False

    def error(self, c: int, context: str) -> "_Stop":
        return _Stop(f"invalid character {_quote_char(c)} {context}")

    def push(self, c: int, state: int) -> None:
        self.stack.append(state)
        if len(self.stack) > self.max_depth:
            raise self.error(c, "exceeded max depth")

    def pop(self) -> None:
        self.stack.pop()
        if not self.stack:
            self.step = self.end_top_state
            self.end_top = True
        else:
            self.step = self.end_value

    def begin_value_or_empty(self, c: int) -> None:
        if c in _SPACE:
            return
        if c == 0x5D:  # ]
            self.end_value(c)
            return
        self.begin_value(c)

    def begin_value(self, c: int) -> None:
        if c in _SPACE:
            return
        if c == 0x7B:  # {
            self.step = self.begin_string_or_empty
            self.push(c, _OBJECT_KEY)
        elif c == 0x5B:  # [
            self.step = self.begin_value_or_empty
            self.push(c, _ARRAY_VALUE)
        elif c == 0x22:
            self.step = self.in_string
        elif c == 0x2D:
            self.step = self.neg
        elif c == 0x30:
            self.step = self.zero
        elif c == 0x74:
            self.step = self.literal("true", 1)
        elif c == 0x66:
            self.step = self.literal("false", 1)
        elif c == 0x6E:
            self.step = self.literal("null", 1)
        elif 0x31 <= c <= 0x39:
            self.step = self.one
        else:
            raise self.error(c, "looking for beginning of value")

    def begin_string_or_empty(self, c: int) -> None:
        if c in _SPACE:
            return
        if c == 0x7D:  # }
            self.stack[-1] = _OBJECT_VALUE
            self.end_value(c)
            return
        self.begin_string(c)

    def begin_string(self, c: int) -> None:
        if c in _SPACE:
            return
        if c == 0x22:
            self.step = self.in_string
            return
        raise self.error(c, "looking for beginning of object key string")

    def end_value(self, c: int) -> None:
        if not self.stack:
            self.step = self.end_top_state
            self.end_top = True
            self.end_top_state(c)
            return
        if c in _SPACE:
            self.step = self.end_value
            return
        ps = self.stack[-1]
        if ps == _OBJECT_KEY:
            if c == 0x3A:  # :
                self.stack[-1] = _OBJECT_VALUE
                self.step = self.begin_value
                return
            raise self.error(c, "after object key")
        if ps == _OBJECT_VALUE:
            if c == 0x2C:
                self.stack[-1] = _OBJECT_KEY
                self.step = self.begin_string
                return
            if c == 0x7D:
                self.pop()
                return
            raise self.error(c, "after object key:value pair")
        if c == 0x2C:
            self.step = self.begin_value
            return
        if c == 0x5D:
            self.pop()
            return
        raise self.error(c, "after array element")

    def end_top_state(self, c: int) -> None:
        if c not in _SPACE:
            raise self.error(c, "after top-level value")

    def in_string(self, c: int) -> None:
        if c == 0x22:
            self.step = self.end_value
        elif c == 0x5C:
            self.step = self.in_string_esc
        elif c < 0x20:
            raise self.error(c, "in string literal")

    def in_string_esc(self, c: int) -> None:
        if c in _ESCAPES:
            self.step = self.in_string
        elif c == 0x75:  # u
            self.step = self.hex_digit(4)
        else:
            raise self.error(c, "in string escape code")

    def hex_digit(self, left: int) -> "Callable[[int], None]":
        def step(c: int) -> None:
            if c not in _HEX:
                raise self.error(c, "in \\u hexadecimal character escape")
            self.step = self.in_string if left == 1 else self.hex_digit(left - 1)

        return step

    def neg(self, c: int) -> None:
        if c == 0x30:
            self.step = self.zero
        elif 0x31 <= c <= 0x39:
            self.step = self.one
        else:
            raise self.error(c, "in numeric literal")

    def one(self, c: int) -> None:
        if c in _DIGITS:
            return
        self.zero(c)

    def zero(self, c: int) -> None:
        if c == 0x2E:
            self.step = self.dot
        elif c in (0x65, 0x45):
            self.step = self.exp
        else:
            self.end_value(c)

    def dot(self, c: int) -> None:
        if c in _DIGITS:
            self.step = self.dot0
            return
        raise self.error(c, "after decimal point in numeric literal")

    def dot0(self, c: int) -> None:
        if c in _DIGITS:
            return
        if c in (0x65, 0x45):
            self.step = self.exp
            return
        self.end_value(c)

    def exp(self, c: int) -> None:
        if c in (0x2B, 0x2D):
            self.step = self.exp_sign
            return
        self.exp_sign(c)

    def exp_sign(self, c: int) -> None:
        if c in _DIGITS:
            self.step = self.exp0
            return
        raise self.error(c, "in exponent of numeric literal")

    def exp0(self, c: int) -> None:
        if c in _DIGITS:
            return
        self.end_value(c)

    def literal(self, word: str, i: int) -> "Callable[[int], None]":
        def step(c: int) -> None:
            if c != ord(word[i]):
                raise self.error(c, f"in literal {word} (expecting {word[i]!r})")
            self.step = self.end_value if i + 1 == len(word) else self.literal(word, i + 1)

        return step


def syntax_error(data: bytes, max_depth: int = 10000) -> "str | None":
    """The error json.Unmarshal reports for malformed `data` before decoding anything, or None if well-formed.

    Go's limit on nesting is 10000 levels; the plugin passes its own (lower) limit.
    """
    s = _Scanner(max_depth)
    try:
        for c in data:
            s.step(c)
        if not s.end_top:
            s.step(0x20)
    except _Stop as e:
        return e.msg
    if not s.end_top:
        return "unexpected end of JSON input"
    return None


def strerror(e: BaseException) -> str:
    """A syscall.Errno's text: glibc's strerror with a lower-case first letter (as Go's table has them)."""
    if isinstance(e, ValueError):
        return "invalid argument"  # a NUL byte in a path: Go's syscall layer answers EINVAL
    text = getattr(e, "strerror", None)
    if not isinstance(text, str) or not text:
        return str(e)
    return text[0].lower() + text[1:] if len(text) < 2 or not text[1].isupper() else text


def path_error(op: str, path: str, e: BaseException) -> str:
    """*os.PathError's text: `open /run/flannel/subnet.env: no such file or directory`."""
    return f"{op} {path}: {strerror(e)}"


def num_error(func: str, s: str, out_of_range: bool) -> str:
    return f"strconv.{func}: parsing {quote(s)}: {'value out of range' if out_of_range else 'invalid syntax'}"


def _parse_uint(func: str, s0: str, s: str, max_val: int) -> int:
    """strconv.ParseUint's loop: a syntax error at the first non-digit, a range error as soon as the digits so far
    exceed max_val (so `99999999999x` is out of range, not invalid)."""
    if not s:
        raise ValueError(num_error(func, s0, False))
    n = 0
    for ch in s:
        if not ("0" <= ch <= "9"):
            raise ValueError(num_error(func, s0, False))
        n = n * 10 + (ord(ch) - 48)
        if n > max_val:
            raise ValueError(num_error(func, s0, True))
    return n


def atoi(s: str) -> int:
    """strconv.Atoi (64-bit); ValueError with Go's message."""
    body = s[1:] if s[:1] in ("+", "-") else s
    if 0 < len(s) < 19:  # Go's fast path: no range check needed
        if not body or not all("0" <= ch <= "9" for ch in body):
            raise ValueError(num_error("Atoi", s, False))
        return int(s)
    un = _parse_uint("Atoi", s, body, 2**64 - 1)
    if un > 2**63 - (0 if s[:1] == "-" else 1):
        raise ValueError(num_error("Atoi", s, True))
    return -un if s[:1] == "-" else un


def parse_uint32(s: str) -> int:
    """strconv.ParseUint(s, 10, 32); ValueError with Go's message."""
    return _parse_uint("ParseUint", s, s, 2**32 - 1)


def parse_version(v: str) -> tuple[int, int, int]:
    """The reference library's version.ParseVersion; ValueError with its message."""
    if v == "":
        return (0, 1, 0)
    parts = v.split(".")
    if len(parts) >= 4:
        raise ValueError(f"invalid version {quote(v)}: too many parts")
    nums = [0, 0, 0]
    for i, (name, p) in enumerate(zip(("major", "minor", "micro"), parts, strict=False)):
        try:
            nums[i] = atoi(p)
        except ValueError as e:
            raise ValueError(f"failed to convert {name} version part {quote(p)}: {e}") from None
    return (nums[0], nums[1], nums[2])


# ---- _fastjson's rare paths ------------------------------------------------------------------------------------


class BigNumber(float):
    """A number beyond float64 (1e400, a 400-digit integer): Go's decoder refuses it where it decodes into
    interface{} or a float; `text` is the literal as written. Its value is +-inf."""

    text: str

    def __new__(cls, text: str) -> "BigNumber":
        self = super().__new__(cls, "-inf" if text.startswith("-") else "inf")
        self.text = text
        return self


def _go_replace(e: UnicodeError) -> tuple[str, int]:
    assert isinstance(e, UnicodeDecodeError)
    return "\ufffd", e.start + 1


def decode_utf8(data: bytes) -> str:
    """UTF-8 as Go's decoder reads strings: each invalid byte becomes U+FFFD (outside strings the scanner
    refuses it anyway)."""
    import codecs

    try:
        codecs.lookup_error("pyflannel-go")
    except LookupError:
        codecs.register_error("pyflannel-go", _go_replace)
    return data.decode("utf-8", "pyflannel-go")


def json_error(data: "bytes | str", max_depth: int) -> str:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    return syntax_error(raw, max_depth) or "invalid character exceeded max depth"


def too_deep(s: str, max_depth: int) -> bool:
    """Does the JSON text nest (outside strings) deeper than max_depth?"""
    depth = 0
    in_str = esc = False
    for c in s:
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "[" or c == "{":
            depth += 1
            if depth > max_depth:
                return True
        elif c == "]" or c == "}":
            depth -= 1
    return False


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def fix_surrogates(obj: "Any") -> "Any":
    """Go decodes an escaped lone surrogate (\\udc80) as U+FFFD; Python keeps it. (Loops, not comprehensions:
    one frame per level of nesting.)"""
    if isinstance(obj, str):
        if _has_surrogate(obj):
            return "".join(["\ufffd" if "\ud800" <= c <= "\udfff" else c for c in obj])
        return obj
    if isinstance(obj, list):
        out = []
        for v in obj:
            out.append(fix_surrogates(v))
        return out
    if isinstance(obj, dict):
        d = {}
        for k, v in obj.items():
            d[fix_surrogates(k)] = fix_surrogates(v)
        return d
    return obj
