"""POST /v1/audio/transcriptions and /v1/audio/translations as OpenAI's audio API has them, so
that tools and code written for it (the `openai` SDK, chat front ends with a speech button) use
this service by changing their base URL. The request becomes an ordinary job (listed, searchable,
deletable like any other); the answer waits for its text (every chunk's stored: the job is done,
or only its search vectors are still being made) and gives the transcript in the asked
`response_format`, with who said what in `verbose_json` and `diarized_json` (README "OpenAI-
compatible endpoint")."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import string
import time
import unicodedata
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Literal

from litestar import Request, post
from litestar.datastructures import State, UploadFile
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import Body, HeaderParameter, Parameter
from litestar.response import Response, ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from pydantic import ValidationError

from common import jobstore
from common.languages import LANGUAGE_NAMES
from common.logs import job_logged
from common.messages import BOOLEAN_WORDS as STREAM_WORDS
from common.messages import VOCABULARY_MAX_CHARS, JobOptions, vocabulary_chars
from services.ingest.admission import (
    KNOWN_SPEAKER_REFERENCES_REFUSED,
    RETRY_AFTER_S,
    UPLOAD_FORM_PARTS,
    claim_event_stream,
    release_upload,
)
from services.ingest.auth import request_owner
from services.ingest.captions import written_unspaced_letter
from services.ingest.error_handlers import CLIENT_CLOSED_REQUEST
from services.ingest.errors import OPENAI_PREFIX, OpenAIErrorBody, error_body, error_responses, invalid
from services.ingest.jobs import Idempotency, checked_idempotency_key, clean_filename, earlier_job
from services.ingest.live import job_updates, server_exiting
from services.ingest.segments import TranscriptSegment
from services.ingest.speakers import require_enrolled
from services.ingest.submission import submit_recording
from services.ingest.transcripts import fetch_transcript, to_srt, to_vtt

log = logging.getLogger(__name__)

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json", "diarized_json"]
# Below the OpenAI SDK's own timeout (600 s): a job whose text is still being written then is
# answered 503 with Retry-After, and the SDK's retry (the same file and options) waits on for that
# same job. A stream with nothing new for this long ends so too (its keep-alives reset the SDK's
# read timeout, so it would otherwise stay open as long as the job does).
WAIT_S = 300.0
POLL_S = 2.0
# The same request again finds the job it made while that runs and this long after it is done:
# a job that ends between the SDK's attempts (or before a person sends it again) is not redone.
REPEAT_WINDOW = timedelta(minutes=10)
# A failed or cancelled job is the answer to the same request for less long: long enough for the
# SDK's own retries (sent again as soon as an answer is lost), short enough that a person sending
# it again on purpose, a while later, gets a new job.
FAILED_REPEAT_WINDOW = timedelta(minutes=2)


@dataclass
class OpenAITranscriptionForm:
    file: Annotated[UploadFile, Parameter(description="The recording")]
    model: Annotated[str, Parameter(description="Accepted and ignored: the service's WHISPER_MODEL is used")] = (
        "whisper-1")
    language: Annotated[str | None, Parameter(
        description="A Whisper language code (or several, comma-separated, for a recording that switches between "
                    "them); left out: detected")] = None
    prompt: Annotated[str | None, Parameter(
        description=f"Text Whisper goes on from, or names and terms the recording uses: its last "
                    f"{VOCABULARY_MAX_CHARS} characters become the job's vocabulary")] = None
    response_format: Annotated[str | None, Parameter(
        description="json (blank or left out), text, srt, vtt, verbose_json (segments with their speaker, and "
                    "words) or diarized_json")] = None
    # Numbers are read as text so that a blank field means "not given", as on POST /recognize.
    temperature: Annotated[str | None, Parameter(description="A number; accepted and ignored")] = None
    num_speakers: Annotated[str | None, Parameter(description="This service's own: the number of speakers")] = None
    min_speakers: Annotated[str | None, Parameter(description="This service's own: at least this many")] = None
    max_speakers: Annotated[str | None, Parameter(description="This service's own: at most this many")] = None
    # As text, so that a blank field means "not given" (false).
    stream: Annotated[str | None, Parameter(
        description="true: events as the text is written, transcript.text.delta per segment (with "
                    "diarized_json each followed by its transcript.text.segment), then transcript.text.done; "
                    "false, blank or left out: the whole answer once the text is written")] = None


# The fields of OpenAI's transcription request, taken even where ignored (a list comes as
# `name[]`, repeated, from the SDK, or as `name` from a hand-written form; an object such as
# chunking_strategy as `name[key]` fields), and this service's own. Any other is refused: a
# misspelt option, or one only POST /recognize has, would otherwise be dropped without a word.
OPENAI_FIELDS = ("file", "model", "language", "languages", "prompt", "keywords", "response_format", "temperature",
                 "stream", "chunking_strategy", "include", "timestamp_granularities", "known_speaker_names",
                 "known_speaker_references")
OWN_FIELDS = ("num_speakers", "min_speakers", "max_speakers", "spelling", "redact")
LIST_FIELDS = ("languages", "keywords", "include", "timestamp_granularities", "known_speaker_names",
               "known_speaker_references", "redact", "spelling")
OBJECT_FIELDS = ("chunking_strategy", "spelling")


def unknown_fields(names: Iterable[str]) -> list[str]:
    def known(name: str) -> bool:
        field, bracket, key = name.partition("[")
        if not bracket:
            return field in OPENAI_FIELDS or field in OWN_FIELDS
        if key == "]":
            return field in LIST_FIELDS
        return field in OBJECT_FIELDS and key.endswith("]")

    return sorted({name for name in names if not known(name)})


def field_texts(form, field: str) -> list[str]:
    """The field's values, sent as `field` or, as the SDK sends a list, `field[]`."""
    return [value for name in (field, f"{field}[]") for value in form.getall(name, []) if isinstance(value, str)]


