"""Unicode ranges of the scripts the ``script`` filter knows, shared by the per-document
filters (``raylm.data.filters``) and the block filters (``raylm.data.filters_batch``)."""

from __future__ import annotations

SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "cjk": (
        (0x3040, 0x30FF),
        (0x3400, 0x4DBF),
        (0x4E00, 0x9FFF),
        (0xF900, 0xFAFF),
        (0xAC00, 0xD7AF),
        (0x20000, 0x2FA1F),
    ),
    "cyrillic": ((0x400, 0x52F),),
    "arabic": ((0x600, 0x6FF), (0x750, 0x77F)),
}
