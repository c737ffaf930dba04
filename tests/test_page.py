"""The web page in a real browser (Playwright driving Debian's chromium) against the real stack:
upload a recording, watch it reach done without reloading, read both speakers, name one and
remember its voice, click a segment and see the audio seek, download SRT and RTTM, forget the
voice, delete the recording. The screenshot in the README is taken here."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.audio import decode_audio
from tests.audio_files import encode
from tests.conftest import ROOT, free_port, through_another_ingest

CHROMIUM = os.environ.get("STT_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
# STT_UPDATE_SCREENSHOT=1 replaces the README's picture with this run's.
SCREENSHOT = ROOT / "docs" / "web-page.png"
KEY, OTHER_KEY = "page-key-3f9a1c", "page-key-other-77d2"


@pytest.fixture
def browser():
    """Per test: while Playwright's sync API runs, this thread has an event loop, so stacks (whose
    set-up and tear-down use asyncio.run) are made before it starts and removed after it ends."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield browser
        browser.close()


@pytest.fixture
def forgets_its_speakers(stack):
    """The test enrols voices on the shared stack: they are forgotten after it, passed or failed,
    or they would name en_dialogue's voices in every later test."""
    yield
    for speaker in httpx.get(f"{stack.api}/speakers", timeout=30).json()["items"]:
        httpx.delete(f"{stack.api}/speakers/{speaker['id']}", timeout=30)


def discard(api: str, client: httpx.Client, *job_ids: int) -> None:
    """The jobs stopped (when still running) and deleted with the owning key's `client`, once
    ended: the stack is shared, and the tests after this one list its jobs."""
    for job_id in job_ids:
        client.post(f"{api}/transcripts/{job_id}/cancel")
        deadline = time.monotonic() + 60
        while client.delete(f"{api}/transcripts/{job_id}").status_code not in (204, 404):
            assert time.monotonic() < deadline, f"job {job_id} could not be deleted"
            time.sleep(0.5)


def discard_tagged(api: str, tag: str) -> None:
    """As discard, every job of the last 100 whose filename holds `tag` (the test's own uploads)."""
    with httpx.Client(timeout=30) as client:
        mine = [job["id"] for job in client.get(f"{api}/transcripts?limit=100").json()["items"]
                if tag in job["filename"]]
        discard(api, client, *mine)


def wait_until(page, condition, what: str, timeout_s: float = 30) -> None:
    """Until `condition()` holds (what a held route or a stream recorded), the page running meanwhile."""
    for _ in range(int(timeout_s * 10)):
        if condition():
            return
        page.wait_for_timeout(100)
    raise AssertionError(what)


def test_upload_follow_read_play_and_download(stack, fixtures_dir, browser, tmp_path, forgets_its_speakers):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The speaking times (the last thing to refresh the name fields) wait until a name is being
    # typed: refreshing the fields must not take the focus or the text away.
    held: list = []

    def hold_speaking_time(route) -> None:
        if route.request.method == "GET" and not held:
            held.append(route)
        else:
            route.continue_()

    page.route(re.compile(r"/transcripts/\d+/speakers$"), hold_speaking_time)
    # A recording that ended hours ago: listed, but no longer followed by the list's event stream.
    old = stack.value("INSERT INTO transcripts (filename, status, completed_at) VALUES ('old.wav', 'done',"
                      " now() - interval '2 hours') RETURNING id")
    page.goto(stack.api + "/")
    assert page.title() == "stt-pipeline"
    # The script and styles are checked again on every load, as the page is: after an upgrade a
    # browser must not run the new page with the old script.
    for asset in ("/ui/app.js", "/ui/style.css"):
        assert httpx.get(stack.api + asset).headers.get("cache-control") == "no-cache", asset

    page.set_input_files("#file", str(fixtures_dir / "en_dialogue.wav"))
    page.select_option("#language", "en")
    page.get_by_role("button", name="Transcribe").click()
    status = page.locator("#upload-status")
    status.filter(has_text="accepted as job").wait_for(timeout=60_000)
    job_id = int(status.inner_text().rsplit("job ", 1)[1].rstrip("."))

    # Followed live: the job's row and the transcript reach done with no reload.
    page.locator(f'#jobs li[data-job="{job_id}"][data-status="done"]').wait_for(timeout=300_000)
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    segments = page.locator("#segments .segment")
    speakers = {segments.nth(i).get_attribute("data-speaker") for i in range(segments.count())}
    assert speakers == {"spk_0", "spk_1"}
    starts = [float(segments.nth(i).get_attribute("data-start")) for i in range(segments.count())]
    assert starts == sorted(starts) and len(starts) >= 4
    text = page.locator("#segments").inner_text().lower()
    assert "sales" in text and "quarter" in text
    assert page.locator("#segments").get_attribute("lang") == "en"  # read aloud as English

    # Each speaker's talk time is beside its name field; it arrives while a name is being typed,
    # and the typing goes on in the same field.
    page.click("#name-spk_0")
    page.keyboard.type("An")
    wait_until(page, lambda: held, "the page never asked for the speaking times")
    held[0].continue_()
    page.unroute(re.compile(r"/transcripts/\d+/speakers$"))
    page.locator("label[for='name-spk_0']", has_text="(talks 00:").wait_for(timeout=30_000)
    assert page.evaluate("document.activeElement.id") == "name-spk_0"
    page.keyboard.type("na")
    assert page.input_value("#name-spk_0") == "Anna"

    # Name a speaker from the page: the transcript shows it, and screen readers say it.
    page.get_by_role("button", name="Save names").click()
    page.locator("#segments .segment[data-speaker='spk_0'] .who", has_text="Anna").first.wait_for(timeout=30_000)
    annas = page.locator("#segments .segment[data-speaker='spk_0']")
    named = page.get_by_role("button", name=re.compile(r"^Play from [\d:.]+ ?: Anna ?: "))
    assert annas.count() and named.count() == annas.count(), (named.count(), annas.count())

    # Remember that voice: Anna becomes an enrolled speaker, listed under Known voices.
    page.get_by_role("button", name="Remember voices").click()
    page.locator("#transcript-status", has_text="Anna's voice remembered.").wait_for(timeout=60_000)
    page.locator("#people li", has_text="Anna").filter(has_text="1 voiceprint").wait_for(timeout=30_000)
    enrolled = {p["name"]: p for p in httpx.get(f"{stack.api}/speakers", timeout=30).json()["items"]}
    assert enrolled["Anna"]["voiceprint_count"] == 1
    # Pressed again, nothing is added and nothing is refused.
    page.locator("#transcript-status").evaluate("status => { status.textContent = ''; }")
    page.get_by_role("button", name="Remember voices").click()
    page.locator("#transcript-status", has_text="Anna's voice remembered.").wait_for(timeout=60_000)
    enrolled = {p["name"]: p for p in httpx.get(f"{stack.api}/speakers", timeout=30).json()["items"]}
    assert enrolled["Anna"]["voiceprint_count"] == 1

    # The upload form now offers her as someone who may be in the next recording; ticked, the job
    # expects her (and only her) to be named.
    page.get_by_role("checkbox", name="Anna").check()
    page.set_input_files("#file", str(fixtures_dir / "jfk.flac"))
    page.get_by_role("button", name="Transcribe").click()
    status.filter(has_text="jfk.flac accepted as job").wait_for(timeout=60_000)
    expecting = int(status.inner_text().rsplit("job ", 1)[1].rstrip("."))
    options = httpx.get(f"{stack.api}/transcripts/{expecting}", timeout=30).json()["options"]
    assert options["expected_speakers"] == ["Anna"], options
    page.locator("#transcript-title", has_text="jfk.flac").wait_for(timeout=30_000)
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator("#transcript-title", has_text="en_dialogue.wav").wait_for(timeout=30_000)
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)

    # Clicking a segment seeks the audio there.
    page.wait_for_function("document.querySelector('#player').readyState >= 1", timeout=30_000)
    target = segments.nth(2)
    start = float(target.get_attribute("data-start"))
    target.click()
    position = page.evaluate("document.querySelector('#player').currentTime")
    assert abs(position - start) < 0.5, (position, start)

    page.screenshot(path=str(SCREENSHOT if os.environ.get("STT_UPDATE_SCREENSHOT") else tmp_path / "page.png"),
                    full_page=True)

    with page.expect_download() as download:
        page.get_by_role("link", name="Download SRT").click()
    srt = Path(download.value.path()).read_text()
    assert "-->" in srt and "Anna: " in srt and "spk_1: " in srt
    with page.expect_download() as download:
        page.get_by_role("link", name="Download RTTM").click()
    assert Path(download.value.path()).read_text().startswith("SPEAKER en_dialogue 1 ")

    # Search by meaning unavailable (the embedding service away: the server's 503): the page
    # searches by words and says so.
    by_meaning = re.compile(r"/search\?(?!.*mode=text)")
    page.route(by_meaning, lambda route: route.fulfill(status=503, json={
        "status_code": 503, "detail": "embedding service unavailable", "extra": {"code": "embedding_unavailable"}}))
    page.fill("#query", "sales numbers")
    page.press("#query", "Enter")
    page.locator("#hits li", has_text="by words only").wait_for(timeout=30_000)
    page.locator("#hits li button", has_text="en_dialogue.wav").first.wait_for(timeout=30_000)
    page.unroute(by_meaning)

    asked: list[str] = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.on("dialog", answer)
    # Forgetting asks first; then the voice is gone from the page and the server.
    page.get_by_role("button", name="Forget Anna").click()
    page.locator("#people li", has_text="Anna").wait_for(state="detached", timeout=30_000)
    assert asked and asked[-1].startswith("Forget Anna")
    assert "Anna" not in {p["name"] for p in httpx.get(f"{stack.api}/speakers", timeout=30).json()["items"]}

    # Deleting asks first; once confirmed the recording is gone from the page and the server.
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    page.get_by_role("button", name="Delete recording").click()
    page.locator(f'#jobs li[data-job="{job_id}"]').wait_for(state="detached", timeout=30_000)
    assert "en_dialogue.wav" in asked[-1]
    assert page.locator("#transcript").is_hidden()
    assert httpx.get(f"{stack.api}/status/{job_id}", timeout=30).status_code == 404

    # A recording deleted elsewhere (another tab, the CLI, retention) while open: without a
    # click, the page says it is gone (the list's event stream tells it), drops it from the list,
    # offers nothing more for it, and does not keep asking for it.
    page.locator(f'#jobs li[data-job="{expecting}"][data-status="done"] button').click(timeout=300_000)
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    assert httpx.delete(f"{stack.api}/transcripts/{expecting}", timeout=30).status_code == 204
    page.locator("#transcript-status", has_text="was deleted").wait_for(timeout=15_000)
    page.locator(f'#jobs li[data-job="{expecting}"]').wait_for(state="detached", timeout=5_000)
    # From here on (before it, the player may still have been fetching the recording, on a busy
    # machine later than the transcript's end).
    streams: list[str] = []
    page.on("request", lambda request: streams.append(request.url)
            if f"/transcripts/{expecting}" in request.url else None)
    assert page.locator("#transcript").is_visible()
    for control in ("#downloads a", "#delete", "#cancel", "#rerun", "#player"):
        assert not page.locator(control).is_visible(), control
    page.wait_for_timeout(4_500)  # a page that kept asking would have tried again every 2 s
    assert streams == [], streams
    # One deleted elsewhere that no stream told the page of: opened, the page says it is gone.
    assert httpx.delete(f"{stack.api}/transcripts/{old}", timeout=30).status_code == 204
    page.locator(f'#jobs li[data-job="{old}"] button').click()
    page.locator("#transcript-status", has_text="was deleted").wait_for(timeout=15_000)
    page.locator(f'#jobs li[data-job="{old}"]').wait_for(state="detached", timeout=5_000)
    assert errors == []
    page.close()


def test_a_stereo_call_with_one_party_per_channel(stack, fixtures_dir, browser):
    page = browser.new_page()
    page.goto(stack.api + "/")
    page.set_input_files("#file", str(fixtures_dir / "stereo_diarization.wav"))
    page.get_by_label("One party per channel").check()
    page.get_by_role("button", name="Transcribe").click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=300_000)
    segments = page.locator("#segments .segment")
    by_speaker = {}
    for i in range(segments.count()):
        by_speaker.setdefault(segments.nth(i).get_attribute("data-speaker"), []).append(
            segments.nth(i).locator(".text").inner_text().lower())
    texts = sorted(" ".join(t) for t in by_speaker.values())
    assert len(texts) == 2 and "wizard" in texts[0] and "horizon" in texts[1], by_speaker
    # Run again with a count of voices: the channels are mixed for it (a count does not go with
    # channels kept apart, which the first job's options would otherwise carry over).
    first = page.locator("#transcript").get_attribute("data-job")
    page.get_by_role("form", name="Run again").get_by_label("Speakers").fill("2")
    page.get_by_role("button", name="Run again").click()
    page.wait_for_function(f"document.querySelector('#transcript').dataset.job !== '{first}'", timeout=30_000)
    again = page.locator("#transcript").get_attribute("data-job")
    options = httpx.get(f"{stack.api}/transcripts/{again}", timeout=30).json()["options"]
    assert options["num_speakers"] == 2 and not options.get("multichannel"), options
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=300_000)
    page.close()


def test_names_and_terms_typed_in_are_spelled_so(stack, fixtures_dir, browser):
    page = browser.new_page()
    page.goto(stack.api + "/")
    page.set_input_files("#file", str(fixtures_dir / "hotwords.mp3"))
    page.get_by_label("Names and terms").fill("ComfyUI")
    transcribe = page.get_by_role("button", name="Transcribe")
    transcribe.dblclick()  # one recording, one job
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=300_000)
    said = " ".join(page.locator("#segments .segment .text").all_inner_texts())
    assert said.count("ComfyUI") == 2, said  # Whisper alone writes other words (test_handlers)
    jobs = httpx.get(f"{stack.api}/transcripts?limit=100", timeout=30).json()["items"]
    assert [job["filename"] for job in jobs].count("hotwords.mp3") == 1, jobs
    # Done uploading: the form is ready for the next file, not for this one again.
    assert transcribe.is_enabled()
    assert page.eval_on_selector("#file", "input => input.files.length") == 0
    assert page.locator("#upload-progress").is_hidden()
    page.close()


