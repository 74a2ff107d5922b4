"""Profiling a run: every actor's phases on one timeline (`profile.enabled=true`).

Each actor records a span (name, start, duration) around its phase methods in its own process;
the loop records its own phases the same way; after every step the driver collects the actors'
spans, and at the end (or on a crash) writes `<run_dir>/timeline.json` in Chrome trace format,
which Perfetto (ui.perfetto.dev) and chrome://tracing open. One track per actor.

Start times are wall-clock microseconds (time.time_ns), comparable across processes on one host
and NTP-close across hosts; durations come from the monotonic clock.

`busy_split` reads a timeline back: per actor group, the share of the loop's wall time spent in
each phase and idle. The end-to-end benchmark reports it as actor utilisation.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from pathlib import Path

Span = dict  # {"name": str, "ts": int (µs since epoch), "dur": int (µs), "args": dict}

MAX_SPANS = 100_000  # per actor between two collections: a bound, should collection stop


class Spans:
    """A bounded list of finished spans, recorded in this process (nothing when not enabled)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.spans: deque[Span] = deque(maxlen=MAX_SPANS)

    @contextmanager
    def span(self, name: str, **args):
        if not self.enabled:
            yield
            return
        ts = time.time_ns() // 1000
        start = time.perf_counter()
        try:
            yield
        finally:  # the thread: a threaded actor (a sandbox worker's runs) has spans that overlap
            self.spans.append({"name": name, "ts": ts, "dur": int((time.perf_counter() - start) * 1e6),
                               "args": args, "tid": threading.get_native_id()})

    def take(self) -> list[Span]:
        out = list(self.spans)
        self.spans.clear()
        return out


class Traced:
    """Mixed into an actor class: once start_tracing() is called, each method named in PHASES
    records a span of its own name (before that, and in runs without profiling, nothing).

    Ray is applied at the edge (rlsys/cluster/groups.py), and so is this: the plain classes stay plain.
    """

    PHASES: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.PHASES:
            method = getattr(cls, name)
            if not getattr(method, "_rlsys_traced", False):  # Ray subclasses the class again
                setattr(cls, name, _traced(method, name))

    def start_tracing(self) -> None:
        self._spans = Spans()

    def take_spans(self) -> list[Span]:
        spans = getattr(self, "_spans", None)
        return spans.take() if spans is not None else []


def _traced(method, name: str):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        spans = getattr(self, "_spans", None)
        if spans is None:
            return method(self, *args, **kwargs)
        with spans.span(name):
            return method(self, *args, **kwargs)

    wrapper._rlsys_traced = True
    return wrapper


class Timeline:
    """Collects spans per track (an actor, or the driver) and writes them as a Chrome trace."""

    def __init__(self):
        self.tracks: dict[str, list[Span]] = defaultdict(list)

    def add(self, track: str, spans: list[Span]) -> None:
        self.tracks[track].extend(spans)

    def to_chrome(self) -> dict:
        events = []
        for pid, (track, spans) in enumerate(sorted(self.tracks.items(), key=lambda kv: _track_order(kv[0]))):
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": track}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
            events += [{"ph": "X", "name": s["name"], "ts": s["ts"], "dur": s["dur"], "pid": pid,
                        "tid": s.get("tid", 0), "args": s.get("args", {})} for s in spans]
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write(self, path: Path) -> Path:
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.to_chrome()))
        tmp.rename(path)
        return path


def _track_order(track: str) -> tuple[int, str]:
    roles = ("driver", "generator", "reward", "learner")
    role = track.split()[0]
    return (roles.index(role) if role in roles else len(roles), track)


def read_tracks(path: Path) -> dict[str, list[Span]]:
    """A Chrome trace written by Timeline, back to {track: spans}."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    tracks: dict[str, list[Span]] = {name: [] for name in names.values()}
    for e in events:
        if e["ph"] == "X":
            tracks[names[e["pid"]]].append({"name": e["name"], "ts": e["ts"], "dur": e["dur"], "args": e["args"],
                                            "tid": e["tid"]})
    return tracks


def busy_split(tracks: dict[str, list[Span]], skip_steps: int = 0) -> dict[str, dict[str, float]]:
    """Per actor group (generator, reward, learner): the mean share of the loop's wall time each
    of its actors spent in each phase, and idle (the rest).

    The window is the driver's steps (its "step" spans), after `skip_steps` warm-up steps; each
    actor span is clipped to the window. An actor's spans of one phase that overlap (a threaded
    actor: a sandbox worker's concurrent runs) count once, as their union. Shares of a group add up to 1.
    """
    steps = sorted((s for s in tracks.get("driver", []) if s["name"] == "step"), key=lambda s: s["ts"])[skip_steps:]
    if not steps:
        raise ValueError("the timeline has no driver step spans to measure against")
    windows = [(s["ts"], s["ts"] + s["dur"]) for s in steps]
    wall = sum(b - a for a, b in windows)
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for track, spans in tracks.items():
        role = track.split()[0]
        if role == "driver":
            continue
        busy: dict[str, float] = defaultdict(float)
        for name, start, end in _union(spans):
            for a, b in windows:
                overlap = min(b, end) - max(a, start)
                if overlap > 0:
                    busy[name] += overlap / wall
        busy["idle"] = max(0.0, 1.0 - sum(busy.values()))
        groups[role].append(busy)
    return {role: {phase: sum(a.get(phase, 0.0) for a in actors) / len(actors)
                   for phase in sorted({p for a in actors for p in a}, key=lambda p: (p == "idle", p))}
            for role, actors in groups.items()}


def _union(spans: list[Span]) -> list[tuple[str, int, int]]:
    """(name, start, end) of each phase's spans, overlapping ones merged."""
    out: list[tuple[str, int, int]] = []
    for name in {s["name"] for s in spans}:
        merged: list[list[int]] = []
        for start, end in sorted((s["ts"], s["ts"] + s["dur"]) for s in spans if s["name"] == name):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        out += [(name, a, b) for a, b in merged]
    return out
