"""The certified bound sources of ``solve`` and the choice between them (``bound`` option ``lp|sdp|auto``):
the cut LP (:mod:`.lp`) run in the search's cycle, or the SDP (:mod:`.sdp`) in its own thread; what the selection
JSON records about them."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

from qpm_plugins.selectors.qpm.cpsat import exact_model_fits
from qpm_plugins.selectors.qpm.instance import default_candidates
from qpm_plugins.selectors.qpm.lp import LpBound
from qpm_plugins.selectors.qpm.options import BOUND_CHOICES
from qpm_plugins.selectors.qpm.sdp import SdpBound

AUTO_MIN_SECONDS = 60.0  # below this the SDP's setup (about 10 s at n = 512) eats too much of its share
AUTO_MAX_FEATURES = 1024  # memory: the PSD block and X grow as n^2 (0.5 GB at n = 512)


def choose_bound(choice: str, inst, time_limit: float, *, work_limited: bool = False) -> str:
    """``lp`` or ``sdp`` for a ``bound`` option of ``lp``, ``sdp`` or ``auto``.

    A work-limited search (the selector's ``work_limit``) gets the LP from auto: it is a step of the search's cycle,
    so its bound is the same on every machine, while the SDP runs in its own thread on the clock.

    auto takes the SDP where the LP is loose and the SDP pays off: problems too big for CP-SAT's exact model (whose
    own bound closes small problems), at most :data:`AUTO_MAX_FEATURES` features, a time limit of at least
    :data:`AUTO_MIN_SECONDS`, and at least two usable cores (the SDP runs in its own thread beside the search; on
    one core it would take the search's time). At CUB size (512 x 200) a 120 s budget certifies 343.1 with the
    SDP against 358.9 with the LP and clique cuts (benchmarks/results/sdp.md).
    """
    if choice not in BOUND_CHOICES:
        raise ValueError(f"bound must be one of {', '.join(BOUND_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice
    if work_limited:
        return "lp"
    small = exact_model_fits(inst)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return "sdp" if (not small and inst.n <= AUTO_MAX_FEATURES and time_limit >= AUTO_MIN_SECONDS
                     and cores >= 2) else "lp"


class _SourceView:
    """A wrapper around a bound source that forwards its ``name`` and ``bound``."""

    def __init__(self, source) -> None:
        self.source = source

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def bound(self) -> float:
        return self.source.bound


class TimedSource(_SourceView):
    """A bound source that counts the seconds its steps take (``seconds``); otherwise the source itself."""

    def __init__(self, source) -> None:
        super().__init__(source)
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return self.source.done

    def step(self, deadline: float) -> float:
        t0 = time.perf_counter()
        try:
            return self.source.step(deadline)
        finally:
            self.seconds += time.perf_counter() - t0


class ConcurrentSource(_SourceView):
    """Runs a bound source's steps in a background thread, beside the search, until its deadline.

    The first ``step(deadline)`` starts the thread and returns at once; later calls return the best certified
    bound so far. The thread steps the source until it is ``done``, a step does no work (the next SCS chunk no
    longer fits before the deadline) or :meth:`finish` asks it to stop; :meth:`finish` then waits for the chunk in
    flight (at most one chunk: a chunk is only started when it fits before the deadline). This is for sources whose
    work releases the GIL (SCS does, while it iterates): the SDP then takes the search's idle core instead of turns
    in its schedule, so the bound's time comes out of neither the local search's rounds nor CP-SAT's chunks, which
    stay the same deterministic sequence. An exception in the thread ends the bound work (the bound so far stays
    valid) and is kept in ``error``; the selection goes on without it.
    """

    def __init__(self, source) -> None:
        super().__init__(source)
        self.error: str | None = None
        self.abandoned = False  # finish() returned while a chunk was still running
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def done(self) -> bool:
        return self._thread is not None  # started: the thread does the rest

    @property
    def seconds(self) -> float:
        return float(self.source.seconds)

    def step(self, deadline: float) -> float:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(deadline,), name=f"qpm-{self.name}-bound",
                                            daemon=True)
            self._thread.start()
        return self.source.bound

    def _run(self, deadline: float) -> None:
        src = self.source
        try:
            while not self._stop.is_set() and not src.done and time.perf_counter() < deadline:
                before = src.steps
                src.step(deadline)
                if src.steps == before:
                    break
        except Exception as exc:  # noqa: BLE001 - the bound is optional; the selection must not die with it
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if hasattr(src, "close"):
                src.close()

    def finish(self, deadline: float | None = None) -> float:
        """Stop after the chunk in flight and return the final certified bound.

        Waits for the chunk in flight, but with a ``deadline`` at most until ``deadline +`` :data:`FINISH_GRACE`: a
        chunk that the load stretched past it is left to end on its own (its thread releases the solver's memory
        when it does) and the bound certified before it is returned; ``abandoned`` then says so."""
        self._stop.set()
        if self._thread is not None:
            timeout = None if deadline is None else max(0.0, deadline + FINISH_GRACE - time.perf_counter())
            self._thread.join(timeout)
            self.abandoned = self._thread.is_alive()
        return self.source.bound


FINISH_GRACE = 2.0  # seconds past the deadline that finish() waits for a chunk in flight

SDP_MAX_FEATURES = 2048  # explicit --bound sdp beyond this: memory grows as n^2 (about 8 GB at 2048)


def bound_sources(choice: str, inst, M: int | None, time_limit: float, *, cut_rounds: int = 50,
                  work_limited: bool = False) -> list:
    """The bound sources for :func:`~qpm_plugins.selectors.qpm.solver.solve`: the cut LP or the SDP, as
    :func:`choose_bound` picks (the LP for a work-limited search under auto), timed."""
    M = default_candidates(inst) if M is None else int(M)
    if choose_bound(choice, inst, time_limit, work_limited=work_limited) == "sdp":
        if inst.n > SDP_MAX_FEATURES:
            from qpmcli.errors import SelectionError

            raise SelectionError(f"--bound sdp: {inst.n} features is more than the SDP bound takes "
                                 f"({SDP_MAX_FEATURES}; its memory grows as n^2, about 0.5 GB at 512); use --bound lp "
                                 f"or auto")
        return [ConcurrentSource(SdpBound(inst, M))]
    return [TimedSource(LpBound(inst, M, cut_rounds=cut_rounds))]


def bound_stats(choice: str, sources: list, stats: dict[str, Any], bound: float) -> dict[str, Any]:
    """What the selection JSON records about the bound: the option, the method used, which source gave the final
    ``bound`` (``cpsat`` for CP-SAT's own bound, ``objective`` when the bound is the solution's value, i.e. optimal)
    and the seconds spent in each source; the SDP's solver details under ``sdp``."""
    out: dict[str, Any] = {"bound_option": choice, "bound_method": "+".join(s.name for s in sources)}
    candidates_: dict[str, float] = {s.name: float(s.bound) for s in sources}
    if stats.get("cpsat_bound") is not None:
        candidates_["cpsat"] = float(stats["cpsat_bound"])
    finite = {k: v for k, v in candidates_.items() if math.isfinite(v)}
    best = min(finite, key=finite.get) if finite else None
    if not math.isfinite(bound):
        out["bound_from"] = None
    else:
        out["bound_from"] = best if best is not None and finite[best] <= bound + 1e-9 else "objective"
    for s in sources:
        out[f"{s.name}_seconds"] = round(float(getattr(s, "seconds", 0.0)), 3)
        if getattr(s, "error", None):
            out[f"{s.name}_error"] = s.error
        if getattr(s, "abandoned", False):
            out[f"{s.name}_abandoned"] = True  # its last chunk ran past the deadline and was not waited for
        inner = getattr(s, "source", s)
        if isinstance(inner, SdpBound):
            out["sdp"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in inner.info.items()}
    return out
