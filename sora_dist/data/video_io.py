"""Video/image decoding (PyAV), frame sampling, bucketing, and an atomic mp4 writer.

torchvision's and torchcodec's video readers do not work in our environments, so decoding is
PyAV only and resizing is torch.nn.functional.interpolate. Images (png/jpg/...) are opened with
PyAV's image demuxer and become 1-frame videos, so one code path serves both.

Buckets follow Open-Sora: a table of resolutions (H, W) crossed with frame counts. A clip goes to
the resolution with the nearest aspect ratio (in log space, so 2:1 and 1:2 are equally far from
1:1) and to the largest frame count its duration allows at the target fps; it is then resized to
cover the bucket and center-cropped, so no padding ever reaches the VAE.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import av
import torch
import torch.nn.functional as F

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")

# Every reason an input can be rejected; rejects.jsonl uses these names.
REJECT_KINDS = (
    "missing", "zero_length", "corrupt", "truncated", "unsupported_codec",
    "too_short", "huge_resolution", "no_caption",
)


class BadInput(ValueError):
    """An input file that cannot become a training sample. `kind` is one of REJECT_KINDS."""

    def __init__(self, kind: str, path: str, detail: str):
        assert kind in REJECT_KINDS, kind
        self.kind, self.path, self.detail = kind, str(path), detail
        super().__init__(f"{path}: {kind}: {detail}")


@dataclass(frozen=True)
class VideoInfo:
    path: str
    is_image: bool
    width: int
    height: int
    fps: float          # 0 for images
    num_frames: int     # container's count (or duration*fps estimate); 1 for images
    codec: str


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def name(self) -> str:
        """Pixel bucket key: H x W x T."""
        return f"{self.height}x{self.width}x{self.frames}"


def _has_mp4_signature(path: str) -> bool:
    # An ISO-BMFF file starts with a box whose type is 'ftyp'; if that is there but the
    # demuxer fails, the file was cut short (moov atom lost) rather than being garbage.
    with open(path, "rb") as f:
        head = f.read(12)
    return len(head) >= 8 and head[4:8] == b"ftyp"


def probe(path: str, max_side: int = 4096) -> VideoInfo:
    """Read-only header check. Raises BadInput for missing/zero-length/corrupt/truncated/
    unsupported-codec/huge-resolution files; decodes at most one frame."""
    path = str(path)
    if not os.path.isfile(path):
        raise BadInput("missing", path, "file does not exist; fix the manifest path")
    if os.path.getsize(path) == 0:
        raise BadInput("zero_length", path, "file is empty (0 bytes); re-export or drop it")
    is_image = path.lower().endswith(IMAGE_EXTS)
    try:
        container = av.open(path, mode="r")
    except (av.error.InvalidDataError, av.error.EOFError) as e:
        kind = "truncated" if _has_mp4_signature(path) else "corrupt"
        raise BadInput(kind, path, f"demuxer cannot read it ({e.__class__.__name__}: {e})") from None
    except av.error.FFmpegError as e:
        raise BadInput("corrupt", path, f"cannot open ({e})") from None
    try:
        if not container.streams.video:
            raise BadInput("corrupt", path, "no video stream in the container")
        stream = container.streams.video[0]
        codec_name = stream.codec_context.name if stream.codec_context else "unknown"
        try:
            av.codec.Codec(codec_name, "r")
        except Exception:
            raise BadInput("unsupported_codec", path,
                           f"codec {codec_name!r} has no decoder in this PyAV build; transcode to h264") from None
        w, h = int(stream.codec_context.width), int(stream.codec_context.height)
        if w <= 0 or h <= 0:
            raise BadInput("corrupt", path, f"stream reports size {w}x{h}")
        if max(w, h) > max_side:
            raise BadInput("huge_resolution", path,
                           f"{w}x{h} exceeds encode.max_side={max_side}; downscale it or raise max_side")
        if is_image:
            fps, n = 0.0, 1
        else:
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            if fps <= 0:
                raise BadInput("corrupt", path, "stream has no frame rate")
            n = int(stream.frames or 0)
            if n <= 0:  # some containers carry no frame count: estimate from the duration
                if stream.duration and stream.time_base:
                    n = int(float(stream.duration * stream.time_base) * fps)
                elif container.duration:
                    n = int(container.duration / 1e6 * fps)
        # Decode one frame so a header-valid file with broken payload fails here, cheaply.
        try:
            next(iter(container.decode(video=0)))
        except StopIteration:
            kind = "truncated" if _has_mp4_signature(path) else "corrupt"
            raise BadInput(kind, path, "no decodable frame") from None
        except av.error.FFmpegError as e:
            raise BadInput("corrupt", path, f"first frame does not decode ({e})") from None
        return VideoInfo(path, is_image, w, h, fps, max(n, 1), codec_name)
    finally:
        container.close()


def parse_buckets(resolutions: Sequence[Sequence[int]], frames: Sequence[int]) -> list[Bucket]:
    """Cross the resolution list [[H, W], ...] with the frame-count list into a bucket table."""
    if not resolutions or not frames:
        raise ValueError("bucket table needs at least one [H, W] resolution and one frame count")
    out = []
    for r in resolutions:
        if len(r) != 2 or min(int(r[0]), int(r[1])) < 1:
            raise ValueError(f"bucket resolution {list(r)} must be [H, W] with positive ints")
        for t in frames:
            if int(t) < 1:
                raise ValueError(f"bucket frame count {t} must be >= 1")
            out.append(Bucket(int(r[0]), int(r[1]), int(t)))
    return out


def frames_available(info: VideoInfo, target_fps: float) -> tuple[int, float]:
    """(frames obtainable when sampling at target fps, effective fps). A source slower than
    the target is taken frame by frame at its own fps rather than duplicating frames."""
    if info.is_image:
        return 1, 0.0
    fps = min(float(target_fps), info.fps) if target_fps > 0 else info.fps
    n = int(math.floor((info.num_frames - 1) * fps / info.fps + 1e-6)) + 1
    return n, fps


def choose_bucket(info: VideoInfo, buckets: Sequence[Bucket], target_fps: float) -> tuple[Bucket, float]:
    """Nearest aspect ratio; among resolutions of that aspect the largest that needs no
    upscaling (else the smallest); then the longest frame count that fits.
    Raises BadInput(too_short)."""
    avail, fps = frames_available(info, target_fps)
    ar = math.log(info.height / info.width)
    dist = {hw: abs(math.log(hw[0] / hw[1]) - ar) for hw in {(b.height, b.width) for b in buckets}}
    best = min(dist.values())
    same_ar = sorted((hw for hw, d in dist.items() if d - best < 1e-9), key=lambda hw: hw[0] * hw[1])
    # Upscaling invents no detail and costs compute: a 240p clip belongs in the 240p bucket.
    no_up = [hw for hw in same_ar if hw[0] * hw[1] <= info.height * info.width]
    res = no_up[-1] if no_up else same_ar[0]
    # Images only fit 1-frame buckets; videos take the longest count <= available frames, but
    # never the 1-frame bucket: a 3-frame clip silently becoming a still would hide bad data.
    same_res = [b for b in buckets if (b.height, b.width) == res]
    if info.is_image:
        fits = [b for b in same_res if b.frames == 1]
        if not fits:
            raise BadInput("too_short", info.path, "image input but the bucket table has no 1-frame "
                           "bucket; add 1 to the frame counts or drop images")
        return fits[0], fps
    fits = [b for b in same_res if 1 < b.frames <= avail]
    if not fits:
        need = min([b.frames for b in same_res if b.frames > 1], default=2)
        raise BadInput("too_short", info.path,
                       f"{avail} frames at {fps:g} fps but the smallest bucket needs {need}; "
                       "add a shorter frame count to the bucket table or drop the clip")
    return max(fits, key=lambda b: b.frames), fps


def resize_crop(frames_TCHW: torch.Tensor, height: int, width: int, chunk: int = 16) -> torch.Tensor:
    """Scale so the frame covers (height, width) keeping aspect, then center-crop. uint8 in/out.
    Frames go through in chunks to bound the float32 working memory on long clips."""
    T, _, h, w = frames_TCHW.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (nh - height) // 2, (nw - width) // 2
    out = torch.empty(T, frames_TCHW.shape[1], height, width, dtype=torch.uint8)
    for s in range(0, T, chunk):
        x = frames_TCHW[s:s + chunk].float()
        if (nh, nw) != (h, w):
            # antialias only matters (and is only supported) when shrinking
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=scale < 1)
        x = x[:, :, top:top + height, left:left + width]
        out[s:s + chunk] = x.round().clamp_(0, 255).to(torch.uint8)
    return out


def read_frames(info: VideoInfo, num_frames: int, fps: float,
                size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Decode `num_frames` frames sampled at `fps` from the start. Returns uint8 (T, 3, H, W).
    Only the needed frames are kept, and decoding stops after the last one. With `size`, each
    kept frame is resized/cropped right away, so memory scales with the bucket, not the source
    resolution (a 4K source never has more than one full-size frame alive)."""
    if info.is_image:
        wanted = [0]
    else:
        step = info.fps / fps
        wanted = [int(round(i * step)) for i in range(num_frames)]
    want_set, last = set(wanted), wanted[-1]
    got: dict[int, torch.Tensor] = {}
    try:
        with av.open(info.path, mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in want_set:
                    x = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None]
                    got[i] = resize_crop(x, *size)[0] if size else x[0].contiguous()
                if i >= last:
                    break
    except av.error.FFmpegError as e:
        kind = "truncated" if got else "corrupt"
        raise BadInput(kind, info.path, f"decode failed after {len(got)} frames ({e})") from None
    if len(got) < len(want_set):
        # The header promised more frames than the payload holds: the file was cut short.
        raise BadInput("truncated", info.path,
                       f"decoded {len(got)} of {len(want_set)} needed frames; header says {info.num_frames}")
    return torch.stack([got[i] for i in wanted])


