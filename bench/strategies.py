"""python -m bench.strategies: how to turn speaker turns into speaker-attributed text, decided by
the numbers. The same speaker turns (the references', so only the transcription differs), the
same model, four ways:

  per-turn    each speaker turn transcribed on its own (clips cut in memory; the seed's idea
              without its temporary files)
  whole-chunk one faster-whisper pass over the chunk's speech regions (the turns', padded and
              laid end to end) with word timestamps, each word given to the speaker whose turn
              overlaps it most (WhisperX's way; the default)
  batched     faster-whisper's BatchedInferencePipeline over the chunk with its own VAD (silero;
              batch 8, word timestamps), words assigned the same way
  batched over the regions   the default's speech regions cut into clips of up to 30 s where
              they join or in a pause, decoded 8 at once by the batched pipeline
              (WHISPER_BATCH_SIZE=8)

on the two dialogues (speaker-attributed references) and a ~5-minute concatenation of the
fixtures. Prints cpWER and transcription seconds per strategy.

    python -m bench.strategies [--fixtures DIR] [--minutes 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import (
    DEFAULT_FIXTURES,
    SAMPLE_RATE,
    bench_settings,
    concatenate,
    cpwer,
    cpwer_by_piece,
    fmt,
    load_components,
    load_fixtures,
    quiet_logs,
    table,
)

DIALOGUES = ("en_dialogue", "ru_dialogue")
NOT_ENGLISH = ("ru_dialogue", "multilingual")


def per_turn(model, audio, turns, language, beam_size):
    from common.messages import Segment

    segments = []
    for turn in turns:
        clip = audio[int(turn.start * SAMPLE_RATE):int(turn.end * SAMPLE_RATE)]
        if clip.size < SAMPLE_RATE // 10:
            continue
        pieces, _ = model.transcribe(clip, language=language, beam_size=beam_size,
                                     condition_on_previous_text=False)
        text = " ".join(p.text.strip() for p in pieces).strip()
        if text:
            segments.append(Segment(index=len(segments), speaker=turn.speaker, start_ts=turn.start,
                                    end_ts=turn.end, text=text))
    return segments


def whole_chunk(model, audio, turns, language, beam_size):
    from services.transcriber.whisper import transcribe_chunk

    return transcribe_chunk(model, audio, 0.0, turns, language, beam_size)[0]


def batched(model, audio, turns, language, beam_size):
    from faster_whisper import BatchedInferencePipeline

    from common.messages import Segment, Word
    from services.transcriber.whisper import _runs_by_speaker

    pipeline = BatchedInferencePipeline(model)
    pieces, _ = pipeline.transcribe(audio, language=language, beam_size=beam_size, batch_size=8,
                                    word_timestamps=True)
    words = [Word(word=w.word, start=w.start, end=w.end, probability=w.probability)
             for piece in pieces for w in (piece.words or [])]
    return [Segment(index=i, speaker=speaker, start_ts=run[0].start, end_ts=run[-1].end,
                    text="".join(w.word for w in run).strip(), words=run)
            for i, (speaker, run, _) in enumerate(_runs_by_speaker(words, [None] * len(words), turns))]


def batched_regions(model, audio, turns, language, beam_size):
    from services.transcriber.whisper import transcribe_chunk

    return transcribe_chunk(model, audio, 0.0, turns, language, beam_size, batch_size=8)[0]


STRATEGIES = {"per-turn": per_turn, "whole-chunk (default)": whole_chunk, "batched": batched,
              "batched over the regions": batched_regions}


def main() -> None:
    from common.audio import decode_audio
    from common.messages import SpeakerTurn
    from services.transcriber.languages import detect_language

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the concatenated file")
    args = parser.parse_args()
    quiet_logs()
    settings = bench_settings()
    _, _, model = load_components(settings)
    fixtures = load_fixtures(args.fixtures)

    cases = []  # (name, audio, cpWER of a list of segments)
    for fixture in fixtures:
        if fixture.stem in DIALOGUES:
            reference = [(u.speaker, u.text) for u in sorted(fixture.utterances, key=lambda u: u.start)]
            words = sum(len(text.split()) for _, text in reference)
            cases.append((f"{fixture.name} ({words} reference words)", decode_audio(str(fixture.path)), fixture.turns,
                          lambda segs, ref=reference: cpwer(ref, [(s.speaker, s.text) for s in segs])))
    # One language per job (detected once), so the long file is made of the English fixtures only;
    # scored piece by piece: each copy of a fixture gets its own speaker mapping.
    concat = concatenate([f for f in fixtures if f.stem not in NOT_ENGLISH], args.minutes * 60)

    def score_concatenation(segments) -> float:
        return cpwer_by_piece(concat, [(s.speaker, s.start_ts, s.end_ts, s.text) for s in segments])["all"]

    # Only the pieces with a transcript are scored: say how many words that is.
    scored = [(start, end) for _, start, end in concat.pieces if any(a == start for a, _ in concat.text_regions)]
    words = sum(len(u.text.split()) for u in concat.utterances if any(a <= u.start < b for a, b in scored))
    cases.append((f"English concatenation ({concat.duration / 60:.1f} min; {words} reference words scored)",
                  concat.audio, concat.turns, score_concatenation))

    rows = []
    totals = {name: [0.0, []] for name in STRATEGIES}
    for case_name, audio, reference_turns, score in cases:
        turns = [SpeakerTurn(speaker=speaker, start=start, end=end) for speaker, start, end in reference_turns]
        language = detect_language(model, audio[: 30 * SAMPLE_RATE])
        for name, strategy in STRATEGIES.items():
            started = time.perf_counter()
            segments = strategy(model, audio, turns, language, settings.whisper_beam_size)
            seconds = time.perf_counter() - started
            value = score(segments)
            totals[name][0] += seconds
            totals[name][1].append(value)
            rows.append([case_name, name, fmt(value), fmt(seconds, "s")])
            print(f"  {case_name} / {name}: cpWER {fmt(value)} %, {seconds:.1f} s", flush=True)
    for name, (seconds, values) in totals.items():
        rows.append(["MEAN / TOTAL", name, fmt(float(np.mean(values))), fmt(seconds, "s")])
    print()
    print(table(["audio", "strategy", "cpWER %", "transcribe s"], rows))


if __name__ == "__main__":
    main()
