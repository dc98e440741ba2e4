"""Writing measured tables into docs/: a script owns the block between its markers.

    <!-- bench_batching:begin -->
    ...the script's latest table...
    <!-- bench_batching:end -->
"""

from __future__ import annotations

import re
from pathlib import Path


def replace_section(doc: Path, name: str, text: str) -> None:
    """Put ``text`` between ``name``'s markers in ``doc`` (appended with them if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in body and end in body:
        body = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    doc.write_text(body)