def test_a_long_list_of_names_and_terms_is_sent_whole_or_refused_before_it_is_sent(stack, fixtures_dir, browser):
    """The field holds what the server takes (its terms counted joined by bare commas, as the
    server counts them): a pasted list longer than that as written is kept and sent whole, not cut
    off mid-word; one the server would refuse is not sent, and the field says how long it may be."""
    page = browser.new_page()
    sent: list[bytes] = []

    def refused(route) -> None:  # no job is made
        sent.append(route.request.post_data_buffer or b"")
        route.fulfill(status=415, json={"detail": "not a recording"})

    page.route(re.compile(r"/recognize$"), refused)
    try:
        page.goto(stack.api + "/")
        terms = [f"Term{i:02d}" for i in range(16)]  # 16 × 6 characters + 15 commas: 111 as the server counts
        pasted = ",   ".join(terms)  # 156 characters as written
        page.get_by_label("Names and terms").fill(pasted)
        assert page.input_value("#vocabulary") == pasted
        assert page.eval_on_selector("#vocabulary", "input => input.validity.valid")
        page.set_input_files("#file", str(fixtures_dir / "empty.wav"))
        page.get_by_role("button", name="Transcribe").click()
        page.locator("#upload-status", has_text="415 not a recording").wait_for(timeout=30_000)
        assert len(sent) == 1 and pasted.encode() in sent[0], sent

        too_long = ", ".join(f"Kubernetes{i:02d}" for i in range(14))  # 14 × 12 + 13 commas: 181
        page.get_by_label("Names and terms").fill(too_long)
        assert page.input_value("#vocabulary") == too_long
        page.set_input_files("#file", str(fixtures_dir / "empty.wav"))
        page.get_by_role("button", name="Transcribe").click()
        page.wait_for_timeout(500)
        assert len(sent) == 1, "a list the server refuses was sent"
        message = page.eval_on_selector("#vocabulary", "input => input.validationMessage")
        assert "150" in message and "181" in message, message
        page.get_by_label("Names and terms").fill(too_long.rsplit(", ", 1)[0].rsplit(", ", 1)[0])  # 12 terms: 155
        assert "155" in page.eval_on_selector("#vocabulary", "input => input.validationMessage")
        page.get_by_label("Names and terms").fill(too_long.rsplit(", ", 3)[0])  # 11 terms: 142
        assert page.eval_on_selector("#vocabulary", "input => input.validity.valid")
    finally:
        page.close()


def test_card_and_phone_numbers_and_addresses_are_hidden_when_asked(stack, browser):
    page = browser.new_page()
    page.goto(stack.api + "/")
    page.get_by_label("Hide card and phone numbers, e-mail addresses").check()
    # Dropped on the page, outside the drop box: uploaded (with the form's options), and the
    # browser does not leave the page to open the file.
    recording = base64.b64encode((ROOT / "tests" / "data" / "billing_call.flac").read_bytes()).decode()
    cancelled = page.evaluate('''(recording) => {
        const files = new DataTransfer();
        const bytes = Uint8Array.from(atob(recording), (c) => c.charCodeAt(0));
        files.items.add(new File([bytes], "billing_call.flac", { type: "audio/flac" }));
        const target = document.querySelector("#search-title");
        return ["dragover", "drop"].map((type) => !target.dispatchEvent(
            new DragEvent(type, { dataTransfer: files, bubbles: true, cancelable: true })));
    }''', recording)
    assert cancelled == [True, True]
    page.locator("#upload-status", has_text="billing_call.flac accepted as job").wait_for(timeout=60_000)
    # Opened as it runs, its recording (the upload, with the numbers audible) is not played: the
    # redacted copy is, once the job is done.
    job_id = page.locator("#transcript").get_attribute("data-job")
    asked: list[int] = []
    page.on("request", lambda request: asked.append(1) if f"/transcripts/{job_id}/audio" in request.url else None)
    page.locator("#audio-status", has_text="plays once the transcript is done").wait_for(timeout=30_000)
    assert not asked and page.locator("#player").get_attribute("src") is None
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=300_000)
    # Through the redaction of the recording (503 meanwhile, asked again less and less often): long
    # on a loaded machine.
    page.wait_for_function("document.querySelector('#player').readyState >= HTMLMediaElement.HAVE_METADATA",
                           timeout=180_000)
    assert page.locator("#audio-status").is_hidden(), page.locator("#audio-status").inner_text()
    said = " ".join(page.locator("#segments .segment .text").all_inner_texts())
    assert "[CARD]" in said and "[PHONE]" in said, said
    # The e-mail address comes in the second voice's part, which starts mid-number: Whisper may
    # decode it again by random sampling (a sentence can come back other, or not at all), so it is
    # hidden whenever it is there, not always there (test_handlers hears it whole, and hides it).
    assert not re.search(r"\d{3}|support ?at|example|@", said, re.I), said
    page.close()


def test_a_recording_that_changes_language_is_written_in_each(stack, fixtures_dir, browser):
    page = browser.new_page()
    page.goto(stack.api + "/")
    page.set_input_files("#file", str(fixtures_dir / "multilingual.mp3"))
    page.select_option("#language", label="changes during the recording")
    page.get_by_role("button", name="Transcribe").click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=300_000)
    texts = page.locator("#segments .segment .text")
    by_language: dict[str, str] = {}
    for i in range(texts.count()):
        language = texts.nth(i).get_attribute("lang")
        by_language[language] = by_language.get(language, "") + " " + texts.nth(i).inner_text().lower()
    assert set(by_language) == {"en", "de"}, by_language
    assert "permission" in by_language["en"] and " und " in by_language["de"], by_language
    page.close()


def test_unsure_words_are_marked_and_a_miscounted_recording_runs_again(stack, fixtures_dir, browser):
    page = browser.new_page()
    page.goto(stack.api + "/")
    page.set_input_files("#file", str(fixtures_dir / "sample.wav"))
    page.get_by_role("button", name="Transcribe").click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=300_000)
    first = page.locator("#transcript").get_attribute("data-job")
    assert speakers_shown(page) == 2

    # The words Whisper was unsure of are underlined, and only those; the text reads the same.
    segments = httpx.get(f"{stack.api}/transcripts/{first}?words=true", timeout=30).json()["segments"]
    unsure = sorted(w["word"] for s in segments for w in s["words"] if (w.get("probability") or 1) < 0.5)
    assert unsure, "sample.wav (a far-field meeting) has words Whisper is unsure of"
    page.locator("#unsure-hint").wait_for(state="visible", timeout=30_000)
    marks = page.locator("#segments mark.unsure")
    assert sorted(marks.all_inner_texts()) == unsure
    assert "%" in marks.first.get_attribute("title")
    assert sorted(page.locator("#segments .segment .text").all_inner_texts()) == sorted(s["text"] for s in segments)
    page.get_by_role("form", name="Run again").get_by_label("Speakers").fill("3")
    page.get_by_role("button", name="Run again").click()
    page.wait_for_function(f"document.querySelector('#transcript').dataset.job !== '{first}'")
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=300_000)
    assert speakers_shown(page) == 3
    assert page.locator("#jobs li").filter(has_text="sample.wav").count() >= 2  # the first job is kept
    second = page.locator("#transcript").get_attribute("data-job")
    page.close()

    # A recording removed by AUDIO_RETENTION_DAYS, opened on a later visit (a new browser context:
    # nothing cached): the page says why it does not play, and the transcript reads as before.
    stack.query("UPDATE transcripts SET audio_removed_at = now() WHERE id = $1", int(first))
    try:  # the stack is shared: other tests count removed recordings
        page = browser.new_page()
        page.goto(stack.api + "/")
        page.locator(f'#jobs li[data-job="{first}"] button').click()
        page.locator("#audio-status", has_text="AUDIO_RETENTION_DAYS").wait_for(timeout=30_000)
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
        assert page.locator("#transcript-status").inner_text() == "Done."
        assert sorted(page.locator("#segments .segment .text").all_inner_texts()) == sorted(
            s["text"] for s in segments)
    finally:
        stack.query("UPDATE transcripts SET audio_removed_at = NULL WHERE id = $1", int(first))

    # The server's `transcript.deleted` (the job deleted while its stream was open): the page
    # says so and drops the job from the list.
    page.route(f"**/transcripts/{second}/events", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body=f'event: transcript.deleted\ndata: {{"transcript_id": {second}}}\nid: end\n\n'))
    page.locator(f'#jobs li[data-job="{second}"] button').click()
    page.locator("#transcript-status", has_text="was deleted").wait_for(timeout=15_000)
    page.locator(f'#jobs li[data-job="{second}"]').wait_for(state="detached", timeout=5_000)
    assert page.get_by_role("button", name="Delete recording").is_hidden()
    page.close()


def speakers_shown(page) -> int:
    segments = page.locator("#segments .segment")
    return len({segments.nth(i).get_attribute("data-speaker") for i in range(segments.count())})


@pytest.fixture(scope="module")
def keyed_stack(stack):
    with through_another_ingest(stack, "ingest-page-keys", API_KEYS=f"{KEY},{OTHER_KEY}") as keyed:
        yield keyed


def test_a_segment_is_corrected_on_the_page(stack, fixtures_dir, browser):
    page = browser.new_page()
    page.goto(stack.api + "/")
    page.set_input_files("#file", str(fixtures_dir / "en_dialogue.wav"))
    page.get_by_role("button", name="Transcribe").click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=300_000)
    job_id = int(page.locator("#transcript").get_attribute("data-job"))
    first = page.locator("#segments li").first
    said_by = first.locator(".segment").get_attribute("data-speaker")
    other = "spk_1" if said_by == "spk_0" else "spk_0"
    first.get_by_role("button", name="Correct the segment at").click()
    form = page.get_by_role("form", name="Correct the segment at")
    form.get_by_label("Words").fill("Hello everyone, welcome to Zanzibar.")
    form.get_by_label("Speaker").select_option(other)
    form.get_by_role("button", name="Save correction").click()
    page.locator("#transcript-status", has_text="Correction saved.").wait_for(timeout=30_000)
    corrected = page.locator("#segments .segment", has_text="welcome to Zanzibar")
    assert corrected.get_attribute("data-speaker") == other
    segments = httpx.get(f"{stack.api}/transcripts/{job_id}", timeout=30).json()["segments"]
    assert [(s["speaker"], s["text"]) for s in segments if s["edited"]] == [
        (other, "Hello everyone, welcome to Zanzibar.")]
    page.close()


def a_recording_in_the_database(stack, filename: str, said: list[tuple[str, str]], turns: list[str] | None = None,
                                ended_hours_ago: float = 0) -> int:
    """A finished job made in the database, with nothing transcribed (the tests of the name fields
    need no recording processed): `said` is who says what, a segment every 2 s; `turns`, the
    speakers the diarizer found, a second's turn each; ended `ended_hours_ago` (over an hour ago,
    /events no longer tells of it)."""
    job_id = stack.value("INSERT INTO transcripts (filename, status, language, completed_at) VALUES ($1, 'done',"
                         " 'en', now() - make_interval(secs => $2 * 3600)) RETURNING id", filename, ended_hours_ago)
    for index, (speaker, text) in enumerate(said):
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                    " VALUES ($1, 0, $2, $3, $4, $5, $6)", job_id, index, speaker, 2.0 * index, 2.0 * index + 1.5, text)
    for index, speaker in enumerate(turns or []):
        stack.query("INSERT INTO speaker_turns (transcript_id, chunk_index, index, speaker, start_ts, end_ts)"
                    " VALUES ($1, 0, $2, $3, $4, $5)", job_id, index, speaker, float(index), index + 1.0)
    return job_id


def test_forgetting_a_voice_keeps_the_names_and_the_correction_being_typed(stack, browser, forgets_its_speakers):
    anna = stack.value("INSERT INTO speakers (name) VALUES ('Anna') RETURNING id")
    job_id = a_recording_in_the_database(stack, "standup.wav", [
        ("spk_0", "Morning, all."), ("spk_1", "Morning."), ("spk_0", "Let us start.")])
    stack.query("INSERT INTO transcript_speakers (transcript_id, speaker, name, name_source, matched_speaker_id)"
                " VALUES ($1, 'spk_0', 'Anna', 'auto', $2)", job_id, anna)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    assert page.input_value("#name-spk_0") == "Anna"  # her voice recognised
    # Another speaker being named, and a segment being corrected, neither saved yet.
    page.fill("#name-spk_1", "Ben")
    page.locator("#segments li").nth(1).get_by_role("button", name="Correct the segment at").click()
    words = page.get_by_role("form", name="Correct the segment at").get_by_label("Words")
    words.fill("Good morning.")

    # Forgotten, Anna's name leaves the transcript; what is being typed stays. Her Forget button
    # gone with the list made anew, the focus goes to the list's heading, not to the page's top.
    page.get_by_role("button", name="Forget Anna").focus()
    page.keyboard.press("Enter")
    page.locator("#segments .segment[data-speaker='spk_0'] .who", has_text="spk_0").first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Forget Anna").wait_for(state="detached", timeout=30_000)
    page.wait_for_function("document.activeElement?.id === 'people-title'", timeout=5_000)
    assert page.input_value("#name-spk_0") == ""
    assert page.input_value("#name-spk_1") == "Ben"
    assert words.input_value(timeout=5_000) == "Good morning."
    page.get_by_role("button", name="Save names").click()
    page.locator("#transcript-status", has_text="Names saved.").wait_for(timeout=30_000)
    speakers = httpx.get(f"{stack.api}/transcripts/{job_id}/speakers", timeout=30).json()["speakers"]
    assert (speakers["spk_0"].get("name"), speakers["spk_1"].get("name")) == (None, "Ben"), speakers
    assert errors == []
    page.close()


