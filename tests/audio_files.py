"""Audio made on the fly for tests (PyAV's own FFmpeg), from real fixtures or from nothing."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import av
import numpy as np

from common.audio import SAMPLE_RATE, decode_audio


def encode(samples: np.ndarray, container: str, codec: str, rate: int, channels: int = 2,
           sample_rate: int = SAMPLE_RATE, bit_rate: int | None = None) -> bytes:
    """Encode mono float audio (at `sample_rate`) into `container`/`codec`, duplicated over
    `channels` channels and resampled to `rate`."""
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        stream.codec_context.options = {"strict": "experimental"}  # FFmpeg's native vorbis
        if bit_rate:
            stream.bit_rate = bit_rate
        interleaved = np.repeat((np.clip(samples, -1, 1) * 32767).astype(np.int16), channels)[None, :]
        frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout=layout)
        frame.sample_rate = sample_rate
        resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=rate)
        for resampled in resampler.resample(frame):
            for packet in stream.encode(resampled):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def without_its_length(flac: bytes) -> bytes:
    """`flac` with the length its header says (STREAMINFO's total samples) made 0, "unknown"."""
    data = bytearray(flac)
    data[21] &= 0xF0
    data[22:26] = bytes(4)
    return bytes(data)


def wav(samples: np.ndarray, rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    return encode(samples, "wav", "pcm_s16le", rate, channels)


def wav_header(data_bytes: int, rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV header announcing `data_bytes` of samples."""
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16) +
            b"data" + struct.pack("<I", data_bytes))


def _cut(audio: np.ndarray, spans: list[tuple[float, float]], gap_s: float = 0.6) -> np.ndarray:
    gap = np.zeros(int(gap_s * SAMPLE_RATE), dtype=np.float32)
    pieces = []
    for start, end in spans:
        pieces += [gap, audio[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)]]
    return np.concatenate(pieces + [gap])


def en_dialogue_voices(fixtures: Path) -> dict[str, bytes]:
    """WAVs of en_dialogue's two voices other than en_dialogue itself: `first_half` (its first two
    utterances, A's then B's: the recording to enrol from) and `second_half` (the two after them),
    no audio in common; `a_alone` (A's first utterance twice over: a sample to enrol from, at
    least 5 s long, with none of `second_half`'s audio), `both` (every utterance) and 8 s of
    `silence`. Recognised in `second_half`, B scores ~0.71 (A ~0.85) against the default
    SPEAKER_MATCH_THRESHOLD 0.6: a test that names B there catches a threshold too strict."""
    audio = decode_audio(str(fixtures / "en_dialogue.wav"))
    utterances = json.loads((fixtures / "en_dialogue.json").read_text())
    first_a = (utterances[0]["start"], utterances[0]["end"])
    return {"first_half": wav(_cut(audio, [(u["start"], u["end"]) for u in utterances[:2]])),
            "second_half": wav(_cut(audio, [(u["start"], u["end"]) for u in utterances[2:]])),
            "a_alone": wav(_cut(audio, [first_a, first_a])),
            "both": wav(_cut(audio, [(u["start"], u["end"]) for u in utterances])),
            "silence": wav(np.zeros(8 * SAMPLE_RATE, dtype=np.float32))}
