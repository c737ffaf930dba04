"""Audio decoding (PyAV, which carries its own FFmpeg): any common format to 16 kHz mono."""

from __future__ import annotations

from typing import BinaryIO

import av
import numpy as np

SAMPLE_RATE = 16_000
PCM_BYTES_PER_SECOND = SAMPLE_RATE * 2  # signed 16-bit mono


class UndecodableAudio(ValueError):
    """The bytes are not audio this service can decode."""


class AudioTooLong(ValueError):
    pass


def decode_audio(source: str | BinaryIO, max_seconds: float | None = None) -> np.ndarray:
    """Decode the first audio stream to float32 mono at 16 kHz in [-1, 1]."""
    pieces: list[np.ndarray] = []
    decoded = 0
    limit = int(max_seconds * SAMPLE_RATE) if max_seconds else None
    try:
        with av.open(source, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise UndecodableAudio("the file has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler ignore gaps in timestamps
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    pieces.append(samples)
                    decoded += samples.size
                if limit is not None and decoded > limit:
                    raise AudioTooLong(
                        f"the audio is longer than the limit of {max_seconds / 3600:g} h"
                    )
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
    except (UndecodableAudio, AudioTooLong):
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
        if not pieces:
            raise UndecodableAudio(f"not decodable audio ({type(exc).__name__})") from exc
        # A truncated file: keep what decoded, as players do.
    if not pieces:
        raise UndecodableAudio("the file contains no audio samples")
    return pcm16_to_float(np.concatenate(pieces).astype(np.int16).tobytes())


def probe_audio(source: BinaryIO) -> None:
    """Cheap check that `source` is decodable audio: opens it and decodes the first frames.
    Raises UndecodableAudio with a message a user understands."""
    try:
        with av.open(source, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise UndecodableAudio("the file has no audio stream")
            stream = container.streams.audio[0]
            for index, frame in enumerate(container.decode(stream)):
                if frame.samples > 0:
                    return
                if index > 50:
                    break
    except UndecodableAudio:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
        raise UndecodableAudio(f"not decodable audio ({type(exc).__name__})") from exc
    raise UndecodableAudio("the file contains no audio samples")


def float_to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
