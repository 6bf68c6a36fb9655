"""Videos as streams: decoding with timestamps, encoding playable H.264, and per-clip consistency.

No torch here. Decoding and encoding go through the ffmpeg binary that imageio-ffmpeg bundles, so every
codec that ffmpeg decodes is read (H.264, HEVC, VP9, old MPEG-4 Part 2 ...), and frames arrive one at a
time: memory does not grow with the clip's length.

Frame selection: ``fps`` resamples by timestamp (ffmpeg's fps filter: frame i of the output is the
source frame shown at ``start + i / fps``), never above the source rate (that would only repeat
frames); ``start``/``end`` in seconds; ``max_frames`` caps the count.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from .atomic import temporary_path


@dataclass(frozen=True)
class FrameSelect:
    """Which frames of a clip to process (validated once)."""

    fps: float | None = None  # None = the source rate
    start: float | None = None  # seconds
    end: float | None = None  # seconds
    max_frames: int | None = None

    def __post_init__(self):
        if self.fps is not None and not self.fps > 0:
            raise UsageError(f"--fps must be > 0, not {self.fps}")
        if self.start is not None and self.start < 0:
            raise UsageError(f"--start must be >= 0, not {self.start}")
        if self.end is not None and self.end <= (self.start or 0):
            raise UsageError(f"--end ({self.end}) must be after --start ({self.start or 0})")
        if self.max_frames is not None and self.max_frames < 1:
            raise UsageError(f"--max-frames must be >= 1, not {self.max_frames}")


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float  # frames per second of the stream we produce (after --fps)
    source_fps: float
    duration: float  # seconds, of the source (0 if unknown)
    codec: str
    start: float

    def expected_frames(self, select: FrameSelect) -> int | None:
        if not self.duration or not self.fps:
            return None
        end = min(select.end, self.duration) if select.end else self.duration
        n = max(0, int(round((end - self.start) * self.fps)))
        return min(n, select.max_frames) if select.max_frames else n


@dataclass
class Frame:
    index: int  # 0-based index in the selected stream
    time: float  # seconds from the start of the source
    rgb: np.ndarray  # uint8 [H, W, 3]


def _ffmpeg_args(select: FrameSelect) -> tuple[list[str], list[str]]:
    input_params, output_params = [], []
    if select.start:
        input_params += ["-ss", f"{select.start:.6f}"]
    if select.end:
        output_params += ["-t", f"{select.end - (select.start or 0):.6f}"]
    if select.fps:
        output_params += ["-vf", f"fps={select.fps:.6g}"]
    if select.max_frames:
        output_params += ["-frames:v", str(select.max_frames)]
    # stop at the first damaged packet instead of concealing it, so damage is reported, not hidden;
    # one decoding thread: the model needs the cores far more than the decoder does
    input_params += ["-xerror", "-threads", "1"]
    return input_params, output_params


def open_video(path: Path, select: FrameSelect = FrameSelect()) -> tuple[VideoInfo, Iterator[Frame]]:
    """Probe ``path`` and return its info and a frame iterator.

    Raises InputError (naming the file) when the file cannot be opened or has no video stream. The
    iterator raises InputError naming the frame index when decoding fails part-way; the frames before
    it have been yielded.
    """
    import imageio_ffmpeg

    if not path.is_file():
        raise InputError(f"{path}: no such file", "check the path")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)", "re-export or remove it")
    input_params, output_params = _ffmpeg_args(select)
    gen = imageio_ffmpeg.read_frames(str(path), input_params=input_params, output_params=output_params)
    try:
        meta = next(gen)
    except (RuntimeError, OSError, StopIteration) as e:
        gen.close()
        raise InputError(
            f"{path}: not a readable video ({_ffmpeg_reason(e)})",
            "check that it is a video file with a video stream (mp4, mov, mkv, avi, webm)",
        ) from e
    w, h = (int(v) for v in meta["size"])
    src_fps = float(meta.get("fps") or 0.0)
    if select.fps and src_fps and select.fps > src_fps * 1.001:
        # more frames than the source has would only repeat frames: keep the source rate
        gen.close()
        return open_video(path, replace(select, fps=None))
    info = VideoInfo(
        w,
        h,
        float(select.fps or src_fps or 25.0),
        src_fps,
        float(meta.get("duration") or 0.0),
        str(meta.get("codec", "?")),
        float(select.start or 0.0),
    )
    return info, _frames(path, gen, info, info.expected_frames(select))


def _frames(path: Path, gen, info: VideoInfo, expected: int | None) -> Iterator[Frame]:
    nbytes = info.width * info.height * 3
    i = 0
    try:
        while True:
            try:
                raw = next(gen)
            except StopIteration:
                break
            except (RuntimeError, OSError) as e:
                raise InputError(
                    f"{path}: decoding failed at frame {i} ({_ffmpeg_reason(e)})",
                    "the frames before it were processed; re-encode or repair the file",
                ) from e
            if len(raw) != nbytes:
                raise InputError(f"{path}: short frame {i} ({len(raw)} of {nbytes} bytes)", "the file is damaged")
            rgb = np.frombuffer(raw, np.uint8).reshape(info.height, info.width, 3).copy()  # writable for torch
            yield Frame(i, info.start + i / info.fps, rgb)
            i += 1
    finally:
        gen.close()
    if i == 0:
        raise InputError(
            f"{path}: the video has no frames in the selected range",
            "check --start/--end, or that the clip is not empty",
        )
    # A stream cut short (an interrupted download or copy) ends cleanly for the demuxer; its container
    # still states the full duration, so a clear shortfall is damage, not the end of the clip.
    if expected and i < 0.9 * expected and expected - i >= 2:
        raise InputError(
            f"{path}: the stream ended at frame {i} of the {expected} its duration announces (truncated or damaged)",
            "the frames before it were processed; re-download or repair it",
        )


def _ffmpeg_reason(e: BaseException) -> str:
    text = str(e)
    if "does not contain any stream" in text:
        return "it has no video stream"
    for pattern in (r"moov atom not found", r"Invalid data found[^\n]*", r"[Ee]rror[^\n]{0,80}"):
        m = re.search(pattern, text)
        if m:
            return m.group(0).strip()
    first = text.strip().splitlines()
    return first[0][:120] if first else type(e).__name__


class VideoWriter:
    """H.264 (yuv420p, even dimensions, faststart) writer that plays everywhere; atomic on close.

    Frames of odd width or height are padded by one replicated pixel row/column. ``close()`` finalises
    the file and renames it into place, also after an interruption, so what was written plays. Until
    then it grows under a temporary name of ours (``atomic.temporary_path``), which a later run clears
    if this process is killed.
    """

    def __init__(self, path: Path, width: int, height: int, fps: float):
        import imageio_ffmpeg

        self.path = path
        self.size = (width + width % 2, height + height % 2)
        self.pad = (height % 2, width % 2)
        self.tmp = temporary_path(path)
        self.gen = imageio_ffmpeg.write_frames(
            str(self.tmp),
            self.size,
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            quality=None,
            output_params=["-crf", "18", "-threads", "1", "-movflags", "+faststart", "-f", "mp4"],
            ffmpeg_log_level="error",
        )
        self.gen.send(None)
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        if any(self.pad):
            rgb = np.pad(rgb, ((0, self.pad[0]), (0, self.pad[1]), (0, 0)), mode="edge")
        self.gen.send(np.ascontiguousarray(rgb))
        self.frames += 1

    def close(self) -> None:
        self.gen.close()
        if self.frames:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()


# ------------------------------------------------------------------------------ per-clip consistency


class ClipRange:
    """One colour range for a whole clip: robust (1st, 99th percentile) from the first frame, then adapting
    slowly (weight ``rate`` per frame), never per-frame min-max, so colours do not flicker."""

    def __init__(self, rate: float = 0.02, q: tuple[float, float] = (1.0, 99.0)):
        self.rate, self.q = rate, q
        self.lo: float | None = None
        self.hi: float | None = None
        self.first: tuple[float, float] | None = None

    def update(self, d: np.ndarray) -> tuple[float, float]:
        lo, hi = (float(v) for v in np.percentile(d[::4, ::4], self.q))
        if self.lo is None:
            self.lo, self.hi = lo, hi
            self.first = (lo, hi)
        else:
            self.lo += self.rate * (lo - self.lo)
            self.hi += self.rate * (hi - self.hi)
        return self.lo, max(self.hi, self.lo + 1e-6)
