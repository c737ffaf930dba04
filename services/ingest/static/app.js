// The stt-pipeline page: upload, follow jobs live (server-sent events), read and play a
// transcript, name speakers and remember their voices, download, search. Plain JavaScript
// against the public HTTP API.
"use strict";

const $ = (selector) => document.querySelector(selector);
const KEY_STORAGE = "stt-api-key";
// Dark enough on white for text (WCAG AA), distinct enough for borders.
const COLOURS = ["#0b5cad", "#b3261e", "#1d6b2a", "#7a3fa0", "#8a5a00", "#00707a", "#a1306b", "#4a5360"];

const state = {
  jobs: new Map(), deleted: new Set(), open: null, stream: null, speakers: [], names: {}, talk: {}, audioUrl: null,
  shown: new Map(),  // the open transcript's segments on the page, by `renderSegment`'s key
  uploading: 0, jobsStream: null, jobsRetry: null, jobsCursor: null, jobsListed: false, audioLoads: 0,
  audioRetries: 0,  // of the recording now loading, after a 503
  audioAgainAtEnd: null,  // the job whose recording is looked at again when it ends: it may be redacted then
  audioTag: null,  // the ETag of the recording in the player (null: none there yet)
  pendingSeek: null,  // where to play from once the recording is there
  pendingPaused: false,  // and to stay paused there (it was paused when it was loaded again)
  peopleRetry: null,
  jobEventAt: new Map(),  // when /events last told of each job (performance.now())
  openedByUploads: new Set(),  // jobs an upload opened, not the user
  saving: new Set(),  // corrections on their way, as `${jobId}/${chunk_index}:${index}`
  namesAsked: 0,  // names asked for or sent: an answer of names older than the last is not shown
  translated: false,  // the open transcript's text is Whisper's English translation
  searches: 0,  // searches asked for: an answer to any but the last is dropped
  searchMore: null,  // { path, cursor }: where "More results" of the last search goes on from
  hitsShown: new Set(),  // the hits of the last search on the page, so a later page shows none again
  redacting: null,  // the job whose recording the server last said is being redacted (markRedacting)
  correctionForms: 0,  // correction forms made: each one's reason has an id of its own
  said: null,  // { job, status }: what the user's last action came to is in the status line (sayInStatusLine)
};

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

// What an API key can hold: it goes in a header (X-API-Key), which a browser sends only of
// printable ASCII (fetch throws on anything else, and the page would ask again for ever).
const KEY_CHARACTERS = /^[\x20-\x7e]*$/;
function keyProblem(key) {
  return KEY_CHARACTERS.test(key) ? ""
    : "An API key holds only printable ASCII (letters, digits, punctuation): this one has other characters"
      + " (a letter of another alphabet, an accent, or something pasted along with it). Not used: check it and"
      + " enter it again.";
}
function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

// A live region's text changed only when it differs: some screen readers say a region again
// whenever it is written, the same words or not.
function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

// Whether the focus is nowhere (on the body), or on something removed or hidden: a keyboard or
// screen reader user would go on from the top of the page.
function focusLost() {
  const active = document.activeElement;
  return !active || active === document.body || !active.isConnected || active.closest("[hidden]") !== null;
}

// Hides or shows a control of the open transcript; one hidden with the focus hands it to the
// transcript's title (focusable: tabindex=-1), not to nowhere.
function setShown(element, shown) {
  const hadFocus = !shown && element.contains(document.activeElement);
  element.hidden = !shown;
  if (hadFocus) $("#transcript-title").focus();
}

function notice(text) {
  const box = $("#notice");
  box.textContent = text || "";
  box.hidden = !text;
}

function explainRefusal(status) {
  if (status === 401) notice("This server needs an API key: enter it above.");
  else if (status === 403) notice("The API key was refused.");
}

// The answer when OK; else throws an Error with the answer's `status`, `detail` (the API's reason)
// and `code` (its `extra.code`, where it has one: what tells GET /search's 503s apart).
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  explainRefusal(response.status);
  if (!response.ok) {
    let detail = response.statusText;
    let extra;
    try {
      const body = await response.json();
      detail = body.detail || detail;
      extra = body.extra;
    } catch (error) { /* not JSON */ }
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    error.detail = detail;
    error.code = extra?.code;
    error.retryAfter = response.headers.get("Retry-After");
    throw error;
  }
  return response;
}

function clock(seconds) {
  const total = Math.max(0, Math.round(seconds * 10)) / 10;
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const rest = (total % 60).toFixed(1).padStart(4, "0");
  return (hours ? `${hours}:${String(minutes).padStart(2, "0")}` : String(minutes).padStart(2, "0")) + `:${rest}`;
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// ---- server-sent events over fetch (EventSource cannot send the API key header) ------------

// The server sends a keep-alive every 15 s: a stream silent for this long has died without an
// error (a proxy or NAT forgot the connection) and is made again.
const SILENT_STREAM_MS = 45_000;

function readWithin(reader, ms) {
  let timer;
  const silence = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error("silent stream")), ms); });
  return Promise.race([reader.read(), silence]).finally(() => clearTimeout(timer));
}

