"""Synthetic captioned clips (moving shapes) for demos, tests and benchmarks.

Each clip is a pure function of its seed: a colored square or disc moving across a plain
background, with a caption that describes it, so a small model has something learnable.
"""
from __future__ import annotations

import json
import math
import os
import random
import re

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


# ---- the demo's sample check: read the prompt's attributes back from decoded frames --------------
CAPTION_RE = re.compile(r"a (\w+) (square|circle) moving (\w+) on a (\w+) background")


def parse_caption(caption: str) -> dict:
    """{'color', 'shape', 'motion', 'background'} of a render_clip caption; ValueError otherwise."""
    m = CAPTION_RE.fullmatch(caption.strip())
    if not m or m[1] not in COLORS or m[3] not in MOTIONS or m[4] not in BACKGROUNDS:
        raise ValueError(f"caption {caption!r} is not of the demo's form 'a <color> <square|circle> moving "
                         f"<left|right|up|down> on a <black|gray|dark> background'")
    return {"color": m[1], "shape": m[2], "motion": m[3], "background": m[4]}


def _nearest(rgb: torch.Tensor, palette: dict) -> tuple[str, float]:
    names = sorted(palette)
    d = (torch.tensor([palette[n] for n in names], dtype=torch.float32) - rgb.float()).norm(dim=1)
    i = int(d.argmin())
    return names[i], float(d[i])


def _circular_centroid(mask_HW: torch.Tensor) -> tuple[float, float]:
    """Object centre on the torus (objects wrap around the frame), in pixels."""
    H, W = mask_HW.shape
    out = []
    for n, weights in ((H, mask_HW.float().sum(1)), (W, mask_HW.float().sum(0))):
        ang = torch.arange(n, dtype=torch.float32) * (2 * math.pi / n)
        a = math.atan2(float((weights * ang.sin()).sum()), float((weights * ang.cos()).sum()))
        out.append((a % (2 * math.pi)) * n / (2 * math.pi))
    return out[0], out[1]


def measure_clip(frames_TCHW: torch.Tensor, color_tol: float = 60.0) -> dict:
    """What a uint8 (T, 3, H, W) clip shows, measured from its pixels:
    background: the palette colour nearest the per-channel median of all pixels (a VAE's
    errors gather at the frame's edges, so not the border's);
    color: the palette colour nearest the median of the object's pixels (those > color_tol from
    the background), object: mean fraction of the frame those pixels cover;
    motion: the direction of the larger median per-frame displacement of the object's centre on the
    torus (None for fewer than 2 frames or less than 0.25 px/frame), with *_dist the distances
    (0-441) from the measured colours to the palette entries named."""
    x = frames_TCHW.float()
    T, _, H, W = x.shape
    bg_rgb = x.permute(1, 0, 2, 3).reshape(3, -1).median(dim=1).values  # the object covers far less than half
    background, bg_dist = _nearest(bg_rgb, BACKGROUNDS)
    mask = (x - bg_rgb.view(1, 3, 1, 1)).norm(dim=1) > color_tol  # (T, H, W)
    frac = float(mask.float().mean())
    out = {"background": background, "background_dist": bg_dist, "object": frac,
           "color": None, "color_dist": float("inf"), "motion": None, "speed": 0.0}
    if mask.any():
        obj_rgb = x.permute(1, 0, 2, 3)[:, mask].median(dim=1).values
        out["color"], out["color_dist"] = _nearest(obj_rgb, COLORS)
    present = [float(mask[t].float().mean()) > 0.002 for t in range(T)]
    cents = [_circular_centroid(mask[t]) if present[t] else None for t in range(T)]
    steps = [[(b - a + n / 2) % n - n / 2 for a, b, n in zip(c0, c1, (H, W))]  # shortest way round
             for c0, c1 in zip(cents, cents[1:]) if c0 is not None and c1 is not None]
    if len(steps) >= max(1, (T - 1) // 2):
        # the median step: a centre-cropped clip's object may leave the picture and jump back
        dy, dx = torch.tensor(steps).median(dim=0).values.tolist()
        out["speed"] = max(abs(dy), abs(dx))
        if out["speed"] >= 0.25:
            out["motion"] = ("down" if dy > 0 else "up") if abs(dy) > abs(dx) else ("right" if dx > 0 else "left")
    return out


# A plain background is read within this distance of its palette entry: under half the distance
# between the two closest backgrounds (black-dark, 57), so a frame of decoded noise, whose median
# colour lands anywhere, is not read as a background.
BACKGROUND_TOL = 25.0


def check_clip(frames_TCHW: torch.Tensor, caption: str, parts=("background", "color", "motion"),
               color_tol: float = 60.0) -> dict:
    """measure_clip against the caption: {part: bool} for each part asked, plus 'measured' and
    'pass' (all parts). A colour counts only within color_tol of its palette entry (the
    background within BACKGROUND_TOL), and an object
    only when it covers 0.3-40% of the frame, so noise cannot pass by the nearest-colour lottery."""
    want = parse_caption(caption)
    got = measure_clip(frames_TCHW, color_tol)
    has_object = 0.003 <= got["object"] <= 0.4
    res = {}
    for part in parts:
        if part == "background":
            res[part] = got["background"] == want["background"] and got["background_dist"] <= BACKGROUND_TOL
        elif part == "color":
            res[part] = has_object and got["color"] == want["color"] and got["color_dist"] <= color_tol
        elif part == "motion":
            res[part] = has_object and got["motion"] == want["motion"]
        else:
            raise ValueError(f"check_clip part {part!r}: use background, color or motion")
    res["pass"] = all(res[p] for p in parts)
    res["measured"] = got
    return res
