"""Text shown to users (terminal, PNG captions, HTML): image names made printable on one line."""
from __future__ import annotations

__all__ = ["printable"]


def printable(text: object) -> str:
    """``text`` with control characters (newlines, tabs...) written as escapes (``\\n``) and bytes that
    were not UTF-8 (Python keeps them as lone surrogates) as ``\\xNN``; other text is unchanged."""
    s = str(text)
    if all(32 <= ord(c) < 0xD800 or 0xE000 <= ord(c) for c in s) and "\x7f" not in s:
        return s
    out = []
    for c in s:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:  # surrogateescape: the original byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 32 or o == 0x7F or 0xD800 <= o <= 0xDFFF:
            out.append(c.encode("unicode_escape", "backslashreplace").decode("ascii")
                       if o < 0xD800 else f"\\u{o:04x}")
        else:
            out.append(c)
    return "".join(out)
