"""`stt`, the command-line client: submit recordings, follow jobs, fetch transcripts, watch events."""