def asked_language(language: str | None, languages: list[str]) -> str | None:
    """JobOptions' language from OpenAI's `language` or its `languages` (those the recording may
    be in: here the ones its passages are told apart among, as `language` "en,de" asks)."""
    if languages and language and language.strip():
        raise HTTPException(status_code=400, detail=(
            "language and languages: give one of them (language: the one spoken; languages: those the recording"
            " may switch between)"))
    return ",".join(languages) if languages else language


def asked_vocabulary(keywords: list[str], prompt: str | None) -> str | None:
    """JobOptions' vocabulary from OpenAI's `keywords` (names and terms, as the vocabulary is) and
    `prompt`: the keywords first, refused where POST /recognize would refuse them as its vocabulary,
    then as much of the prompt's end as the room they leave takes."""
    if not keywords:
        return prompt_vocabulary(prompt)
    terms = ",".join(keywords)
    used = vocabulary_chars(terms)
    if used > VOCABULARY_MAX_CHARS:
        raise HTTPException(status_code=400, detail=(
            f"keywords: longer than {VOCABULARY_MAX_CHARS} characters (the terms with a comma between each), the"
            f" most the job's vocabulary takes: keep the names and terms Whisper would otherwise get wrong"))
    tail = prompt_vocabulary(prompt, VOCABULARY_MAX_CHARS - used - 1) if used else prompt_vocabulary(prompt)
    return ",".join(text for text in (terms, tail) if text)


