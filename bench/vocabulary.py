"""What a job's vocabulary does: `python -m bench.vocabulary`.

Two questions, on the fixtures:
- does a term the recording uses come out spelled as given? `hotwords.mp3` says "ComfyUI" twice
  (the words around it are counted too, so a vocabulary that gets the term but loses the
  sentence shows);
- what does a vocabulary cost when the recording never uses its terms? Every fixture with a
  transcript reference (`en_dialogue`, `ru_dialogue`, `jfk`) is transcribed without one and with
  a full-length list of unrelated names and jargon, and cpWER is printed side by side.

Each file goes through the diarizer and the transcriber's handler as a job would (bench.common's
run_pipeline), one diarization per file for all its runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import (
    DEFAULT_FIXTURES,
    bench_settings,
    cpwer_counts,
    fmt,
    load_components,
    load_fixtures,
    normalize,
    quiet_logs,
    run_pipeline,
    table,
)

TERM_FILE, TERM = "hotwords.mp3", "ComfyUI"
CONTEXT_WORDS = ["then", "you", "go", "into", "your", "folder", "again", "in", "the"]
# Names and jargon none of the fixtures uses; as many as fit are given.
UNRELATED = ("Anna Petrova, Kubernetes, Siobhan O'Neill, pgvector, Nguyen Van An, RabbitMQ, "
             "Grzegorz Brzęczyszczykiewicz, Terraform, Reykjavík, Prometheus, Boris Johansson, OAuth, "
             "Syktyvkar, diarization, Tallinn, gRPC, "
             "CAM++, Grafana, Yaroslavl, PostgreSQL, pyannote, Llama").split(", ")


def longest_vocabulary(terms) -> list[str]:
    """As many of `terms` as a job's vocabulary may hold."""
    from common.messages import VOCABULARY_MAX_CHARS

    kept: list[str] = []
    for term in terms:
        if len(", ".join([*kept, term])) > VOCABULARY_MAX_CHARS:
            break
        kept.append(term)
    return kept


def evaluate(fixtures_dir: Path) -> dict:
    from common.audio import decode_audio
    from common.messages import JobOptions

    quiet_logs()
    settings = bench_settings()
    diarize, _, model = load_components(settings)
    unrelated = JobOptions(vocabulary=longest_vocabulary(term for term in UNRELATED if term != TERM))
    with_term = JobOptions(vocabulary=[TERM, *unrelated.vocabulary[:-1]])

    waveform = decode_audio(str(fixtures_dir / TERM_FILE))
    diarization = diarize(waveform, JobOptions())
    term_rows = []
    for name, options in [("none", JobOptions()), (TERM, JobOptions(vocabulary=TERM)),
                          (f"{TERM} among {len(with_term.vocabulary)} terms", with_term)]:
        text = " ".join(s.text for s in run_pipeline(waveform, diarize, model, settings, options,
                                                     diarization=diarization).segments)
        said = normalize(text).split()
        term_rows.append({"vocabulary": name, "term": text.count(TERM),
                          "context": in_order(CONTEXT_WORDS, said), "text": text.strip()})

    cost_rows = []
    for fixture in load_fixtures(fixtures_dir):
        reference = ([(u.speaker, u.text) for u in sorted(fixture.utterances, key=lambda u: u.start)]
                     if fixture.utterances else [("A", fixture.text)] if fixture.text else None)
        if not reference:
            continue
        waveform = decode_audio(str(fixture.path))
        diarization = diarize(waveform, JobOptions())
        row = {"file": fixture.name}
        for name, options in [("none", JobOptions()), ("unrelated", unrelated)]:
            t = time.perf_counter()
            result = run_pipeline(waveform, diarize, model, settings, options, diarization=diarization)
            row[f"transcribe_s_{name}"] = round(time.perf_counter() - t, 2)
            said = [(s.speaker, s.text) for s in sorted(result.segments, key=lambda s: s.start_ts)]
            errors, length = cpwer_counts(reference, said)
            row[f"cpwer_{name}"] = errors / length if length else None
        cost_rows.append(row)
    return {"term": term_rows, "cost": cost_rows, "unrelated_chars": len(", ".join(unrelated.vocabulary))}


def in_order(expected: list[str], said: list[str]) -> int:
    """How many of `expected` the text has in their order (the longest common subsequence):
    common words found anywhere in it would count as the sentence kept."""
    best = [0] * (len(said) + 1)
    for word in expected:
        previous_row_diagonal = 0
        for j, spoken in enumerate(said, 1):
            above = best[j]
            best[j] = previous_row_diagonal + 1 if word == spoken else max(best[j], best[j - 1])
            previous_row_diagonal = above
    return best[-1]


def render(report: dict) -> str:
    lines = [f"{TERM_FILE}: how often {TERM!r} is written (it is said twice), and how many of the "
             f"{len(CONTEXT_WORDS)} words said around it it has in their order",
             table(["vocabulary", TERM, "words around it", "text"],
                   [[r["vocabulary"], str(r["term"]), f"{r['context']}/{len(CONTEXT_WORDS)}", r["text"]]
                    for r in report["term"]]),
             "",
             f"Files that never use the terms: cpWER without a vocabulary and with "
             f"{report['unrelated_chars']} characters of unrelated names and jargon",
             table(["file", "cpWER none", "cpWER unrelated", "transcribe s none", "transcribe s unrelated"],
                   [[r["file"], fmt(r["cpwer_none"]), fmt(r["cpwer_unrelated"]), fmt(r["transcribe_s_none"], "s"),
                     fmt(r["transcribe_s_unrelated"], "s")] for r in report["cost"]])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="fixtures directory")
    args = parser.parse_args()
    started = time.perf_counter()
    report = evaluate(args.fixtures)
    print(render(report))
    print(f"\nwall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