def test_names_read_before_a_save_committed_do_not_take_the_saved_name_back(stack, browser, forgets_its_speakers):
    """A voice is forgotten while a name is being saved: the names read that follows was answered by
    the server before the save committed, and reaches the page after the save's answer. The saved
    name stays on screen."""
    cleo = stack.value("INSERT INTO speakers (name) VALUES ('Cleo') RETURNING id")
    job_id = a_recording_in_the_database(stack, "weekly.wav", [("spk_0", "Hello."), ("spk_1", "Hi.")])
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())
    held_save: list = []
    held_read: list = []  # (route, the server's answer, given before the names were saved)

    def hold_the_save_and_the_read_after_it(route) -> None:
        if route.request.method == "PATCH":
            held_save.append(route)
        elif held_save:
            held_read.append((route, route.fetch()))
        else:
            route.continue_()

    page.route(re.compile(rf"/transcripts/{job_id}/speakers$"), hold_the_save_and_the_read_after_it)
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    page.locator("label[for='name-spk_0']", has_text="(talks").wait_for(timeout=30_000)
    page.fill("#name-spk_0", "Anna")
    page.get_by_role("button", name="Save names").click()
    wait_until(page, lambda: held_save, "the page never sent the names")
    page.get_by_role("button", name="Forget Cleo").click()
    wait_until(page, lambda: held_read, "the page never read the names again")
    assert httpx.get(f"{stack.api}/speakers/{cleo}", timeout=30).status_code == 404

    held_save[0].continue_()
    page.locator("#transcript-status", has_text="Names saved.").wait_for(timeout=30_000)
    route, answered_before_the_save = held_read[0]
    with page.expect_response(lambda response: response.request.method == "GET"
                              and response.url.endswith(f"/transcripts/{job_id}/speakers")):
        route.fulfill(response=answered_before_the_save)
    page.wait_for_timeout(500)  # time for the answer to be read (and, wrongly, shown)
    assert page.input_value("#name-spk_0") == "Anna"
    assert page.locator("#segments .segment .who").all_inner_texts() == ["Anna", "spk_1"]
    assert errors == []
    page.close()


def test_a_file_uploaded_in_the_background_leaves_the_transcript_being_named_open(stack, fixtures_dir, browser):
    job_id = a_recording_in_the_database(stack, "interview.wav", [
        ("spk_0", "Thanks for coming."), ("spk_1", "Glad to be here.")])
    page = browser.new_page()
    # The upload takes its time (a big file, a slow line): it is answered once the test says so.
    held: list = []
    page.route(re.compile(r"/recognize$"), lambda route: held.append(route))
    page.goto(stack.api + "/")
    page.set_input_files("#file", str(fixtures_dir / "empty.wav"))
    page.get_by_role("button", name="Transcribe").click()
    wait_until(page, lambda: held, "the page never sent the file")
    # Meanwhile another recording is opened, and a speaker named there (not saved yet).
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    page.fill("#name-spk_1", "Ben")
    # And the next file is chosen, to be sent once this one is.
    page.set_input_files("#file", str(fixtures_dir / "jfk.flac"))
    held[0].continue_()
    status = page.locator("#upload-status")
    status.filter(has_text="empty.wav accepted as job").wait_for(timeout=60_000)
    uploaded = int(re.search(r"job (\d+)", status.inner_text())[1])
    # The new job is listed, and said to be; the recording being named stays open as it was.
    page.locator(f'#jobs li[data-job="{uploaded}"]').wait_for(timeout=30_000)
    assert "not opened" in status.inner_text()
    # The file chosen meanwhile is still chosen, the upload done.
    page.locator("#upload-progress").wait_for(state="hidden", timeout=10_000)
    assert page.eval_on_selector("#file", "input => [...input.files].map((file) => file.name)") == ["jfk.flac"]
    assert page.locator("#transcript").get_attribute("data-job") == str(job_id)
    assert page.locator("#transcript-title").inner_text() == "interview.wav"
    assert page.input_value("#name-spk_1") == "Ben"
    page.close()
    # Not left processing beside the tests after this one.
    httpx.post(f"{stack.api}/transcripts/{uploaded}/cancel", timeout=30)
    for done_with in (uploaded, job_id):
        httpx.delete(f"{stack.api}/transcripts/{done_with}", timeout=30)


def sends_events(page, job_id: int, filename: str, said: list[tuple[str, str]], names: list[str | None],
                 failed: bool = False) -> None:
    """The page is sent the job's event stream (/transcripts/{id}/events) as the server sent it
    live: the segments of a_recording_in_the_database's `said`, each with the speaker's name as it
    was when it was sent (`names`, one a segment), then the job's end (its failure when `failed`)."""
    def event(kind: str, data: dict, event_id: str) -> str:
        return f"event: {kind}\ndata: {json.dumps(data)}\nid: {event_id}\n\n"

    stream = [event("segment.created", {"transcript_id": job_id, "chunk_index": 0, "index": i, "speaker": speaker,
                                        "speaker_name": name, "start_ts": 2.0 * i, "end_ts": 2.0 * i + 1.5,
                                        "text": text}, f"0:{i}")
              for i, ((speaker, text), name) in enumerate(zip(said, names, strict=True))]
    ended = {"id": job_id, "transcript_id": job_id, "filename": filename, "status": "error" if failed else "done",
             "stage": "failed" if failed else "done", "percent": 100, "language": "en"}
    body = "".join(stream) + event("transcript.failed" if failed else "transcript.completed", ended, "end")
    page.route(f"**/transcripts/{job_id}/events", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=body))


def test_a_name_recognised_after_its_field_was_made_is_kept_when_others_are_saved(stack, browser):
    said = [("spk_0", "Hello."), ("spk_1", "Hi there."), ("spk_0", "Shall we begin?")]
    job_id = a_recording_in_the_database(stack, "call.wav", said)
    stack.query("INSERT INTO transcript_speakers (transcript_id, speaker, name, name_source)"
                " VALUES ($1, 'spk_0', 'Anna', 'auto')", job_id)
    page = browser.new_page()
    # As the page saw it live: spk_0's voice was recognised between its first segment and its
    # second, so the first came unnamed.
    sends_events(page, job_id, "call.wav", said, [None, None, "Anna"])
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    # Naming the other speaker leaves hers as it is: not taken back (which recognition would not
    # undo), and shown in her field.
    page.fill("#name-spk_1", "Ben")
    page.get_by_role("button", name="Save names").click()
    page.locator("#transcript-status", has_text="Names saved.").wait_for(timeout=30_000)
    speakers = httpx.get(f"{stack.api}/transcripts/{job_id}/speakers", timeout=30).json()["speakers"]
    assert (speakers["spk_0"].get("name"), speakers["spk_1"].get("name")) == ("Anna", "Ben"), speakers
    assert page.input_value("#name-spk_0") == "Anna"
    assert page.locator("#segments .segment .who").all_inner_texts() == ["Anna", "Ben", "Anna"]
    page.close()


def test_names_given_or_taken_back_after_the_segments_were_sent_are_shown_at_the_end(stack, browser):
    said = [("spk_0", "Hello."), ("spk_1", "Hi there."), ("spk_0", "Shall we begin?")]
    job_id = a_recording_in_the_database(stack, "renamed.wav", said)
    stack.query("INSERT INTO transcript_speakers (transcript_id, speaker, name, name_source)"
                " VALUES ($1, 'spk_1', 'Anna', 'auto')", job_id)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # As the page saw it live: spk_0 recognised as Ben (a voice forgotten since), spk_1 not yet
    # (her voice was enrolled meanwhile in another tab, or a later chunk matched her).
    sends_events(page, job_id, "renamed.wav", said, ["Ben", None, "Ben"])
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    # At the end, the names as the server has them.
    page.locator("#segments .segment .who", has_text="Anna").wait_for(timeout=15_000)
    assert page.locator("#segments .segment .who").all_inner_texts() == ["spk_0", "Anna", "spk_0"]
    assert (page.input_value("#name-spk_0"), page.input_value("#name-spk_1")) == ("", "Anna")
    assert errors == []
    page.close()


def test_someone_else_is_a_speaker_the_recording_does_not_have(stack, browser):
    """The diarizer found three voices; two of them say something. "Someone else" in a correction
    is a fourth, not the third (whose turns would then count as the corrected words' speaker's)."""
    job_id = a_recording_in_the_database(stack, "three.wav", [("spk_0", "Hello."), ("spk_1", "Hi.")],
                                         turns=["spk_0", "spk_1", "spk_2"])
    page = browser.new_page()
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    page.locator("label[for='name-spk_0']", has_text="(talks").wait_for(timeout=30_000)
    page.locator("#segments li").first.get_by_role("button", name="Correct the segment at").click()
    offered = page.eval_on_selector_all("#segments form.correction option",
                                        "options => options.map((option) => [option.value, option.textContent])")
    assert offered == [["spk_0", "spk_0"], ["spk_1", "spk_1"], ["spk_3", "spk_3 (someone else)"]], offered
    page.close()


def test_a_recording_deleted_elsewhere_long_after_it_ended_leaves_the_page(stack, browser):
    """/events tells of a deletion only for the jobs of the last hour: one that ended before it,
    deleted while open (from the command line, by retention), is found gone by the page's own
    calls: a 404 there, and the job itself gone too. A 404 of only what was asked for (here its
    recording, not stored) leaves it be."""
    job_id = a_recording_in_the_database(stack, "archived.wav", [("spk_0", "Hello."), ("spk_1", "Hi.")],
                                         ended_hours_ago=2)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    page.locator("#audio-status", has_text="could not be loaded").wait_for(timeout=30_000)
    assert page.locator(f'#jobs li[data-job="{job_id}"]').count() == 1
    assert page.locator("#transcript-status").inner_text() == "Done."

    assert httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=30).status_code == 204
    page.fill("#name-spk_1", "Ben")
    page.get_by_role("button", name="Save names").click()
    page.locator("#transcript-status", has_text="was deleted").wait_for(timeout=15_000)
    page.locator(f'#jobs li[data-job="{job_id}"]').wait_for(state="detached", timeout=5_000)
    for control in ("#downloads a", "#delete", "#rerun", "#player"):
        assert not page.locator(control).is_visible(), control
    assert errors == []
    page.close()


def test_the_page_and_a_recording_answer_head_as_they_answer_get(keyed_stack, made_job):
    """HEAD wherever GET works (RFC 9110, 9.1: curl -I, a download tool asking the size first): the
    same status and headers, no body; a recording's to its owner's key only."""
    from services.ingest.auth import owner_of

    stack = keyed_stack
    got, headed = httpx.get(f"{stack.api}/", timeout=30), httpx.head(f"{stack.api}/", timeout=30)
    assert got.headers["content-type"] == "text/html; charset=utf-8"
    assert headed.status_code == 200 and headed.content == b""
    assert without_date(headed.headers) == without_date(got.headers)

    content = bytes(range(256)) * 40
    job_id = made_job("talk.flac", content)
    stack.query("UPDATE transcripts SET owner = $1 WHERE id = $2", owner_of(KEY), job_id)
    url = f"{stack.api}/transcripts/{job_id}/audio"
    mine = {"X-API-Key": KEY}
    etag = httpx.get(url, headers=mine, timeout=30).headers["etag"]
    for asked, status in (({}, 200), ({"Range": "bytes=100-199"}, 206), ({"If-None-Match": etag}, 304)):
        got, headed = (httpx.request(method, url, headers={**mine, **asked}, timeout=30) for method in ("GET", "HEAD"))
        assert (got.status_code, headed.status_code, headed.content) == (status, status, b""), asked
        assert without_date(headed.headers) == without_date(got.headers), asked
    assert httpx.head(url, headers=mine, timeout=30).headers["content-length"] == str(len(content))
    assert httpx.head(url, headers={"X-API-Key": OTHER_KEY}, timeout=30).status_code == 404
    assert httpx.head(url, timeout=30).status_code == 401


def without_date(headers: httpx.Headers) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name != "date"}


def test_names_saved_as_another_recording_opens_stay_with_their_own(stack, browser):
    first = a_recording_in_the_database(stack, "first.wav", [("spk_0", "One."), ("spk_1", "Two.")])
    second = a_recording_in_the_database(stack, "second.wav", [("spk_0", "Three."), ("spk_1", "Four.")])
    page = browser.new_page()
    held: list = []
    page.route(re.compile(rf"/transcripts/{first}/speakers$"),
               lambda route: held.append(route) if route.request.method == "PATCH" else route.continue_())
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{first}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    page.fill("#name-spk_0", "Anna")
    page.get_by_role("button", name="Save names").click()
    wait_until(page, lambda: held, "the page never sent the names")
    # The second recording is opened before the first's names are answered for.
    page.locator(f'#jobs li[data-job="{second}"] button').click()
    page.locator(f'#transcript[data-job="{second}"][data-ended="true"]').wait_for(timeout=60_000)
    with page.expect_response(lambda response: response.request.method == "PATCH"):
        held[0].continue_()
    page.wait_for_timeout(500)  # time for the answer to be read (and, wrongly, shown)
    saved = httpx.get(f"{stack.api}/transcripts/{first}/speakers", timeout=30).json()["speakers"]
    assert saved["spk_0"].get("name") == "Anna"  # saved for the first recording
    assert page.locator("#transcript-status").inner_text() == "Done."
    assert page.input_value("#name-spk_0") == ""
    assert page.locator("#segments .segment .who").all_inner_texts() == ["spk_0", "spk_1"]
    page.close()


def test_a_correction_saved_twice_shows_once_and_keeps_what_is_written_meanwhile(stack, browser):
    job_id = a_recording_in_the_database(stack, "review.wav", [
        ("spk_0", "We met on Monday."), ("spk_1", "It was Tuesday."), ("spk_0", "Right, Tuesday.")])
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The server embeds the words before it answers (up to 15 s): the first save is answered
    # once the test says so.
    held: list = []
    sent: list[str] = []

    def first_held(route) -> None:
        sent.append(route.request.post_data)
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route(re.compile(rf"/transcripts/{job_id}/segments/0/1$"), first_held)
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    row = page.locator('#segments li[data-segment="0:1"]')
    row.get_by_role("button", name="Correct the segment at").click()
    form = row.get_by_role("form", name="Correct the segment at")
    form.get_by_label("Words").fill("It was Wednesday.")
    save = form.get_by_role("button", name="Save correction")
    save.click()
    wait_until(page, lambda: held, "the page never sent the correction")
    # Pressed again while it is on its way: not sent again.
    save.click(force=True)
    page.wait_for_timeout(500)
    assert len(sent) == 1 and save.is_disabled(), sent
    # Cancelled and opened again meanwhile: written in, it waits for the first save.
    form.get_by_role("button", name="Cancel").click()
    row.get_by_role("button", name="Correct the segment at").click()
    words = row.get_by_role("form", name="Correct the segment at").get_by_label("Words")
    words.fill("It was Thursday")
    assert row.get_by_role("button", name="Save correction").is_disabled()
    with page.expect_response(lambda response: response.request.method == "PATCH"):
        held[0].continue_()
    page.locator("#transcript-status", has_text="Correction saved.").wait_for(timeout=30_000)
    # The segment once, as saved; the form written in meanwhile kept, its text and its focus.
    assert row.count() == 1
    assert row.locator(".segment .text").inner_text() == "It was Wednesday."
    page.keyboard.type(".")
    assert words.input_value() == "It was Thursday."
    page.locator("#transcript-status").evaluate("status => { status.textContent = ''; }")
    row.get_by_role("button", name="Save correction").click()
    page.locator("#transcript-status", has_text="Correction saved.").wait_for(timeout=30_000)
    assert row.count() == 1 and row.locator("form").count() == 0
    assert row.locator(".segment .text").inner_text() == "It was Thursday."
    segments = httpx.get(f"{stack.api}/transcripts/{job_id}", timeout=30).json()["segments"]
    assert [(s["text"], s["edited"]) for s in segments][1] == ("It was Thursday.", True), segments
    assert len(sent) == 2 and errors == []
    page.close()


