"""The sandbox pool: a step's programs judged by sandbox workers (Ray actors), each program once.

With reward.verifier=code the programs a model wrote run here, in place of the reward workers'
verifier children (rlsys.cluster.rewards.CodeRewardPool scores the samples with it):

- each distinct (program, tests, setup, limits) runs once a run: a group's identical answers, and an
  answer seen at an earlier step, are judged from the cache (`CACHE_SIZE` most recent);
- a program's tests are split over several workers when there are fewer programs than workers
  (the program runs once per part), so a step with one long program still uses the pool;
- every run is a call to one worker with a deadline (reward.timeout_s; the sandbox's own wall
  deadline, reward.code.wall_s, is shorter, so a worker past it is hung, not its program); a worker
  does reward.code.runs_per_worker runs at once (threads, each run its own uid and process tree), so
  the Ray round trip of one run overlaps the others' execution; a worker that dies or hangs is
  killed and replaced and its runs go to other workers; a run that loses two workers is judged
  failed, with the reason (at most cluster.max_actor_restarts replacements a run, then the run stops);
- elastic: the pool starts with reward.code.workers, grows by one worker a call while more than
  reward.code.backlog programs wait per worker (up to reward.code.max_workers; a new worker serves once
  it has started, the call does not wait for it), and shrinks by one when a call's runs would have
  fit in one worker fewer.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

import ray

from rlsys.actors.sandbox_worker import TestsRun
from rlsys.cluster.deadlines import LOST
from rlsys.sandbox.execute import Limits
from rlsys.sandbox.judge import CACHE_SIZE, NO_CODE, Judgement, judgement_key, parse_gold, tally

ATTEMPTS = 2
"""Workers a run may lose (dead or hung) before it is judged failed rather than run again."""


@dataclasses.dataclass
class _Job:
    """One distinct program on one problem's tests."""
    code: str
    tests: list[str]
    setup: str
    results: dict[int, tuple[bool, str]] = dataclasses.field(default_factory=dict)
    cut: list[str] = dataclasses.field(default_factory=list)  # how runs that left tests unreported ended


@dataclasses.dataclass
class _Run:
    """A part of a job's tests, for one worker call."""
    key: str
    indices: list[int]
    attempts: int = 0