// A dropped connection is made again (every 2 s), resuming after the last event; onReconnect()
// is told each time it is made again, for what a stream does not resume. A 4xx answer would be
// the same again (no such job, a key refused): following stops and onGone(status) is told.
function follow(path, onEvent, { lastEventId = null, endId = null, onGone = null, onReconnect = null } = {}) {
  const controller = new AbortController();
  let last = lastEventId;
  let stopped = false;
  let connected = false;
  async function connect() {
    while (!stopped) {
      try {
        const headers = authHeaders(last ? { "Last-Event-ID": last } : {});
        const response = await fetch(path, { headers, signal: controller.signal });
        if (response.status >= 400 && response.status < 500 && response.status !== 408 && response.status !== 429) {
          stopped = true;
          explainRefusal(response.status);
          if (onGone) onGone(response.status);
          return;
        }
        if (!response.ok) throw new Error(`${response.status}`);
        if (response.status === 204) { stopped = true; return; }  // nothing more will come (SSE)
        if (connected && onReconnect) onReconnect();
        connected = true;
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        // However reading ends (an event that does not parse or is not handled included), the
        // connection is closed before the next: an open one counts against the server's streams.
        try {
          for (;;) {
            const { value, done } = await readWithin(reader, SILENT_STREAM_MS);
            if (done) break;
            buffer += decoder.decode(value, { stream: true });
            let end;
            while ((end = buffer.indexOf("\n\n")) >= 0) {
              if (stopped) return;  // events that came before stop() are not told
              const block = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              const event = { type: "message", data: "", id: null };
              for (const line of block.split("\n")) {
                if (line.startsWith(":")) continue;
                const colon = line.indexOf(":");
                const field = colon < 0 ? line : line.slice(0, colon);
                const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
                if (field === "event") event.type = value;
                else if (field === "data") event.data += (event.data ? "\n" : "") + value;
                else if (field === "id") event.id = value;
              }
              if (!event.data) continue;
              if (event.id !== null) last = event.id;
              onEvent(event.type, JSON.parse(event.data));
              if (endId !== null && event.id === endId) { stopped = true; return; }
            }
          }
        } finally {
          reader.cancel().catch(() => { /* already closed */ });
        }
      } catch (error) {
        if (stopped || error.name === "AbortError") return;
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
  connect();
  return { stop() { stopped = true; controller.abort(); } };
}

// ---- jobs ---------------------------------------------------------------------------------

function renderJob(job) {
  if (state.deleted.has(job.id)) return;  // an event sent before it was deleted
  const known = state.jobs.get(job.id) || {};
  const merged = { ...known, ...job };
  state.jobs.set(job.id, merged);
  let item = document.querySelector(`#jobs li[data-job="${job.id}"]`);
  if (!item) {
    item = document.createElement("li");
    item.dataset.job = job.id;
    item.innerHTML = '<button type="button"><span class="name"></span><span class="state"></span>'
      + '<progress max="100"></progress></button>';
    item.querySelector("button").addEventListener("click", () => { if (mayOpen(job.id)) openTranscript(job.id); });
    const list = $("#jobs");
    const after = [...list.children].find((other) => Number(other.dataset.job) < job.id);
    list.insertBefore(item, after || null);
  }
  item.dataset.status = merged.status;
  item.className = `status-${merged.status}`;
  item.querySelector(".name").textContent = `${merged.id}. ${merged.filename}`;
  const label = merged.status === "processing" ? `${merged.stage} ${merged.percent}%` : merged.status;
  item.querySelector(".state").textContent = label;
  const bar = item.querySelector("progress");
  bar.value = merged.percent;
  bar.hidden = merged.status !== "processing";
  bar.setAttribute("aria-label", `${merged.filename}: ${label}`);
  item.querySelector("button").setAttribute("aria-current", state.open === job.id ? "true" : "false");
  if (state.open === job.id) {
    showProgress(merged);
    // A job opened from elsewhere (a search hit) is named once its events say what it is.
    if (merged.filename) $("#transcript-title").textContent = merged.filename;
  }
}

// A page of GET /transcripts into the list; "More" asks for the next one while there is one.
function showJobsPage(page) {
  page.items.reverse().forEach(renderJob);
  state.jobsCursor = page.next_cursor ?? null;
  $("#more-jobs").hidden = state.jobsCursor === null;
}

// The list from the newest job down as far as it went before ("More" takes it further; at first,
// one page), each row as the server has it now. A row in that span that the server no longer
// lists was deleted while nothing could tell the page: it goes. False when answered for the key
// before.
// The listed jobs but those /events told of since `askedAt`: newer there than in a list that was on
// its way meanwhile (and the stream does not tell them again).
function notToldSince(jobs, askedAt) {
  return jobs.filter((job) => !((state.jobEventAt.get(job.id) ?? -1) > askedAt));
}

async function listJobs(key) {
  const askedAt = performance.now();
  const shown = [...state.jobs.keys()];
  const listedBefore = state.jobsListed;
  const reached = state.jobsCursor;  // where "More" goes on from; null once every job is listed
  const items = [];
  let next = null;
  do {
    const page = await (await api(`/transcripts?limit=50${next === null ? "" : `&cursor=${next}`}`)).json();
    if (apiKey() !== key) return false;
    items.push(...page.items);
    next = page.next_cursor ?? null;
  } while (listedBefore && next !== null && (reached === null || next > reached));
  const listed = new Set(items.map((job) => job.id));
  for (const id of shown) {
    if (id >= (next ?? 0) && !listed.has(id)) forgetJob(id, { elsewhere: true });
  }
  showJobsPage({ items: notToldSince(items, askedAt), next_cursor: next });
  state.jobsListed = true;
  return true;
}

// The newest jobs, then each change (/events). A list that could not be had (the database
// restarting, the network down) is said so and asked for again every 5 s; changes are followed
// meanwhile. A stream made again starts afresh, so it does not tell what was deleted while it
// was down, nor the jobs it does not follow (those ended over an hour ago): the list is asked for
// again then. A key refused is said by api(): a new key loads again.
async function loadJobs() {
  const key = apiKey();
  clearTimeout(state.jobsRetry);
  try {
    if (!(await listJobs(key))) return;
    notice("");
  } catch (error) {
    if (apiKey() !== key || error.status === 401 || error.status === 403) return;
    notice(`The recordings could not be listed (${error.message}): trying again.`);
    state.jobsRetry = setTimeout(loadJobs, 5000);
  }
  if (!state.jobsStream) {
    state.jobsStream = follow("/events", (type, job) => {
      if (type === "job") {
        state.jobEventAt.set(job.id, performance.now());
        renderJob(job);
      }
      else if (type === "job.deleted") forgetJob(job.id, { elsewhere: true });
    }, { onReconnect: loadJobs });
  }
}

async function loadMoreJobs() {
  const more = $("#more-jobs");
  const key = apiKey();
  const askedAt = performance.now();
  more.disabled = true;
  try {
    const page = await (await api(`/transcripts?limit=50&cursor=${encodeURIComponent(state.jobsCursor)}`)).json();
    if (apiKey() !== key) return;
    showJobsPage({ ...page, items: notToldSince(page.items, askedAt) });
  } catch (error) {
    notice(`No more recordings could be listed: ${error.message}`);
  } finally {
    more.disabled = false;
    // Turned off meanwhile, the button lost the focus: back on it, or on the list's heading once
    // every recording is listed.
    if (apiKey() === key && focusLost()) (more.hidden ? $("#jobs-title") : more).focus();
  }
}

// ---- upload -------------------------------------------------------------------------------

// The form's options as they are now, for one file: taken when the file is chosen or dropped,
// not when its turn to upload comes (the options may have been changed for the next file).
function uploadForm(file) {
  const form = new FormData();
  form.append("file", file);
  const language = $("#language").value;
  const speakers = $("#speakers").value;
  if (language) form.append("language", language);
  if (speakers && !$("#multichannel").checked) form.append("num_speakers", speakers);
  if ($("#multichannel").checked) form.append("multichannel", "true");
  if ($("#translate").checked) form.append("task", "translate");
  if ($("#redact").checked) form.append("redact", $("#redact").value);
  const vocabulary = $("#vocabulary").value.trim();
  if (vocabulary) form.append("vocabulary", vocabulary);
  const expected = [...document.querySelectorAll("#expected-people input:checked")].map((box) => box.value);
  if (expected.length) form.append("expected_speakers", expected.join(", "));
  return form;
}

// The most the server takes as a job's names and terms (VOCABULARY_MAX_CHARS, common/messages.py),
// counted as it counts them (vocabularyChars): a field's maxlength would count the spaces after the
// commas, and cut a pasted list off mid-word without a word.
const VOCABULARY_MAX_CHARS = 150;

// How long `text` is as the server counts a vocabulary (vocabulary_chars): its terms, split at
// commas and lines, with what is not printable blanked, blanks collapsed, empty ones and repeats
// left out, joined by bare commas; in characters (code points).
function vocabularyChars(text) {
  const terms = text.replaceAll("\n", ",").split(",")
    .map((term) => term.replace(/[\p{C}\p{Z}]/gu, " ").split(" ").filter(Boolean).join(" "))
    .filter(Boolean);
  return [...[...new Set(terms)].join(",")].length;
}

// The field refuses (as the browser refuses a form's invalid field) a list the server would.
function checkVocabulary() {
  const field = $("#vocabulary");
  const used = vocabularyChars(field.value);
  field.setCustomValidity(used <= VOCABULARY_MAX_CHARS ? ""
    : `Names and terms take at most ${VOCABULARY_MAX_CHARS} characters (spaces around the commas not counted);`
      + ` these take ${used}: keep those Whisper would otherwise get wrong.`);
}

// An upload that sends nothing for this long has stalled (a half-open connection): given up, so
// that the files after it are not held up for as long as the browser would wait.
const UPLOAD_STALLED_MS = 60_000;

// One send of a prepared upload; `key`, the same on every send of one file, makes a resend after
// a lost answer give back the job the first made instead of a second one. It is sent with the API
// key in use when the file was chosen (`owner`), whatever key was entered since: its job is theirs.
function upload({ file, form, key, owner }) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", "/recognize");
    request.setRequestHeader("Idempotency-Key", key);
    if (owner) request.setRequestHeader("X-API-Key", owner);
    const bar = $("#upload-progress");
    bar.hidden = false;
    bar.value = 0;
    let stalled = setTimeout(() => request.abort(), UPLOAD_STALLED_MS);
    const moved = () => { clearTimeout(stalled); stalled = setTimeout(() => request.abort(), UPLOAD_STALLED_MS); };
    request.upload.onprogress = (event) => {
      moved();
      if (event.lengthComputable) bar.value = Math.round((event.loaded / event.total) * 100);
    };
    // Once the file is sent, the server stores it before it answers (minutes for a big one): no
    // longer a stall.
    let sent = false;
    request.upload.onload = () => { sent = true; clearTimeout(stalled); };
    request.onloadend = () => clearTimeout(stalled);
    request.onload = () => {
      bar.value = 100;
      let body = {};
      try { body = JSON.parse(request.responseText); } catch (error) { /* not JSON */ }
      if (request.status === 202) { resolve(body); return; }
      const error = new Error(`${file.name}: ${request.status} ${body.detail || request.statusText}`);
      error.status = request.status;
      error.retryAfter = Number(request.getResponseHeader("Retry-After")) || 0;
      // A proxy that answers 502 or 504 was sent the file: the job may have been made.
      error.answerLost = request.status === 502 || request.status === 504;
      error.maybeMade = error.answerLost;
      reject(error);
    };
    request.onerror = () => {
      const error = new Error(`${file.name}: the upload failed`);
      // Cut off before the file was all sent, nothing was made; after, the job may have been.
      error.cutOff = !sent;
      error.answerLost = sent;
      error.maybeMade = sent;
      reject(error);
    };
    request.onabort = () => reject(new Error(`${file.name}: the upload stalled (nothing sent for ${UPLOAD_STALLED_MS / 1000} s)`));
    request.send(form);
  });
}

// How long an upload the server answers 503 with Retry-After (it takes no more at once, or its
// database or broker is briefly away; nothing was made) is offered again, as `stt submit` does.
const UPLOAD_BUSY_WAIT_MS = 120_000;

// How many times a file whose answer was lost (the connection dropped, a proxy's 502 or 504) is
// sent again: with its Idempotency-Key, the server gives back the job an earlier send made, or
// makes it now.
const UPLOAD_ANSWER_LOST_RESENDS = 3;
const UPLOAD_ANSWER_LOST_WAIT_MS = 2_000;

// A send cut off before the file was all sent made nothing. The network may have dropped, or the
// server answered before reading the file and closed the connection (busy: 503; the file over
// MAX_UPLOAD_MB: 413), which a browser reports as a failed request, not as that answer. It is
// sent again as a busy server's file is, within UPLOAD_BUSY_WAIT_MS, after this long and twice as
// long each time after.
const UPLOAD_CUT_OFF_FIRST_WAIT_MS = 2_000;

async function uploadWaitingOutBusy(prepared, status) {
  const name = prepared.file.name;
  // From the first busy or cut-off answer, not the first send: that may come after a long upload.
  let giveUpAt = null;
  let resends = 0;
  let cutOffWaitMs = UPLOAD_CUT_OFF_FIRST_WAIT_MS;
  let maybeMade = false;
  for (;;) {
    let waitMs;
    try {
      return await upload(prepared);
    } catch (error) {
      maybeMade ||= Boolean(error.maybeMade);
      if (giveUpAt === null && (error.cutOff || error.status === 503)) giveUpAt = Date.now() + UPLOAD_BUSY_WAIT_MS;
      if (error.answerLost && resends < UPLOAD_ANSWER_LOST_RESENDS) {
        resends += 1;
        status.textContent = `${name}: no answer came; sending it again…`;
        waitMs = UPLOAD_ANSWER_LOST_WAIT_MS;
      } else if (error.cutOff && Date.now() + cutOffWaitMs <= giveUpAt) {
        status.textContent = `${name}: the connection was cut while sending it; sending it again in`
          + ` ${cutOffWaitMs / 1000} s…`;
        waitMs = cutOffWaitMs;
        cutOffWaitMs *= 2;
      } else if (error.status === 503 && error.retryAfter && Date.now() + error.retryAfter * 1000 <= giveUpAt) {
        status.textContent = `${name}: the server is busy; sending it again in ${error.retryAfter} s…`;
        waitMs = error.retryAfter * 1000;
      } else if (maybeMade) {
        // Whatever became of the sends after (refused, stalled, cut off): said refused, the file
        // would be sent again by hand, and its job made twice.
        throw new Error(`${name}: sent; the answer was lost: check the list before sending it again.`);
      } else if (error.cutOff) {
        throw new Error(`${name}: the upload failed: the connection was cut before the file was all sent, each`
          + " time. The server may be busy, or the file over its size limit (MAX_UPLOAD_MB); or the network is down.");
      } else {
        throw error;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, waitMs));
  }
}

