"""POST /v1/audio/transcriptions and /v1/audio/translations as OpenAI's audio API has them, so
that tools and code written for it (the `openai` SDK, chat front ends with a speech button) use
this service by changing their base URL. The request becomes an ordinary job (listed, searchable,
deletable like any other); the answer waits for it to end and gives the transcript in the asked
`response_format`, with who said what in `verbose_json` and `diarized_json` (README "OpenAI-
compatible endpoint")."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import string
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from litestar import Request, post
from litestar.datastructures import State, UploadFile
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException
from litestar.openapi import ResponseSpec
from litestar.params import Body, HeaderParameter, Parameter
from litestar.response import Response
from pydantic import ValidationError

from common import jobstore
from common.logs import job_logged
from common.messages import VOCABULARY_MAX_CHARS, JobOptions
from services.ingest.auth import request_owner
from services.ingest.errors import OpenAIErrorBody, error_body, error_responses, invalid
from services.ingest.jobs import Idempotency, clean_filename, earlier_job
from services.ingest.segments import TranscriptSegment
from services.ingest.speakers import require_enrolled
from services.ingest.submission import submit_recording
from services.ingest.transcripts import fetch_transcript, to_srt, to_vtt

log = logging.getLogger(__name__)

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json", "diarized_json"]
# Below the OpenAI SDK's own timeout (600 s): a job still running then is answered 503 with
# Retry-After, and the SDK's retry (the same file and options) waits on for that same job.
WAIT_S = 300.0
POLL_S = 2.0


@dataclass
class OpenAITranscriptionForm:
    file: Annotated[UploadFile, Parameter(description="The recording")]
    model: Annotated[str, Parameter(description="Accepted and ignored: the service's WHISPER_MODEL is used")] = (
        "whisper-1")
    language: Annotated[str | None, Parameter(description="A Whisper language code; left out: detected")] = None
    prompt: Annotated[str | None, Parameter(
        description=f"Names and terms the recording uses (the job's vocabulary), up to {VOCABULARY_MAX_CHARS} "
                    "characters")] = None
    response_format: Annotated[str, Parameter(
        description="json, text, srt, vtt, verbose_json (segments with their speaker, and words) or diarized_json")] = (
        "json")
    temperature: Annotated[float | None, Parameter(description="Accepted and ignored")] = None
    num_speakers: Annotated[int | None, Parameter(description="This service's own: the number of speakers")] = None
    min_speakers: Annotated[int | None, Parameter(description="This service's own: at least this many")] = None
    max_speakers: Annotated[int | None, Parameter(description="This service's own: at most this many")] = None
    spelling: Annotated[str | None, Parameter(
        description="This service's own: custom spelling, heard=written pairs, comma-separated")] = None
    redact: Annotated[str | None, Parameter(
        description="This service's own: what to replace in the text, comma-separated (email, card, phone, "
                    "number)")] = None


# OpenAI's diarizing model takes up to 4 names, each with a 2-10 s reference clip, as repeated
# multipart fields (the SDK sends a list in `extra_body` as `name[]`). Here the names are those of
# enrolled speakers (README "Speakers"), who become the job's expected_speakers; clips are refused,
# since a voice is enrolled once, with consent, rather than sent with each request.
KNOWN_SPEAKER_NAMES = ("known_speaker_names[]", "known_speaker_names")
KNOWN_SPEAKER_REFERENCES = ("known_speaker_references[]", "known_speaker_references")


async def known_speaker_names(request: Request) -> list[str]:
    form = await request.form()
    if any(form.getall(field, []) for field in KNOWN_SPEAKER_REFERENCES):
        raise HTTPException(status_code=400, detail=(
            "known_speaker_references: reference clips are not taken here; enrol each voice once (POST /speakers, "
            "or `stt speakers enroll NAME sample.wav`) and give its name in known_speaker_names"))
    return [name for field in KNOWN_SPEAKER_NAMES for name in form.getall(field, []) if isinstance(name, str)]


IdempotencyKey = Annotated[str | None, HeaderParameter(
    name="Idempotency-Key", description="As for POST /recognize: the same request again waits for the same job")]


def request_hash(digest: str, filename: str, options: JobOptions) -> str:
    asked = json.dumps(["openai", digest, filename, options.model_dump(exclude_none=True)], sort_keys=True)
    return hashlib.sha256(asked.encode()).hexdigest()


def file_digest(stream) -> str:
    digest = hashlib.sha256()
    while block := stream.read(1024 * 1024):
        digest.update(block)
    stream.seek(0)
    return digest.hexdigest()


async def wait_for_end(state: State, job_id: int, timeout_s: float) -> str:
    """The job's status once it has ended, or "processing" after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with state.wakeups.listen(job_id) as woken:
        while True:
            status = (await jobstore.job(state.pool, job_id))["status"]
            left = deadline - time.monotonic()
            if status != "processing" or left <= 0:
                return status
            woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), min(left, POLL_S))


def speaker_letters(segments: list[TranscriptSegment]) -> dict[str, str]:
    """Speakers as OpenAI's diarization labels them, A, B... in order of first words, unless named."""
    letters: dict[str, str] = {}
    for segment in segments:
        if segment.speaker not in letters:
            n = len(letters)
            letters[segment.speaker] = string.ascii_uppercase[n] if n < 26 else f"S{n + 1}"
    return {label: next((s.speaker_name for s in segments if s.speaker == label and s.speaker_name), letter)
            for label, letter in letters.items()}