def test_a_segment_is_corrected_with_the_keyboard(stack, browser):
    job_id = a_recording_in_the_database(stack, "keys.wav", [("spk_0", "Hello there."), ("spk_1", "Hi.")])
    page = browser.new_page()
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    row = page.locator('#segments li[data-segment="0:0"]')
    correct = row.get_by_role("button", name="Correct the segment at")
    form = row.get_by_role("form", name="Correct the segment at")

    def focused() -> str:
        return page.evaluate("(() => { const e = document.activeElement;"
                             " return `${e.closest('li')?.dataset.segment}/${e.className || e.tagName}`; })()")

    # Escape closes the form, as Cancel does: the focus is back on the button that opened it.
    correct.focus()
    page.keyboard.press("Enter")
    form.wait_for()
    page.keyboard.press("Escape")
    form.wait_for(state="detached", timeout=5_000)
    assert focused() == "0:0/correct"
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")  # Save, then Cancel
    page.keyboard.press("Enter")
    form.wait_for(state="detached", timeout=5_000)
    assert focused() == "0:0/correct"
    # Saved, the focus is on the corrected segment.
    page.keyboard.press("Enter")
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("Hello, everyone.")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.locator("#transcript-status", has_text="Correction saved.").wait_for(timeout=30_000)
    assert row.locator(".segment .text").inner_text() == "Hello, everyone."
    assert focused() == "0:0/segment"
    page.close()


def test_opening_another_recording_asks_before_losing_names_and_corrections(stack, browser):
    first = a_recording_in_the_database(stack, "naming.wav", [("spk_0", "One."), ("spk_1", "Two.")])
    second = a_recording_in_the_database(stack, "elsewhere.wav", [("spk_0", "Three.")])
    page = browser.new_page()
    asked: list[str] = []
    accept: list[bool] = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.on("dialog", answer)
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{first}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    page.fill("#name-spk_1", "Ben")
    # Not discarded: the name typed stays.
    page.locator(f'#jobs li[data-job="{second}"] button').click()
    wait_until(page, lambda: asked, "the page never asked")
    assert asked == ["Discard unsaved names and corrections?"]
    page.wait_for_timeout(500)
    assert page.locator("#transcript").get_attribute("data-job") == str(first)
    assert page.input_value("#name-spk_1") == "Ben"
    # The recording open, clicked again: it stays as it is, nothing asked.
    page.locator(f'#jobs li[data-job="{first}"] button').click()
    page.wait_for_timeout(500)
    assert page.input_value("#name-spk_1") == "Ben" and len(asked) == 1
    # Discarded: the other recording opens.
    accept.append(True)
    page.locator(f'#jobs li[data-job="{second}"] button').click()
    page.locator(f'#transcript[data-job="{second}"][data-ended="true"]').wait_for(timeout=60_000)
    assert len(asked) == 2
    # A correction being written is asked for too.
    page.locator("#segments li").first.get_by_role("button", name="Correct the segment at").click()
    accept.clear()
    page.locator(f'#jobs li[data-job="{first}"] button').click()
    wait_until(page, lambda: len(asked) == 3, "the page never asked")
    page.wait_for_timeout(500)
    assert page.locator("#transcript").get_attribute("data-job") == str(second)
    assert page.get_by_role("form", name="Correct the segment at").count() == 1
    page.close()


def test_a_search_answered_after_a_later_one_is_not_shown(stack, browser):
    tag = uuid.uuid4().hex[:6]
    early = a_recording_in_the_database(stack, f"early_{tag}.wav", [("spk_0", "The pineapple harvest was late.")])
    late = a_recording_in_the_database(stack, f"late_{tag}.wav", [("spk_0", "The zeppelin landed at noon.")])
    # More than a page of hits (20), one said right to left.
    many = a_recording_in_the_database(stack, f"many_{tag}.wav", [("spk_0", f"Walrus sighting number {n}.")
                                                                  for n in range(24)]
                                       + [("spk_1", "שלום לכולם walrus")])
    stack.query("UPDATE segments SET search_text = to_tsvector(stt_text_config('en'), text)"
                " WHERE transcript_id = ANY($1::bigint[])", [early, late, many])
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The first search is slow to answer (the embedding service busy): it is answered once a
    # second one has been.
    held: list = []
    page.route(re.compile(r"/search\?.*q=pineapple"),
               lambda route: route.continue_() if held else held.append(route))
    page.goto(stack.api + "/")
    page.fill("#query", "pineapple")
    page.press("#query", "Enter")
    wait_until(page, lambda: held, "the page never searched")
    page.fill("#query", "zeppelin")
    page.press("#query", "Enter")
    page.locator("#hits li button", has_text=f"late_{tag}.wav").first.wait_for(timeout=30_000)
    shown = page.locator("#hits li").all_inner_texts()
    with page.expect_response(lambda response: "pineapple" in response.url):
        held[0].continue_()
    page.wait_for_timeout(500)  # time for the answer to be read (and, wrongly, shown)
    assert page.locator("#hits li").all_inner_texts() == shown
    assert f"early_{tag}.wav" not in page.locator("#hits").inner_text()

    # A page of hits at a time: "More results" follows next_cursor until every hit is shown.
    page.fill("#query", "walrus")
    page.press("#query", "Enter")
    hits = page.locator("#hits li button")
    page.wait_for_function("document.querySelectorAll('#hits li button').length === 20", timeout=30_000)
    more = page.get_by_role("button", name="More results")
    for _ in range(10):
        if more.is_hidden():
            break
        before = hits.count()
        more.click()
        page.wait_for_function(f"document.querySelectorAll('#hits li button').length > {before}"
                               " || document.querySelector('#more-hits').hidden", timeout=30_000)
    assert more.is_hidden()
    # Every one of this recording's hits, each once (other recordings of the same file, made by
    # earlier tests, show the same words: they are other hits).
    mine = hits.filter(has_text=f"many_{tag}.wav").all_inner_texts()
    assert len(mine) == len(set(mine)) == 25, mine
    # Each part of a hit reads in the direction of its own words.
    hebrew = page.locator("#hits .said", has_text="שלום")
    assert hebrew.get_attribute("dir") == "auto"
    assert hebrew.evaluate("e => getComputedStyle(e).direction") == "rtl"
    assert errors == []
    page.close()
    stack.query("DELETE FROM transcripts WHERE id = ANY($1::bigint[])", [early, late, many])


@pytest.fixture
def embedder_away(stack):
    """The stack through an ingest whose embedding service refuses connections: a search by meaning
    is answered 503 at once."""
    with through_another_ingest(stack, "ingest-page-embedder-away", OLLAMA_URL=f"http://127.0.0.1:{free_port()}",
                                OLLAMA_RETRIES="0") as away:
        yield away


def test_only_a_search_the_embedding_service_refused_is_asked_again_by_words(embedder_away, browser):
    """Every 503 of a search was asked again with mode=text: one over its time limit, or with the
    database away, made the person wait twice, then read that search by meaning was unavailable.
    Those now say why they failed, at once; the embedding service's own 503 (its extra.code), here
    the server's, is still searched by words. Markup a transcript says shows as text: the page
    turned a "<mark>" typed in a correction into a highlight."""
    stack = embedder_away
    tag = uuid.uuid4().hex[:6]
    said = "A quokka smiled at the <b>camera</b> & <mark>us</mark>."
    job_id = a_recording_in_the_database(stack, f"quokka_{tag}.wav", [("spk_0", said)])
    stack.query("UPDATE segments SET search_text = to_tsvector(stt_text_config('en'), text) WHERE transcript_id = $1",
                job_id)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    asked: list[str] = []
    refusals: list[str] = []

    def searched(route) -> None:
        asked.append(route.request.url)
        if refusals:
            route.fulfill(status=503, headers={"Retry-After": "5"},
                          json={"status_code": 503, "detail": refusals.pop(0)})
        else:
            route.continue_()

    try:
        page.route(re.compile(r"/search\?"), searched)
        page.goto(stack.api + "/")
        for why in ("the search took over 15 s and was stopped: narrow it with transcript_id, speaker, language,"
                    " since or until", "a backing service is unavailable; try again shortly"):
            asked.clear()
            refusals.append(why)
            page.fill("#query", "quokka")
            page.press("#query", "Enter")
            page.locator("#hits li", has_text=why).wait_for(timeout=15_000)
            page.wait_for_timeout(1000)  # time for a search by words to be asked (wrongly)
            assert len(asked) == 1 and "mode=text" not in asked[0], asked
            assert page.locator("#hits").inner_text() == f"503: {why}"
        asked.clear()
        page.fill("#query", "quokka")
        page.press("#query", "Enter")
        page.locator("#hits li", has_text="by words only").wait_for(timeout=30_000)
        hit = page.locator("#hits li button", has_text=f"quokka_{tag}.wav")
        hit.wait_for(timeout=30_000)
        assert len(asked) == 2 and "mode=text" not in asked[0] and asked[1].endswith("&mode=text"), asked
        assert hit.inner_text().endswith(f": {said}") and hit.locator("mark").all_inner_texts() == ["quokka"]
        assert errors == []
    finally:
        page.close()
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)


def test_a_translated_transcript_reads_as_english(stack, browser):
    """Asked to translate, Whisper writes English whatever is spoken: screen readers are told the
    text is English, not the language spoken (the job's) nor a passage's."""
    job_id = stack.value("INSERT INTO transcripts (filename, status, language, options, completed_at)"
                         " VALUES ('anruf.wav', 'done', 'de', $1::jsonb, now()) RETURNING id",
                         json.dumps({"task": "translate", "language": "multi"}))
    for index, (language, text) in enumerate([("de", "Good day, how are you?"), ("fr", "Very well, thank you.")]):
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                    " language) VALUES ($1, 0, $2, 'spk_0', $3, $4, $5, $6)", job_id, index, 2.0 * index,
                    2.0 * index + 1.5, text, language)
    page = browser.new_page()
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{job_id}"] button').click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    page.locator('#segments[lang="en"]').wait_for(state="attached", timeout=10_000)
    texts = page.locator("#segments .segment .text")
    assert texts.count() == 2
    assert page.eval_on_selector_all("#segments .segment .text", "texts => texts.map((t) => t.lang)") == ["", ""]
    page.close()


def test_the_list_catches_up_when_its_event_stream_is_back(stack, browser):
    def ended_hours_ago(filename: str) -> int:
        return stack.value("INSERT INTO transcripts (filename, status, completed_at) VALUES ($1, 'done',"
                           " now() - interval '2 hours') RETURNING id", filename)

    older, old = ended_hours_ago("older.wav"), ended_hours_ago("old.wav")
    running = stack.value("INSERT INTO transcripts (filename) VALUES ('running.wav') RETURNING id")
    recent = a_recording_in_the_database(stack, "recent.wav", [("spk_0", "Hello.")])
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The list's first page ends before `old`: "More" lists it.
    listed: list[str] = []

    def first_page_ends_before_old(route) -> None:
        listed.append(route.request.url)
        answer = route.fetch()
        items = [job for job in answer.json()["items"] if job["id"] > old]
        route.fulfill(response=answer, json={"items": items, "next_cursor": items[-1]["id"]})

    page.route(re.compile(r"/transcripts\?limit=50$"), first_page_ends_before_old)
    # The list's event stream is dropped at once (a proxy, a laptop asleep); made again, it is
    # held until the test has changed what it would have told.
    streams: list = []

    def dropped_then_held(route) -> None:
        streams.append(route)
        if len(streams) == 1:
            route.fulfill(status=200, content_type="text/event-stream", body=": stream of jobs\n\n")
        elif len(streams) > 2:
            route.continue_()

    page.route(f"{stack.api}/events", dropped_then_held)
    page.goto(stack.api + "/")
    page.locator(f'#jobs li[data-job="{running}"][data-status="processing"]').wait_for(timeout=30_000)
    page.get_by_role("button", name="More").click()
    page.locator(f'#jobs li[data-job="{old}"]').wait_for(timeout=30_000)
    wait_until(page, lambda: len(streams) > 1, "the page never made its event stream again")
    assert len(listed) == 1  # not asked for again on the stream's first connection
    # Meanwhile: two recordings deleted elsewhere, and one that ended over an hour ago (which a
    # new stream no longer follows).
    for job_id in (recent, old):
        assert httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=30).status_code == 204
    stack.query("UPDATE transcripts SET status = 'done', stage = 'done', completed_at = now() - interval '2 hours'"
                " WHERE id = $1", running)
    streams[1].continue_()
    page.locator(f'#jobs li[data-job="{running}"][data-status="done"]').wait_for(timeout=15_000)
    for job_id in (recent, old):
        page.locator(f'#jobs li[data-job="{job_id}"]').wait_for(state="detached", timeout=5_000)
    # What "More" listed is still listed (less what was deleted), once each, newest first.
    shown = page.eval_on_selector_all("#jobs li", "items => items.map((i) => Number(i.dataset.job))")
    assert older in shown and shown == sorted(set(shown), reverse=True), shown
    assert errors == []
    page.close()
    for job_id in (older, running):
        httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=30)


def test_known_voices_that_could_not_be_listed_are_asked_for_again(stack, browser, forgets_its_speakers):
    stack.value("INSERT INTO speakers (name) VALUES ('Anna') RETURNING id")
    page = browser.new_page()
    # The first answer fails (PostgreSQL restarting); the page says so and asks again.
    asked: list[str] = []

    def fails_once(route) -> None:
        asked.append(route.request.url)
        if len(asked) == 1:
            route.fulfill(status=503, json={"detail": "the database is restarting"})
        else:
            route.continue_()

    page.route(f"{stack.api}/speakers", fails_once)
    page.goto(stack.api + "/")
    page.locator("#people li", has_text="could not be listed").wait_for(timeout=30_000)
    page.get_by_role("button", name="Forget Anna").wait_for(timeout=30_000)
    assert page.locator("#people li", has_text="could not be listed").count() == 0
    page.get_by_role("checkbox", name="Anna").wait_for(timeout=5_000)  # "Who may be in it"
    page.close()


