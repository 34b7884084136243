"""Which idle services to stop so that a GPU deploy fits: the cheapest set on one GPU.

Pure: the table hands in the candidates (idle, not busy, resident long enough) and the
free memory of each GPU; nothing here touches a reservation.
"""

from __future__ import annotations

import itertools

import attrs

from deploy_agent.models import Owner

# What a redeploy is taken to cost when its last deploy wasn't timed (adopted services).
UNTIMED_DEPLOY_S = 30.0
HELD_COST = 1e6  # added to a held service's cost: idle ones are always evicted first
EXHAUSTIVE_UP_TO = 12  # candidates on one GPU searched over every subset; beyond, greedily


@attrs.frozen
class Candidate:
    """An idle service that could be evicted: where, how much it frees, what it costs."""

    name: str
    owner: Owner
    gpu: int
    gb: float  # what placement counts it for: max(declared, observed)
    idle_since: float  # wall clock
    deploy_s: float | None  # how long its last deploy took to be healthy
    held: bool = False  # leased (a preemption candidate): any idle service goes first

    def cost(self, now: float) -> float:
        """A long cold start costs more to redo; one released long ago, less (it is the least
        likely to be asked for again soon). One that someone holds costs more than any idle."""
        base = max(self.deploy_s or UNTIMED_DEPLOY_S, 1.0) / max(now - self.idle_since, 1.0)
        return base + (HELD_COST if self.held else 0.0)


@attrs.frozen
class Eviction:
    """The services to stop on one GPU, and the memory that frees."""

    gpu: int
    victims: tuple[Candidate, ...]

    @property
    def freed_gb(self) -> float:
        return sum(victim.gb for victim in self.victims)


def plan(needed_gb: float, free_by_gpu: dict[int, float], candidates: list[Candidate],
         now: float) -> Eviction | None:
    """The cheapest set of candidates on one GPU whose memory makes `needed_gb` fit; None
    when no set does (then nothing is evicted)."""
    best: tuple[float, int, int, tuple[Candidate, ...]] | None = None
    for gpu, free in sorted(free_by_gpu.items()):
        mine = sorted((c for c in candidates if c.gpu == gpu), key=lambda c: (c.cost(now), c.name))
        if free + sum(c.gb for c in mine) < needed_gb:
            continue
        chosen = _cheapest(needed_gb - free, mine, now)
        key = (sum(c.cost(now) for c in chosen), len(chosen), gpu)
        if best is None or key < best[:3]:
            best = (*key, chosen)
    return Eviction(gpu=best[2], victims=best[3]) if best is not None else None


def _cheapest(short_gb: float, candidates: list[Candidate], now: float) -> tuple[Candidate, ...]:
    """The subset freeing at least `short_gb` at the least cost (every subset when few;
    else the cheapest per GB first)."""
    if short_gb <= 0:
        return ()
    if len(candidates) <= EXHAUSTIVE_UP_TO:
        fitting = (subset for size in range(1, len(candidates) + 1)
                   for subset in itertools.combinations(candidates, size)
                   if sum(c.gb for c in subset) >= short_gb)
        return min(fitting, key=lambda subset: (sum(c.cost(now) for c in subset), len(subset)))
    chosen: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: c.cost(now) / max(c.gb, 0.01)):
        chosen.append(candidate)
        if sum(c.gb for c in chosen) >= short_gb:
            break
    return tuple(chosen)