async def form_list_options(request: Request, language: str | None, prompt: str | None) -> dict[str, object]:
    """JobOptions' language, vocabulary, expected_speakers, redact and spelling as the form gives
    them, in either shape: one comma-separated text, or as the SDK sends its lists and extra_body's
    (`languages[]=en`, `redact[]=email`, one field each) and objects (`spelling[confu i]=ComfyUI`).
    Unknown fields are refused here."""
    form = await request.form()
    if unknown := unknown_fields(form.keys()):
        raise HTTPException(status_code=400, detail=(
            f"unknown form field {', '.join(map(repr, unknown))[:300]}; the fields are OpenAI's "
            f"({', '.join(OPENAI_FIELDS)}) and this service's own ({', '.join(OWN_FIELDS)}); POST /recognize takes"
            " the others"))
    # OpenAI's diarizing model takes up to 4 names, each with a 2-10 s reference clip. Here the names
    # are those of enrolled speakers (README "Speakers"), who become the job's expected_speakers;
    # clips are refused (as their part begins, by admission's body check; here too, for a form
    # that reached the handler some other way).
    if field_texts(form, "known_speaker_references"):
        raise HTTPException(status_code=400, detail=KNOWN_SPEAKER_REFERENCES_REFUSED)
    # A name cannot hold a comma, so a single field's "Anna, Boris" can only be two names.
    names = [name for text in field_texts(form, "known_speaker_names") for name in text.split(",")]
    kinds = field_texts(form, "redact")
    # spelling[heard]=written fields are pairs; spelling[] fields (the SDK's list) are texts, as spelling ones.
    pairs = {name[len("spelling["):-1]: value for name, value in form.multi_items()
             if name.startswith("spelling[") and name != "spelling[]" and isinstance(value, str)}
    spelling_text = field_texts(form, "spelling")
    if pairs and spelling_text:
        raise HTTPException(status_code=400, detail="spelling: give it as one text (heard=written, comma-separated)"
                                                    " or as spelling[heard]=written fields, not both")
    # A blank field counts as not given, as elsewhere in the form.
    languages = [text for text in field_texts(form, "languages") if text.strip()]
    keywords = [text for text in field_texts(form, "keywords") if text.strip()]
    return {"language": asked_language(language, languages), "vocabulary": asked_vocabulary(keywords, prompt),
            "expected_speakers": names, "redact": ",".join(kinds) if kinds else None,
            "spelling": pairs or (",".join(spelling_text) if spelling_text else None)}


def asked_stream(text: str | None) -> bool:
    """`stream`: true/false, 1/0, yes/no, on/off in any case, as the README lists them (not the
    t/f, y/n pydantic's lax bool takes too); a blank field counts as not given (false)."""
    if text is None or not text.strip():
        return False
    try:
        return STREAM_WORDS[text.strip().lower()]
    except KeyError:
        raise HTTPException(status_code=400, detail=(
            "stream: true or false (1/0, yes/no, on/off; blank or left out: false)")) from None


IdempotencyKey = Annotated[str | None, HeaderParameter(
    name="Idempotency-Key", description="As for POST /recognize: the same request again waits for the same job")]


def joined_text(texts: Iterable[str]) -> str:
    """Segments' texts as one: a space between two, but not next to a character of a script
    written without spaces between words (Chinese, Japanese, Thai), as captions part words."""
    parts, previous = [], ""
    for text in texts:
        parts += [text_separator(previous, text), text]
        previous = text or previous
    return "".join(parts)


def text_separator(before: str, after: str) -> str:
    """A space, unless a letter of a script written without spaces (Chinese, Japanese, Thai...) is
    next to where the two meet, past the punctuation and symbols there ("好。" "「是」"): an emoji or
    a full-width symbol next to a Latin word is not one ("funny 😂" "Okay.")."""
    if not before or not after:
        return ""
    nearest = (_nearest_letter(reversed(before)), _nearest_letter(after))
    return "" if any(c and written_unspaced_letter(c) for c in nearest) else " "


def _nearest_letter(characters: Iterable[str]) -> str:
    """The first letter or digit, past punctuation, symbols and marks; "" at a space or the end."""
    for c in characters:
        if c.isspace():
            return ""
        if unicodedata.category(c)[0] in "LN":
            return c
    return ""