// While files upload, "Transcribe" is off (a second click would send them again), the file choice
// is cleared as they are taken (files chosen meanwhile are sent with the next click), and once all
// are sent the bar goes away. Files dropped meanwhile wait their turn (one progress bar, one status
// line), with the options the form had when they were dropped, and the API key in use then:
// another key entered meanwhile (another user's) never makes their jobs.
let uploads = Promise.resolve();
function uploadAll(files) {
  if (!state.uploading) $("#upload-outcomes").replaceChildren();  // of the files sent before
  const owner = apiKey();
  const prepared = files.map((file) => ({ file, form: uploadForm(file), key: requestKey(), owner }));
  const openWhenSent = state.open;
  uploads = uploads.catch(() => { /* told on the page */ }).then(() => uploadBatch(prepared, openWhenSent));
  return uploads;
}

// Edits to the open transcript not saved yet: a name typed (or cleared) in a field, or a
// correction being written. Opening another transcript would lose them; those on their way to
// the server are saved all the same.
function unsavedEdits() {
  if (state.open === null) return false;
  const names = [...document.querySelectorAll("#names input")]
    .some((input) => input.value.trim() !== input.dataset.shown && input.value !== input.dataset.sent);
  return names || Boolean(document.querySelector("#segments form.correction:not([data-saving])"));
}

const DISCARD_EDITS = "Discard unsaved names and corrections?";

// Whether the user's click may open `jobId` in place of the open transcript: asked first when
// that would lose edits. The transcript open, clicked again, keeps its edits.
function mayOpen(jobId) {
  if (!unsavedEdits()) return true;
  return state.open !== jobId && confirm(DISCARD_EDITS);
}

// A job of files sent opens in place of the open transcript only while the user still looks at
// what they looked at when they sent them (or at a job an upload opened) and has nothing unsaved
// there: files uploading in the background must not take away the transcript the user turned to.
function uploadMayOpen(openWhenSent, jobsOfBatch) {
  if (state.open === null) return true;
  const chosenBeforeOrByUploads = state.open === openWhenSent || jobsOfBatch.has(state.open)
    || state.openedByUploads.has(state.open);
  return chosenBeforeOrByUploads && !unsavedEdits();
}

// What became of a file that made no job of the key in use (refused, or made under the key it
// was chosen with): kept, one line each, as the status line goes on to the next file.
function keepUploadOutcome(text) {
  const line = document.createElement("li");
  line.textContent = text;
  $("#upload-outcomes").appendChild(line);
}

async function uploadBatch(files, openWhenSent) {
  const status = $("#upload-status");
  const submit = $("#upload button[type=submit]");
  const jobsOfBatch = new Set();
  state.uploading += 1;
  submit.disabled = true;
  try {
    for (const item of files) {
      status.textContent = `Uploading ${item.file.name}…`;
      try {
        const accepted = await uploadWaitingOutBusy(item, status);
        if (item.owner !== apiKey()) {
          // Made under the key it was chosen with; the page shows another key's jobs now.
          status.textContent = `${accepted.filename} accepted as job ${accepted.id}, under the API key it was`
            + " chosen with (not the one entered since).";
          keepUploadOutcome(status.textContent);
          continue;
        }
        // A send again after a lost answer is answered with the job the first send made, which /events
        // may have told of already (ended, even): shown as it is, not set back to submitted.
        if (!state.jobs.has(accepted.id)) {
          renderJob({ id: accepted.id, filename: accepted.filename, status: "processing", stage: "submitted", percent: 0 });
        }
        if (uploadMayOpen(openWhenSent, jobsOfBatch)) {
          status.textContent = `${accepted.filename} accepted as job ${accepted.id}.`;
          state.openedByUploads.add(accepted.id);
          openTranscript(accepted.id);
        } else {
          status.textContent = `${accepted.filename} accepted as job ${accepted.id}: it is listed, not opened,`
            + (unsavedEdits() ? " as the open transcript has changes not saved." : " as another transcript is open.");
        }
        jobsOfBatch.add(accepted.id);
      } catch (error) {
        status.textContent = error.message;
        keepUploadOutcome(error.message);
      }
    }
  } finally {
    state.uploading -= 1;
    if (!state.uploading) {
      submit.disabled = false;
      $("#upload-progress").hidden = true;
    }
  }
}

// ---- one transcript -----------------------------------------------------------------------

function speakerIndex(label) {
  if (!state.speakers.includes(label)) state.speakers.push(label);
  return state.speakers.indexOf(label);
}

function speakerName(label) { return state.names[label] || label; }

// Shows a segment once, in time order. True when it brings a speaker or a name the page did not
// have (the name fields and the other segments' names need `refreshNames` then); work per segment
// stays the same however long the transcript, as a long meeting's segments arrive in a burst.
function renderSegment(segment) {
  const list = $("#segments");
  const key = `${segment.start_ts}:${segment.speaker}:${segment.text}`;
  if (state.shown.get(key)?.isConnected) return false;
  const news = !state.speakers.includes(segment.speaker)
    || (Boolean(segment.speaker_name) && state.names[segment.speaker] !== segment.speaker_name);
  if (segment.speaker_name) state.names[segment.speaker] = segment.speaker_name;
  const colour = COLOURS[speakerIndex(segment.speaker) % COLOURS.length];
  const item = document.createElement("li");
  item.dataset.key = key;
  item.dataset.start = segment.start_ts;
  item.dataset.segment = `${segment.chunk_index}:${segment.index}`;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "segment";
  button.dataset.speaker = segment.speaker;
  button.dataset.start = segment.start_ts;
  button.style.setProperty("--speaker", colour);
  button.style.setProperty("--speaker-text", colour);
  // Its name is what it shows, with words for a screen reader around it (visually hidden): "Play
  // from 00:04.0: Anna: …", the words Whisper was unsure of said to be (markWords). No aria-label:
  // that would be said in place of the content, and leave the unsure words unsaid.
  button.innerHTML = '<span class="visually-hidden">Play from </span>'
    + `<span class="time">${clock(segment.start_ts)}</span><span class="visually-hidden">: </span>`
    + '<span class="who" dir="auto"></span><span class="visually-hidden">: </span><span class="text" dir="auto"></span>';
  button.querySelector(".who").textContent = speakerName(segment.speaker);
  button.querySelector(".text").textContent = segment.text;
  // Screen readers and fonts follow the language of the text: the segment's own where the
  // recording switches language, else the transcript's (set on the list).
  if (segment.language && !state.translated) button.querySelector(".text").lang = segment.language;
  button.addEventListener("click", () => playFrom(segment.start_ts, button));
  item.appendChild(button);
  if (segment.chunk_index !== undefined && segment.chunk_index !== null) {
    const correct = document.createElement("button");
    correct.type = "button";
    correct.className = "correct";
    correct.textContent = "✎";
    correct.title = "Correct the words or the speaker";
    correct.setAttribute("aria-label", `Correct the segment at ${clock(segment.start_ts)}`);
    correct.addEventListener("click", () => openCorrection(item, segment));
    item.appendChild(correct);
  }
  const last = list.lastElementChild;
  const later = !last || Number(last.dataset.start) <= segment.start_ts ? null
    : [...list.children].find((other) => Number(other.dataset.start) > segment.start_ts);
  list.insertBefore(item, later);
  state.shown.set(key, item);
  return news;
}

// Words Whisper was unsure of (probability below this) are underlined once the job is done, so
// a reader knows which ones to check against the recording.
const UNSURE_BELOW = 0.5;

// The done job's whole document: its words' probabilities, and its options (the list and the
// events do not have them), which say whether the text was translated.
async function readDone(jobId) {
  let transcript;
  try {
    transcript = await (await api(`/transcripts/${jobId}?words=true`)).json();
  } catch (error) {
    forgottenIfGone(jobId, error);
    return;  // the transcript reads as it is, without marks
  }
  if (state.open !== jobId) return;
  if (transcript.options?.task === "translate") showTranslated();
  markUnsureWords(transcript.segments);
}

// Translated, the text is English whatever the job's (spoken) language or a segment's is.
function showTranslated() {
  state.translated = true;
  $("#segments").lang = "en";
  for (const text of document.querySelectorAll("#segments .segment .text[lang]")) text.removeAttribute("lang");
}

function markUnsureWords(segments) {
  const items = new Map([...document.querySelectorAll("#segments li")].map((item) => [item.dataset.segment, item]));
  let marked = 0;
  for (const segment of segments) {
    const text = items.get(`${segment.chunk_index}:${segment.index}`)?.querySelector(".segment .text");
    if (text && text.textContent === segment.text) marked += markWords(text, segment.words || []);
  }
  $("#unsure-hint").hidden = marked === 0;
}

// Wraps each unsure word of the element's text in a <mark>, finding the words in order; the
// text itself is unchanged. Returns how many were marked.
function markWords(element, words) {
  const text = element.textContent;
  const pieces = [];
  let cursor = 0;
  for (const word of words) {
    const at = word.word ? text.indexOf(word.word, cursor) : -1;
    if (at < 0) continue;
    const end = at + word.word.length;
    if (typeof word.probability === "number" && word.probability < UNSURE_BELOW) {
      pieces.push(text.slice(cursor, at));
      const mark = document.createElement("mark");
      mark.className = "unsure";
      mark.textContent = word.word;
      mark.title = `Unsure (${Math.round(word.probability * 100)}%): check it against the recording`;
      pieces.push(mark);
    } else {
      pieces.push(text.slice(cursor, end));
    }
    cursor = end;
  }
  const marked = pieces.filter((piece) => typeof piece !== "string").length;
  if (marked) element.replaceChildren(...pieces, text.slice(cursor));
  return marked;
}

