"""How batchcap words a failure that ends up in a row or a log: one line, of bounded length."""

from __future__ import annotations


def one_line(message: object, limit: int = 300) -> str:
    """``message`` squeezed onto one line of at most ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