def test_a_silent_recording_says_nobody_talks(stack, fixtures_dir, browser):
    page = browser.new_page()
    # The server busy at first (every upload slot taken: 503 with Retry-After, nothing made): the
    # page sends the file again after the wait, as the CLI does.
    busy: list[str] = []

    def busy_once(route) -> None:
        if busy:
            route.continue_()
        else:
            busy.append(route.request.url)
            route.fulfill(status=503, headers={"Retry-After": "1"}, json={"detail": "2 uploads are in progress"})

    page.route(re.compile(r"/recognize$"), busy_once)
    page.goto(stack.api + "/")
    page.set_input_files("#file", str(fixtures_dir / "empty.wav"))
    page.get_by_role("button", name="Transcribe").click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=120_000)
    assert busy
    # Not a bare "Done." over an empty list, which looks like a page still loading.
    assert page.locator("#transcript-status").inner_text() == "Done: nobody talks in this recording."
    page.close()


def test_a_recording_still_processing_can_be_stopped(stack, fixtures_dir, browser, tmp_path):
    parts = [decode_audio(str(fixtures_dir / n)) for n in ("ami_dev00.wav", "ami_dev01.wav", "ami_trn03.wav")]
    meeting = tmp_path / "long meeting.opus"  # 3 minutes: still diarizing when the button is pressed
    meeting.write_bytes(encode(np.concatenate(parts * 2), "ogg", "libopus", 48_000, channels=1, bit_rate=24_000))
    page = browser.new_page()
    asked: list[str] = []
    page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
    page.goto(stack.api + "/")
    page.set_input_files("#file", str(meeting))
    page.get_by_role("button", name="Transcribe").click()
    page.get_by_role("button", name="Stop processing").click()
    page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
    assert asked and asked[-1].startswith("Stop processing long meeting.opus?")
    assert page.locator("#transcript-status").inner_text().startswith("Stopped")
    assert page.get_by_role("button", name="Stop processing").is_hidden()
    # What it kept can be saved: as JSON (the subtitle formats are for finished transcripts).
    assert page.locator("#downloads a").all_inner_texts() == ["Download JSON"]
    job_id = int(page.locator("#transcript").get_attribute("data-job"))
    document = httpx.get(f"{stack.api}/status/{job_id}", timeout=30).json()
    assert document["status"] == "error" and document["error"] == "cancelled"
    page.get_by_role("button", name="Delete recording").click()  # a stopped job can be deleted
    page.locator(f'#jobs li[data-job="{job_id}"]').wait_for(state="detached", timeout=30_000)
    page.close()


def test_with_api_keys_the_key_is_asked_once_and_used_for_everything(keyed_stack, fixtures_dir, browser):
    stack = keyed_stack
    clients = {key: httpx.Client(headers={"X-API-Key": key}, timeout=30) for key in (KEY, OTHER_KEY)}
    made: dict[str, list[int]] = {KEY: [], OTHER_KEY: []}
    page = None
    try:
        made[KEY].append(mine := stack.submit_job(fixtures_dir / "jfk.flac", client=clients[KEY]))
        made[OTHER_KEY].append(theirs := stack.submit_job(fixtures_dir / "jfk.flac", name="theirs.flac",
                                                          client=clients[OTHER_KEY]))
        page = browser.new_page()
        page.goto(stack.api + "/")
        page.locator("#notice", has_text="needs an API key").wait_for(timeout=30_000)
        page.fill("#api-key", KEY)
        page.get_by_role("button", name="Use key").click()
        page.locator(f'#jobs li[data-job="{mine}"][data-status="done"]').wait_for(timeout=300_000)
        assert page.locator(f'#jobs li[data-job="{theirs}"]').count() == 0
        page.locator(f'#jobs li[data-job="{mine}"] button').click()
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
        assert "ask not what your country" in page.locator("#segments").inner_text().lower()
        # The audio element cannot send the key: the page fetched the file with it.
        page.wait_for_function("document.querySelector('#player').src.startsWith('blob:')", timeout=30_000)
        with page.expect_download() as download:
            page.get_by_role("link", name="Download TXT").click()
        assert "ask not what your country" in Path(download.value.path()).read_text().lower()
        # A recording removed by AUDIO_RETENTION_DAYS: the page says why it does not play.
        stack.query("UPDATE transcripts SET audio_removed_at = now() WHERE id = $1", mine)
        page.locator(f'#jobs li[data-job="{mine}"] button').click()
        page.locator("#audio-status", has_text="AUDIO_RETENTION_DAYS").wait_for(timeout=30_000)
        assert page.locator("#player").get_attribute("src") is None
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)  # opened anew: its stream again
        assert "ask not what your country" in page.locator("#segments").inner_text().lower()
        # Kept for the browser session: a reload needs no key again.
        page.reload()
        page.locator(f'#jobs li[data-job="{mine}"]').wait_for(timeout=30_000)
    finally:
        if page is not None:
            page.close()
        for key, client in clients.items():
            discard(stack.api, client, *made[key])
            client.close()


def test_with_api_keys_a_job_opened_plays_its_own_recording_and_the_list_goes_on(keyed_stack, fixtures_dir, browser):
    stack = keyed_stack
    client = httpx.Client(headers={"X-API-Key": KEY}, timeout=30)
    made: list[int] = []
    page = None
    try:
        made.append(first := stack.submit_job(fixtures_dir / "jfk.flac", name="first.flac", client=client))
        made.append(second := stack.submit_job(fixtures_dir / "en_dialogue.wav", name="second.wav", client=client))
        for job_id in made:
            assert stack.wait_finished(job_id, client=client)["status"] == "done"
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.add_init_script(f"sessionStorage.setItem('stt-api-key', '{KEY}')")
        # /events would list the recent jobs too: here the list comes from GET /transcripts only.
        page.route(f"{stack.api}/events", lambda route: route.abort())
        # The first list fails (PostgreSQL restarting); the next has one job and a next page.
        listed: list[str] = []

        def list_page(route) -> None:
            listed.append(route.request.url)
            if len(listed) == 1:
                route.fulfill(status=503, json={"detail": "the database is restarting"})
                return
            answer = route.fetch()
            items = answer.json()["items"]
            route.fulfill(response=answer, json={"items": items[:1], "next_cursor": items[0]["id"]})

        page.route(re.compile(r"/transcripts\?limit=50$"), list_page)
        page.goto(stack.api + "/")
        page.locator("#notice", has_text="could not be listed").wait_for(timeout=30_000)
        page.locator(f'#jobs li[data-job="{second}"]').wait_for(timeout=30_000)  # asked again
        assert page.locator("#notice").is_hidden()
        assert page.locator(f'#jobs li[data-job="{first}"]').count() == 0

        # A job not in the list (opened from a search hit) is named once its events come.
        page.evaluate(f"openTranscript({first})")
        page.locator("#transcript-title", has_text="first.flac").wait_for(timeout=30_000)
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=60_000)
        page.wait_for_function("document.querySelector('#player').src.startsWith('blob:')", timeout=30_000)
        first_url = page.evaluate("document.querySelector('#player').src")

        # "More" lists the rest, then goes.
        page.get_by_role("button", name="More").click()
        everything = {job["id"] for job in client.get(f"{stack.api}/transcripts?limit=100").json()["items"]}
        page.locator("#more-jobs").wait_for(state="hidden", timeout=30_000)
        shown = {int(i) for i in page.eval_on_selector_all("#jobs li", "items => items.map((i) => i.dataset.job)")}
        assert shown == everything and {first, second} <= shown, (shown, everything)

        # Another job opened and a time asked for at once (a search hit), its recording still on
        # its way: nothing plays until it is there (not the first job's), then it plays from there.
        held: list = []
        page.route(f"{stack.api}/transcripts/{second}/audio", lambda route: held.append(route))
        page.evaluate(f"openTranscript({second}); playFrom(3, null)")
        wait_until(page, lambda: held, "the page never asked for the second recording")
        player = page.evaluate("(({ src, paused }) => ({ src, paused }))(document.querySelector('#player'))")
        assert player == {"src": "", "paused": True}, player
        assert page.evaluate("(url) => fetch(url).then(() => 'kept', () => 'revoked')", first_url) == "revoked"
        held[0].continue_()
        page.wait_for_function("document.querySelector('#player').src.startsWith('blob:')"
                               " && document.querySelector('#player').currentTime > 2.9", timeout=30_000)
        position = page.evaluate("document.querySelector('#player').currentTime")
        assert position < 4.5, position
        size = page.evaluate("fetch(document.querySelector('#player').src).then((r) => r.arrayBuffer())"
                             ".then((b) => b.byteLength)")
        assert size == len(client.get(f"{stack.api}/transcripts/{second}/audio").content)
        assert errors == []
    finally:
        if page is not None:
            page.close()
        for job_id in made:
            client.delete(f"{stack.api}/transcripts/{job_id}")
        client.close()


def test_a_recording_still_being_redacted_plays_once_it_is(stack, browser, made_job):
    """Just after a job that asked for redaction is done, its recording answers 503 with
    Retry-After until ingest has written the redacted copy (seconds): the page asks again, saying
    nothing meanwhile, and plays it once it is there. Streamed by the audio element (no key) and
    fetched with a key alike. The jobs are made by hand as tests/test_redacted_playback.py does."""
    from common.storage import upload_bytes
    from tests.audio_files import wav

    s3, bucket = stack.s3(), stack.settings().audio_bucket
    redacted_copy = wav(np.zeros(16_000, dtype=np.float32))

    def being_redacted() -> int:
        return made_job("call.mp3", b"ID3 the upload as sent", options={"redact": ["phone"]}, due=True)

    def redacted(job_id: int) -> None:
        upload_bytes(s3, bucket, f"uploads/{job_id}", redacted_copy)
        stack.query("UPDATE transcripts SET audio_redacted_at = now() WHERE id = $1", job_id)

    def plays_once_redacted(key: str | None) -> None:
        job_id = being_redacted()
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        if key:
            page.add_init_script(f"sessionStorage.setItem('stt-api-key', '{key}')")
        refused: list[int] = []
        page.on("response", lambda response: refused.append(response.status)
                if response.url.endswith(f"/transcripts/{job_id}/audio") and response.status == 503 else None)
        page.goto(stack.api + "/")
        page.evaluate(f"openTranscript({job_id})")
        wait_until(page, lambda: refused, "the page never asked for the recording")
        page.wait_for_timeout(1500)
        assert page.locator("#audio-status").is_hidden(), page.locator("#audio-status").inner_text()
        redacted(job_id)
        page.wait_for_function("document.querySelector('#player').readyState >= HTMLMediaElement.HAVE_METADATA",
                               timeout=30_000)
        assert page.locator("#audio-status").is_hidden(), page.locator("#audio-status").inner_text()
        assert page.evaluate("document.querySelector('#player').src.startsWith('blob:')") == bool(key)
        assert errors == []
        page.close()

    plays_once_redacted(None)  # the audio element streams it
    plays_once_redacted("any-key-the-server-does-not-ask-for")  # fetched with the key


def test_a_job_opened_while_it_runs_plays_its_redacted_copy_once_it_ends(stack, browser, made_job):
    """A job opened while it runs (an upload opens its own) that is redacted as it ends: the page
    plays the redacted copy, never the upload it had before. A job that asked for redaction is not
    played while it runs (what is stored then is the upload, with what will be hidden audible), nor
    is one whose options could not be read (GET /transcripts/{id} answered 503: the database
    restarting); one that did not ask is (the transcriber's REDACT may redact it all the same) and
    is loaded again once it ends, paused where it was paused. Streamed by the audio element (no
    key) and fetched with a key alike. The jobs are made by hand and ended in the database, as the
    persister ends them."""
    from common.storage import upload_bytes
    from tests.audio_files import wav

    s3, bucket = stack.s3(), stack.settings().audio_bucket
    uploaded = wav(np.full(32_000, 0.1, dtype=np.float32))  # 2 s
    redacted_copy = wav(np.zeros(16_000, dtype=np.float32))  # 1 s

    def opened_running(key: str | None, options: dict, options_fail: bool = False) -> tuple:
        job_id = made_job("call.wav", uploaded, options=options, status="processing")
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        if key:
            page.add_init_script(f"sessionStorage.setItem('stt-api-key', '{key}')")
        asked: list[int] = []
        recording = re.compile(rf"/transcripts/{job_id}/audio(\?|$)")
        page.on("response", lambda response: asked.append(response.status) if recording.search(response.url) else None)
        if options_fail:
            failed: list[str] = []

            def fails_once(route) -> None:
                if failed:
                    route.continue_()
                else:
                    failed.append(route.request.url)
                    route.fulfill(status=503, json={"detail": "the database is restarting"})

            page.route(re.compile(rf"/transcripts/{job_id}$"), fails_once)
        page.goto(stack.api + "/")
        page.locator(f'#jobs li[data-job="{job_id}"][data-status="processing"]').wait_for(timeout=30_000)
        page.evaluate(f"openTranscript({job_id})")
        if options_fail:
            wait_until(page, lambda: failed, "the page never asked for the job's options")
        return job_id, page, asked, errors

    def ends_and_is_redacted(job_id: int, page, asked: list[int], errors: list[str], key: str | None,
                             paused_at: float | None = None) -> None:
        stack.query("UPDATE transcripts SET status = 'done', stage = 'done', progress = 1, completed_at = now(),"
                    " audio_redaction_due = true WHERE id = $1", job_id)
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=30_000)
        wait_until(page, lambda: 503 in asked, "the page never asked for the recording again as the job ended")
        upload_bytes(s3, bucket, f"uploads/{job_id}", redacted_copy)
        stack.query("UPDATE transcripts SET audio_redacted_at = now(), audio_redaction_due = false WHERE id = $1",
                    job_id)
        page.wait_for_function("Math.abs(document.querySelector('#player').duration - 1) < 0.1", timeout=30_000)
        if paused_at is not None:  # still paused, where it was
            page.wait_for_function("document.querySelector('#player').readyState >= HTMLMediaElement.HAVE_METADATA",
                                   timeout=30_000)
            page.wait_for_timeout(500)
            player = page.evaluate("(({ currentTime, paused }) => ({ currentTime, paused }))"
                                   "(document.querySelector('#player'))")
            assert player["paused"] and abs(player["currentTime"] - paused_at) < 0.05, player
        assert page.evaluate("document.querySelector('#player').src.startsWith('blob:')") == bool(key)
        assert page.locator("#audio-status").is_hidden(), page.locator("#audio-status").inner_text()
        assert errors == []
        page.close()

    for key in (None, "any-key-the-server-does-not-ask-for"):
        # Redaction asked: nothing played (nor asked for) while it runs, and the page says when it
        # plays; the same where whether it asked could not be read.
        for options_fail in (False, True):
            job_id, page, asked, errors = opened_running(key, {"redact": ["card"]}, options_fail)
            page.locator("#audio-status", has_text="plays once the transcript is done").wait_for(timeout=30_000)
            page.wait_for_timeout(1500)
            assert asked == [] and page.locator("#player").get_attribute("src") is None, asked
            ends_and_is_redacted(job_id, page, asked, errors, key)
        # None asked: the upload plays while it runs; the redacted copy once it has ended, paused
        # where the upload was paused.
        job_id, page, asked, errors = opened_running(key, {})
        page.wait_for_function("Math.abs(document.querySelector('#player').duration - 2) < 0.1", timeout=30_000)
        page.evaluate("document.querySelector('#player').currentTime = 0.6")
        ends_and_is_redacted(job_id, page, asked, errors, key, paused_at=0.6)
        # Redaction asked, and the job stopped: only a job that ends done is redacted, so its
        # upload (the numbers audible) is never played: the server's reason is said in place of
        # the player.
        job_id, page, asked, errors = opened_running(key, {"redact": ["card"]})
        page.locator("#audio-status", has_text="plays once the transcript is done").wait_for(timeout=30_000)
        assert httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=30).status_code == 200
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=30_000)
        page.locator("#audio-status", has_text="asked for redaction, and it was stopped before its recording was"
                                               " redacted").wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        assert page.locator("#player").is_hidden() and page.locator("#player").get_attribute("src") is None
        assert 409 in asked and not {200, 206} & set(asked), asked
        assert errors == []
        page.close()


