"""An incremental JSON object scanner: feed text as it streams, learn where the object ends.

The tool-call parsers need to know, without waiting for the whole message, whether the text after
a call marker is still a valid beginning of a JSON object (keep reading), is not one (the marker
was just text), or has closed (the call is complete). `json.loads` answers only the last question,
and only for whole text; this scanner answers all three one character at a time and resumes where
it stopped, so a call streamed token by token is scanned once, not once per token.

It accepts exactly RFC 8259 objects (what `json.loads` with NaN/Infinity refused accepts):
strings without raw control characters, numbers without leading zeros, true/false/null."""

from __future__ import annotations

from enum import Enum

_WS = " \t\n\r"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_ESCAPES = '"\\/bfnrt'
_LITERALS = {"t": "true", "f": "false", "n": "null"}


class Scan(Enum):
    MORE = "more"  # a valid prefix of an object: feed more text
    DONE = "done"  # the object closed; `end` is the index just after its final brace
    INVALID = "invalid"  # no object starts with this text; `end` is the offending character


class _S(Enum):
    START = 0  # before the opening brace (whitespace allowed)
    VALUE = 1  # a value is expected (after ':' or ',' in an array, or after '[')
    VALUE_OR_CLOSE = 2  # after '[': a value or ']'
    KEY_OR_CLOSE = 3  # after '{': a key or '}'
    KEY = 4  # after ',' in an object: a key
    COLON = 5  # after a key
    AFTER = 6  # after a value: ',' or the container's closing bracket
    STRING = 7
    ESCAPE = 8
    UNICODE = 9
    NUMBER = 10
    LITERAL = 11


class JsonObjectScanner:
    """Scans one JSON object in `text`, beginning at `start`; call `scan(text)` again with the same
    text extended, and it resumes where it stopped. After DONE or INVALID it keeps answering the
    same."""

    def __init__(self, start: int = 0) -> None:
        self.pos = start
        self.end = -1
        self.result = Scan.MORE
        self._state = _S.START
        self._stack: list[str] = []  # open containers, '{' or '['
        self._string_is_key = False
        self._hex_left = 0
        self._literal = ""  # the rest of true/false/null still expected
        self._number = ""  # the number's shape so far (for the leading-zero and digit rules)

    def scan(self, text: str) -> Scan:
        while self.result is Scan.MORE and self.pos < len(text):
            if not self._step(text[self.pos]):
                self.result, self.end = Scan.INVALID, self.pos
                break
            self.pos += 1
            if self._state is _S.AFTER and not self._stack:
                self.result, self.end = Scan.DONE, self.pos
        return self.result

    # ---- one character -------------------------------------------------------------------------
    def _step(self, ch: str) -> bool:  # noqa: PLR0911, PLR0912 (a state machine reads best flat)
        s = self._state
        if s is _S.STRING:
            if ch == '"':
                self._state = _S.COLON if self._string_is_key else _S.AFTER
            elif ch == "\\":
                self._state = _S.ESCAPE
            elif ch < " ":
                return False
            return True
        if s is _S.ESCAPE:
            if ch == "u":
                self._state, self._hex_left = _S.UNICODE, 4
                return True
            self._state = _S.STRING
            return ch in _ESCAPES
        if s is _S.UNICODE:
            if ch not in _HEX:
                return False
            self._hex_left -= 1
            if not self._hex_left:
                self._state = _S.STRING
            return True
        if s is _S.LITERAL:
            if ch != self._literal[0]:
                return False
            self._literal = self._literal[1:]
            if not self._literal:
                self._state = _S.AFTER
            return True
        if s is _S.NUMBER:
            if self._number_step(ch):
                return True
            if not self._number_complete():
                return False
            self._state = _S.AFTER  # the character ends the number; read it as what follows
            return self._step(ch)
        if ch in _WS:
            return True
        if s is _S.START:
            if ch != "{":
                return False
            self._stack.append("{")
            self._state = _S.KEY_OR_CLOSE
            return True
        if s in (_S.KEY_OR_CLOSE, _S.KEY):
            if ch == "}" and s is _S.KEY_OR_CLOSE:
                return self._close("{")
            if ch != '"':
                return False
            self._state, self._string_is_key = _S.STRING, True
            return True
        if s is _S.COLON:
            if ch != ":":
                return False
            self._state = _S.VALUE
            return True
        if s is _S.AFTER:
            top = self._stack[-1]
            if ch == ",":
                self._state = _S.KEY if top == "{" else _S.VALUE
                return True
            return self._close(top) if ch == ("}" if top == "{" else "]") else False
        # VALUE or VALUE_OR_CLOSE
        if ch == "]" and s is _S.VALUE_OR_CLOSE:
            return self._close("[")
        return self._begin_value(ch)

    def _begin_value(self, ch: str) -> bool:
        if ch == '"':
            self._state, self._string_is_key = _S.STRING, False
        elif ch == "{":
            self._stack.append("{")
            self._state = _S.KEY_OR_CLOSE
        elif ch == "[":
            self._stack.append("[")
            self._state = _S.VALUE_OR_CLOSE
        elif ch in _LITERALS:
            self._state, self._literal = _S.LITERAL, _LITERALS[ch][1:]
        elif ch == "-" or ch in _DIGITS:
            self._state, self._number = _S.NUMBER, ""
            return self._number_step(ch)
        else:
            return False
        return True

    def _close(self, opener: str) -> bool:
        if not self._stack or self._stack[-1] != opener:
            return False
        self._stack.pop()
        self._state = _S.AFTER
        return True

    # ---- numbers: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? --------------------------------
    def _number_step(self, ch: str) -> bool:
        n = self._number
        last = n[-1:] if n else ""
        ok = False
        if ch == "-":
            ok = n == "" or last in "eE"
        elif ch == "+":
            ok = last in ("e", "E")
        elif ch in _DIGITS:
            # no digit after a leading zero of the integer part
            ok = n.lstrip("-") != "0"
        elif ch == ".":
            ok = bool(n.lstrip("-")) and "." not in n and "e" not in n.lower() and last in _DIGITS
        elif ch in "eE":
            ok = last in _DIGITS and "e" not in n.lower()
        if ok:
            self._number = n + ch
        return ok

    def _number_complete(self) -> bool:
        return self._number[-1:] in tuple(_DIGITS)


def scan_object(text: str, start: int = 0) -> tuple[Scan, int]:
    """Scan `text[start:]` in one go: (result, end)."""
    scanner = JsonObjectScanner(start)
    result = scanner.scan(text)
    return result, scanner.end
