"""Speaker turns as the diarizer gives them (they may overlap): where anyone talks."""

from __future__ import annotations

from common.messages import SpeakerTurn, TimeSpan


def speech_regions(turns: list[SpeakerTurn], bridge_s: float = 0.0) -> list[TimeSpan]:
    """The union of the turns, sorted, with gaps shorter than `bridge_s` closed. Turns that only
    touch (one ends where the next begins) stay apart when `bridge_s` is 0: nobody is cut off
    between them, so a chunk may end there."""
    regions: list[list[float]] = []
    for turn in sorted(turns, key=lambda t: t.start):
        if regions and turn.start - regions[-1][1] < bridge_s:
            regions[-1][1] = max(regions[-1][1], turn.end)
        else:
            regions.append([turn.start, turn.end])
    return [TimeSpan(start=start, end=end) for start, end in regions]
