"""The encode job's input list: a folder (captions in sibling .txt files) or a jsonl/csv manifest.

Every rank builds the same sorted list, then takes its round-robin slice, so no coordination
is needed to split the work.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Optional

from sora_dist.data.video_io import IMAGE_EXTS, VIDEO_EXTS


@dataclass(frozen=True)
class InputItem:
    source: str                 # absolute path of the video/image
    caption: Optional[str]      # None = no caption found (rejected as no_caption)


def _read_caption_file(media_path: str) -> Optional[str]:
    txt = os.path.splitext(media_path)[0] + ".txt"
    if not os.path.isfile(txt):
        return None
    with open(txt, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def list_inputs(src: str) -> list[InputItem]:
    """Sorted, de-duplicated inputs. Raises ValueError naming the manifest line that is broken."""
    if os.path.isdir(src):
        items = []
        for root, _, files in os.walk(src):
            for name in files:
                if name.lower().endswith(VIDEO_EXTS + IMAGE_EXTS) and not name.startswith("."):
                    p = os.path.abspath(os.path.join(root, name))
                    items.append(InputItem(p, _read_caption_file(p)))
        if not items:
            raise ValueError(f"encode.input={src!r} holds no video/image files ({VIDEO_EXTS + IMAGE_EXTS})")
        return sorted(items, key=lambda it: it.source)
    base = os.path.dirname(os.path.abspath(src))
    rows: list[tuple[int, dict]] = []
    if src.endswith(".jsonl"):
        with open(src, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{src}:{i}: not valid JSON ({e}); fix or delete the line") from None
    elif src.endswith(".csv"):
        with open(src, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ValueError(f"{src}: csv needs a header with 'path' and 'caption' columns; "
                                 f"found {reader.fieldnames}")
            rows = [(i, r) for i, r in enumerate(reader, 2)]
    else:
        raise ValueError(f"encode.input={src!r}: use a folder, a .jsonl or a .csv manifest")
    items, seen = [], set()
    for i, r in rows:
        if not isinstance(r, dict) or not r.get("path"):
            raise ValueError(f"{src}:{i}: row has no 'path' field; each row needs path and caption")
        p = r["path"] if os.path.isabs(r["path"]) else os.path.join(base, r["path"])
        p = os.path.abspath(p)
        if p in seen:
            continue  # the same file listed twice would become a duplicate sample
        seen.add(p)
        cap = r.get("caption")
        items.append(InputItem(p, cap.strip() if isinstance(cap, str) else None))
    if not items:
        raise ValueError(f"encode.input={src!r} lists no inputs")
    return sorted(items, key=lambda it: it.source)
