"""HiDrop schedules: where vision tokens enter, how many survive each cut, where they leave.

All layer indices are 0-based (paper numbering is 1-based; see shared DESIGN §1):
  inject_layer  first layer that sees vision tokens (paper L_inj − 1)
  prune_after   vision tokens are cut *after* these layers (paper F − 1)
  keep          tokens left after each cut
  exit_layer    first layer with no vision tokens (paper L_exit − 1); None = never
Peers (vanilla, PyramidDrop, FastV) are schedules of the same machinery.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

SELECTIONS = ("hard", "relaxed", "mask")
POSITIONS = ("persistent", "group", "compacted")

# Published schedules on LLaVA-1.5 (32 layers, 576 vision tokens), 0-based.
_PRESETS_32 = {
    "vanilla": dict(inject_layer=0, prune_after=(), keep=(), exit_layer=None),
    "tok80": dict(inject_layer=8, prune_after=(9, 12, 15, 18), keep=(453, 10, 5, 1), exit_layer=24),
    "tok64": dict(inject_layer=8, prune_after=(9, 13, 15, 17), keep=(215, 10, 5, 1), exit_layer=24),
    "tok48": dict(inject_layer=8, prune_after=(9, 13, 15, 17), keep=(87, 10, 5, 1), exit_layer=24),
    # MobileLLaMA-2.7B (32 layers): paper 1-based injection 15, exit 28, cuts after 16/19/22/25;
    # the paper gives no keep counts for it, we use Tok64's.
    "mobilellama": dict(inject_layer=14, prune_after=(15, 18, 21, 24), keep=(215, 10, 5, 1), exit_layer=27),
    "pdrop": dict(inject_layer=0, prune_after=(7, 15, 23), keep=(288, 144, 72), exit_layer=None),
    "fastv": dict(inject_layer=0, prune_after=(1,), keep=(288,), exit_layer=None),
}
PRESETS = tuple(_PRESETS_32)


@dataclasses.dataclass(frozen=True)
class Schedule:
    num_layers: int
    n_vision: int
    inject_layer: int = 0
    prune_after: tuple = ()
    keep: tuple = ()
    exit_layer: Optional[int] = None
    selection: str = "hard"
    positions: str = "persistent"
    temperature: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "prune_after", tuple(int(p) for p in self.prune_after))
        object.__setattr__(self, "keep", tuple(keep_count(k, self.n_vision, i)
                                               for i, k in enumerate(self.keep)))
        validate(self)

    @property
    def exit(self) -> int:
        """Exit layer with None resolved to `num_layers`."""
        return self.num_layers if self.exit_layer is None else self.exit_layer

    def segments(self):
        """[(start, stop, n_vision_tokens)] covering all layers; each runs as one scan."""
        cuts = [0, self.inject_layer, *(p + 1 for p in self.prune_after), self.exit, self.num_layers]
        counts = [0, self.n_vision, *self.keep, 0]
        out = []
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            if b > a:
                out.append((a, b, counts[i]))
        return out

    def tokens_per_layer(self) -> list:
        return [n for a, b, n in self.segments() for _ in range(a, b)]

    def mean_tokens(self) -> float:
        """The paper's "average tokens": vision tokens per layer averaged over all layers."""
        return sum(self.tokens_per_layer()) / self.num_layers


def keep_count(k, n_vision: int, i: int = 0) -> int:
    """A keep entry as a count: an int is a count; a float in (0, 1) a fraction of the n_vision
    tokens entering the model (rounded, at least 1), so a schedule means the same at any grid."""
    if isinstance(k, float) and not float(k).is_integer():
        if not 0 < k < 1:
            _bad(f"keep[{i}]", k, "an int count, or a float fraction in (0, 1) of the vision tokens")
        return max(1, round(k * n_vision))
    return int(k)