def load_clip(path: str, buckets: Sequence[Bucket], target_fps: float, max_side: int = 4096
              ) -> tuple[torch.Tensor, Bucket, float, VideoInfo]:
    """probe -> bucket -> decode -> resize/crop. Returns (uint8 (T,3,H,W), bucket, fps, info)."""
    info = probe(path, max_side=max_side)
    bucket, fps = choose_bucket(info, buckets, target_fps)
    frames = read_frames(info, bucket.frames, fps, size=(bucket.height, bucket.width))
    return frames, bucket, fps, info


def to_unit_range(frames_TCHW_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the VAE's input range)."""
    return frames_TCHW_uint8.float().div(127.5).sub(1.0)


def write_mp4(frames_TCHW: torch.Tensor, path: str, fps: float, codec: Optional[str] = None) -> str:
    """Write frames to an mp4 atomically (temp file in the same folder, then os.replace).

    uint8 frames are taken as [0, 255]; float frames as [-1, 1] (what VAE decode returns).
    Odd sizes are padded by one edge pixel because yuv420p needs even width and height.
    """
    if frames_TCHW.ndim != 4 or frames_TCHW.shape[1] not in (1, 3):
        raise ValueError(f"write_mp4 wants frames (T, 3, H, W); got shape {tuple(frames_TCHW.shape)}")
    if fps <= 0:
        raise ValueError(f"write_mp4: fps={fps} must be > 0")
    x = frames_TCHW.detach().cpu()
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    T, _, H, W = x.shape
    if H % 2 or W % 2:
        x = F.pad(x.float(), (0, W % 2, 0, H % 2), mode="replicate").to(torch.uint8)
        H, W = H + H % 2, W + W % 2
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # The temp name keeps the .mp4 suffix: PyAV picks the muxer from the extension.
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp.mp4")
    rate = Fraction(fps).limit_denominator(1001)
    arr = x.permute(0, 2, 3, 1).contiguous().numpy()
    try:
        with av.open(tmp, mode="w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "18", "preset": "veryfast"}
            for t in range(T):
                frame = av.VideoFrame.from_ndarray(arr[t], format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class Mp4StreamWriter:
    """Write decoded chunks to an mp4 as they arrive (PyAV), atomically: a temp file in the same
    folder is renamed into place on close(); on error it is removed. Same conventions as
    data.video_io.write_mp4: float frames in [-1, 1] or uint8, (T, 3, H, W) or (1, 3, T, H, W)."""

    def __init__(self, path: str, fps: float, codec: Optional[str] = None):
        if fps <= 0:
            raise ValueError(f"Mp4StreamWriter: fps={fps} must be > 0")
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.{os.getpid()}.tmp.mp4")
        self._codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        self._rate = Fraction(fps).limit_denominator(1001)
        self._av, self._container, self._stream, self.frames_written = av, None, None, 0

    def write(self, frames: torch.Tensor) -> None:
        x = frames.detach().cpu()
        if x.ndim == 5:
            if x.shape[0] != 1:
                raise ValueError(f"Mp4StreamWriter.write: batch of {x.shape[0]} videos; write one at a time")
            x = x[0].permute(1, 0, 2, 3)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Mp4StreamWriter.write wants (T, 3, H, W) or (1, 3, T, H, W); got {tuple(frames.shape)}")
        if x.dtype != torch.uint8:
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        H, W = x.shape[-2:]
        if H % 2 or W % 2:  # yuv420p needs even sizes: pad one edge pixel
            x = torch.nn.functional.pad(x.float(), (0, W % 2, 0, H % 2), mode="replicate").to(torch.uint8)
        if self._container is None:
            self._container = self._av.open(self._tmp, mode="w")
            self._stream = self._container.add_stream(self._codec, rate=self._rate)
            self._stream.width, self._stream.height, self._stream.pix_fmt = x.shape[-1], x.shape[-2], "yuv420p"
            if self._codec == "libx264":
                self._stream.options = {"crf": "18", "preset": "veryfast"}
        elif (x.shape[-1], x.shape[-2]) != (self._stream.width, self._stream.height):
            raise ValueError(f"Mp4StreamWriter.write: frame size {W}x{H} differs from the first chunk's")
        for f in x.permute(0, 2, 3, 1).contiguous().numpy():
            for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(f, format="rgb24")):
                self._container.mux(packet)
        self.frames_written += x.shape[0]

    def close(self) -> str:
        if self._container is None:
            raise ValueError("Mp4StreamWriter.close: no frames were written")
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            os.replace(self._tmp, self.path)
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        if self._container is not None and os.path.exists(self._tmp):
            try:
                self._container.close()
            except Exception:  # already closed or broken; the temp file goes either way
                pass
            os.remove(self._tmp)

    def __enter__(self) -> "Mp4StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