def test_a_job_opened_while_it_runs_that_ends_unchanged_keeps_its_recording_and_place(stack, browser, made_job):
    """A job opened while it runs whose recording is the same once it ends (nothing redacted): the
    page looks at its version (one byte: its ETag) and keeps what it has, loading nothing again;
    paused, it stays where it was. Streamed by the audio element (no key) and fetched with a key
    alike."""
    from tests.audio_files import wav

    uploaded = wav(np.full(32_000, 0.1, dtype=np.float32))  # 2 s

    def kept(key: str | None) -> None:
        job_id = made_job("call.wav", uploaded, status="processing")
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        if key:
            page.add_init_script(f"sessionStorage.setItem('stt-api-key', '{key}')")
        asked: list[str | None] = []  # each request's Range (the page's look at the version: bytes=0-0)
        recording = re.compile(rf"/transcripts/{job_id}/audio(\?|$)")
        page.on("request", lambda request: asked.append(request.headers.get("range"))
                if recording.search(request.url) else None)
        page.goto(stack.api + "/")
        page.locator(f'#jobs li[data-job="{job_id}"][data-status="processing"]').wait_for(timeout=30_000)
        page.evaluate(f"openTranscript({job_id})")
        page.wait_for_function("Math.abs(document.querySelector('#player').duration - 2) < 0.1", timeout=30_000)
        page.evaluate("document.querySelector('#player').currentTime = 1.25")
        page.wait_for_timeout(1000)
        src = page.evaluate("document.querySelector('#player').src")
        before = len(asked)
        stack.query("UPDATE transcripts SET status = 'done', stage = 'done', progress = 1, completed_at = now()"
                    " WHERE id = $1", job_id)
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=30_000)
        wait_until(page, lambda: len(asked) > before, "the page never looked at the recording as the job ended")
        page.wait_for_timeout(1500)
        player = page.evaluate("(({ src, currentTime, paused }) => ({ src, currentTime, paused }))"
                               "(document.querySelector('#player'))")
        assert player["src"] == src and player["paused"] and abs(player["currentTime"] - 1.25) < 0.01, player
        assert asked[before:] == ["bytes=0-0"], asked
        assert page.locator("#audio-status").is_hidden(), page.locator("#audio-status").inner_text()
        assert errors == []
        page.close()

    kept(None)  # the audio element streams it
    kept("any-key-the-server-does-not-ask-for")  # fetched with the key


def test_segments_are_read_out_whole_and_each_in_its_own_direction(stack, browser):
    """A segment's button is named by what it shows, with words for a screen reader (no aria-label
    said in place of it): the words Whisper was unsure of, underlined on screen, are said to be.
    Text written right to left (Hebrew, Arabic) reads so: a segment's words, a name typed in."""
    tag = uuid.uuid4().hex[:6]
    job_id = a_recording_in_the_database(stack, f"bidi_{tag}.wav", [
        ("spk_0", "We met in Zanzibar today."), ("spk_1", "שלום לכולם, מה שלומכם?")])
    words = [{"word": " We", "start": 0.0, "end": 0.2, "probability": 0.9},
             {"word": " met", "start": 0.2, "end": 0.4, "probability": 0.9},
             {"word": " in", "start": 0.4, "end": 0.5, "probability": 0.9},
             {"word": " Zanzibar", "start": 0.5, "end": 1.0, "probability": 0.3},
             {"word": " today.", "start": 1.0, "end": 1.5, "probability": 0.9}]
    stack.query("UPDATE segments SET words = $2::jsonb WHERE transcript_id = $1 AND index = 0", job_id,
                json.dumps(words))
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(stack.api + "/")
        page.locator(f'#jobs li[data-job="{job_id}"] button').click()
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=30_000)
        page.locator("#segments mark.unsure", has_text="Zanzibar").wait_for(timeout=30_000)
        first = page.locator("#segments .segment").first
        assert first.get_attribute("aria-label") is None
        named = page.get_by_role("button", name=re.compile(
            r"^Play from 00:00\.0 ?: spk_0 ?: We met in Zanzibar \(unsure\) today\.$"))
        assert named.count() == 1, first.evaluate("b => b.textContent")
        assert first.locator(".text").inner_text() == "We met in Zanzibar today."  # the words as they are

        hebrew = page.locator("#segments .segment .text", has_text="שלום")
        assert hebrew.get_attribute("dir") == "auto"
        assert hebrew.evaluate("e => getComputedStyle(e).direction") == "rtl"
        page.fill("#name-spk_1", "דנה")
        name = page.locator("#name-spk_1")
        assert name.get_attribute("dir") == "auto"
        assert name.evaluate("e => getComputedStyle(e).direction") == "rtl"
        page.get_by_role("button", name="Save names").click()
        page.locator("#transcript-status", has_text="Names saved.").wait_for(timeout=30_000)
        assert page.get_by_role("button", name=re.compile(r"^Play from 00:02\.0 ?: דנה ?: שלום")).count() == 1
        assert errors == []
    finally:
        page.close()
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)


def test_the_focus_is_not_lost_when_the_control_pressed_goes(stack, browser, made_job):
    """Stop processing, Run again and Delete recording go once pressed (hidden, or the transcript
    closed): the focus goes to the transcript's title (the job stopped; the new job opened) or to
    the heading of the recordings (deleted), not back to the top of the page, where a keyboard or
    screen reader user would have to start again."""
    from tests.audio_files import wav

    job_id = made_job("focus.wav", wav(np.zeros(16_000, dtype=np.float32)), status="processing")
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())
    rerun = None

    def press(name: str) -> None:
        page.get_by_role("button", name=name).focus()
        page.keyboard.press("Enter")

    def focused_on(element_id: str) -> None:
        page.wait_for_function(f"document.activeElement?.id === '{element_id}'", timeout=5_000)

    try:
        page.goto(stack.api + "/")
        page.locator(f'#jobs li[data-job="{job_id}"][data-status="processing"]').wait_for(timeout=30_000)
        page.evaluate(f"openTranscript({job_id})")
        press("Stop processing")
        page.locator("#transcript-status", has_text="Stopped").wait_for(timeout=30_000)
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=30_000)
        focused_on("transcript-title")

        press("Run again")
        page.wait_for_function(f"document.querySelector('#transcript').dataset.job !== '{job_id}'", timeout=30_000)
        rerun = int(page.locator("#transcript").get_attribute("data-job"))
        focused_on("transcript-title")

        page.locator(f'#jobs li[data-job="{job_id}"] button').click()
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=30_000)
        press("Delete recording")
        page.locator(f'#jobs li[data-job="{job_id}"]').wait_for(state="detached", timeout=30_000)
        focused_on("jobs-title")
        assert errors == []
    finally:
        page.close()
        if rerun is not None:
            with httpx.Client(timeout=30) as client:
                discard(stack.api, client, rerun)


def test_a_recording_opened_again_is_the_browsers_copy_checked(stack, browser, made_job):
    """Streamed, a recording's address is that of its version (its ETag): opened again, even after
    the page is reloaded, it is the same address, so the browser plays the copy it has, checking it
    first (If-None-Match: 304) rather than reading it all again; a recording replaced (by its
    redacted copy) has another."""
    from common.storage import upload_bytes
    from tests.audio_files import wav

    first = made_job("first.wav", wav(np.full(32_000, 0.1, dtype=np.float32)))
    second = made_job("second.wav", wav(np.full(16_000, 0.1, dtype=np.float32)))
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    read: list[tuple[str, str | None]] = []  # each read of a recording's address, and its If-None-Match
    page.on("response", lambda response: read.append((response.url, response.request.all_headers().get(
        "if-none-match"))) if "/audio?" in response.url else None)
    page.goto(stack.api + "/")

    def opened(job_id: int, duration: float) -> str:
        page.evaluate(f"openTranscript({job_id})")
        page.wait_for_function(f"Math.abs(document.querySelector('#player').duration - {duration}) < 0.1",
                               timeout=30_000)
        return page.evaluate("document.querySelector('#player').src")

    address = opened(first, 2)
    etag = httpx.get(address, timeout=30).headers["etag"]
    assert opened(second, 1) != address
    del read[:]
    assert opened(first, 2) == address
    page.reload()
    assert opened(first, 2) == address
    page.wait_for_timeout(500)
    assert read and all(url == address and asked == etag for url, asked in read), (read, etag)
    # Replaced (here by a recording of another length): another address, the new recording played.
    upload_bytes(stack.s3(), stack.settings().audio_bucket, f"uploads/{first}",
                 wav(np.zeros(48_000, dtype=np.float32)))
    opened(second, 1)
    assert opened(first, 3) != address
    assert errors == []
    page.close()


def test_a_recording_being_redacted_for_long_is_asked_for_until_it_plays(stack, browser, made_job):
    """The recording of a job just done answers 503 "being redacted" for longer than a few tries
    (ingest busy, the store slow): the page keeps asking, less often, says why after a while, and
    plays it once it is there. Streamed by the audio element (no key) and fetched with a key alike."""
    from tests.audio_files import wav

    job_id = made_job("call.wav", wav(np.zeros(16_000, dtype=np.float32)), redacted=True)

    def plays_after(key: str | None, tries: int) -> None:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        if key:
            page.add_init_script(f"sessionStorage.setItem('stt-api-key', '{key}')")
        refused: list[str | None] = []  # the Range asked for (the page's own look at why: bytes=0-0)

        def being_redacted(route) -> None:
            # `tries` loads refused; streamed, each load's look at why too (it is asked at once)
            tried = [r for r in refused if r != "bytes=0-0"]
            why = route.request.headers.get("range") == "bytes=0-0"
            if (len(refused) - len(tried) < len(tried)) if why else (len(tried) < tries):
                refused.append(route.request.headers.get("range"))
                route.fulfill(status=503, headers={"Retry-After": "1", "Cache-Control": "no-store"},
                              json={"detail": f"the recording of job {job_id} is being redacted;"
                                              " try again in a few seconds"})
            else:
                route.continue_()

        page.route(re.compile(rf"/transcripts/{job_id}/audio(\?|$)"), being_redacted)
        page.goto(stack.api + "/")
        page.evaluate(f"openTranscript({job_id})")
        page.locator("#audio-status", has_text="still being redacted").wait_for(timeout=60_000)
        page.wait_for_function("document.querySelector('#player').readyState >= HTMLMediaElement.HAVE_METADATA",
                               timeout=60_000)
        assert len([r for r in refused if r != "bytes=0-0"]) == tries, refused
        assert page.locator("#audio-status").is_hidden(), page.locator("#audio-status").inner_text()
        assert errors == []
        page.close()

    plays_after(None, 9)  # the audio element streams it
    plays_after("any-key-the-server-does-not-ask-for", 9)  # fetched with the key


