"""`edgesplit faulttest`: kill the cloud worker mid-generation, many times, and check nothing is lost.

For each sampling (greedy, seeded), recovery mode (`restart`: the killed worker is started again
on its endpoint; `second`: the device fails over to a second worker) and prompt context, one
uninterrupted generation gives the reference tokens; then `runs` generations each SIGKILL the
worker at a random token. A run counts as identical when its tokens equal the reference's. Worker
processes are real (`cloud serve`, warmed with the plan), so a restart includes loading the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgesplit.device.split import load_front, run_split
from edgesplit.harness.worker_proc import WorkerProcess
from edgesplit.runtime.calibration import CALIBRATION_TEXT
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.generate import load_tokenizer
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.runtime.store import ModelStore

log = logging.getLogger(__name__)

SAMPLINGS = {"greedy": SamplingParams(), "seeded": SamplingParams(temperature=0.8, top_p=0.95, seed=1234)}
MODES = ("restart", "second")


@dataclass(frozen=True)
class FaultRequest:
    """How many kills, of how long a generation, at which prompt contexts (tokens)."""

    runs: int = 20
    tokens: int = 200
    contexts: tuple[int, ...] = (64, 1024)
    modes: tuple[str, ...] = MODES
    samplings: tuple[str, ...] = tuple(SAMPLINGS)
    seed: int = 0  # of the kill points

    def __post_init__(self) -> None:
        if self.runs < 1 or self.tokens < 2 or not self.contexts or min(self.contexts) < 1:
            raise ConfigError(f"faulttest needs runs >= 1, tokens >= 2 and contexts >= 1, got {self}")
        bad = sorted(set(self.modes) - set(MODES)) + sorted(set(self.samplings) - set(SAMPLINGS))
        if bad:
            raise ConfigError(f"faulttest: unknown mode or sampling {bad} (modes {MODES}, samplings {tuple(SAMPLINGS)})")


@contextlib.contextmanager
def _workers(store: ModelStore, plan: Plan, n: int) -> Iterator[list[WorkerProcess]]:
    """`n` warm worker processes (1 thread each) serving `plan`, stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="edgesplit-faulttest-") as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(plan.to_json())
        ws = [WorkerProcess(str(store.path), store.config.d_model, threads=1, extra=("--warm-plan", str(plan_file)))
              for _ in range(n)]
        try:
            for w in ws:
                w.start()
            yield ws
        finally:
            for w in ws:
                w.stop()


def prompt_of(store: ModelStore, n: int) -> list[int]:
    """A prompt of exactly `n` tokens of ordinary text (the calibration paragraph, repeated)."""
    tok = load_tokenizer(store)
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(CALIBRATION_TEXT + " ")
    return ids[:n]


def _generate(store, plan, endpoints, prompt, params, tokens, front, kill_at=None, on_kill=None) -> tuple[list, list]:
    out: list[int] = []
    recoveries: list = []
    for r in run_split(store, endpoints, plan, prompt, params, tokens, stop_ids=(), front=front, timeout_s=30.0,
                       recoveries=recoveries):
        out.append(r.token)
        if kill_at is not None and len(out) == kill_at and on_kill is not None:
            on_kill()
    return out, recoveries


def _one_case(store, plan, front, req: FaultRequest, sampling: str, mode: str, context: int,
              rng: random.Random) -> dict:
    params, prompt = SAMPLINGS[sampling], prompt_of(store, context)
    runs: list[dict] = []
    with _workers(store, plan, 2 if mode == "second" else 1) as ws:
        endpoints = [w.endpoint for w in ws]
        want, _ = _generate(store, plan, endpoints[:1], prompt, params, req.tokens, front)
        for _ in range(req.runs):
            k = rng.randrange(1, req.tokens)

            def on_kill() -> None:
                ws[0].kill()
                if mode == "restart":
                    ws[0].start(wait=False)  # the device's recovery finds it once it is up

            try:
                got, recoveries = _generate(store, plan, endpoints, prompt, params, req.tokens, front, k, on_kill)
                runs.append({"kill_at": k, "completed": True, "identical": got == want,
                             "recovery_ms": sum(r.ms for r in recoveries),
                             "replayed_positions": sum(r.replayed_positions for r in recoveries)})
            except EdgesplitError as exc:
                runs.append({"kill_at": k, "completed": False, "identical": False, "error": str(exc)[:300]})
            if not ws[0].alive:  # "second": bring the killed one back
                ws[0].start()
            else:
                ws[0].wait()
    done = [r for r in runs if r["completed"]]
    ms = [r["recovery_ms"] for r in done]
    return {"sampling": sampling, "mode": mode, "context": context, "runs": len(runs),
            "completed": len(done), "identical": sum(r["identical"] for r in runs),
            "recovery_ms_median": statistics.median(ms) if ms else None, "recovery_ms_max": max(ms) if ms else None,
            "replayed_positions_median": statistics.median(r["replayed_positions"] for r in done) if done else None,
            "errors": [r["error"] for r in runs if not r["completed"]]}


def faulttest(store: ModelStore, plan: Plan, req: FaultRequest, threads: int = 1) -> dict:
    """Every (sampling, mode, context) case of `req`; one JSON-able dict with the totals."""
    need = max(req.contexts) + req.tokens
    if plan.max_seq_len < need:
        raise ConfigError(f"faulttest: plan.max_seq_len {plan.max_seq_len} < longest context {max(req.contexts)} + "
                          f"{req.tokens} tokens; give --max-seq-len {need} or more")
    rng = random.Random(req.seed)
    front = load_front(store, plan, threads=threads)
    t0 = time.perf_counter()
    cases = [_one_case(store, plan, front, req, s, m, c, rng)
             for s in req.samplings for m in req.modes for c in req.contexts]
    total = sum(c["runs"] for c in cases)
    return {"request": dataclasses.asdict(req), "cut": plan.cut, "codec": str(plan.codec), "cases": cases,
            "runs": total, "completed": sum(c["completed"] for c in cases),
            "identical": sum(c["identical"] for c in cases), "seconds": time.perf_counter() - t0}
