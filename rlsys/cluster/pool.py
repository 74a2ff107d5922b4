"""The rollout pool: generator engines that join and leave between steps.

Within a step the pool hands prompt chunks to engines by pending work (`generate`). An engine that
dies mid-chunk (its node lost) is dropped and its chunk goes to another engine; an engine on a
node that Ray marks as draining finishes the chunk it holds and is given no other. Either way
every prompt is generated exactly once per step, with the weights of that step.

Between steps (`between_steps`, called by the loop before it generates):
  1. engines that died, and engines on draining nodes, leave (their placement groups are removed,
     so the node can go);
  2. with autoscale.enabled the policy (`decide`) may ask for one engine more or one fewer; the
     autoscaler is asked for the whole pool's bundles (`request_resources`), so it adds nodes for
     new engines and may remove the nodes that engines gave back. Without autoscaling the pool
     keeps generator.num_engines: a lost engine is replaced where the cluster has room;
  3. an engine whose node arrived and whose vLLM engine has started joins: learner rank 0 sends it
     the current weights over a group of their own, before it serves a single prompt (an NCCL
     or gloo group cannot be grown in place); then the weight-sync group is rebuilt over the
     new membership (the caller's `WeightSync.connect`).
Engines still starting never hold up a step: they join at the first boundary after they are
ready, or are dropped (and logged) after autoscale.node_timeout_s.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from rlsys.cluster.deadlines import LOST, PhaseTimeout, describe
from rlsys.cluster.placement import generator_group
from rlsys.cluster.remote import draining_nodes, in_group, missing, node_roles, placement_record
from rlsys.config import AutoscaleConfig
from rlsys.types import Rollout


@dataclass
class Engine:
    index: int  # never reused within a run: events and tracks name engines by it
    actor: object
    pg: PlacementGroup | None  # None: a bundle of a group the engine does not own (colocated)
    requested_at: float
    ready: object | None = None  # whereami() ref while the engine starts
    where: dict = field(default_factory=dict)  # its placement.json record (node, pid, GPU ids, ...)
    asked: dict = field(default_factory=dict)  # the CPUs/GPUs it asked for


@dataclass
class StepLoad:
    """What the policy sees of one step."""
    generate_share: float  # generate phase / whole step
    idle: int  # engines that got no chunk this step


def chunk_size(prompts: int, engines: int, per_engine: int = 1) -> int:
    """`per_engine` chunks per engine on average (generator.chunks_per_engine). One: each engine
    decodes all its prompts' samples in one batch (a CPU engine reads every weight once per
    decode step whatever the batch: 16 sequences cost little more than 8). More: finer balance
    when answer lengths vary widely, at smaller batches.

    >>> chunk_size(32, 4), chunk_size(32, 4, per_engine=2), chunk_size(2, 3)
    (8, 4, 1)
    """
    return max(1, math.ceil(prompts / (per_engine * engines)))


def chunk_seed(*key: int) -> int:
    """A 32-bit sampling seed from a key like (trainer.seed, step, chunk): independent streams for
    nearby keys (numpy's SeedSequence hashing), the same on every machine.

    >>> chunk_seed(0, 3, 1) == chunk_seed(0, 3, 1), chunk_seed(0, 3, 1) == chunk_seed(0, 3, 2)
    (True, False)
    """
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def decide(history: list[StepLoad], size: int, pending: int, cfg: AutoscaleConfig, prompts: int,
           per_engine: int = 1) -> int:
    """+1 (grow), -1 (shrink) or 0, from the last `cfg.patience` steps since the pool last changed.

    Grow while generation dominates the step (share above grow_above) with every engine busy, and
    only when one more engine would get work (the prompts cut into at least that many chunks).
    Shrink when some engine got no work at all in each of those steps. Nothing while an engine is
    starting: its effect is not measured yet.
    """
    recent = history[-cfg.patience:]
    if pending or len(recent) < cfg.patience:
        return 0
    if size > cfg.min_generators and all(s.idle > 0 for s in recent):
        return -1
    more = size + 1
    useful = math.ceil(prompts / chunk_size(prompts, more, per_engine)) >= more
    if size < cfg.max_generators and useful and all(s.generate_share > cfg.grow_above and s.idle == 0
                                                     for s in recent):
        return +1
    return 0


class GeneratorPool:
    def __init__(self, engines: list[Engine], start: Callable[[int], Engine] | None = None,
                 autoscale: AutoscaleConfig | None = None, bundle: dict | None = None, target: int | None = None,
                 wait_timeout_s: float = 600.0, max_restarts: int = 3, generate_timeout_s: float = 3600.0,
                 chunks_per_engine: int = 1, sleeps: bool = False):
        """engines: started and placed. start(index): begin starting one more engine (returns at
        once; the engine is ready when `ready` resolves). bundle: one engine's placement bundle, for
        the autoscaler. target: the size to keep without autoscaling (None: the starting size; with
        start=None nothing is ever replaced).
        wait_timeout_s: how long a pool left empty waits for a starting engine. max_restarts: engines
        lost (died, not drained) that the run replaces before it stops. generate_timeout_s: one
        step's rollouts (deadlines.generate_s). chunks_per_engine: see chunk_size. sleeps: the
        engines were started with a sleep level (generator.sleep_level; see `sleep`)."""
        self.engines = engines
        self.sleeps = sleeps
        self.chunks_per_engine = chunks_per_engine
        self.start = start
        self.autoscale = autoscale if autoscale is not None and autoscale.enabled else None
        self.bundle = bundle
        self.target = target if target is not None else len(engines)
        self.starting: list[Engine] = []
        self.next_index = max((e.index for e in engines), default=-1) + 1
        self.history: list[StepLoad] = []
        self.last_load: dict[int, tuple[int, float]] = {}  # engine index -> (chunks, busy seconds), last generate
        self.lost_this_step: list[dict] = []
        self.requested = -1
        self.wait_timeout_s = wait_timeout_s
        self.max_restarts, self.losses = max_restarts, 0
        self.generate_timeout_s = generate_timeout_s
        self.requeue_below = 0  # a chunk whose rollouts carry an older weight version is sampled again
        self.requeued = 0       # chunks sampled again since the last take_requeued()
        # The asynchronous loop's producer thread (generate) and its main thread (drop_dead before a
        # push) can both find the same engine dead: membership changes go through this lock, once.
        self.lock = threading.RLock()
        # A push's first phase (`paused`): no chunk is handed out and the ones in flight finish,
        # so the learners post their broadcast only once every engine is free to receive it.
        self.idle_changed = threading.Condition(self.lock)
        self.pausing = False
        self.in_flight = 0  # chunks handed out and not back yet, over every generate call

    def requeue_older_than(self, version: int) -> None:
        """From now on, a chunk that comes back sampled by weights older than `version` goes back
        to the queue (trainer.in_flight=requeue: the asynchronous loop calls this just before it
        pushes `version`). An engine loads a push between two chunks, so a chunk sent again runs
        on the new weights once they have landed (until then it comes back old and goes again)."""
        self.requeue_below = version

    def take_requeued(self) -> int:
        count, self.requeued = self.requeued, 0
        return count

    @property
    def actors(self) -> list:
        return [e.actor for e in self.engines]

    # ---- within a step

    def sleep(self) -> None:
        """Every engine frees its GPU memory for the learner, until the push that follows
        (generator.sleep_level; an engine without sleep mode returns at once). An engine lost
        here leaves the pool as in generation; the pool replaces it between steps."""
        if not self.sleeps:
            return
        engines = list(self.engines)
        refs = [e.actor.sleep.remote() for e in engines]
        _, hung = ray.wait(refs, num_returns=len(refs), timeout=self.generate_timeout_s)
        if hung:
            raise PhaseTimeout("sleep", [f"generator {e.index}" for e, r in zip(engines, refs) if r in hung],
                               self.generate_timeout_s, "deadlines.generate_s")
        for ref, engine in zip(refs, engines):
            try:
                ray.get(ref)
            except LOST as e:
                self.lost_engine(engine, e, phase="sleep")

    def generate(self, prompts: list, n: int, seed: tuple[int, ...] | None = None, **sampling) -> list[Rollout]:
        """n rollouts per prompt, in prompt order; every prompt exactly once, whatever engines leave.
        seed: each chunk is sampled with chunk_seed(*seed, chunk index), whichever engine takes it,
        so that what a step samples does not depend on timing (nor on an engine being new)."""
        size = chunk_size(len(prompts), len(self.engines), self.chunks_per_engine)
        chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        todo = list(range(len(chunks)))[::-1]  # popped from the end: chunk 0 first
        results: dict[int, list[Rollout]] = {}
        pending: dict = {}
        load = {e.index: [0, 0.0] for e in self.engines}
        draining = draining_nodes()
        idle = [e for e in self.engines if e.where.get("node_id") not in draining][::-1]
        if not idle and self.engines:  # every node is draining: use them until they go
            idle = list(self.engines)[::-1]
        deadline = time.monotonic() + self.generate_timeout_s
        try:
            self._hand_out(chunks, todo, pending, results, idle, load, n, seed, sampling, deadline)
        finally:  # a call that raises leaves no chunk counted in flight: the next push would wait for it
            with self.idle_changed:
                self.in_flight -= len(pending)
                self.idle_changed.notify_all()
        self.last_load = {i: (c, s) for i, (c, s) in load.items()}
        out = [r for i in range(len(chunks)) for r in results[i]]
        assert len(out) == len(prompts) * n, f"{len(out)} rollouts for {len(prompts)} prompts x {n}"
        return out

    def _hand_out(self, chunks: list, todo: list[int], pending: dict, results: dict, idle: list[Engine], load: dict,
                  n: int, seed: tuple[int, ...] | None, sampling: dict, deadline: float) -> None:
        """generate's loop: chunks to free engines (none while a push is paused), results back."""
        while todo or pending:
            with self.idle_changed:
                if not pending and todo:  # a push in progress: wait until it is done
                    self.idle_changed.wait_for(lambda: not self.pausing, timeout=max(0.0, deadline - time.monotonic()))
                while idle and todo and not self.pausing:
                    engine, chunk = idle.pop(), todo.pop()
                    chunk_sampling = sampling if seed is None else sampling | {"seed": chunk_seed(*seed, chunk)}
                    ref = engine.actor.generate.remote(chunks[chunk], n, **chunk_sampling)
                    pending[ref] = (chunk, engine, time.perf_counter())
                    self.in_flight += 1
            if not pending:
                if self.pausing:
                    raise PhaseTimeout("generate", ["the weight push"], self.generate_timeout_s, "deadlines.generate_s")
                raise RuntimeError(f"no generator left to take {len(todo)} prompt chunk(s): every engine of the "
                                   f"pool was lost ({self.lost_this_step})")
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise PhaseTimeout("generate", sorted(f"generator {e.index}" for _, e, _ in pending.values()),
                                   self.generate_timeout_s, "deadlines.generate_s")
            chunk, engine, t0 = pending.pop(done[0])
            with self.idle_changed:
                self.in_flight -= 1
                self.idle_changed.notify_all()
            try:
                results[chunk] = ray.get(done[0])
            except LOST as e:
                # Its node went (preempted, drained past its deadline): the chunk goes to another engine.
                self.lost_engine(engine, e, chunk_requeued=chunk)
                load.pop(engine.index, None)
                todo.append(chunk)
                continue
            load[engine.index][0] += 1
            load[engine.index][1] += time.perf_counter() - t0
            if engine.where.get("node_id") not in draining_nodes():
                idle.append(engine)
            if min(r.weight_version for r in results[chunk]) < self.requeue_below:  # trainer.in_flight=requeue
                del results[chunk]
                todo.append(chunk)
                self.requeued += 1

    @contextlib.contextmanager
    def paused(self):
        """A weight push's first phase: no engine is handed a new chunk, and the chunks in flight
        (the asynchronous loop's producer generating meanwhile) finish on the weights they began
        with. The push's second phase, inside, finds every engine free: its receive starts at
        once instead of queueing behind a chunk while the learners' broadcast is already posted
        (whose group timeout would then count the chunk's time too). Generation resumes after."""
        with self.idle_changed:
            self.pausing = True
            if not self.idle_changed.wait_for(lambda: self.in_flight == 0, timeout=self.generate_timeout_s):
                self.pausing = False
                self.idle_changed.notify_all()
                raise PhaseTimeout("sync (engines finishing their chunks)", [f"{self.in_flight} chunk(s)"],
                                   self.generate_timeout_s, "deadlines.generate_s")
        try:
            yield
        finally:
            with self.idle_changed:
                self.pausing = False
                self.idle_changed.notify_all()

    def lost_engine(self, engine: Engine, error: Exception, **detail) -> None:
        """An engine that died (its process killed, its node gone) leaves the pool at once; the
        weight sync rebuilds its group before the next push, and the pool replaces it between steps."""
        with self.lock:
            if engine not in self.engines:  # the other thread found it first
                return
            self._record_loss(engine, error, detail)
            self._remove(engine)

    def _record_loss(self, engine: Engine, error: Exception, detail: dict) -> None:
        reason = describe(error)
        self.lost_this_step.append({"engine": engine.index, "node": engine.where.get("node_id"), "reason": reason,
                                    **detail})
        print(f"[rlsys] generator {engine.index} lost ({reason})"
              + ("; its chunk goes to another engine" if "chunk_requeued" in detail else ""), flush=True)

    def drop_dead(self, timeout_s: float = 30.0) -> None:
        """Ask every engine where it is; the ones that died since they last answered leave the pool.
        The weight sync calls this before a push: a dead member would break the broadcast."""
        refs = {e.actor.whereami.remote(): e for e in list(self.engines)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except LOST as e:
                self.lost_engine(refs[ref], e, found="before the weight push")

    # ---- between steps

    def between_steps(self, step: int, generate_share: float | None, prompts: int, join: Callable) -> dict:
        """Membership changes at a step boundary; returns this boundary's events and pool state.
        join(engines): send the current weights to these new engines, before they serve. (The
        weight sync rebuilds its group whenever the pool differs from the group it has.)"""
        events: list[dict] = [{"event": "lost", "step": step, **x} for x in self.lost_this_step]
        self.lost_this_step = []
        changed = bool(events)
        draining = draining_nodes()
        for engine in list(self.engines):
            if engine.where.get("node_id") in draining:  # idle now: nothing to finish or hand back
                events.append({"event": "drained", "step": step, "engine": engine.index,
                               "node": engine.where.get("node_id")})
                self._remove(engine)
                changed = True
        if generate_share is not None and self.last_load:
            idle = sum(1 for c, _ in self.last_load.values() if c == 0)
            self.history.append(StepLoad(generate_share, idle))
        if self.autoscale is not None:
            # The last steps' load says nothing about a pool that just lost engines: measure it anew.
            move = 0 if changed else decide(self.history, len(self.engines), len(self.starting), self.autoscale,
                                            prompts, self.chunks_per_engine)
            if move > 0:
                events.append(self._begin_start(step, "grow"))
            elif move < 0:
                victim = next(e for e in reversed(self.engines) if self.last_load.get(e.index, (0, 0))[0] == 0)
                events.append({"event": "shrink", "step": step, "engine": victim.index,
                               "node": victim.where.get("node_id")})
                self._remove(victim)
                changed = True
            floor = self.autoscale.min_generators
        else:
            floor = self.target
        lost = sum(e["event"] == "lost" for e in events)
        self.losses += lost
        if lost and self.losses > self.max_restarts:
            raise RuntimeError(f"step {step}: generators were lost {self.losses} times in this run, more than "
                               f"cluster.max_actor_restarts={self.max_restarts} (last: {events[-1]}); stopping "
                               f"rather than replacing engines that keep dying")
        while self.start is not None and len(self.engines) + len(self.starting) < floor:
            events.append(self._begin_start(step, "replace"))
        if self.autoscale is not None:
            self._request(len(self.engines) + len(self.starting))
        joined = self._collect_started(step, events)
        deadline = time.time() + self.wait_timeout_s
        while not self.engines and not joined and self.starting:
            # Nothing left to generate with (every engine drained or lost): wait for a starting one.
            if time.time() > deadline:
                raise RuntimeError(f"step {step}: no generator serving and none of the {len(self.starting)} starting "
                                   f"got a node within {self.wait_timeout_s:.0f}s: {missing([self.bundle])}")
            print(f"[rlsys] step {step}: no generator serving; waiting for {len(self.starting)} starting "
                  f"(missing now: {missing([self.bundle])})", flush=True)
            ray.wait([e.ready for e in self.starting], num_returns=1, timeout=10.0)
            joined = self._collect_started(step, events)
        if joined:
            t0 = time.time()
            join(joined)
            for engine in joined:
                events.append({"event": "join", "step": step, "engine": engine.index,
                               "node": engine.where.get("node_id"),
                               "seconds_to_serving": time.time() - engine.requested_at,
                               "weights_seconds": time.time() - t0})
            self.engines += joined
            changed = True
        if not self.engines:
            raise RuntimeError(f"step {step}: the rollout pool is empty ({len(self.starting)} engine(s) still "
                               f"starting); events: {events}")
        if changed:
            self.history = []  # the new pool's load is not measured yet
        return {"events": events, "engines": {e.index: e.where.get("node_id") for e in self.engines},
                "starting": [e.index for e in self.starting]}

    def _begin_start(self, step: int, why: str) -> dict:
        engine = self.start(self.next_index)
        self.next_index += 1
        self.starting.append(engine)
        print(f"[rlsys] step {step}: starting generator {engine.index} ({why})", flush=True)
        return {"event": "request", "step": step, "engine": engine.index, "why": why}

    def _collect_started(self, step: int, events: list[dict]) -> list[Engine]:
        joined = []
        for engine in list(self.starting):
            ready, _ = ray.wait([engine.ready], timeout=0)
            if ready:
                try:
                    engine.where = placement_record(ray.get(engine.ready), engine.asked, node_roles())
                except LOST as e:  # its node went while the engine was starting
                    events.append({"event": "failed_start", "step": step, "engine": engine.index,
                                   "reason": str(e).splitlines()[0][:200]})
                    self.starting.remove(engine)
                    self._release(engine)
                    continue
                self.starting.remove(engine)
                engine.ready = None
                joined.append(engine)
            elif self.autoscale is not None and time.time() - engine.requested_at > self.autoscale.node_timeout_s:
                events.append({"event": "gave_up", "step": step, "engine": engine.index,
                               "seconds": time.time() - engine.requested_at})
                print(f"[rlsys] generator {engine.index}: no node within autoscale.node_timeout_s="
                      f"{self.autoscale.node_timeout_s:.0f}s; dropped", flush=True)
                self.starting.remove(engine)
                self._release(engine)
        return joined

    def _request(self, size: int) -> None:
        """The autoscaler's floor for the rollout pool: room for `size` engines (it may then remove
        nodes that engines gave back)."""
        if size != self.requested:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[dict(self.bundle) for _ in range(size)])
            self.requested = size

    def _remove(self, engine: Engine) -> None:
        """Idempotent: an engine already gone is left alone."""
        with self.lock:
            if engine not in self.engines:
                return
            self.engines.remove(engine)
        self._release(engine)

    def _release(self, engine: Engine) -> None:
        ray.kill(engine.actor)
        if engine.pg is not None:
            remove_placement_group(engine.pg)

    def shutdown(self) -> None:
        for engine in self.engines + self.starting:
            self._release(engine)
        self.engines, self.starting = [], []
        if self.autoscale is not None:
            self._request(0)


def start_engine(index: int, make_actor: Callable[[dict], object], bundle: dict, asked: dict) -> Engine:
    """One engine in a placement group of its own; returns at once (the engine is ready when
    `ready` resolves: its node arrived and its vLLM engine loaded)."""
    pg = placement_group([bundle], strategy="PACK", name=generator_group(index))
    actor = make_actor(in_group(pg, 0))
    return Engine(index, actor, pg, time.time(), ready=actor.whereami.remote(), asked=asked)