def test_run_again_and_corrected_words_wait_until_the_recording_is_redacted(stack, browser, made_job):
    """Until ingest's job-end step has written the redacted copy of a done job's recording, the
    server refuses to run it again or to correct its words (409), and no event tells when it has:
    the page shows Run again and the words of a correction off, saying why, and on again once the
    job is no longer marked (no reload), learning it from the recording it asks for again. A
    speaker can be corrected meanwhile, as the server allows. Run again refused for a redaction the
    page had not heard of says the server's reason, and turns them off until it is over. Streamed
    by the audio element (no key) and fetched with a key alike."""
    from common.storage import upload_bytes
    from tests.audio_files import wav

    s3, bucket = stack.s3(), stack.settings().audio_bucket
    recording = wav(np.zeros(16_000, dtype=np.float32))

    def redacted(job_id: int) -> None:  # as the job-end step leaves it
        upload_bytes(s3, bucket, f"uploads/{job_id}", recording)
        stack.query("UPDATE transcripts SET audio_redacted_at = now(), audio_redaction_due = false WHERE id = $1",
                    job_id)

    def waits_for_the_redaction(key: str | None) -> None:
        job_id = made_job("call.wav", recording, options={"redact": ["phone"]}, due=True, segment=True)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        if key:
            page.add_init_script(f"sessionStorage.setItem('stt-api-key', '{key}')")
        page.goto(stack.api + "/")
        page.evaluate(f"window.notReloaded = true; openTranscript({job_id})")
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=30_000)
        run_again = page.get_by_role("button", name="Run again")
        rerun_wait = page.locator("#rerun-wait", has_text="being redacted; try again in a moment")
        rerun_wait.wait_for(timeout=30_000)
        assert run_again.is_disabled()

        row = page.locator("#segments li").first
        row.get_by_role("button", name="Correct the segment at").click()
        form = page.get_by_role("form", name="Correct the segment at")
        words_wait = form.locator(".redacting", has_text="being redacted; try again in a moment")
        assert form.get_by_label("Words").is_disabled() and words_wait.is_visible()
        form.get_by_label("Speaker").select_option("spk_1")  # the speaker can be corrected now
        form.get_by_role("button", name="Save correction").click()
        page.locator("#transcript-status", has_text="Correction saved.").wait_for(timeout=30_000)
        assert page.locator("#segments .segment").first.get_attribute("data-speaker") == "spk_1"
        row.get_by_role("button", name="Correct the segment at").click()
        assert form.get_by_label("Words").is_disabled() and words_wait.is_visible()

        redacted(job_id)
        page.wait_for_function("!document.querySelector('#rerun button[type=submit]').disabled", timeout=30_000)
        assert rerun_wait.is_hidden()
        assert form.get_by_label("Words").is_enabled() and words_wait.is_hidden()  # the form open is on again
        form.get_by_role("button", name="Cancel").click()

        # Marked again behind the page's back (as if asked just as the job ended): the server's reason.
        stack.query("UPDATE transcripts SET audio_redacted_at = NULL, audio_redaction_due = true WHERE id = $1",
                    job_id)
        run_again.click()
        page.locator("#transcript-status", has_text=f"Not run again: job {job_id} asked for redaction").wait_for(
            timeout=30_000)
        assert "409" not in page.locator("#transcript-status").inner_text()
        rerun_wait.wait_for(timeout=30_000)
        assert run_again.is_disabled()
        redacted(job_id)
        page.wait_for_function("!document.querySelector('#rerun button[type=submit]').disabled", timeout=30_000)
        assert rerun_wait.is_hidden()
        assert page.evaluate("window.notReloaded === true")
        assert errors == []
        page.close()

    waits_for_the_redaction(None)  # the audio element streams it
    waits_for_the_redaction("any-key-the-server-does-not-ask-for")  # fetched with the key


def test_files_chosen_under_one_key_are_sent_under_it_after_another_is_entered(keyed_stack, fixtures_dir, browser,
                                                                             tmp_path):
    """Files chosen under one API key wait their turn while another is entered (another user at the
    same browser): they are still sent under the first key (its jobs), and the page, showing the
    second key's recordings now, neither lists nor opens them."""
    stack = keyed_stack
    tag = uuid.uuid4().hex[:6]
    names = [f"first_{tag}.wav", f"second_{tag}.wav"]
    for name in names:
        shutil.copy(fixtures_dir / "empty.wav", tmp_path / name)
    client = httpx.Client(headers={"X-API-Key": KEY}, timeout=30)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sent: list[str | None] = []
    held: list = []

    def first_held(route) -> None:
        sent.append(route.request.headers.get("x-api-key"))
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route(re.compile(r"/recognize$"), first_held)
    try:
        page.goto(stack.api + "/")
        page.fill("#api-key", KEY)
        page.get_by_role("button", name="Use key").click()
        page.set_input_files("#file", [str(tmp_path / name) for name in names])
        page.get_by_role("button", name="Transcribe").click()
        wait_until(page, lambda: held, "the page never sent the first file")
        page.fill("#api-key", OTHER_KEY)
        page.get_by_role("button", name="Use key").click()
        held[0].continue_()
        status = page.locator("#upload-status")
        status.filter(has_text=f"{names[1]} accepted as job").wait_for(timeout=60_000)
        assert sent == [KEY, KEY], sent
        # Each said below the status line, the first not taken away by the second.
        kept = page.locator("#upload-outcomes li").all_inner_texts()
        assert [line.split(" accepted")[0] for line in kept] == names, kept
        listed = {key: {job["filename"] for job in httpx.get(f"{stack.api}/transcripts?limit=100", timeout=30,
                                                             headers={"X-API-Key": key}).json()["items"]}
                  for key in (KEY, OTHER_KEY)}
        assert set(names) <= listed[KEY] and not set(names) & listed[OTHER_KEY], listed
        page.wait_for_timeout(500)
        assert [page.locator("#jobs li", has_text=name).count() for name in names] == [0, 0]
        assert page.locator("#transcript").is_hidden()
        assert errors == []
    finally:
        page.close()
        for job in client.get(f"{stack.api}/transcripts?limit=100").json()["items"]:
            if job["filename"] in names:
                stack.wait_finished(job["id"], client=client)
                client.delete(f"{stack.api}/transcripts/{job['id']}")
        client.close()


def test_with_api_keys_an_upload_with_redaction_plays_its_redacted_copy(keyed_stack, browser):
    """An upload opens as it runs; with API keys the page fetches the recording and keeps it. With
    redaction asked, it is not fetched while the job runs (the upload, the card number audible,
    is what is stored then): once the job is done, the redacted copy is what plays."""
    import hashlib

    stack = keyed_stack
    client = httpx.Client(headers={"X-API-Key": KEY}, timeout=60)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.add_init_script(f"sessionStorage.setItem('stt-api-key', '{KEY}')")
    page.goto(stack.api + "/")
    page.get_by_label("Hide card and phone numbers, e-mail addresses").check()
    page.set_input_files("#file", str(ROOT / "tests" / "data" / "billing_call.flac"))
    page.get_by_role("button", name="Transcribe").click()
    status = page.locator("#upload-status")
    status.filter(has_text="billing_call.flac accepted as job").wait_for(timeout=60_000)
    job_id = int(re.search(r"job (\d+)", status.inner_text())[1])
    try:
        page.locator("#audio-status", has_text="plays once the transcript is done").wait_for(timeout=30_000)
        assert page.locator("#player").get_attribute("src") is None
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=300_000)
        page.wait_for_function("document.querySelector('#player').src.startsWith('blob:')"
                               " && document.querySelector('#player').readyState >= HTMLMediaElement.HAVE_METADATA",
                               timeout=60_000)
        played = page.evaluate("fetch(document.querySelector('#player').src).then((r) => r.arrayBuffer())"
                               ".then((b) => crypto.subtle.digest('SHA-256', b)).then((d) => Array.from("
                               "new Uint8Array(d), (x) => x.toString(16).padStart(2, '0')).join(''))")
        stored = client.get(f"{stack.api}/transcripts/{job_id}/audio")
        assert stored.status_code == 200 and stored.headers["content-type"] == "audio/wav"  # the redacted copy
        assert played == hashlib.sha256(stored.content).hexdigest()
        card = page.locator("#segments .segment", has_text="[CARD]").first
        start = float(card.get_attribute("data-start"))
        card.click()
        position = page.evaluate("document.querySelector('#player').currentTime")
        assert abs(position - start) < 0.5, (position, start)
        assert page.locator("#audio-status").is_hidden(), page.locator("#audio-status").inner_text()
        assert errors == []
    finally:
        page.close()
        stack.wait_finished(job_id, client=client)
        client.delete(f"{stack.api}/transcripts/{job_id}")
        client.close()


def test_a_voice_forgotten_whose_answer_is_lost_is_not_said_to_be_kept(stack, browser, forgets_its_speakers):
    """The server commits the forgetting, then a proxy answers 504 (re-matching a key's thousands of
    recordings took too long): the page does not say the voice was kept, and shows what the server has."""
    anna = stack.value("INSERT INTO speakers (name) VALUES ('Anna') RETURNING id")
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())
    answered: list[int] = []

    def forgotten_then_timed_out(route) -> None:
        if route.request.method != "DELETE":
            route.continue_()
            return
        answered.append(route.fetch().status)
        route.fulfill(status=504, json={"detail": "the proxy timed out"})

    page.route(f"{stack.api}/speakers/{anna}", forgotten_then_timed_out)
    page.goto(stack.api + "/")
    page.get_by_role("button", name="Forget Anna").click()
    page.locator("#notice", has_text="Anna may have been forgotten").wait_for(timeout=30_000)
    assert answered == [204]
    page.get_by_role("button", name="Forget Anna").wait_for(state="detached", timeout=30_000)
    assert "not forgotten" not in page.locator("#notice").inner_text()
    assert httpx.get(f"{stack.api}/speakers/{anna}", timeout=30).status_code == 404
    assert errors == []
    page.close()


def drops_files(page, files: list[tuple[str, bytes]]) -> None:
    """`files` (name, content) dropped on the page, as from a file manager."""
    page.evaluate("""(files) => {
      const transfer = new DataTransfer();
      for (const [name, content] of files) {
        const bytes = Uint8Array.from(atob(content), (c) => c.charCodeAt(0));
        transfer.items.add(new File([bytes], name, { type: "audio/wav" }));
      }
      document.querySelector("#drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true,
                                                                            cancelable: true }));
    }""", [[name, base64.b64encode(content).decode()] for name, content in files])


def test_each_file_of_a_batch_says_what_became_of_it(stack, fixtures_dir, browser):
    """Options the server would refuse are not sent with files dropped, and a speaker count goes
    while the parties are one per channel. Of three files dropped at once, one is refused, one's
    answer a proxy loses (502) after it was all sent, and one's connection is cut on its first send
    (the browser says before the file was all sent: it is sent again) and its answer lost on every
    send after: the second is sent again with its Idempotency-Key (its job, made once, opens), and
    what became of the first and the third stays said below the status line."""
    tag = uuid.uuid4().hex[:6]
    refused, lost_once, lost_for_good = (f"{what}_{tag}.wav" for what in ("refused", "lost_once", "lost_for_good"))
    audio = (fixtures_dir / "empty.wav").read_bytes()
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sends: list[tuple[str, str]] = []  # (file, Idempotency-Key)

    def answers_lost(route) -> None:
        name = re.search(rb'filename="([^"]+)"', route.request.post_data_buffer or b"")[1].decode()
        sends.append((name, route.request.headers["idempotency-key"]))
        tries = [sent for sent, _ in sends].count(name)
        if name == refused:
            route.fulfill(status=415, json={"detail": "not a recording"})
        elif name == lost_once and tries == 1:
            route.fetch()  # the job is made
            route.fulfill(status=502, body="Bad Gateway")
        elif name == lost_for_good and tries == 1:
            route.fetch()
            route.abort("connectionreset")
        elif name == lost_for_good:
            route.fulfill(status=504, body="Gateway Timeout")
        else:
            route.continue_()

    page.route(re.compile(r"/recognize$"), answers_lost)
    try:
        page.goto(stack.api + "/")
        page.fill("#speakers", "40")
        drops_files(page, [(f"too_many_speakers_{tag}.wav", audio)])
        page.wait_for_timeout(500)
        assert sends == []
        page.get_by_label("One party per channel").check()
        assert page.locator("#speakers").is_disabled() and page.input_value("#speakers") == ""
        page.get_by_label("One party per channel").uncheck()
        assert page.locator("#speakers").is_enabled()

        drops_files(page, [(refused, audio), (lost_once, audio), (lost_for_good, audio)])
        status = page.locator("#upload-status")
        wait_until(page, lambda: len(sends) == 8 and page.locator("#upload button[type=submit]").is_enabled(),
                   "the files were never all sent")
        assert status.inner_text().startswith(f"{lost_for_good}: sent; the answer was lost"), (status.inner_text(),
                                                                                              sends)
        outcomes = page.locator("#upload-outcomes li").all_inner_texts()
        assert [line.split(":")[0] for line in outcomes] == [refused, lost_for_good], outcomes
        assert "415 not a recording" in outcomes[0]
        assert outcomes[1].endswith("sent; the answer was lost: check the list before sending it again."), outcomes
        assert [sent for sent, _ in sends] == [refused, lost_once, lost_once] + [lost_for_good] * 5, sends
        assert len({key for sent, key in sends if sent == lost_once}) == 1
        assert len({key for sent, key in sends if sent == lost_for_good}) == 1
        made = [job["id"] for job in httpx.get(f"{stack.api}/transcripts?limit=100", timeout=30).json()["items"]
                if job["filename"] == lost_once]
        assert len(made) == 1, made
        assert page.locator("#transcript").get_attribute("data-job") == str(made[0])
        assert errors == []
    finally:
        page.close()
        discard_tagged(stack.api, tag)


def test_a_file_whose_answer_was_lost_is_not_said_refused_when_sent_again(stack, fixtures_dir, browser):
    """The first send of a file made its job, but its answer was lost; the send again is refused
    (the server busy, with no wait to offer). The page says that the file was sent and to check
    the list: said refused, it would be sent again by hand and made twice."""
    tag = uuid.uuid4().hex[:6]
    name = f"lost_then_refused_{tag}.wav"
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sends: list[str] = []  # their Idempotency-Keys

    def lost_then_refused(route) -> None:
        sends.append(route.request.headers["idempotency-key"])
        if len(sends) == 1:
            route.fetch()  # the job is made
            route.fulfill(status=502, body="Bad Gateway")
        else:
            route.fulfill(status=503, json={"detail": "the server is busy"})

    page.route(re.compile(r"/recognize$"), lost_then_refused)
    try:
        page.goto(stack.api + "/")
        drops_files(page, [(name, (fixtures_dir / "empty.wav").read_bytes())])
        wait_until(page, lambda: len(sends) == 2 and page.locator("#upload button[type=submit]").is_enabled(),
                   "the file was never sent again")
        said = f"{name}: sent; the answer was lost: check the list before sending it again."
        assert page.locator("#upload-status").inner_text() == said
        assert page.locator("#upload-outcomes li").all_inner_texts() == [said]
        assert len(set(sends)) == 1
        assert errors == []
    finally:
        page.close()
        discard_tagged(stack.api, tag)


