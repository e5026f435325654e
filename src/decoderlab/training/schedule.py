"""The learning-rate schedule as run state: its length in optimizer steps, frozen once and saved in every snapshot.

A run's schedule is one or more segments of steps. The first covers the run as asked: `--steps` and `--tokens`
fix its length up front; `--time` fixes it once the run has measured its own speed (see `Trainer`). A resumed run
continues the saved segments exactly, whatever budget flags it is given. Continuing past the end is explicit:
`extend` appends a segment over the extra budget whose warmup ramps from the LR the run ended at (not from 0)
back to the peak, then holds and decays as the run's schedule does (Ibrahim et al. 2024, "Simple and Scalable
Strategies to Continually Pre-train Large Language Models": re-warming and re-decaying recovers the loss a fresh
run would reach; starting the ramp at the final LR avoids the jump a restart at the peak makes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .optim import lr_factor


@dataclass
class Budget:
    """How much (more) to train: the first of these reached ends it."""

    steps: int | None = None
    tokens: int | None = None
    time: float | None = None  # seconds of training

    def given(self) -> bool:
        return any(v is not None for v in (self.steps, self.tokens, self.time))

    def steps_for(self, tokens_per_step: int, seconds_per_step: float | None) -> int | None:
        """The budget in steps, where it can be known: tokens round up (as a run by tokens stops), time needs a
        measured speed."""
        options = []
        if self.steps is not None:
            options.append(self.steps)
        if self.tokens is not None:
            options.append(math.ceil(self.tokens / tokens_per_step))
        if self.time is not None:
            if seconds_per_step is None:
                return None
            options.append(max(1, math.floor(self.time / max(seconds_per_step, 1e-9))))
        return min(options) if options else None


@dataclass
class Segment:
    start: int  # steps done when the segment begins
    end: int  # steps done when it ends (the run stops here unless extended)
    start_factor: float = 0.0  # the LR multiplier its warmup ramps up from

    def to_list(self) -> list[float]:
        return [self.start, self.end, self.start_factor]


class Schedule:
    """LR multiplier per step: `lr_factor` over each segment (warmup, then constant, cosine or warmup-stable-decay)."""

    def __init__(self, kind: str, warmup: float, decay: float, floor: float,
                 segments: list[Segment] | None = None) -> None:
        self.kind, self.warmup, self.decay, self.floor = kind, warmup, decay, floor
        self.segments: list[Segment] = list(segments or [])

    @property
    def frozen(self) -> bool:
        """Whether the run's length in steps is known (it is saved in snapshots from then on)."""
        return bool(self.segments)

    @property
    def end(self) -> int:
        return self.segments[-1].end

    def freeze(self, total_steps: int) -> None:
        self.segments = [Segment(0, max(0, int(total_steps)), 0.0)]

    def factor(self, step: int) -> float:
        """The multiplier for the optimizer step taken when `step` steps are done."""
        seg = next((s for s in reversed(self.segments) if s.start <= step), self.segments[0])
        progress = (step - seg.start) / max(1, seg.end - seg.start)
        return lr_factor(progress, self.warmup, self.kind, self.decay, self.floor, start=seg.start_factor)

    def extend(self, steps: int) -> Segment:
        """A new segment of `steps` after the end, its warmup ramping from the multiplier of the run's last step."""
        if steps < 1:
            raise UserError(f"--extend needs at least one more step, got {steps}")
        last = self.factor(self.end - 1) if self.end > 0 else 0.0
        segment = Segment(self.end, self.end + int(steps), last)
        self.segments.append(segment)
        return segment

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "warmup": self.warmup, "decay": self.decay, "floor": self.floor,
                "segments": [s.to_list() for s in self.segments]}

    @classmethod
    def from_dict(cls, data: Any) -> Schedule:
        """The saved schedule; a malformed one is a UserError (the caller names the file)."""
        try:
            segments = [Segment(int(a), int(b), float(f)) for a, b, f in data["segments"]]
            schedule = cls(str(data["kind"]), float(data["warmup"]), float(data["decay"]), float(data["floor"]),
                           segments)
        except (KeyError, TypeError, ValueError):
            raise UserError("the saved schedule is malformed") from None
        if not segments or any(s.end < s.start for s in segments) or any(
                a.end != b.start for a, b in zip(segments, segments[1:], strict=False)):
            raise UserError("the saved schedule is malformed")
        return schedule