def _breaks_text(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def prompt_vocabulary(prompt: str | None, most_chars: int = VOCABULARY_MAX_CHARS) -> str | None:
    """OpenAI's `prompt` is text for Whisper to go on from, often the transcript of the piece
    before (Whisper itself reads only its end). Here it becomes the job's vocabulary, which Whisper
    is also shown as preceding text: its last whole words within the vocabulary's bound. When its
    last word alone is longer than that (text without spaces, as Chinese or Japanese is written;
    a long URL), its last characters within it, from after a punctuation mark among them where
    there is one."""
    if prompt is None:
        return None
    if most_chars <= 0:
        return ""
    text = prompt[-4 * VOCABULARY_MAX_CHARS:].strip()
    words = text.split()
    while words and vocabulary_chars(" ".join(words)) > most_chars:
        words.pop(0)
    if words or not text:
        return " ".join(words)
    start = len(text) - most_chars
    if not _breaks_text(text[start - 1]):  # cut inside a sentence: from the next one, if one starts
        start = next((i + 1 for i in range(start, len(text) - 1) if _breaks_text(text[i])), start)
    tail = text[start:].strip()
    while vocabulary_chars(tail) > most_chars:
        tail = tail[1:].lstrip()
    return tail


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected. The body has been read by then, so the next ASGI
    message is the disconnect (or the end of the answer)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def request_hash(digest: str, filename: str, options: JobOptions) -> str:
    asked = json.dumps(["openai", digest, filename, options.model_dump(exclude_none=True)], sort_keys=True)
    return hashlib.sha256(asked.encode()).hexdigest()


def file_digest(stream) -> str:
    digest = hashlib.sha256()
    while block := stream.read(1024 * 1024):
        digest.update(block)
    stream.seek(0)
    return digest.hexdigest()


def text_written(job) -> bool:
    """Every chunk's text is stored, final: the job has ended, or only its search vectors are still
    to come (the persister moves it to `embedding` in the transaction that stores its last chunk's
    text; spelling and redaction are the transcriber's, before that, and what the embedder's copy
    stores again is the same text)."""
    return job["status"] != "processing" or job["stage"] == "embedding"


async def wait_for_text(state: State, job_id: int, timeout_s: float) -> str:
    """The job's status once it has ended, "written" once its text is while it still runs (its
    search vectors to come), "processing" after `timeout_s`, or "deleted"."""
    deadline = time.monotonic() + timeout_s
    exiting = server_exiting(state)
    with state.wakeups.listen(job_id) as woken:
        while True:
            job = await jobstore.job(state.pool, job_id)
            if job is None:  # deleted while waited for (the web page, retention)
                return "deleted"
            status = job["status"]
            if status == "processing" and text_written(job):
                return "written"
            left = deadline - time.monotonic()
            # Stopping: the server waits for open answers, so a wait held on would hold the
            # restart for minutes; the 503 it gets sends the client back to this job elsewhere.
            if status != "processing" or left <= 0 or exiting():
                return status
            woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), min(left, POLL_S))


def speaker_letter(n: int) -> str:
    """The label of the recording's n-th speaker (from 0) as OpenAI's diarization has it."""
    return string.ascii_uppercase[n] if n < 26 else f"S{n + 1}"


def speaker_letters(segments: list[TranscriptSegment]) -> dict[str, str]:
    """Speakers as OpenAI's diarization labels them, A, B... in order of first words, unless named."""
    letters: dict[str, str] = {}
    for segment in segments:
        if segment.speaker not in letters:
            letters[segment.speaker] = speaker_letter(len(letters))
    return {label: next((s.speaker_name for s in segments if s.speaker == label and s.speaker_name), letter)
            for label, letter in letters.items()}


def verbose_segment(n: int, segment: TranscriptSegment) -> dict:
    """A segment as in OpenAI's verbose_json, whose clients read every field: Whisper's decoding
    figures that are not kept here have neutral values (`tokens` empty, `temperature` 0, a
    segment of speech `no_speech_prob` 0); `avg_logprob` is the words' mean log probability."""
    probabilities = [w.probability for w in segment.words or [] if w.probability]
    text = segment.text.encode()
    return {"id": n, "seek": round(segment.start_ts * 100), "start": segment.start_ts, "end": segment.end_ts,
            "text": segment.text, "tokens": [], "temperature": 0.0,
            "avg_logprob": round(sum(math.log(p) for p in probabilities) / len(probabilities), 4) if probabilities
            else 0.0,
            "compression_ratio": round(len(text) / len(zlib.compress(text)), 4) if text else 0.0,
            "no_speech_prob": 0.0, "speaker": segment.speaker,
            **({"speaker_name": segment.speaker_name} if segment.speaker_name else {})}