// A segment corrected by hand (PATCH /transcripts/{id}/segments/{chunk}/{index}): its words, or
// who said them (one of the speakers, or a new one). One save of a segment at a time, also from a
// form opened again after Cancel: the server embeds the words before it answers (up to 15 s). The
// answer replaces the segment's row as it is then, less a form written in meanwhile, which stays.
function openCorrection(item, segment) {
  if (item.querySelector("form")) return;
  const jobId = state.open;
  const where = `${segment.chunk_index}:${segment.index}`;
  const saving = `${jobId}/${where}`;
  const row = () => document.querySelector(`#segments li[data-segment="${where}"]`);
  const form = document.createElement("form");
  form.className = "correction";
  form.setAttribute("aria-label", `Correct the segment at ${clock(segment.start_ts)}`);
  const labels = [...new Set([...state.speakers, segment.speaker])];
  // Past every label the job has: those with segments on the page, and those the diarizer found
  // that have none (their turns, in the speaking times).
  const taken = [...labels, ...Object.keys(state.talk)];
  const fresh = `spk_${Math.max(-1, ...taken.map((l) => Number(l.split("_")[1]) || 0)) + 1}`;
  const wait = `words-wait-${++state.correctionForms}`;
  form.innerHTML = '<label>Speaker <select name="speaker"></select></label>'
    + `<label>Words <textarea name="text" rows="2" dir="auto" aria-describedby="${wait}"></textarea></label>`
    + '<button type="submit">Save correction</button><button type="button" class="cancel">Cancel</button>'
    + `<p class="redacting hint" id="${wait}" hidden>${WORDS_WAIT}</p>`;
  const select = form.querySelector("select");
  for (const label of [...labels, fresh]) {
    const option = document.createElement("option");
    option.value = label;
    option.textContent = label === fresh ? `${fresh} (someone else)` : speakerName(label);
    option.selected = label === segment.speaker;
    select.appendChild(option);
  }
  const textarea = form.querySelector("textarea");
  textarea.value = segment.text;
  const submit = form.querySelector("button[type=submit]");
  submit.disabled = state.saving.has(saving);
  showRedactingIn(form);
  const close = () => {
    form.remove();
    row()?.querySelector(".correct")?.focus();
  };
  form.querySelector(".cancel").addEventListener("click", close);
  form.addEventListener("keydown", (event) => {
    if (event.key === "Escape") { event.preventDefault(); close(); }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (submit.disabled) return;
    // Only what differs from the segment as shown now: words sent unchanged are embedded again.
    const shown = row().querySelector(".segment");
    const changes = {};
    if (textarea.value.trim().split(/\s+/).join(" ") !== shown.querySelector(".text").textContent) changes.text = textarea.value;
    if (select.value !== shown.dataset.speaker) changes.speaker = select.value;
    if (!Object.keys(changes).length) { close(); return; }
    const sent = [textarea.value, select.value];
    state.saving.add(saving);
    submit.disabled = true;
    form.dataset.saving = "true";
    try {
      const corrected = await (await api(`/transcripts/${jobId}/segments/${segment.chunk_index}/${segment.index}`, {
        method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify(changes),
      })).json();
      if (state.open !== jobId) return;
      const before = row();
      const written = textarea.value !== sent[0] || select.value !== sent[1];
      const kept = [...(before?.querySelectorAll("form.correction") || [])].find((other) => other !== form || written);
      // The focus on the row, in the form saved or lost (a button turned off) goes to the
      // corrected segment; in a form kept, it stays.
      const focused = document.activeElement;
      const focusHere = focused === document.body || form.contains(focused) || Boolean(before?.contains(focused));
      before?.remove();
      renderSegment(corrected);
      const after = row();
      if (kept) after.appendChild(kept);
      if (kept?.contains(focused)) focused.focus();
      else if (focusHere) after.querySelector(".segment").focus();
      refreshNames();
      sayInStatusLine("Correction saved.");
    } catch (error) {
      if (await forgottenIfGone(jobId, error)) return;
      if (state.open === jobId) sayInStatusLine(`Not corrected: ${refusal(jobId, error)}`);
    } finally {
      state.saving.delete(saving);
      submit.disabled = false;
      delete form.dataset.saving;
      const waiting = state.open === jobId ? row()?.querySelector("form.correction button[type=submit]") : null;
      if (waiting) waiting.disabled = false;
    }
  });
  item.appendChild(form);
  (textarea.disabled ? select : textarea).focus();
}

// The name fields, one per speaker, updated in place and new speakers appended. Each field keeps
// what it was last filled with (dataset.shown): one still showing that follows the names as they
// come, one typed in keeps its text (and its focus) until saved.
function refreshNames() {
  for (const button of document.querySelectorAll("#segments .segment")) {
    button.querySelector(".who").textContent = speakerName(button.dataset.speaker);
  }
  const form = $("#names");
  if (!state.speakers.length) { form.replaceChildren(); return; }
  let save = form.querySelector(".save");
  if (!save) {
    save = document.createElement("button");
    save.type = "submit";
    save.className = "save";
    save.textContent = "Save names";
    form.appendChild(save);
  }
  state.speakers.forEach((label, index) => {
    const id = `name-${label}`;
    let input = form.querySelector(`#${CSS.escape(id)}`);
    if (!input) {
      const field = document.createElement("span");
      const caption = document.createElement("label");
      caption.htmlFor = id;
      input = document.createElement("input");
      input.id = id;
      input.dataset.label = label;
      input.placeholder = "name";
      input.dir = "auto";  // a name in Arabic or Hebrew is written right to left
      input.value = input.dataset.shown = state.names[label] ?? "";
      field.append(caption, " ", input);
      form.insertBefore(field, save);
    } else if (input.value === input.dataset.shown) {
      input.value = input.dataset.shown = state.names[label] ?? "";
    }
    const caption = input.parentElement.querySelector("label");
    const talk = state.talk[label];
    caption.textContent = talk === undefined ? label
      : `${label} (talks ${clock(talk.speech_s)}, ${Math.round(talk.share * 100)}%, ${talk.words} words)`;
    caption.style.color = COLOURS[index % COLOURS.length];
  });
  if ($("#transcript").dataset.status !== "done" || form.querySelector(".remember")) return;
  const remember = document.createElement("button");
  remember.type = "button";
  remember.className = "remember";
  remember.textContent = "Remember voices";
  remember.title = "Save the names, and recognise these voices in new recordings";
  remember.addEventListener("click", rememberVoices);
  form.appendChild(remember);
}

// Returns false when the names could not be saved (the reason is shown).
async function saveNames(event) {
  if (event) event.preventDefault();
  const jobId = state.open;
  const changes = {};
  const sent = [];
  // Only the fields typed in: a name that came after its field was made (a voice recognised
  // meanwhile) is no change, and sent as an empty field it would be taken back for good.
  for (const input of document.querySelectorAll("#names input")) {
    const name = input.value.trim();
    if (name === input.dataset.shown) continue;
    changes[input.dataset.label] = name || null;
    sent.push([input, input.value]);
  }
  if (!Object.keys(changes).length) return true;
  // Such a name would be saved, but never remembered as a voice (a comma separates the names of
  // the people expected in a recording).
  const withComma = Object.values(changes).find((name) => name && name.includes(","));
  if (withComma) {
    sayInStatusLine(`Not saved: a name cannot hold a comma ("${withComma}"): commas`
      + " separate the names of the people expected in a recording.");
    return false;
  }
  state.namesAsked += 1;  // names asked for before are older than the answer to these
  for (const [input, value] of sent) input.dataset.sent = value;
  try {
    const answer = await (await api(`/transcripts/${jobId}/speakers`, {
      method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify(changes),
    })).json();
    if (state.open !== jobId) return true;
    // A names read started before this answer may have been read on the server before these
    // names were saved: its answer, however late, is older than this one.
    state.namesAsked += 1;
    // A field typed in again while the names were on their way stays a change.
    for (const [input, value] of sent) if (input.value === value) input.dataset.shown = value;
    state.names = Object.fromEntries(Object.entries(answer.speakers).filter(([, name]) => name));
    refreshNames();
    sayInStatusLine("Names saved.");
    return true;
  } catch (error) {
    if (await forgottenIfGone(jobId, error)) return false;
    if (state.open === jobId) sayInStatusLine(error.message);
    return false;
  } finally {
    for (const [input] of sent) delete input.dataset.sent;
  }
}

// Each speaker of the open transcript named by hand becomes a voiceprint of that person (POST
// /speakers). Names recognition gave are left out: a voice it got wrong would become a voiceprint
// of the wrong person, and one it got right is known already.
// The `extra.code` of POST /speakers' 409 that `force` overrides: the voice sounds like someone
// already remembered (speakers.py), not the 409 of a voice remembered already.
const SOUNDS_LIKE_ANOTHER = "sounds_like_another";

