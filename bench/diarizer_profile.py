"""python -m bench.diarizer_profile: where the offline diarizer's time goes, on each device.

Every fixture with a reference is diarized on each --devices entry (cpu, cuda, and
`cuda-torch-defaults`: CUDA with torch's defaults, i.e. TF32 convolutions and cuDNN for CAM++, as
the diarizer ran before 2026-12-04), and the turns compared with the first device's, clip by clip.
Then the clips laid end to end (--repeat times, with 1 s gaps) are timed step by step: the
segmentation model's forward passes, the filterbanks, CAM++'s runs (how many and how long), the
clustering, and the speakers' whole voices.

A GPU host without PyAV can take the clips as decoded here: `--save-audio clips.npz` writes
them, `--audio clips.npz` reads them instead of the fixtures.

    python -m bench.diarizer_profile [--devices cpu,cuda,cuda-torch-defaults] [--repeat 3]
    python -m bench.diarizer_profile --save-audio clips.npz
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_FIXTURES, SAMPLE_RATE, load_fixtures, quiet_logs, table

TORCH_DEFAULTS = "cuda-torch-defaults"
ANALYSIS = "analysis: the three above and the rest"


def load_clips(args) -> dict[str, np.ndarray]:
    if args.audio:
        with np.load(args.audio) as saved:
            return {name: saved[name] for name in saved.files}
    from common.audio import decode_audio

    return {f.stem: decode_audio(str(f.path)) for f in load_fixtures(args.fixtures) if f.turns}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class StepTimes:
    """Wall time and calls of each step, the GPU's queue drained before each clock reading."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def timed(self, step: str, fn):
        def inner(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start
            self.calls[step] = self.calls.get(step, 0) + 1
            return result
        return inner


@contextlib.contextmanager
def on(variant: str) -> Iterator[str]:
    """The torch device of a --devices entry; for TORCH_DEFAULTS, the diarizer's CUDA settings
    undone for the block (TF32 allowed, cuDNN under CAM++)."""
    if variant != TORCH_DEFAULTS:
        yield variant
        return
    import torch

    from services.diarizer import offline, speaker_embedding

    model = speaker_embedding.load_embedding_model("cuda")
    module = speaker_embedding.campplus_module().to("cuda")

    def with_cudnn(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch).to("cuda")).float().cpu().numpy()

    plain_infer, plain_float32 = model.infer, offline.full_float32
    object.__setattr__(model, "infer", with_cudnn)
    offline.full_float32 = lambda: None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield "cuda"
    finally:
        object.__setattr__(model, "infer", plain_infer)
        offline.full_float32 = plain_float32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def profile(device: str, waveform: np.ndarray) -> dict:
    """One diarization of `waveform`, step by step, as diarize_offline runs it."""
    from services.diarizer import offline, speaker_embedding

    model = speaker_embedding.load_embedding_model(device)
    segmentation = offline.load_segmentation(device)
    steps = StepTimes(device)
    plain = model.infer, offline.fbank, segmentation.model.forward
    object.__setattr__(model, "infer", steps.timed("CAM++ runs", plain[0]))
    offline.fbank = steps.timed("filterbanks", plain[1])
    segmentation.model.forward = steps.timed("segmentation", plain[2])
    try:
        local = steps.timed(ANALYSIS, offline.analyse)(waveform, device=device)
    finally:
        object.__setattr__(model, "infer", plain[0])
        offline.fbank = plain[1]
        del segmentation.model.forward
    diarization = steps.timed("clustering and turns", offline.decide)(local)
    steps.timed("whole voices (CAM++ once a speaker)", offline.with_whole_voices)(waveform, diarization, device)
    total = sum(steps.seconds[s] for s in (ANALYSIS, "clustering and turns", "whole voices (CAM++ once a speaker)"))
    return {"seconds": steps.seconds, "calls": steps.calls, "total": total,
            "speakers": len({t.speaker for t in diarization.turns})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=None, help=f"comma-separated: cpu, cuda, {TORCH_DEFAULTS} "
                        "(default: cpu, and the other two when torch sees a GPU)")
    parser.add_argument("--repeat", type=int, default=3, help="times the clips are laid end to end")
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--audio", type=Path, help="clips saved by --save-audio, instead of the fixtures")
    parser.add_argument("--save-audio", type=Path, help="write the decoded clips and stop")
    args = parser.parse_args()
    quiet_logs()
    clips = load_clips(args)
    if args.save_audio:
        np.savez_compressed(args.save_audio, **clips)
        print(f"{len(clips)} clips written to {args.save_audio}")
        return
    import torch

    from services.diarizer.offline import diarize_offline, load_offline_models

    variants = args.devices.split(",") if args.devices else (
        ["cpu", "cuda", TORCH_DEFAULTS] if torch.cuda.is_available() else ["cpu"])
    gap = np.zeros(SAMPLE_RATE, dtype=np.float32)
    long = np.concatenate([part for clip in clips.values() for part in (clip, gap)] * args.repeat)
    turns: dict[str, dict[str, list]] = {}
    profiles: dict[str, dict] = {}
    for variant in variants:
        with on(variant) as device:
            load_offline_models(device)
            diarize_offline(long[: 10 * SAMPLE_RATE], device=device)  # the first calls set up kernels
            turns[variant] = {name: diarize_offline(clip, device=device).turns for name, clip in clips.items()}
            profiles[variant] = profile(device, long)
        print(f"  {variant}: done", flush=True)

    minutes = len(long) / SAMPLE_RATE / 60
    steps = list(profiles[variants[0]]["seconds"])
    rows = []
    for step in steps:
        row = [step]
        for variant in variants:
            p = profiles[variant]
            calls = p["calls"].get(step, 0)
            row.append(f"{p['seconds'].get(step, 0.0):.1f}" + (f" ({calls} runs)" if step == "CAM++ runs" else ""))
        rows.append(row)
    rows.append(["real-time factor"] + [f"{profiles[v]['total'] / (minutes * 60):.3f}" for v in variants])
    rows.append(["speakers found"] + [str(profiles[v]["speakers"]) for v in variants])
    print(f"\n{minutes:.1f} minutes ({len(clips)} clips laid end to end {args.repeat} times), seconds per step:")
    print(table(["step", *variants], rows))
    first = variants[0]
    same = [[v, f"{sum(turns[v][n] == turns[first][n] for n in clips)} of {len(clips)}",
             ", ".join(n for n in clips if turns[v][n] != turns[first][n]) or "-"] for v in variants[1:]]
    if same:
        print(f"\nclips diarized alone, turns identical to {first}'s:")
        print(table(["device", "identical", "different"], same))


if __name__ == "__main__":
    main()