class SandboxPool:
    def __init__(self, make, workers: int, max_workers: int, backlog: int, limits: Limits, timeout_s: float,
                 start_timeout_s: float = 300.0, max_restarts: int = 3, runs_per_worker: int = 1):
        """make(max_concurrency): a new sandbox worker actor (rlsys.cluster.remote.SandboxActor) that
        takes that many calls at once: the pool passes runs_per_worker, so the two agree. workers: the
        pool's size at the start and its floor; limits: the runs' limits (part of the cache key);
        timeout_s: the deadline of one worker call; start_timeout_s: of a worker's start;
        runs_per_worker: calls in flight to one worker at once."""
        self.make, self.min_workers, self.max_workers, self.backlog = make, workers, max_workers, backlog
        self.runs_per_worker = runs_per_worker
        self.limits, self.timeout_s, self.start_timeout_s = limits, timeout_s, start_timeout_s
        self.max_restarts, self.restarts = max_restarts, 0
        self.ready: list = []  # workers that serve
        self.starting: dict = {}  # ObjectRef of whereami() -> (actor, time asked)
        for _ in range(workers):
            self._start()
        self.cache: collections.OrderedDict[str, Judgement] = collections.OrderedDict()
        self.totals: collections.Counter[str] = collections.Counter()  # since the last take_metrics()

    @property
    def actors(self) -> list:
        return list(self.ready)

    def wait_ready(self) -> list[dict]:
        """Blocks until every starting worker serves (deadline start_timeout_s); their whereami()."""
        where = []
        while self.starting:
            where += self._admit(timeout=self.start_timeout_s, block=True)
        return where

    def judge(self, programs: list[tuple[str | None, str]]) -> list[Judgement]:
        """(program or None, gold) pairs -> their judgements, in order. A malformed gold is a data
        error (GoldError); nothing a program does raises here."""
        specs = [parse_gold(gold) for _, gold in programs]
        keys, jobs, hits = [], {}, 0
        for (code, gold), spec in zip(programs, specs):
            if code is None:
                keys.append(None)
                continue
            key = judgement_key(code, gold, self.limits)
            keys.append(key)
            if key in self.cache or key in jobs:
                hits += 1
            else:
                jobs[key] = _Job(code, spec["tests"], spec.get("setup", ""))
        self._resize(len(jobs))
        runs = self._split(jobs)
        seconds, timeouts = self._run_all(runs, jobs)
        for key, job in jobs.items():
            self.cache[key] = tally(job.results, len(job.tests), None, "; ".join(dict.fromkeys(job.cut)))
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        self.totals.update({"sandbox/programs": len(jobs), "sandbox/runs": len(runs), "sandbox/cache_hits": hits,
                            "sandbox/seconds": seconds, "sandbox/timeouts": timeouts})
        out = []
        for key, spec in zip(keys, specs):
            if key is None:
                out.append(Judgement(0, len(spec["tests"]), NO_CODE, None))
            else:
                self.cache.move_to_end(key)
                out.append(self.cache[key])
        return out

    def take_metrics(self) -> dict[str, float]:
        """Since the last call: distinct programs run, worker calls, programs judged from the cache,
        seconds spent in sandboxes (summed over workers), runs cut at their wall deadline; and the
        pool's size and the replacements so far."""
        metrics = {k: float(self.totals[k]) for k in ("sandbox/programs", "sandbox/runs", "sandbox/cache_hits",
                                                      "sandbox/seconds", "sandbox/timeouts")}
        self.totals.clear()
        return metrics | {"sandbox/workers": float(len(self.ready)), "sandbox/restarts": float(self.restarts)}

    def _split(self, jobs: dict[str, _Job]) -> list[_Run]:
        """One run per job, or each job's tests in parts when the pool has more workers than jobs."""
        if not jobs:
            return []
        parts = max(1, len(self.ready) // len(jobs))
        runs = []
        for key, job in jobs.items():
            n = min(parts, len(job.tests))
            size = math.ceil(len(job.tests) / n)
            runs += [_Run(key, list(range(i, min(i + size, len(job.tests))))) for i in range(0, len(job.tests), size)]
        return runs

    def _run_all(self, runs: list[_Run], jobs: dict[str, _Job]) -> tuple[float, int]:
        """Every run on some worker, each worker `runs_per_worker` runs at a time; returns (sandbox
        seconds, runs cut at their wall deadline)."""
        queue = collections.deque(runs)
        inflight: dict = {}  # ObjectRef -> (actor, run, time sent)
        seconds, timeouts = 0.0, 0
        while queue or inflight:
            self._admit(timeout=0.0)
            busy = collections.Counter(id(actor) for actor, _, _ in inflight.values())
            for _ in range(self.runs_per_worker):  # round-robin: every worker's first run before any second
                for actor in [a for a in self.ready if busy[id(a)] < self.runs_per_worker]:
                    if not queue:
                        break
                    run = queue.popleft()
                    job = jobs[run.key]
                    ref = actor.run.remote(job.code, [job.tests[i] for i in run.indices], run.indices, job.setup)
                    inflight[ref] = (actor, run, time.monotonic())
                    busy[id(actor)] += 1
            if not inflight:  # no worker serves yet: wait for one to start
                if not self.starting:
                    raise RuntimeError("the sandbox pool has no worker left to run programs on")
                self._admit(timeout=self.start_timeout_s, block=True)
                continue
            oldest = min(sent for _, _, sent in inflight.values())
            ready, _ = ray.wait(list(inflight), num_returns=1,
                                timeout=max(0.0, min(1.0, oldest + self.timeout_s - time.monotonic())))
            for ref in ready:
                actor, run, _ = inflight.pop(ref)
                try:
                    got: TestsRun = ray.get(ref)
                except LOST as e:
                    self._lost(actor, run, f"died ({type(e).__name__})", queue, jobs, inflight)
                    continue
                jobs[run.key].results.update(got.results)
                seconds += got.execution.seconds
                if got.execution.verdict == "timeout":
                    timeouts += 1
                if len(got.results) < len(run.indices) and got.execution.reason:
                    jobs[run.key].cut.append(got.execution.reason)
            now = time.monotonic()
            for ref in [r for r, (_, _, sent) in inflight.items() if now - sent > self.timeout_s]:
                if ref not in inflight:  # its worker was lost with another of its runs
                    continue
                actor, run, _ = inflight.pop(ref)
                self._lost(actor, run, f"gave no result within {self.timeout_s:g}s (reward.timeout_s)", queue, jobs,
                           inflight)
        return seconds, timeouts

    def _lost(self, actor, run: _Run, why: str, queue, jobs: dict[str, _Job], inflight: dict) -> None:
        """A worker died or hung on `run`: replace it; the run goes again, or is judged failed after
        ATTEMPTS. The worker's other runs in flight go again as they were (they did not lose it)."""
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"a sandbox worker {why}; {self.restarts} sandbox worker failures in this run, "
                               f"cluster.max_actor_restarts={self.max_restarts}")
        print(f"[rlsys] sandbox worker {why}; replaced, its run goes to another worker", flush=True)
        ray.kill(actor)
        self.ready.remove(actor)
        self._start()
        for ref in [r for r, (a, _, _) in inflight.items() if a is actor]:
            queue.appendleft(inflight.pop(ref)[1])
        run.attempts += 1
        if run.attempts < ATTEMPTS:
            queue.append(run)
        else:
            jobs[run.key].cut.append(f"its sandbox worker {why}, {ATTEMPTS} times")

    def _resize(self, programs: int) -> None:
        """One worker more while more than `backlog` programs wait per worker; one fewer when they fit in one less."""
        size = len(self.ready) + len(self.starting)
        if programs > self.backlog * size and size < self.max_workers:
            self._start()
        elif size > self.min_workers and programs <= self.backlog * (size - 1) and self.ready:
            ray.kill(self.ready.pop())

    def _start(self) -> None:
        actor = self.make(self.runs_per_worker)
        self.starting[actor.whereami.remote()] = (actor, time.monotonic())

    def _admit(self, timeout: float, block: bool = False) -> list[dict]:
        """Workers whose start finished now serve; one that failed to start, or took longer than
        start_timeout_s, stops the run (a machine that cannot sandbox says why in its error)."""
        if not self.starting:
            return []
        ready, _ = ray.wait(list(self.starting), num_returns=1 if block else len(self.starting), timeout=timeout)
        where = []
        for ref in ready:
            actor, _ = self.starting.pop(ref)
            where.append(ray.get(ref))  # a worker whose sandbox cannot start raises here, with the reason
            self.ready.append(actor)
        now = time.monotonic()
        late = [asked for _, asked in self.starting.values() if now - asked > self.start_timeout_s]
        if late:
            raise RuntimeError(f"{len(late)} sandbox worker(s) did not start within {self.start_timeout_s:g}s "
                               f"(deadlines.start_s): the cluster has no room for reward.code.num_cpus, or it hangs")
        return where

    def close(self) -> None:
        for actor in self.ready + [a for a, _ in self.starting.values()]:
            ray.kill(actor)
        self.ready, self.starting = [], {}
