"""The demo's sample check (data/demo_clips.py): it reads a clip's background colour, object
colour and motion direction back from pixels, so it must pass on the rendered clips (the ground
truth) and fail on noise and on clips of another caption."""
import pytest
import torch

from sora_dist.data.demo_clips import BACKGROUNDS, COLORS, MOTIONS, check_clip, parse_caption, render_clip


@pytest.mark.parametrize("seed", range(12))
def test_check_passes_on_rendered_clips(seed):
    frames, caption = render_clip(64, 80, 17, seed)
    res = check_clip(frames, caption)
    assert res["pass"], res
    assert res["measured"]["background_dist"] < 5 and res["measured"]["color_dist"] < 5


def test_check_reads_each_attribute():
    frames, caption = render_clip(64, 64, 17, 3)
    want = parse_caption(caption)
    for part, names in (("background", BACKGROUNDS), ("color", COLORS), ("motion", MOTIONS)):
        other = next(n for n in sorted(names) if n != want[part])
        if part == "background" and {other, want[part]} == {"black", "dark"}:
            other = "gray"
        wrong = caption.replace(f" {want[part]} ", f" {other} ") if part != "background" else \
            caption.replace(f"on a {want[part]}", f"on a {other}")
        if part == "motion":
            wrong = caption.replace(f"moving {want['motion']}", f"moving {other}")
        res = check_clip(frames, wrong)
        assert not res[part] and not res["pass"], (part, wrong, res)
        assert all(res[p] for p in ("background", "color", "motion") if p != part), (part, res)


def test_check_fails_on_noise_and_flat_frames():
    _, caption = render_clip(64, 64, 17, 5)
    noise = torch.randint(0, 256, (17, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert not check_clip(noise, caption)["pass"]
    bg = parse_caption(caption)["background"]
    flat = torch.tensor(BACKGROUNDS[bg], dtype=torch.uint8).view(1, 3, 1, 1).expand(17, 3, 64, 64).clone()
    res = check_clip(flat, caption)
    assert res["background"] and not res["color"] and not res["motion"]  # no object: only the colour of the page


def test_motion_needs_frames_and_parts_are_checked():
    frames, caption = render_clip(64, 64, 1, 7)
    assert check_clip(frames, caption, parts=("background", "color"))["pass"]
    assert not check_clip(frames, caption)["motion"]  # one frame shows no motion
    with pytest.raises(ValueError, match="demo's form"):
        check_clip(frames, "a cat playing piano")
    with pytest.raises(ValueError, match="part"):
        check_clip(frames, caption, parts=("size",))
