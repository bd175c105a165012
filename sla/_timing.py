"""Wall-clock timings that say when they cannot be trusted.

A CPU timing taken while another process uses the cores measures the contention, not the code: ``sla demo``
once showed SLA at 0.2-0.8x of dense attention with another job running and 5x on the idle machine, with no
warning. So the commands that report times

* interleave the compared runs: every repeat runs each method once, in an order that rotates from one repeat
  to the next, so that a burst of load hits all of them alike instead of whichever ran during it;
* measure, over the timed window, how much CPU *other* processes used: the machine's busy CPU time on the
  CPUs this process may run on (Linux ``/proc/stat``) minus this process's own CPU time; elsewhere the
  1-minute load average is the fallback;
* measure the spread of the repeats of each method;

and attach warnings to the result when the cores this process uses were not free, or when the repeats of a
method spread by more than ``max_spread`` of their median.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field


def usable_cpus() -> list[int] | None:
    """The CPU ids this process may run on (``None`` where the OS does not say)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _busy_cpu_seconds(cpus: list[int] | None) -> float | None:
    """Busy seconds since boot, summed over ``cpus`` (all CPUs if ``None``), from ``/proc/stat``; ``None`` if
    unavailable (not Linux)."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    wanted = None if cpus is None else {f"cpu{i}" for i in cpus}
    busy = 0
    for parts in lines:
        if (parts[0] == "cpu") != (wanted is None) or (wanted is not None and parts[0] not in wanted):
            continue
        values = [int(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal (guest is in user)
        busy += sum(values) - values[3] - values[4]
    return busy / tick


def _own_cpu_seconds() -> float:
    t = os.times()  # this process, all of its threads
    return t.user + t.system


@dataclass
class Timing:
    """Seconds per call of each timed function, and what the machine was doing meanwhile.

    ``other_cpus``: average number of CPUs (among those this process may use) kept busy by other processes
    during the timed window; ``None`` where it cannot be measured. ``load_average``: the 1-minute load average
    at the end. ``warnings``: why the numbers should not be trusted (empty when nothing was noticed).
    """

    seconds: dict = field(default_factory=dict)
    cpus: int = 1
    threads: int = 1
    other_cpus: float | None = None
    load_average: float | None = None
    spread: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    @property
    def trustworthy(self) -> bool:
        return not self.warnings

    def warning_text(self) -> str:
        """One sentence for reports, or "" when there is nothing to warn about."""
        if not self.warnings:
            return ""
        return ("timings are not trustworthy: " + "; ".join(self.warnings)
                + ". Rerun on an idle machine for numbers you can compare.")

    def to_dict(self) -> dict:
        return asdict(self)


def time_interleaved(fns: dict, repeats: int, *, warmup: int = 1, threads: int = 1, check_cpu: bool = True,
                     max_spread: float = 0.3) -> Timing:
    """Time each of ``fns`` (``{name: zero-argument callable}``) ``repeats`` times, interleaved.

    Each function first runs ``warmup`` times untimed. Repeat ``r`` then runs every function once, starting
    with the ``r``-th (rotating), so no function is always first after a pause. ``threads``: how many threads
    the timed work runs on (e.g. ``torch.get_num_threads()``), to judge whether other processes took cores
    it needed; ``check_cpu=False`` skips that check (GPU timings). Callables must finish their own work
    (synchronise a GPU) before returning.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    cpus = usable_cpus()
    n_cpus = len(cpus) if cpus else (os.cpu_count() or 1)
    busy0, own0, wall0 = _busy_cpu_seconds(cpus), _own_cpu_seconds(), time.perf_counter()
    seconds = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            seconds[name].append(time.perf_counter() - t0)
    busy1, own1, wall1 = _busy_cpu_seconds(cpus), _own_cpu_seconds(), time.perf_counter()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    other = None
    if busy0 is not None and busy1 is not None and wall1 > wall0:
        other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))

    timing = Timing(seconds=seconds, cpus=n_cpus, threads=threads, other_cpus=other, load_average=load)
    if check_cpu:
        # The timed work wants `threads` of the `n_cpus` cores; a quarter of a core of slack absorbs daemons.
        free_needed = min(threads, n_cpus)
        if other is not None:
            if n_cpus - other < free_needed - 0.25:
                timing.warnings.append(f"other processes kept {other:.1f} of the {n_cpus} CPUs busy while timing "
                                       f"(this work uses {threads} thread(s))")
        elif load is not None and load > n_cpus:
            timing.warnings.append(f"the load average was {load:.1f} on {n_cpus} CPUs")
    for name in names:
        ts = seconds[name]
        med = statistics.median(ts)
        timing.spread[name] = (max(ts) - min(ts)) / med if med > 0 else 0.0
        if len(ts) >= 3 and timing.spread[name] > max_spread:
            timing.warnings.append(f"the {len(ts)} runs of {name} spread by {100 * timing.spread[name]:.0f}% of "
                                   f"their median")
    return timing
