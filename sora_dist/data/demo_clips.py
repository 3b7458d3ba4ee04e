"""Synthetic captioned clips (moving shapes) for demos, tests and benchmarks.

Each clip is a pure function of its seed: a colored square or disc moving across a plain
background, with a caption that describes it, so a small model has something learnable.
"""
from __future__ import annotations

import json
import os
import random

import torch
from PIL import Image

from sora_dist.data.video_io import write_mp4

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230),
          "yellow": (230, 220, 40), "white": (240, 240, 240), "purple": (150, 50, 200)}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (120, 120, 120), "dark": (30, 30, 60)}
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def render_clip(height: int, width: int, frames: int, seed: int) -> tuple[torch.Tensor, str]:
    """uint8 (T, 3, H, W) frames and a caption."""
    rng = random.Random(seed)
    color, bg = rng.choice(sorted(COLORS)), rng.choice(sorted(BACKGROUNDS))
    motion, shape = rng.choice(sorted(MOTIONS)), rng.choice(["square", "circle"])
    size = max(2, min(height, width) // rng.choice([3, 4, 5]))
    dx, dy = MOTIONS[motion]
    speed = max(1.0, min(height, width) / max(frames, 1) * 0.8)
    y0, x0 = rng.uniform(size, height - size), rng.uniform(size, width - size)
    yy = torch.arange(height).float()[:, None]
    xx = torch.arange(width).float()[None, :]
    out = torch.empty(frames, 3, height, width, dtype=torch.uint8)
    bgc = torch.tensor(BACKGROUNDS[bg], dtype=torch.uint8)[:, None, None]
    fgc = torch.tensor(COLORS[color], dtype=torch.uint8)[:, None, None]
    for t in range(frames):
        # wrap around the frame so the object never leaves the picture
        cy = (y0 + dy * speed * t) % height
        cx = (x0 + dx * speed * t) % width
        if shape == "square":
            inside = ((yy - cy).abs() <= size / 2) & ((xx - cx).abs() <= size / 2)
        else:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size / 2) ** 2
        out[t] = torch.where(inside[None], fgc, bgc)
    caption = f"a {color} {shape} moving {motion} on a {bg} background"
    return out, caption


def make_demo_clips(out_dir: str, n: int = 12, seed: int = 0, sizes=None, fps_choices=(8, 12, 24),
                    frame_choices=(17, 24, 33, 48), images: int = 0) -> str:
    """Write n mp4 clips of varied size/fps/length (+ `images` png stills) and manifest.jsonl."""
    sizes = sizes or [(64, 64), (48, 96), (96, 48), (72, 128), (64, 80)]
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(n):
        h, w = rng.choice(sizes)
        fps, T = rng.choice(fps_choices), rng.choice(frame_choices)
        frames, caption = render_clip(h, w, T, seed * 100_003 + i)
        path = write_mp4(frames, os.path.join(out_dir, f"clip_{i:04d}.mp4"), fps)
        rows.append({"path": os.path.basename(path), "caption": caption})
    for i in range(images):
        h, w = rng.choice(sizes)
        frames, caption = render_clip(h, w, 1, seed * 100_003 + n + i)
        name = f"still_{i:04d}.png"
        tmp = os.path.join(out_dir, f".{name}.tmp.png")
        Image.fromarray(frames[0].permute(1, 2, 0).numpy()).save(tmp)
        os.replace(tmp, os.path.join(out_dir, name))
        rows.append({"path": name, "caption": caption})
    manifest = os.path.join(out_dir, "manifest.jsonl")
    tmp = manifest + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, manifest)
    return manifest