async function rememberVoices() {
  const jobId = state.open;  // the transcript whose voices these are, whatever is opened meanwhile
  // Said under that transcript only: not under another opened meanwhile.
  const say = (text) => { if (state.open === jobId) sayInStatusLine(text); };
  if (!(await saveNames(null))) return;
  let named;
  try {
    const speakers = (await (await api(`/transcripts/${jobId}/speakers`)).json()).speakers;
    named = Object.entries(speakers).filter(([, s]) => s.name && s.source === "manual").map(([label, s]) => [label, s.name]);
  } catch (error) {
    if (!(await forgottenIfGone(jobId, error))) say(`Not remembered: ${error.message}`);
    return;
  }
  if (!named.length) {
    say("Name a speaker first: only names given here are remembered (recognised voices are known already).");
    return;
  }
  const said = [];
  const enrol = (name, label, force) => api("/speakers", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name, transcript_id: jobId, label, force }),
  });
  for (const [label, name] of named) {
    try {
      try {
        await enrol(name, label, false);
      } catch (error) {
        // The voice sounds like another person remembered: the user may know better.
        if (error.code !== SOUNDS_LIKE_ANOTHER || !confirm(`${name}: ${error.message}\n\nRemember anyway?`)) throw error;
        await enrol(name, label, true);
      }
      said.push(`${name}'s voice remembered.`);
    } catch (error) {
      if (await forgottenIfGone(jobId, error)) return;
      said.push(`${name}: ${error.message}`);
    }
  }
  say(said.join(" "));
  loadPeople();
}

// ---- known voices -------------------------------------------------------------------------

// A list that could not be had (the database restarting, the network down) is said so in its
// place and asked for again every 5 s; a key refused is said by api(): a new key loads again.
async function loadPeople() {
  const key = apiKey();
  clearTimeout(state.peopleRetry);
  const list = $("#people");
  let people;
  try {
    people = (await (await api("/speakers")).json()).items;
  } catch (error) {
    if (apiKey() !== key || error.status === 401 || error.status === 403) return;
    list.innerHTML = "";
    const problem = document.createElement("li");
    problem.className = "problem";
    problem.textContent = `The known voices could not be listed (${error.message}): trying again.`;
    list.appendChild(problem);
    state.peopleRetry = setTimeout(loadPeople, 5000);
    return;
  }
  if (apiKey() !== key) return;  // answered for the key before
  list.innerHTML = "";
  if (!people.length) list.innerHTML = '<li class="hint">None yet.</li>';
  for (const person of people) {
    const item = document.createElement("li");
    item.dataset.speaker = person.id;
    item.innerHTML = '<span class="name"></span> <span class="hint"></span> <button type="button" class="link"></button>';
    item.querySelector(".name").textContent = person.name;
    item.querySelector(".name").dir = "auto";
    const count = person.voiceprint_count;
    item.querySelector(".hint").textContent = `${count} voiceprint${count === 1 ? "" : "s"}`;
    const forget = item.querySelector("button");
    forget.textContent = "Forget";
    forget.setAttribute("aria-label", `Forget ${person.name}`);
    forget.addEventListener("click", () => forgetPerson(person));
    list.appendChild(item);
  }
  showExpectedChoices(people);
}

// The upload form's "Who may be in it": a box per known person (names only those ticked).
function showExpectedChoices(people) {
  const choices = $("#expected-people");
  const ticked = new Set([...choices.querySelectorAll("input:checked")].map((box) => box.value));
  choices.innerHTML = "";
  for (const person of people) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = person.name;
    box.checked = ticked.has(person.name);
    label.append(box, ` ${person.name}`);
    choices.appendChild(label);
  }
  $("#expected").hidden = !people.length;
}

async function forgetPerson(person) {
  if (!confirm(`Forget ${person.name}: their voiceprints, and every name recognition gave from them?`
      + " (Names given by hand stay.)")) return;
  try {
    await api(`/speakers/${person.id}`, { method: "DELETE" });
  } catch (error) {
    // The server commits the forgetting before re-matching the recordings (its sweep finishes
    // that), so a 5xx or a lost connection may come after it happened: a privacy request is never
    // said not to have happened when it may have. A 404: forgotten already.
    if (error.status !== undefined && error.status !== 404 && error.status < 500) {
      notice(`${person.name} was not forgotten: ${error.message}`);
      return;
    }
    if (error.status !== 404) notice(`${person.name} may have been forgotten (${error.message})`);
  }
  if (state.open !== null) reloadNames(state.open);  // names recognised from that voice are gone
  await loadPeople();
  // Its Forget button is gone with the list made anew: the focus goes to the list's heading.
  if (focusLost()) $("#people-title").focus();
}

// The open transcript's names as the server has them now, in the fields not typed in: opened
// anew, it would lose the names being typed and a correction being written.
async function reloadNames(jobId) {
  const asked = ++state.namesAsked;
  let speakers;
  try {
    speakers = (await (await api(`/transcripts/${jobId}/speakers`)).json()).speakers;
  } catch (error) {
    if (await forgottenIfGone(jobId, error)) return;
    if (state.open === jobId) sayInStatusLine(`The names could not be reloaded: ${error.message}`);
    return;
  }
  if (state.open !== jobId || asked !== state.namesAsked) return;  // another transcript, or names newer than these
  state.names = namesOf(speakers);
  refreshNames();
}

// GET /transcripts/{id}/speakers' speakers as state.names: label -> name, of those named.
function namesOf(speakers) {
  return Object.fromEntries(Object.entries(speakers).filter(([, s]) => s.name).map(([label, s]) => [label, s.name]));
}

// What an action on the open transcript came to (names saved, a stop refused...), or why it is
// no longer followed: said in the status line until the user acts again or the job's status
// changes (it ends), as the job's live progress does not write over it (the progress line and
// the list's row show that). Written even when the words are the same: an action done again is
// said again.
function sayInStatusLine(text) {
  $("#transcript-status").textContent = text;
  state.said = { job: state.open, status: $("#transcript").dataset.status };
}

// The open job's progress, as its events or the list's tell: in the progress line (not a live
// region: a screen reader is not told each percent), and its status in the status line (a live
// region: told as it changes), but over what an action came to while the job's status is the same.
function showProgress(job) {
  progressLine(job);
  const said = state.said;
  if (said && said.job === job.id && said.status === job.status) {
    $("#transcript").dataset.status = job.status;
    return;
  }
  showStatus(job);
}

function showStatus(job) {
  state.said = null;
  progressLine(job);
  const status = $("#transcript-status");
  if (job.status === "processing") setText(status, "Processing…");
  else if ((job.error || job.reason) === "cancelled") setText(status, "Stopped: the transcript ends where it was.");
  else if (job.status === "error") setText(status, `Failed: ${job.error || job.reason || "see the job's status"}`);
  // Ended with no segment at all: said, rather than a bare "Done." over an empty list.
  else if ($("#transcript").dataset.ended === "true" && !$("#segments").children.length) {
    setText(status, "Done: nobody talks in this recording.");
  } else setText(status, "Done.");
  $("#transcript").dataset.status = job.status;
}

// Where a job still processing is (its stage and percent), as its row in the list says it.
function progressLine(job) {
  const line = $("#transcript-progress");
  const processing = job.status === "processing";
  line.textContent = processing ? `${job.stage}: ${job.percent ?? 0}%` : "";
  line.hidden = !processing;
}

// meeting.mp3 -> meeting.json, as the server names the other formats (download_name): only an
// extension is replaced ("Dr. Smith interview" keeps its whole name).
function downloadName(jobId, format) {
  const filename = (state.jobs.get(jobId) || {}).filename || "transcript";
  const dot = filename.lastIndexOf(".");
  const own = dot > 0 ? filename.slice(dot + 1) : null;
  const isExtension = own !== null && (own === "" || /^(?=[0-9]*[A-Za-z])[A-Za-z0-9]{1,5}$/.test(own));
  return `${isExtension ? filename.slice(0, dot) : filename}.${format}`;
}

// The exact name (filename*=UTF-8''…, any language) before the ASCII stand-in (filename="…").
function dispositionName(disposition) {
  const exact = disposition.match(/filename\*=UTF-8''([^;\s]+)/i);
  if (exact) {
    try { return decodeURIComponent(exact[1]); } catch (error) { /* malformed: the stand-in */ }
  }
  return (disposition.match(/filename="([^"]+)"/) || [])[1];
}

// `ended`: "done" (every format), "failed" (JSON: the segments a stopped or failed job kept, and
// its reason), or null while it runs (none).
function renderDownloads(jobId, ended) {
  const nav = $("#downloads");
  nav.innerHTML = "";
  if (!ended) return;
  for (const format of ended === "done" ? ["json", "srt", "vtt", "txt", "rttm"] : ["json"]) {
    const link = document.createElement("a");
    link.href = `/transcripts/${jobId}?format=${format}`;
    link.textContent = `Download ${format.toUpperCase()}`;
    // JSON comes with no Content-Disposition: named here as the server names the others.
    link.setAttribute("download", format === "json" ? downloadName(jobId, format) : "");
    if (apiKey()) {
      link.addEventListener("click", async (event) => {
        event.preventDefault();
        let response, blob;
        try {
          response = await api(link.href);
          blob = await response.blob();
        } catch (error) {
          if (await forgottenIfGone(jobId, error)) return;
          if (state.open === jobId) sayInStatusLine(`Not downloaded: ${error.message}`);
          return;
        }
        const disposition = response.headers.get("content-disposition") || "";
        const name = dispositionName(disposition) || downloadName(jobId, format);
        const url = URL.createObjectURL(blob);
        const save = document.createElement("a");
        save.href = url;
        save.download = name;
        save.click();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      });
    }
    nav.appendChild(link);
  }
}

function renderDelete(jobId, ended) {
  const button = $("#delete");
  setShown(button, ended);
  button.onclick = async () => {
    const job = state.jobs.get(jobId) || {};
    if (!confirm(`Delete ${job.filename || `job ${jobId}`}: its transcript, speaker voices and audio?`)) return;
    try {
      await api(`/transcripts/${jobId}`, { method: "DELETE" });
    } catch (error) {
      if (error.status === 404) forgetJob(jobId, { elsewhere: true });  // deleted meanwhile
      else if (state.open === jobId) sayInStatusLine(`Not deleted: ${error.message}`);
      return;
    }
    forgetJob(jobId);
    // The transcript is closed: the list of recordings is where the user goes on.
    if (focusLost()) $("#jobs-title").focus();
  };
}