def test_a_job_told_of_before_its_answer_came_again_keeps_its_state(stack, fixtures_dir, browser):
    """The first send of a file made its job, but its answer was lost; the job ends (stopped here)
    before the send again is answered with that job. Its row stays as it ended, not back at
    "submitted 0%" (no event would ever set it right)."""
    other = a_recording_in_the_database(stack, "opened_meanwhile.wav", [("spk_0", "Hello.")])
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    made: list[int] = []
    held: list = []

    def lost_then_held(route) -> None:
        if not made:
            made.append(route.fetch().json()["id"])
            route.fulfill(status=502, body="Bad Gateway")
        else:
            held.append(route)

    page.route(re.compile(r"/recognize$"), lost_then_held)
    try:
        page.goto(stack.api + "/")
        drops_files(page, [("lost_then_replayed.wav", (fixtures_dir / "empty.wav").read_bytes())])
        wait_until(page, lambda: held, "the file was never sent again")
        # Another recording opened meanwhile: the job of the file is listed, not opened (its
        # transcript's events would set its row right).
        page.locator(f'#jobs li[data-job="{other}"] button').click()
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=30_000)
        httpx.post(f"{stack.api}/transcripts/{made[0]}/cancel", timeout=30)
        row = page.locator(f'#jobs li[data-job="{made[0]}"]')
        page.locator(f'#jobs li[data-job="{made[0]}"]:not([data-status="processing"])').wait_for(timeout=30_000)
        ended = row.get_attribute("data-status"), row.locator(".state").inner_text()
        held[0].continue_()
        page.locator("#upload-status", has_text=f"accepted as job {made[0]}").wait_for(timeout=30_000)
        assert (row.get_attribute("data-status"), row.locator(".state").inner_text()) == ended
        assert page.locator("#transcript").get_attribute("data-job") == str(other)
        assert errors == []
    finally:
        page.close()
        with httpx.Client(timeout=30) as client:
            discard(stack.api, client, *made, other)


def test_a_file_cut_off_while_it_is_sent_is_sent_again_for_a_while_then_said_why(stack, fixtures_dir, browser):
    """A server that answers before it reads the file and closes the connection (busy, or the file
    over MAX_UPLOAD_MB) reads in a browser as the connection cut while the file is sent. The file
    is sent again after longer and longer waits, for as long as a busy server is waited for (two
    minutes, run here on the page's clock), then the page says what may be the cause."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sends: list[str] = []  # their Idempotency-Keys
    page.route(re.compile(r"/recognize$"), lambda route: (sends.append(route.request.headers["idempotency-key"]),
                                                          route.abort("connectionreset")))
    page.clock.install()
    try:
        page.goto(stack.api + "/")
        # The page's time stands still but as run_for moves it on.
        page.clock.pause_at(datetime.fromtimestamp(page.evaluate("Date.now()") / 1000 + 1))
        name = "cut_off.wav"
        drops_files(page, [(name, (fixtures_dir / "empty.wav").read_bytes())])
        status = page.locator("#upload-status")
        submit = page.locator("#upload button[type=submit]")
        waits: list[int] = []
        while True:
            wait_until(page, lambda: len(sends) == len(waits) + 1, "the file was not sent again")
            wait_until(page, lambda: submit.is_enabled() or re.search(rf"again in {2 ** (len(waits) + 1)} s",
                                                                         status.inner_text()),
                       f"no longer wait said after {waits}: {status.inner_text()!r}")
            if submit.is_enabled():
                break
            waits.append(2 ** (len(waits) + 1))
            page.clock.run_for(waits[-1] * 1000)
        assert waits == [2, 4, 8, 16, 32], waits  # the next, 64 s, would go past the two minutes
        said = status.inner_text()
        assert said.startswith(f"{name}: the upload failed: the connection was cut before the file was all sent")
        assert "busy" in said and "MAX_UPLOAD_MB" in said, said
        assert page.locator("#upload-outcomes li").all_inner_texts() == [said]
        assert len(set(sends)) == 1
        assert errors == []
    finally:
        page.close()


def test_a_long_upload_answered_busy_at_its_end_is_sent_again(stack, fixtures_dir, browser):
    """The two minutes a busy server is waited for start at its first 503, not when the file
    started to go: a file three minutes in the sending (run here on the page's clock), answered
    503 with Retry-After at its end, is sent again after the wait, and its job made."""
    tag = uuid.uuid4().hex[:6]
    name = f"long_then_busy_{tag}.wav"
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sends: list[str] = []  # their Idempotency-Keys
    held: list = []

    def held_then_made(route) -> None:
        sends.append(route.request.headers["idempotency-key"])
        if len(sends) == 1:
            held.append(route)
        else:
            route.continue_()

    page.route(re.compile(r"/recognize$"), held_then_made)
    page.clock.install()
    try:
        page.goto(stack.api + "/")
        started = page.evaluate("Date.now()") / 1000 + 1
        page.clock.pause_at(datetime.fromtimestamp(started))
        drops_files(page, [(name, (fixtures_dir / "empty.wav").read_bytes())])
        wait_until(page, lambda: held, "the file was never sent")
        # Three minutes of sending: the time moves on, no timer fires (the file kept moving, no stall).
        page.clock.set_system_time(datetime.fromtimestamp(started + 180))
        held[0].fulfill(status=503, headers={"Retry-After": "1"}, json={"detail": "2 uploads are in progress"})
        status = page.locator("#upload-status")
        wait_until(page, lambda: "sending it again in 1 s" in status.inner_text(),
                   f"the busy server was not waited for: {status.inner_text()!r}")
        page.clock.run_for(1_000)
        status.filter(has_text=f"{name} accepted as job").wait_for(timeout=60_000)
        assert len(sends) == 2 and len(set(sends)) == 1, sends
        assert errors == []
    finally:
        page.close()
        discard_tagged(stack.api, tag)


def test_the_open_transcript_and_the_list_keep_to_what_the_server_has(stack, browser):
    """"More" answered after an event told of a newer state does not set a row back; a job that
    failed shows the names it has then; a name with a comma is not saved (it could not be
    remembered); a voice that sounds like another person's is remembered once the user confirms;
    and a job run again under one API key is not listed under the key entered meanwhile."""
    tag = uuid.uuid4().hex[:6]
    stale = stack.value("INSERT INTO transcripts (filename) VALUES ($1) RETURNING id", f"stale_{tag}.wav")
    failed = a_recording_in_the_database(stack, f"failed_{tag}.wav", [("spk_0", "Hello.")])
    stack.query("INSERT INTO transcript_speakers (transcript_id, speaker, name, name_source)"
                " VALUES ($1, 'spk_0', 'Anna', 'auto')", failed)
    said = [("spk_0", "Hello."), ("spk_1", "Hi there.")]
    voices = a_recording_in_the_database(stack, f"voices_{tag}.wav", said)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))

    def first_page_ends_before_stale(route) -> None:
        answer = route.fetch()
        items = [job for job in answer.json()["items"] if job["id"] > stale]
        route.fulfill(response=answer, json={"items": items, "next_cursor": stale + 1})

    page.route(re.compile(r"/transcripts\?limit=50$"), first_page_ends_before_stale)
    held: dict[str, list] = {"events": [], "more": [], "rerun": []}
    page.route(f"{stack.api}/events", lambda route: held["events"].append(route))
    page.route(re.compile(r"/transcripts\?limit=50&cursor="), lambda route: held["more"].append(route))
    page.route(re.compile(r"/transcripts/\d+/rerun$"), lambda route: held["rerun"].append(route))
    enrolments: list[dict] = []

    def sounds_like_ben(route) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        enrolments.append(route.request.post_data_json)
        if len(enrolments) == 1:
            route.fulfill(status=409, json={"detail": "it sounds like 'Ben': if it is 'Anna''s voice all the same,"
                                                      " send it again with force=true",
                                            "extra": {"code": "sounds_like_another"}})
        else:
            route.fulfill(status=201, json={"id": 1, "name": "Anna"})

    page.route(f"{stack.api}/speakers", sounds_like_ben)
    sends_events(page, failed, f"failed_{tag}.wav", said[:1], [None], failed=True)
    sends_events(page, voices, f"voices_{tag}.wav", said, [None, None])
    try:
        page.goto(stack.api + "/")
        page.get_by_role("button", name="More").click()
        wait_until(page, lambda: held["more"] and held["events"], "the page never asked for more, or for events")
        done = {"id": stale, "filename": f"stale_{tag}.wav", "status": "done", "stage": "done", "percent": 100}
        held["events"][0].fulfill(status=200, content_type="text/event-stream",
                                  body=f"event: job\ndata: {json.dumps(done)}\n\n")
        row = f'#jobs li[data-job="{stale}"]'
        page.locator(f'{row}[data-status="done"]').wait_for(timeout=10_000)
        held["more"][0].fulfill(response=held["more"][0].fetch())  # listed as processing, before the event
        page.wait_for_function("!document.querySelector('#more-jobs').disabled", timeout=10_000)
        assert page.locator(row).get_attribute("data-status") == "done"

        page.locator(f'#jobs li[data-job="{failed}"] button').click()
        page.wait_for_function("document.querySelector('#name-spk_0')?.value === 'Anna'", timeout=10_000)

        page.locator(f'#jobs li[data-job="{voices}"] button').click()
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=30_000)
        page.fill("#name-spk_0", "Smith, Anna")
        page.get_by_role("button", name="Save names").click()
        page.locator("#transcript-status", has_text="cannot hold a comma").wait_for(timeout=10_000)
        speakers = httpx.get(f"{stack.api}/transcripts/{voices}/speakers", timeout=30).json()["speakers"]
        assert not speakers.get("spk_0", {}).get("name"), speakers
        page.fill("#name-spk_0", "Anna")
        page.get_by_role("button", name="Remember voices").click()
        page.locator("#transcript-status", has_text="Anna's voice remembered.").wait_for(timeout=30_000)
        assert [enrolment.get("force") for enrolment in enrolments] == [False, True], enrolments
        assert len(dialogs) == 1 and "Remember anyway?" in dialogs[0], dialogs

        page.locator("#rerun button[type=submit]").click()
        wait_until(page, lambda: held["rerun"], "the page never asked to run it again")
        page.fill("#api-key", "another-users-key")
        page.get_by_role("button", name="Use key").click()
        held["rerun"][0].fulfill(status=202, json={"id": voices + 1_000_000, "filename": f"voices_{tag}.wav"})
        page.wait_for_timeout(500)
        assert page.locator(f'#jobs li[data-job="{voices + 1_000_000}"]').count() == 0

        # A key no request can carry (a header holds printable ASCII only: fetch throws on it, and
        # the list was asked for again for ever, saying it could not be listed) is refused as it
        # is entered, said so; the key in use stays.
        page.fill("#api-key", "clé-ключ")
        page.get_by_role("button", name="Use key").click()
        page.locator("#notice", has_text="only printable ASCII").wait_for(timeout=5_000)
        assert page.evaluate("sessionStorage.getItem('stt-api-key')") == "another-users-key"
        assert page.locator("#api-key").get_attribute("aria-invalid") == "true"
        page.wait_for_timeout(2_500)
        assert "could not be listed" not in page.locator("#notice").inner_text()
        assert errors == []
    finally:
        page.close()
        stack.query("UPDATE transcripts SET status = 'done', stage = 'done', completed_at = now() WHERE id = $1", stale)
        for job_id in (stale, failed, voices):
            httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=30)


def test_what_an_action_came_to_stays_said_while_the_job_runs_on(stack, browser):
    """Names refused on a job still running stay said in the transcript's status line as the
    job's progress comes (its row in the list shows that), until the user acts again or the job
    ends: the user is not left thinking they were saved."""
    tag = uuid.uuid4().hex[:6]
    job_id = stack.value("INSERT INTO transcripts (filename, stage, progress) VALUES ($1, 'transcribing', 0.2)"
                         " RETURNING id", f"running_{tag}.wav")
    stack.query("INSERT INTO chunks (transcript_id, chunk_index, segment_count, transcribed_at)"
                " VALUES ($1, 0, 2, now())", job_id)
    for index, (speaker, text) in enumerate([("spk_0", "Hello."), ("spk_1", "Hi there.")]):
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                    " VALUES ($1, 0, $2, $3, $4, $5, $6)", job_id, index, speaker, 2.0 * index, 2.0 * index + 1.5,
                    text)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(stack.api + "/")
        row = page.locator(f'#jobs li[data-job="{job_id}"]')
        row.locator("button").click()
        status = page.locator("#transcript-status")
        status.filter(has_text="Processing").wait_for(timeout=10_000)
        page.wait_for_timeout(2_000)  # both streams have told of it
        # The live status line says the status as it changes, not each percent: a screen reader
        # would read every one out. It is not written as the job goes on.
        page.evaluate("""() => {
            window.statusWrites = 0;
            new MutationObserver((changes) => { window.statusWrites += changes.length; }).observe(
                document.querySelector('#transcript-status'), { childList: true, characterData: true, subtree: true });
        }""")
        stack.query("UPDATE transcripts SET progress = 0.3 WHERE id = $1", job_id)
        row.locator(".state", has_text="transcribing 30%").wait_for(timeout=10_000)
        # The percent is shown in a line of its own, in no live region: once the transcript's own
        # stream has told of it, the status line was not written.
        progress = page.locator("#transcript-progress")
        progress.filter(has_text="transcribing: 30%").wait_for(timeout=10_000)
        assert page.evaluate("window.statusWrites") == 0 and status.inner_text() == "Processing…"
        assert progress.inner_text() == "transcribing: 30%"
        assert page.evaluate("!document.querySelector('#transcript-progress')"
                             ".closest('[aria-live], [role=status], [role=alert], [role=log]')")
        page.fill("#name-spk_0", "Smith, Anna")
        page.get_by_role("button", name="Save names").click()
        status.filter(has_text="cannot hold a comma").wait_for(timeout=10_000)

        stack.query("UPDATE transcripts SET progress = 0.4 WHERE id = $1", job_id)
        row.locator(".state", has_text="transcribing 40%").wait_for(timeout=10_000)
        progress.filter(has_text="transcribing: 40%").wait_for(timeout=10_000)  # shown all the same
        assert "cannot hold a comma" in status.inner_text()

        # Acting again says what that came to, which stays in its turn.
        page.fill("#name-spk_0", "Anna")
        page.get_by_role("button", name="Save names").click()
        status.filter(has_text="Names saved.").wait_for(timeout=10_000)
        stack.query("UPDATE transcripts SET stage = 'diarizing', progress = 0.6 WHERE id = $1", job_id)
        row.locator(".state", has_text="diarizing 60%").wait_for(timeout=10_000)
        page.wait_for_timeout(2_000)
        assert status.inner_text() == "Names saved."

        # The job's end is said over it.
        stack.query("UPDATE transcripts SET status = 'done', stage = 'done', progress = 1, completed_at = now()"
                    " WHERE id = $1", job_id)
        page.locator('#transcript[data-ended="true"]').wait_for(timeout=10_000)
        assert status.inner_text() == "Done." and progress.is_hidden()
        assert errors == []
    finally:
        page.close()
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)