def rendered(document, response_format: str, task: str) -> Response:
    segments = document.segments
    text = joined_text(s.text for s in segments)
    if response_format == "text":
        return Response(text, media_type="text/plain")
    if response_format in ("srt", "vtt"):
        body = (to_srt if response_format == "srt" else to_vtt)(segments)
        return Response(body, media_type="text/plain")
    duration = document.duration or 0.0
    usage = {"type": "duration", "seconds": duration}
    if response_format == "json":
        return Response({"text": text, "usage": usage})
    if response_format == "diarized_json":
        who = speaker_letters(segments)
        return Response({"task": task, "duration": duration, "text": text,
                         "segments": [{"type": "transcript.text.segment", "id": f"seg_{n}", "start": s.start_ts,
                                       "end": s.end_ts, "text": s.text, "speaker": who[s.speaker]}
                                      for n, s in enumerate(segments)],
                         "usage": usage})
    return Response({
        "task": task, "language": language_name(document, task), "duration": duration, "text": text,
        "segments": [verbose_segment(n, s) for n, s in enumerate(segments)],
        # In time order, as OpenAI's: segments of two people talking at once overlap, so their
        # words listed segment by segment would go back in time.
        "words": verbose_words(segments),
        "usage": usage,
    })


def verbose_words(segments: list[TranscriptSegment]) -> list[dict]:
    """verbose_json's `words`: every segment's, sorted by (start, end), stable for ties."""
    words = [{"word": w.word, "start": w.start, "end": w.end} for s in segments for w in s.words or []]
    return sorted(words, key=lambda w: (w["start"], w["end"]))


def language_name(document, task: str) -> str:
    """The language as OpenAI names it, in English ("english"), always a text: a translation's is
    English; a recording nobody talks in has none detected, and is in the language asked (the
    first of several), else English."""
    if task == "translate":
        return "english"
    asked = (document.options.language or "").split(",")[0]
    code = document.language or (asked if asked in LANGUAGE_NAMES else None)
    return LANGUAGE_NAMES.get(code, code) if code else "english"


async def transcribe_and_wait(state: State, request: Request, data: OpenAITranscriptionForm, task: str,
                              idempotency_key: str | None) -> Response:
    response_format = (data.response_format or "").strip() or "json"
    if response_format not in ResponseFormat.__args__:
        raise HTTPException(status_code=400, detail=f"response_format: one of {', '.join(ResponseFormat.__args__)}")
    stream_events = asked_stream(data.stream)
    if data.temperature is not None and data.temperature.strip():
        try:
            float(data.temperature)
        except ValueError:
            raise HTTPException(status_code=400, detail="temperature: a number") from None
    listed = await form_list_options(request, data.language, data.prompt)
    try:
        options = JobOptions(task=task, num_speakers=data.num_speakers,
                             min_speakers=data.min_speakers, max_speakers=data.max_speakers, **listed)
    except ValidationError as exc:
        raise invalid(exc, whole="form") from exc
    filename = clean_filename(data.file.filename)
    stream = data.file.file
    asked = Idempotency(key=checked_idempotency_key(idempotency_key),
                        request_hash=request_hash(await asyncio.to_thread(file_digest, stream), filename, options))
    owner = request_owner(request)
    # The same request again (the SDK retries after a timeout or a 503): the job it made, not another,
    # though a person it expects was renamed since.
    earlier = (await earlier_job(state.pool, owner, asked) if idempotency_key is not None
               else await jobstore.recent_job_asked_so(state.pool, owner, asked.request_hash, REPEAT_WINDOW,
                                                      FAILED_REPEAT_WINDOW))
    with contextlib.closing(stream):
        if earlier is None:
            await require_enrolled(state.pool, owner, options.expected_speakers, "known_speaker_names")
            accepted = await submit_recording(state, request, stream, filename, options, None, None, asked,
                                              speakers_field="known_speaker_names")
            job_id = accepted.content.id
        else:
            job_id = earlier["id"]
            with job_logged(job_id):
                log.info("the same transcription request again: waiting for its job")
    # The route has no job_id in its path: an error it ends with from here (PostgreSQL going away
    # during the wait, a 500 in rendering) is logged with this job (error_handlers._for_the_routes_job).
    request.scope.setdefault("state", {})["job_id"] = job_id
    # The recording is stored: waiting for the job holds no upload's place.
    release_upload(request.scope)
    # Waiting reads PostgreSQL every few seconds, as an event stream does: one of their places,
    # streamed or not (a client resending a small file could otherwise hold thousands of waits).
    if not claim_event_stream(request.scope):
        raise HTTPException(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                            detail=f"job {job_id} goes on, but this server has as many event streams and waiting"
                                   f" requests open as it takes: send the same request again in {RETRY_AFTER_S} s"
                                   f" to follow it, or follow GET /status/{job_id}")
    if stream_events:
        return ServerSentEvent(text_events(state, job_id, response_format),
                               headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    waiting = asyncio.ensure_future(wait_for_text(state, job_id, WAIT_S))
    gone = asyncio.ensure_future(client_gone(request))
    await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not waiting.done():
        waiting.cancel()
        with job_logged(job_id):
            log.info("the client went away before the job ended; the job goes on; answered %d", CLIENT_CLOSED_REQUEST)
        # The client's doing, not a fault here: counted as one gone before its body came is.
        raise HTTPException(status_code=CLIENT_CLOSED_REQUEST,
                            detail=f"the client closed the connection before job {job_id} ended; the job goes on")
    status = waiting.result()
    if status == "processing" and server_exiting(state)():
        raise HTTPException(status_code=503, headers={"Retry-After": "1"},
                            detail=f"this server is restarting; job {job_id} goes on: send the same request again"
                                   f" to wait for it, or follow GET /status/{job_id}")
    if status == "processing":
        raise HTTPException(status_code=503, headers={"Retry-After": "1"},
                            detail=f"job {job_id} is still processing after {WAIT_S:g} s and goes on: send the same "
                                   f"request again to wait for it, or follow GET /status/{job_id}")
    document = await fetch_transcript(state.pool, job_id, owner, with_words=response_format != "json")
    if status == "deleted" or document is None:
        raise NotFoundException(detail=f"job {job_id} was deleted while this request waited for it")
    if status == "error":
        raise HTTPException(status_code=422, detail=f"job {job_id} failed: {document.error}")
    # Off the event loop: subtitles of corrected segments thousands of characters long take moments.
    return await asyncio.to_thread(rendered, document, response_format, task)


def _event(data: dict) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=json.dumps(data, ensure_ascii=False), sep="\n")