// A 404 from one of the job's own calls (its recording, names, corrections, downloads): the job
// may have been deleted elsewhere (the CLI, retention) with nothing telling the page, as /events
// tells only of the jobs of the last hour; or only what was asked for is gone (a recording no
// longer stored, a segment). The job itself is asked for: gone, it leaves the page as a deletion
// /events tells of does. True when it is gone.
async function forgottenIfGone(jobId, error) {
  if (error?.status !== 404) return false;
  if (state.deleted.has(jobId)) return true;
  try {
    await api(`/status/${jobId}?segments=false`);
    return false;  // there: what was asked for is what is gone
  } catch (other) {
    if (other.status !== 404) return false;  // not known: the first answer is said as it is
  }
  forgetJob(jobId, { elsewhere: true });
  return true;
}

// A deleted job leaves the page: its row, and its transcript if open. Deleted here (the button
// above), the transcript closes; deleted elsewhere (another tab, the CLI, retention), the
// transcript stays readable and says so, with nothing left to do with it.
function forgetJob(jobId, { elsewhere = false } = {}) {
  state.deleted.add(jobId);
  state.jobs.delete(jobId);
  const item = document.querySelector(`#jobs li[data-job="${jobId}"]`);
  if (item) item.remove();
  if (state.open !== jobId) return;
  closeTranscript();
  if (!elsewhere) return;
  const section = $("#transcript");
  section.hidden = false;
  section.dataset.status = "deleted";
  renderDownloads(jobId, null);
  renderCancel(jobId, true);
  renderDelete(jobId, false);
  renderRerun(jobId, false);
  $("#transcript-progress").hidden = true;
  $("#transcript-status").textContent = "This recording was deleted (in another tab, from the command line,"
    + " or by the retention settings): its transcript, speaker voices and audio are gone from the server.";
}

// A job still processing can be stopped (POST /transcripts/{id}/cancel); what it has stored stays.
function renderCancel(jobId, ended) {
  const button = $("#cancel");
  setShown(button, !ended);
  button.onclick = async () => {
    const job = state.jobs.get(jobId) || {};
    if (!confirm(`Stop processing ${job.filename || `job ${jobId}`}? What is transcribed so far is kept.`)) return;
    try {
      const stopped = await (await api(`/transcripts/${jobId}/cancel`, { method: "POST" })).json();
      if (state.open === jobId) {
        showStatus(stopped);
        renderCancel(jobId, true);  // stopped: the focus goes to the transcript's title
      }
    } catch (error) {
      if (await forgottenIfGone(jobId, error)) return;
      if (state.open === jobId) sayInStatusLine(`Not stopped: ${error.message}`);
    }
  };
}

// The recording again as a new job (POST /transcripts/{id}/rerun), with the speaker count given
// (blank: found automatically) and the first job's other options; the new job opens.
function renderRerun(jobId, ended) {
  const form = $("#rerun");
  setShown(form, ended);
  showRedacting();
  // Off while the request is on its way (a double click would make two jobs), and one
  // Idempotency-Key per submission: sent again, the request gives back the same job.
  form.onsubmit = async (event) => {
    event.preventDefault();
    const submit = form.querySelector("button[type=submit]");
    if (submit.disabled) return;
    if (unsavedEdits() && !confirm(DISCARD_EDITS)) return;
    form.dataset.sending = "true";
    submit.disabled = true;
    const speakers = $("#rerun-speakers").value;
    const key = apiKey();
    try {
      const accepted = await (await api(`/transcripts/${jobId}/rerun`, {
        method: "POST", headers: { "Content-Type": "application/json", "Idempotency-Key": requestKey() },
        // A count is of the voices in the mix: a recording kept one party per channel is mixed
        // for it (a count does not go with channels kept apart).
        body: JSON.stringify(speakers ? { num_speakers: Number(speakers), multichannel: false } : { num_speakers: null }),
      })).json();
      if (apiKey() !== key) return;  // another key's list is shown now: not this job's
      renderJob({ id: accepted.id, filename: accepted.filename, status: "processing", stage: "submitted", percent: 0 });
      if (state.open === jobId) {  // else listed: another was opened meanwhile
        openTranscript(accepted.id);
        // The button, turned off while the request was on its way, lost the focus: the new
        // job's title has it.
        if (focusLost()) $("#transcript-title").focus();
      }
    } catch (error) {
      if (await forgottenIfGone(jobId, error)) return;
      if (state.open === jobId) sayInStatusLine(`Not run again: ${refusal(jobId, error)}`);
    } finally {
      delete form.dataset.sending;
      showRedacting();
      // Refused: the focus the button lost as it was turned off is back on it (or, still off while
      // the recording is redacted, on the speaker count before it).
      if (state.open === jobId && !form.hidden && focusLost()) {
        (submit.disabled ? $("#rerun-speakers") : submit).focus();
      }
    }
  };
}

// ---- a done job's recording still being redacted ------------------------------------------

// Until ingest's job-end step has written the redacted copy of a done job's recording (seconds
// after it ends), the server refuses to run it again or to correct its words (409), and answers
// 503 "being redacted" for the recording. No event tells when that is over: the page learns it
// from the recording, which it asks for again after each such 503 (fillPlayer) and only then.
const WORDS_WAIT = "The recording is being redacted; try again in a moment to correct the words"
  + " (the speaker can be corrected now).";

function beingRedacted(error) {
  return error?.status === 503 && /being redacted/.test(error.detail || "");
}

// What the server said of the job's recording: being redacted, or not (served, or refused for
// another reason). Run again and the words of the correction forms follow.
function markRedacting(jobId, redacting) {
  if (redacting) state.redacting = jobId;
  else if (state.redacting === jobId) state.redacting = null;
  showRedacting();
}

// Run again, and the words of the correction forms open, off with the reason while the open
// job's recording is being redacted; on again once it is (a speaker can be corrected meanwhile).
function openRecordingRedacting() {
  return state.open !== null && state.redacting === state.open;
}

function showRedacting() {
  const redacting = openRecordingRedacting();
  const form = $("#rerun");
  form.querySelector("button[type=submit]").disabled = redacting || form.dataset.sending === "true";
  $("#rerun-wait").hidden = !redacting;
  for (const correction of document.querySelectorAll("#segments form.correction")) showRedactingIn(correction);
}

function showRedactingIn(correction) {
  const redacting = openRecordingRedacting();
  correction.querySelector("textarea").disabled = redacting;
  correction.querySelector(".redacting").hidden = !redacting;
}

// What to say of a refused request: a 409's reason as the server words it (the job still
// processing, its recording being redacted...). One for the redaction, asked before the page had
// heard of it (just as the job ended), turns the controls off, and the recording is looked at
// again: once it is redacted they are on again.
function refusal(jobId, error) {
  if (error.status !== 409) return error.message;
  if (/redact/.test(error.detail || "") && state.open === jobId) {
    markRedacting(jobId, true);
    recordingEnded(jobId);
  }
  return error.detail;
}

// A fresh Idempotency-Key (randomUUID exists only on https and localhost pages).
function requestKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return [...crypto.getRandomValues(new Uint8Array(16))].map((byte) => byte.toString(16).padStart(2, "0")).join("");
}

function closeTranscript() {
  if (state.stream) state.stream.stop();
  state.open = null;
  stopAudio();
  $("#transcript").hidden = true;
}

// The player stops and empties (else it plays on what it had), a fetch of a recording still on
// its way is dropped, and so is a seek waiting for it.
function stopAudio() {
  const player = $("#player");
  state.audioLoads += 1;
  state.pendingSeek = null;
  state.pendingPaused = false;
  state.audioTag = null;
  player.removeAttribute("src");
  player.load();
  if (state.audioUrl) { URL.revokeObjectURL(state.audioUrl); state.audioUrl = null; }
}

// Why the recording does not play (under the player; the transcript reads on); "" hides it.
function audioProblem(text) {
  const line = $("#audio-status");
  setText(line, text);
  line.hidden = !text;
}

// The recording will not play, whatever is asked again: the server's reason in place of the
// player. A 409: a job that asked for redaction and was stopped or failed before its recording
// was redacted (only a job that ends done has it redacted), whose upload is never served.
function recordingRefused(error) {
  const player = $("#player");
  player.removeAttribute("src");
  const reason = error.detail || error.message;
  if (error.status === 409) {
    player.hidden = true;
    audioProblem(reason.charAt(0).toUpperCase() + reason.slice(1));
  } else {
    audioProblem(`The recording could not be loaded: ${reason}`);
  }
}

// A 503 (the recording of a job just done still being redacted, the object store busy) passes:
// the recording is asked for again after the answer's Retry-After (else 5 s) for as long as the
// transcript is open. The first few times nothing is said; then why it does not play yet, and it
// is asked for less often (half as long again each time, up to a minute): a redaction that keeps
// failing answers 503 until it is done.
const AUDIO_QUIET_RETRIES = 6;
const AUDIO_RETRY_MAX_MS = 60_000;

function retryDelayMs(retryAfter) {
  const seconds = Number(retryAfter);
  let ms = retryAfter && Number.isFinite(seconds) ? seconds * 1000 : Date.parse(retryAfter || "") - Date.now();
  if (!Number.isFinite(ms)) ms = 5000;
  return Math.min(60_000, Math.max(1000, ms));
}

