"""The deploy files users run: valid against their schemas (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from common.settings import Settings
from tests.conftest import ROOT


def test_compose_file_is_valid_compose_spec():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema",
         "vendor.compose-spec", str(ROOT / "deploy" / "compose.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_a_target_per_service():
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "deploy" / "Dockerfile").read_text(), re.M))
    assert {"ingest", "diarizer", "transcriber", "transcriber-cpu", "embedder", "persister"} <= targets


def test_env_example_lists_every_setting():
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    settings = {name.upper() for name in Settings.model_fields}
    assert settings - listed == set()


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in readme]
    assert missing == []


def test_published_event_schema_matches_the_models():
    from common.messages import events_json_schema

    document = json.loads((ROOT / "docs" / "events.schema.json").read_text())
    assert document == events_json_schema(), "regenerate: python -m common.messages > docs/events.schema.json"
    assert set(document["routing_keys"]) == {"segment.created", "transcript.completed", "transcript.failed"}