async def text_events(state: State, job_id: int, response_format: str) -> AsyncIterator[ServerSentEventMessage]:
    """OpenAI's streamed transcription: `transcript.text.delta` with each segment as it is stored
    (with diarized_json each followed by its `transcript.text.segment`, its speaker named as the
    answer without `stream` names it), then `transcript.text.done` with the whole text, in the
    order the answer without `stream` has it, once it is all written (text_written). A job that
    fails (or is deleted) ends the stream with an error, which the SDKs raise, and so does a server
    that stops first, PostgreSQL going away (the SDK would otherwise take the text so far for all),
    or WAIT_S without anything new."""
    diarized = response_format == "diarized_json"
    previous = ""
    segments: list[tuple[float, tuple[int, int], str]] = []
    letters: dict[str, str] = {}
    news_at = time.monotonic()
    exiting = server_exiting(state)
    async with contextlib.aclosing(job_updates(state.pool, state.wakeups, job_id, (-1, -1), exiting)) as updates:
        async for update in updates:
            match update:
                case ("segment", position, segment):
                    news_at = time.monotonic()
                    segment_id = f"seg_{len(segments)}"
                    delta = text_separator(previous, segment.text) + segment.text
                    previous = segment.text or previous
                    segments.append((segment.start_ts, position, segment.text))
                    yield _event({"type": "transcript.text.delta", "delta": delta,
                                  **({"segment_id": segment_id} if diarized else {})})
                    if diarized:
                        letter = letters.setdefault(segment.speaker, speaker_letter(len(letters)))
                        yield _event({"type": "transcript.text.segment", "id": segment_id, "start": segment.start_ts,
                                      "end": segment.end_ts, "text": segment.text,
                                      "speaker": segment.speaker_name or letter})
                case ("progress", progress) if progress.status == "processing" and progress.stage == "embedding":
                    # Every segment was sent before this: read after the job, as the segments are.
                    yield _event({"type": "transcript.text.done", "text": joined_text(in_time_order(segments))})
                    return
                case ("progress", _):
                    news_at = time.monotonic()
                case ("ended", job) if job["status"] == "done":
                    yield _event({"type": "transcript.text.done", "text": joined_text(in_time_order(segments))})
                    return
                case ("ended", job):
                    yield _event(error_body(OPENAI_PREFIX, 500, f"job {job_id} failed: {job['error']}"))
                    return
                case ("deleted",):
                    yield _event(error_body(OPENAI_PREFIX, 500, f"job {job_id} was deleted"))
                    return
                case ("quiet",):
                    yield ServerSentEventMessage(data=None, comment="keep-alive", sep="\n")
            if time.monotonic() - news_at >= WAIT_S:
                with job_logged(job_id):
                    log.info("nothing new for %g s: the streamed transcription ends with an error; the job goes on",
                             WAIT_S)
                yield _event(error_body(OPENAI_PREFIX, 503, (
                    f"job {job_id} is still processing, nothing new for {WAIT_S:g} s; it goes on: send the request"
                    f" again to follow it, or follow GET /status/{job_id}")))
                return
    # The server stopping, or PostgreSQL gone (job_updates logged that): the job goes on either way.
    stopping = exiting()
    why = "this server is restarting" if stopping else "the job store is unavailable"
    if stopping:
        with job_logged(job_id):
            log.info("the server is stopping: the streamed transcription ends with an error; the job goes on")
    yield _event(error_body(OPENAI_PREFIX, 503, f"{why}; job {job_id} goes on: send the request again to"
                                                " follow it"))