def layer_flops(n: int, d: int, m: int) -> float:
    """The paper's per-layer FLOPs for n tokens: 4nd² + 2n²d + 3ndm."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def vision_flops(s: Schedule, d: int, m: int) -> float:
    """Analytic FLOPs spent on the vision tokens over all layers (paper: 3.82 TF vanilla 7B)."""
    return sum(layer_flops(n, d, m) for n in s.tokens_per_layer())


def _bad(field, value, allowed):
    raise ValueError(f"hidrop.{field} = {value!r} is invalid; allowed: {allowed}")


def validate(s: Schedule) -> None:
    """Fails at config time, naming the field and the allowed range."""
    L = s.num_layers
    if s.selection not in SELECTIONS:
        _bad("selection", s.selection, f"one of {SELECTIONS}")
    if s.positions not in POSITIONS:
        _bad("positions", s.positions, f"one of {POSITIONS}")
    if not s.temperature > 0:
        _bad("temperature", s.temperature, "a positive float")
    if not 0 <= s.inject_layer < L:
        _bad("inject_layer", s.inject_layer, f"an int in [0, {L - 1}] (model has {L} layers)")
    ex = s.exit
    if not s.inject_layer < ex <= L:
        _bad("exit_layer", s.exit_layer, f"None or an int in [{s.inject_layer + 1}, {L}] (after inject_layer)")
    if len(s.keep) != len(s.prune_after):
        _bad("keep", s.keep, f"one count per prune_after layer ({len(s.prune_after)} values)")
    prev = s.inject_layer - 1
    for i, p in enumerate(s.prune_after):
        if not (prev < p and s.inject_layer <= p and p + 1 < ex):
            _bad(f"prune_after[{i}]", p,
                 f"strictly increasing ints in [{max(prev + 1, s.inject_layer)}, {ex - 2}] "
                 f"(from inject_layer={s.inject_layer}, at least one layer before exit={ex})")
        prev = p
    avail = s.n_vision
    for i, k in enumerate(s.keep):
        limit = avail if i == 0 else avail - 1
        if not 1 <= k <= limit:
            _bad(f"keep[{i}]", k, f"an int in [1, {limit}] (strictly decreasing, at most the "
                                  f"{avail} tokens available)")
        avail = k


def preset(name: str, num_layers: int = 32, n_vision: int = 576, **overrides) -> Schedule:
    """A named schedule. Published ones are for 32 layers / 576 tokens; for other sizes the
    layer indices scale with relative depth and the keep counts with the token count (our
    choice: it keeps the concave shape; the paper gives no 13B or tiny-model schedule)."""
    if name not in _PRESETS_32:
        raise ValueError(f"hidrop schedule {name!r} is unknown; allowed: {PRESETS}")
    p = dict(_PRESETS_32[name])
    if (num_layers, n_vision) != (32, 576):
        p = _rescale(p, num_layers, n_vision)
    p.update(overrides)
    return Schedule(num_layers=num_layers, n_vision=n_vision, **p)


def _rescale(p: dict, L: int, n: int) -> dict:
    layer = lambda l: min(L - 1, round(l * L / 32))
    out = dict(inject_layer=layer(p["inject_layer"]), exit_layer=None, prune_after=(), keep=())
    if p["exit_layer"] is not None:
        out["exit_layer"] = max(out["inject_layer"] + 1, min(L, round(p["exit_layer"] * L / 32)))
    ex = L if out["exit_layer"] is None else out["exit_layer"]
    prev, kprev = out["inject_layer"] - 1, n + 1
    for pa, k in zip(p["prune_after"], p["keep"]):
        pa = max(prev + 1, out["inject_layer"], layer(pa))
        k = min(kprev - 1, max(1, round(k * n / 576)))
        if pa + 1 >= ex or k < 1:  # too few layers or tokens left for this cut
            break
        out["prune_after"] += (pa,)
        out["keep"] += (k,)
        prev, kprev = pa, k
    return out