// One more try after the 503 `error`: how long to wait for it.
function audioRetryDelayMs(error) {
  state.audioRetries += 1;
  const beyond = state.audioRetries - AUDIO_QUIET_RETRIES;
  if (beyond > 0) {
    audioProblem(/being redacted/.test(error.detail || "")
      ? "The recording is still being redacted: it plays once that is done (asking again)."
      : `The recording is not available yet (${error.detail || error.message}): asking again.`);
  }
  return Math.min(AUDIO_RETRY_MAX_MS, retryDelayMs(error.retryAfter) * 1.5 ** Math.max(0, beyond));
}

// The recording's address for the audio element: one per version of the recording (its ETag).
// The browser keeps what it read from an address and reads on from there (Chromium's media
// cache), and the recording may have been replaced by its redacted copy since (a job played while
// it ran): the two must not mix. The same version is the same address, so the browser checks its
// own copy (If-None-Match: 304) instead of reading it all again. Without an ETag, an address of
// its own at each load.
const PAGE_OPENED = Date.now().toString(36);
function audioAddress(jobId, tag) {
  const version = tag.replace(/^W\//, "").replaceAll('"', "") || `load-${PAGE_OPENED}.${state.audioLoads}`;
  return `/transcripts/${jobId}/audio?v=${encodeURIComponent(version)}`;
}

// The version of the job's recording stored now: the ETag of its first byte (Range: bytes=0-0),
// asked of the server, not of the browser's copy. Throws as api() does (503 while it is being
// redacted, 410 once removed...).
async function recordingVersion(jobId) {
  const answer = await api(`/transcripts/${jobId}/audio`, { headers: { Range: "bytes=0-0" }, cache: "no-store" });
  await answer.arrayBuffer().catch(() => { /* a byte broken off: the ETag is what is asked for */ });
  return answer.headers.get("ETag") || "";
}

function jobEnded(jobId) {
  const status = state.jobs.get(jobId)?.status;
  return status === "done" || status === "error"
    || (state.open === jobId && $("#transcript").dataset.ended === "true");
}

// The recording of the open job. One still running is looked at again when it ends
// (recordingEnded), as it may be redacted then (what the job asked for, or the transcriber's
// REDACT). While a job that asked for redaction runs, what is stored is the upload with what will
// be hidden audible: it is not played (the server serves it to its owner; the page waits for the
// redacted copy), nor is a running job's whose options could not be read (a 503, the network):
// it may be one. Loaded `again`, a seek waiting for it still waits, and what was playing goes on
// from where it was; what was paused stays paused there.
async function loadAudio(jobId, { again = false } = {}) {
  const player = $("#player");
  let [seek, paused] = [null, false];
  if (again && state.pendingSeek !== null) {
    [seek, paused] = [state.pendingSeek, state.pendingPaused];
  } else if (again && player.getAttribute("src") && (!player.paused || player.currentTime > 0)) {
    [seek, paused] = [player.currentTime, player.paused];
  }
  audioProblem("");
  stopAudio();
  player.hidden = false;
  state.pendingSeek = seek;
  state.pendingPaused = paused;
  const load = state.audioLoads;
  const current = () => state.open === jobId && state.audioLoads === load;  // not another job, nor this one again
  state.audioRetries = 0;
  state.audioAgainAtEnd = null;
  if (!jobEnded(jobId)) {
    state.audioAgainAtEnd = jobId;
    let job = null;
    try {
      job = await (await api(`/transcripts/${jobId}`)).json();
    } catch (error) {  // whether it asked for redaction is not known: played once it has ended
      if (await forgottenIfGone(jobId, error)) return;
    }
    if (!current()) return;
    if (job && job.status !== "processing") {
      state.audioAgainAtEnd = null;  // ended meanwhile: its recording is the one to play
    } else if (!job) {
      audioProblem("The recording plays once the transcript is done: whether anything in it is to be made"
        + " silent first could not be read.");
      return;
    } else if (job.options?.redact?.length) {
      audioProblem("The recording plays once the transcript is done: what is hidden in it is made silent first.");
      return;
    }
  }
  fillPlayer(jobId, current);
}

// The job's recording into the player, as long as current(): fetched with the key (an audio
// element cannot send it), or streamed by the element, seeking by Range requests, at the address
// of the version stored now. A 503 is asked again after its wait.
async function fillPlayer(jobId, current) {
  const player = $("#player");
  const streamed = !apiKey();
  for (;;) {
    try {
      if (streamed) {
        const tag = await recordingVersion(jobId);
        if (!current()) return;
        markRedacting(jobId, false);
        state.audioTag = tag;
        player.src = audioAddress(jobId, tag);
        return;
      }
      const answer = await api(`/transcripts/${jobId}/audio`);
      if (current()) markRedacting(jobId, false);
      const blob = await answer.blob();
      if (!current()) return;
      if (state.audioUrl) URL.revokeObjectURL(state.audioUrl);
      state.audioTag = answer.headers.get("ETag") || "";
      state.audioUrl = URL.createObjectURL(blob);
      player.src = state.audioUrl;
      return;
    } catch (error) {
      if (!current()) return;
      if (error.status === 503) {
        if (beingRedacted(error)) markRedacting(jobId, true);
        await new Promise((resolve) => setTimeout(resolve, audioRetryDelayMs(error)));
        if (!current()) return;
        continue;
      }
      if (await forgottenIfGone(jobId, error) || !current()) return;
      markRedacting(jobId, false);
      recordingRefused(error);
      return;
    }
  }
}

// The job has ended: its recording may have been replaced by its redacted copy, or be about to be
// (the server answers 503 until it is). It is loaded again (never the upload kept) unless the
// version stored is the one in the player: what plays, or is paused, then goes on undisturbed.
async function recordingEnded(jobId) {
  state.audioAgainAtEnd = null;
  const load = state.audioLoads;
  const loaded = state.audioTag;
  if (loaded) {
    let stored = null;
    try {
      stored = await recordingVersion(jobId);
    } catch (error) { /* a 503 (being redacted), or not known: loaded again, which says why */ }
    if (state.open !== jobId || state.audioLoads !== load) return;  // another job, or loaded again meanwhile
    if (stored === loaded) {
      markRedacting(jobId, false);
      return;
    }
  }
  loadAudio(jobId, { again: true });
}

// The audio element only says that it failed: the API says why (e.g. a 410, the recording
// removed after AUDIO_RETENTION_DAYS). A 503 is asked again after its wait, at the address of the
// version stored then (it may have been redacted meanwhile).
async function audioFailed() {
  const player = $("#player");
  const jobId = state.open;
  const load = state.audioLoads;
  if (jobId === null || !player.getAttribute("src")) return;
  const current = () => state.open === jobId && state.audioLoads === load;  // not another job, nor this one again
  let refused = null;
  if (!player.src.startsWith("blob:")) {
    try {
      await recordingVersion(jobId);
    } catch (error) {
      refused = error;
      if (error.status === 503 && current()) {
        if (beingRedacted(error)) markRedacting(jobId, true);
        setTimeout(() => { if (current()) fillPlayer(jobId, current); }, audioRetryDelayMs(error));
        return;
      }
      if (await forgottenIfGone(jobId, error)) return;
    }
  }
  if (!current()) return;
  if (refused) recordingRefused(refused);
  else audioProblem("The recording could not be loaded.");
}

// A seek asked for before the recording of the job just opened is there (fetched with the key)
// waits for it (seekWaiting): else it would play the previous job's recording.
function playFrom(seconds, button) {
  const player = $("#player");
  for (const other of document.querySelectorAll(".segment.playing")) other.classList.remove("playing");
  if (button) button.classList.add("playing");
  state.pendingPaused = false;
  if (!player.getAttribute("src") || player.readyState < HTMLMediaElement.HAVE_METADATA) {
    state.pendingSeek = seconds;
    // A browser that loads nothing until asked (preload ignored) would never tell it is there.
    if (player.getAttribute("src") && player.networkState === HTMLMediaElement.NETWORK_IDLE) player.load();
    return;
  }
  state.pendingSeek = null;
  player.currentTime = seconds;
  player.play().catch(() => { /* the browser may refuse to play without sound output */ });
}

// The recording is there: a seek waiting for it is made (and plays, but where it was paused when
// it was loaded again).
function seekWaiting() {
  if (state.pendingSeek === null) return;
  if (state.pendingPaused) {
    $("#player").currentTime = state.pendingSeek;
    state.pendingSeek = null;
    state.pendingPaused = false;
    return;
  }
  playFrom(state.pendingSeek, document.querySelector(".segment.playing"));
}

// How long each speaker talks (time, share of all talk, words), shown beside its name field; and
// the names as the server has them now: a segment.created event carries the name its speaker had
// when it was sent, and one given or taken back since (a voice enrolled in another tab, a later
// chunk matched again) is told by no event. Fields typed in keep their text (refreshNames).
async function loadSpeakingTime(jobId) {
  const asked = ++state.namesAsked;
  try {
    const answer = await (await api(`/transcripts/${jobId}/speakers`)).json();
    if (state.open !== jobId) return;
    state.talk = answer.speakers;
    if (asked === state.namesAsked) state.names = namesOf(answer.speakers);  // else names newer than these
    refreshNames();
  } catch (error) {
    forgottenIfGone(jobId, error);  // else the names work without it
  }
}

async function openTranscript(jobId) {
  if (state.stream) state.stream.stop();
  state.open = jobId;
  state.speakers = [];
  state.names = {};
  state.talk = {};
  state.shown = new Map();
  state.translated = false;
  state.redacting = null;
  const section = $("#transcript");
  section.hidden = false;
  section.dataset.job = jobId;
  delete section.dataset.ended;
  $("#segments").innerHTML = "";
  $("#names").innerHTML = "";
  $("#segments").lang = "";
  $("#unsure-hint").hidden = true;
  renderDownloads(jobId, null);
  renderDelete(jobId, false);
  renderRerun(jobId, false);
  $("#rerun-speakers").value = "";
  const job = state.jobs.get(jobId) || { id: jobId, filename: "", status: "processing", stage: "submitted", percent: 0 };
  renderCancel(jobId, job.status !== "processing");
  $("#transcript-title").textContent = job.filename || `Job ${jobId}`;
  if (job.language) $("#segments").lang = job.language;
  showStatus(job);
  for (const item of document.querySelectorAll("#jobs li")) renderJob(state.jobs.get(Number(item.dataset.job)));
  loadAudio(jobId);
  state.stream = follow(`/transcripts/${jobId}/events`, (type, data) => {
    if (state.open !== jobId) return;
    if (type === "transcript.deleted") {
      forgetJob(jobId, { elsewhere: true });
    } else if (type === "segment.created") {
      if (renderSegment(data)) refreshNames();
    } else if (type === "progress") {
      renderJob(data);
    } else if (type === "transcript.completed" || type === "transcript.failed") {
      if (data.language && !state.translated) $("#segments").lang = data.language;
      section.dataset.ended = "true";
      renderJob(data);
      showStatus(data);
      renderDownloads(jobId, type === "transcript.completed" ? "done" : "failed");
      renderCancel(jobId, true);
      renderDelete(jobId, true);
      renderRerun(jobId, true);
      refreshNames();
      // Ended, a running job's recording may have been replaced by its redacted copy (or be about
      // to be: the server answers 503 until it is): loaded again then, never the upload kept.
      if (state.audioAgainAtEnd === jobId) recordingEnded(jobId);
      // Names and speaking times as the job left them, a failed one's included.
      loadSpeakingTime(jobId);
      if (type === "transcript.completed") readDone(jobId);
    }
  }, {
    endId: "end",
    onGone: (status) => {
      if (state.open !== jobId) return;
      if (status === 404) forgetJob(jobId, { elsewhere: true });
      else sayInStatusLine(`Not followed: the server answered ${status}.`);
    },
  });
}

// ---- search -------------------------------------------------------------------------------

// The `extra.code` of GET /search's 503 when the query could not be embedded (search.py).
const EMBEDDING_UNAVAILABLE = "embedding_unavailable";

async function search(event) {
  event.preventDefault();
  const query = $("#query").value.trim();
  const list = $("#hits");
  list.innerHTML = "";
  state.searchMore = null;
  state.hitsShown = new Set();
  $("#more-hits").hidden = true;
  const asked = ++state.searches;
  if (!query) return;
  const key = apiKey();
  // What an earlier search answers after a later one was asked is not shown (nor its failure).
  const outdated = () => apiKey() !== key || state.searches !== asked;
  try {
    let path = `/search?limit=20&q=${encodeURIComponent(query)}`;
    let page;
    let wordsOnly = false;
    try {
      page = await (await api(path)).json();
    } catch (error) {
      // Search by meaning needs the embedding service; by words it still works without it. Other
      // 503s (the search ran over its time limit, the database is away) fail by words too.
      if (error.status !== 503 || error.code !== EMBEDDING_UNAVAILABLE || outdated()) throw error;
      path = `${path}&mode=text`;
      page = await (await api(path)).json();
      wordsOnly = true;
    }
    if (outdated()) return;
    if (wordsOnly) {
      const note = document.createElement("li");
      note.textContent = "Searched by words only: search by meaning is unavailable right now.";
      list.appendChild(note);
    }
    if (!page.items.length) list.insertAdjacentHTML("beforeend", "<li>Nothing found.</li>");
    showHits(page, path);
  } catch (error) {
    if (outdated()) return;
    list.innerHTML = "";
    const item = document.createElement("li");
    item.textContent = error.message;
    list.appendChild(item);
  }
}

// A page of hits at the end of the list; "More results" asks for the next one (its next_cursor,
// searched as the first page was: by words only, if it was) while there is one.
function showHits(page, path) {
  const list = $("#hits");
  for (const hit of page.items) {
    // Pages are cut from the ranking as it is when each is asked: a segment stored meanwhile moves
    // the others down, and one already shown would come again on the next page.
    const seen = `${hit.transcript_id} ${hit.start_ts} ${hit.speaker} ${hit.text}`;
    if (state.hitsShown.has(seen)) continue;
    state.hitsShown.add(seen);
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    // `highlighted` is HTML already: the text escaped, the matched words in <mark>. Each part in
    // the direction of its own words (a name or a passage in Arabic or Hebrew, right to left).
    const text = hit.highlighted || escapeHtml(hit.text);
    button.innerHTML = '<strong dir="auto"></strong> <span class="time">[' + clock(hit.start_ts) + ']</span>'
      + ` <em dir="auto"></em>: <span class="said" dir="auto">${text}</span>`;
    button.querySelector("strong").textContent = hit.filename;
    button.querySelector("em").textContent = hit.speaker_name || hit.speaker;
    button.addEventListener("click", async () => {
      if (state.open !== hit.transcript_id) {
        if (!mayOpen(hit.transcript_id)) return;
        await openTranscript(hit.transcript_id);
      }
      playFrom(hit.start_ts, null);
    });
    item.appendChild(button);
    list.appendChild(item);
  }
  const cursor = page.next_cursor ?? null;
  state.searchMore = cursor === null ? null : { path, cursor };
  $("#more-hits").hidden = cursor === null;
}

async function moreHits() {
  const more = $("#more-hits");
  const next = state.searchMore;
  if (!next || more.disabled) return;
  const key = apiKey();
  const asked = state.searches;
  const outdated = () => apiKey() !== key || state.searches !== asked;
  more.disabled = true;
  try {
    const page = await (await api(`${next.path}&cursor=${encodeURIComponent(next.cursor)}`)).json();
    if (outdated()) return;
    const shown = $("#hits").children.length;
    showHits(page, next.path);
    more.disabled = false;
    // The button, turned off meanwhile, lost the focus: it has it again while it is there; once
    // every hit is shown, the first new one has it.
    if (focusLost()) (more.hidden ? $("#hits").children[shown]?.querySelector("button") : more)?.focus();
  } catch (error) {
    if (outdated()) return;
    const item = document.createElement("li");
    item.className = "problem";
    item.textContent = `No more results could be had: ${error.message}`;
    $("#hits").appendChild(item);
  } finally {
    more.disabled = false;
    if (!more.hidden && focusLost()) more.focus();
  }
}

// ---- wiring -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  // One kept by a page before keys were checked: no request could carry it.
  if (keyProblem(apiKey())) sessionStorage.removeItem(KEY_STORAGE);
  $("#api-key").value = apiKey();
  // Another key, another user's data: nothing of the one before stays (its streams included).
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const field = $("#api-key");
    const key = field.value.trim();
    // A key no request can carry is refused here, said so; the key in use stays.
    const problem = keyProblem(key);
    field.setAttribute("aria-invalid", problem ? "true" : "false");
    if (problem) {
      notice(problem);
      field.focus();
      return;
    }
    notice("");
    sessionStorage.setItem(KEY_STORAGE, key);
    if (state.jobsStream) state.jobsStream.stop();
    state.jobsStream = null;
    clearTimeout(state.jobsRetry);
    closeTranscript();
    state.jobs.clear();
    state.jobEventAt.clear();
    state.openedByUploads.clear();
    state.deleted.clear();
    state.jobsCursor = null;
    state.jobsListed = false;
    $("#jobs").innerHTML = "";
    $("#more-jobs").hidden = true;
    $("#hits").innerHTML = "";
    state.searches += 1;  // an answer on its way is the key before's
    state.searchMore = null;
    $("#more-hits").hidden = true;
    $("#people").innerHTML = "";
    showExpectedChoices([]);
    loadJobs();
    loadPeople();
  });
  $("#more-jobs").addEventListener("click", loadMoreJobs);
  // Parties kept one per channel are not counted (the server refuses both): no count then.
  const countOnlyMixed = () => {
    const speakers = $("#speakers");
    speakers.disabled = $("#multichannel").checked;
    if (speakers.disabled) speakers.value = "";
  };
  $("#multichannel").addEventListener("change", countOnlyMixed);
  countOnlyMixed();  // a box the browser ticked again on reload
  $("#vocabulary").addEventListener("input", checkVocabulary);
  checkVocabulary();  // a list the browser filled in again on reload
  $("#upload").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.uploading) return;
    const files = [...$("#file").files];
    if (!files.length) { $("#upload-status").textContent = "Choose a file first."; return; }
    // Cleared as they are taken, not once they are sent: files chosen meanwhile are the next ones.
    $("#file").value = "";
    uploadAll(files);
  });
  // Files dropped anywhere on the page are uploaded (else the browser would leave the page to
  // open them); the drop box lights up while they are over it. Text dragged about is left alone.
  const drop = $("#drop");
  const carriesFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    drop.classList.toggle("over", drop.contains(event.target));
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  document.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    drop.classList.remove("over");
    const files = [...event.dataTransfer.files];
    // As "Transcribe" does: options the server would refuse are shown, nothing is sent.
    if (files.length && $("#upload").reportValidity()) uploadAll(files);
  });
  $("#names").addEventListener("submit", saveNames);
  $("#search").addEventListener("submit", search);
  $("#more-hits").addEventListener("click", moreHits);
  $("#player").addEventListener("error", audioFailed);
  $("#player").addEventListener("loadedmetadata", () => {
    audioProblem("");  // what said it did not play yet
    seekWaiting();
  });
  $("#player").addEventListener("timeupdate", () => {
    const now = $("#player").currentTime;
    let current = null;
    for (const button of document.querySelectorAll(".segment")) {
      if (Number(button.dataset.start) <= now) current = button;
    }
    for (const button of document.querySelectorAll(".segment.playing")) {
      if (button !== current) button.classList.remove("playing");
    }
    if (current) current.classList.add("playing");
  });
  loadJobs();
  loadPeople();
});