def in_time_order(segments: list[tuple[float, tuple[int, int], str]]) -> Iterable[str]:
    """The texts of (start, position, text) as the answer without `stream` orders its segments."""
    return (text for *_, text in sorted(segments))


def openai_error(request: Request, exc: HTTPException) -> Response:
    """What the handler raises, in OpenAI's error shape (errors the framework raises before it
    runs are shaped so by the app's own handlers, services.ingest.errors.error_body). A file that
    is not audio is a 400, as OpenAI answers it, so its SDKs raise BadRequestError."""
    status = 400 if exc.status_code == 415 else exc.status_code
    return Response(error_body(request.url.path, status, exc.detail), status_code=status, headers=exc.headers)


_RESPONSES = {code: ResponseSpec(data_container=OpenAIErrorBody, description=spec.description)
              for code, spec in error_responses(
                  400, 401, 404, 408, 413, 422, 503,
                  e400="Bad request, or a file that is not audio this service can decode: the message says which",
                  e401="An API key is required, or the one given is not valid",
                  e404="The job was deleted while the request waited for it",
                  e422="The job failed (the reason says why) or the Idempotency-Key was used for another request",
                  e503="The job is still processing after 5 minutes (send the same request again to wait on), or "
                       "a backing service is unavailable").items()}


# At most UPLOAD_FORM_PARTS parts: each is held (a file's in memory up to 1 MiB) until the form is read.
OpenAIForm = Annotated[OpenAITranscriptionForm, Body(media_type=RequestEncodingType.MULTI_PART,
                                                     multipart_form_part_limit=UPLOAD_FORM_PARTS)]


@post("/v1/audio/transcriptions", status_code=200, summary="OpenAI-compatible: transcribe a recording and wait",
      responses=_RESPONSES, tags=["OpenAI-compatible"], exception_handlers={HTTPException: openai_error})
async def transcriptions(data: OpenAIForm, state: State, request: Request,
                         idempotency_key: IdempotencyKey = None) -> Response:
    return await transcribe_and_wait(state, request, data, "transcribe", idempotency_key)


@post("/v1/audio/translations", status_code=200, summary="OpenAI-compatible: the recording's text in English",
      responses=_RESPONSES, tags=["OpenAI-compatible"], exception_handlers={HTTPException: openai_error})
async def translations(data: OpenAIForm, state: State, request: Request,
                       idempotency_key: IdempotencyKey = None) -> Response:
    return await transcribe_and_wait(state, request, data, "translate", idempotency_key)


OPENAI_ROUTES = [transcriptions, translations]