def rendered(document, response_format: str, task: str) -> Response:
    segments = document.segments
    text = " ".join(s.text for s in segments)
    if response_format == "text":
        return Response(text, media_type="text/plain; charset=utf-8")
    if response_format in ("srt", "vtt"):
        body = (to_srt if response_format == "srt" else to_vtt)(segments)
        return Response(body, media_type="text/plain; charset=utf-8")
    if response_format == "json":
        return Response({"text": text})
    duration = document.duration or 0.0
    if response_format == "diarized_json":
        who = speaker_letters(segments)
        return Response({"task": "transcribe", "duration": duration, "text": text,
                         "segments": [{"type": "transcript.text.segment", "id": f"seg_{n}", "start": s.start_ts,
                                       "end": s.end_ts, "text": s.text, "speaker": who[s.speaker]}
                                      for n, s in enumerate(segments)],
                         "usage": {"type": "duration", "seconds": duration}})
    return Response({
        "task": task, "language": document.language, "duration": duration, "text": text,
        "segments": [{"id": n, "start": s.start_ts, "end": s.end_ts, "text": s.text, "speaker": s.speaker,
                      **({"speaker_name": s.speaker_name} if s.speaker_name else {})}
                     for n, s in enumerate(segments)],
        "words": [{"word": w.word, "start": w.start, "end": w.end} for s in segments for w in s.words or []],
    })


async def transcribe_and_wait(state: State, request: Request, data: OpenAITranscriptionForm, task: str,
                              idempotency_key: str | None) -> Response:
    if data.response_format not in ResponseFormat.__args__:
        raise HTTPException(status_code=400, detail=f"response_format: one of {', '.join(ResponseFormat.__args__)}")
    try:
        options = JobOptions(language=data.language, vocabulary=data.prompt, task=task, num_speakers=data.num_speakers,
                             min_speakers=data.min_speakers, max_speakers=data.max_speakers, spelling=data.spelling,
                             redact=data.redact, expected_speakers=await known_speaker_names(request))
    except ValidationError as exc:
        raise invalid(exc, whole="form") from exc
    await require_enrolled(state.pool, request_owner(request), options.expected_speakers, "known_speaker_names")
    filename = clean_filename(data.file.filename)
    stream = data.file.file
    asked = Idempotency(key=idempotency_key,
                        request_hash=request_hash(await asyncio.to_thread(file_digest, stream), filename, options))
    owner = request_owner(request)
    # The same request again (the SDK retries after a timeout or a 503): the job it made, not another.
    earlier = (await earlier_job(state.pool, owner, asked) if idempotency_key
               else await jobstore.running_job_asked_so(state.pool, owner, asked.request_hash))
    if earlier is not None:
        job_id = earlier["id"]
        with job_logged(job_id):
            log.info("the same transcription request again: waiting for its job")
    else:
        with contextlib.closing(stream):
            answer = await submit_recording(state, request, stream, filename, options, None, None, asked)
        job_id = answer.content.id
    status = await wait_for_end(state, job_id, WAIT_S)
    if status == "processing":
        raise HTTPException(status_code=503, headers={"Retry-After": "1"},
                            detail=f"job {job_id} is still processing after {WAIT_S:g} s and goes on: send the same "
                                   f"request again to wait for it, or follow GET /status/{job_id}")
    document = await fetch_transcript(state.pool, job_id, owner, with_words=data.response_format != "json")
    if status == "error":
        raise HTTPException(status_code=422, detail=f"job {job_id} failed: {document.error}")
    return rendered(document, data.response_format, task)


def openai_error(request: Request, exc: HTTPException) -> Response:
    """What the handler raises, in OpenAI's error shape (errors the framework raises before it
    runs are shaped so by the app's own handlers, services.ingest.errors.error_body)."""
    return Response(error_body(request.url.path, exc.status_code, exc.detail), status_code=exc.status_code,
                    headers=exc.headers)


_RESPONSES = {code: ResponseSpec(data_container=OpenAIErrorBody, description=spec.description)
              for code, spec in error_responses(
                  400, 413, 415, 422, 503,
                  e422="The job failed (the reason says why) or the Idempotency-Key was used for another request",
                  e503="The job is still processing after 5 minutes (send the same request again to wait on), or "
                       "a backing service is unavailable").items()} | error_responses(401, 403)


@post("/v1/audio/transcriptions", status_code=200, summary="OpenAI-compatible: transcribe a recording and wait",
      responses=_RESPONSES, tags=["OpenAI-compatible"], exception_handlers={HTTPException: openai_error})
async def transcriptions(data: Annotated[OpenAITranscriptionForm, Body(media_type=RequestEncodingType.MULTI_PART)],
                         state: State, request: Request, idempotency_key: IdempotencyKey = None) -> Response:
    return await transcribe_and_wait(state, request, data, "transcribe", idempotency_key)


@post("/v1/audio/translations", status_code=200, summary="OpenAI-compatible: the recording's text in English",
      responses=_RESPONSES, tags=["OpenAI-compatible"], exception_handlers={HTTPException: openai_error})
async def translations(data: Annotated[OpenAITranscriptionForm, Body(media_type=RequestEncodingType.MULTI_PART)],
                       state: State, request: Request, idempotency_key: IdempotencyKey = None) -> Response:
    return await transcribe_and_wait(state, request, data, "translate", idempotency_key)


OPENAI_ROUTES = [transcriptions, translations]
