"""The rows of issue 19's tables: which model each row trains (a HiDrop schedule of the config's
model) and under which schedule it is evaluated.

A row's schedule is written as `cfg.hidrop` fields on top of a preset, resolved for the model's
depth and token count by `hidrop_jax.config.schedule_of` after every override (the tiny demo
model: 8 layers, 144 tokens; Tok64 there is inject 2, cuts after 2/3/4 keeping 54/2/1, exit 6).
Rows that train the same schedule share one training run (the ablations' `hard` and
`persistent` rows are the methods table's `tok64`): every run trains under the same budget,
and seed k means `train.seed = k` (the same initialisation and data order for every row).

Sweeps move one layer and keep the others: a cut that no longer fits between injection and
exit (a cut needs at least one vision layer after it) is dropped with its keep count, so the
row's mean vision tokens (reported) change with it. Nothing here is tuned to agree with the
paper.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    label: str
    # cfg.hidrop of the model this row trains: {"name": preset, field: value}; None = the row
    # trains nothing and evaluates `base`'s model
    train: Optional[dict] = None
    base: str = ""  # the row whose trained model a training-free row evaluates
    evaluate: str = ""  # "": as trained; a preset name; "proposal": analyze's schedule.json of base
    from_proposal: bool = False  # train under analyze's proposal for `base`'s trained model
    ablation: str = ""  # group of the ablations table (selection, positions, inject, exit)
    x: Optional[float] = None  # the swept value (inject / exit layer), for the sweep verdicts


def _tok64_fields(model_layers: int, n_vision: int) -> dict:
    from hidrop_jax.hidrop.schedule import preset
    s = preset("tok64", model_layers, n_vision)
    return dict(inject_layer=s.inject_layer, prune_after=s.prune_after, keep=s.keep, exit_layer=s.exit)


def moved(base: dict, num_layers: int, *, inject: Optional[int] = None, exit: Optional[int] = None) -> dict:
    """`base`'s layout with injection and/or exit moved: cuts move no earlier than injection
    (one layer apart), cuts that leave no vision layer before exit are dropped with their keep."""
    inj = base["inject_layer"] if inject is None else inject
    ex = base["exit_layer"] if exit is None else exit
    cuts, keep = [], []
    for j, (p, k) in enumerate(zip(base["prune_after"], base["keep"])):
        p = max(p, inj + j, cuts[-1] + 1 if cuts else -1)
        if p + 1 >= ex:
            break
        cuts.append(p)
        keep.append(k)
    return dict(inject_layer=inj, prune_after=tuple(cuts), keep=tuple(keep), exit_layer=min(ex, num_layers))


def matched_fastv(num_layers: int, n_vision: int, mean: float) -> dict:
    """FastV (one cut after the preset's layer) keeping k tokens, k chosen so the mean vision
    tokens per layer are closest to `mean` (the paper compares methods at equal mean tokens)."""
    from hidrop_jax.hidrop.schedule import preset
    p = preset("fastv", num_layers, n_vision).prune_after[0]
    before = p + 1
    k = max(1, round((mean * num_layers - before * n_vision) / (num_layers - before)))
    return dict(prune_after=(p,), keep=(min(k, n_vision),))


def matched_pdrop(num_layers: int, n_vision: int, mean: float) -> dict:
    """PyramidDrop's geometric stages (×0.5 per cut, its λ) with the cuts moved earlier, after
    layers 0, L/4 and L/2 (its preset cuts after 3/8, 5/8, 7/8 of the depth leave at least
    ~3/8 × all tokens per layer: Tok64's mean is not reachable); the first stage's count is
    chosen so the mean vision tokens per layer are closest to `mean`."""
    q = max(1, num_layers // 4)
    cuts = tuple(sorted({0, q, 2 * q}))
    best = None
    for k in range(1, n_vision + 1):
        keep = [k]
        for _ in cuts[1:]:
            keep.append(max(1, keep[-1] // 2))
        if any(b >= a for a, b in zip(keep, keep[1:])):
            continue
        bounds = [0, *(c + 1 for c in cuts), num_layers]
        counts = [n_vision, *keep]
        m = sum((b - a) * n for a, b, n in zip(bounds[:-1], bounds[1:], counts)) / num_layers
        if best is None or abs(m - mean) < best[0]:
            best = (abs(m - mean), tuple(keep))
    return dict(prune_after=cuts, keep=best[1])


def rows(table: str, num_layers: int, n_vision: int) -> list[Row]:
    """The rows of `table` ("methods" or "ablations") for a model of this depth/token count."""
    from hidrop_jax.hidrop.schedule import preset
    t64 = _tok64_fields(num_layers, n_vision)
    mean64 = preset("tok64", num_layers, n_vision).mean_tokens()
    if table == "methods":
        out = [
            Row("vanilla", "vanilla (all vision tokens in every layer)", {"name": "vanilla"}),
            Row("pdrop", "PyramidDrop (preset, scaled)", {"name": "pdrop"}),
            Row("fastv_free", "FastV, training-free on the vanilla-trained model", base="vanilla",
                evaluate="fastv"),
            Row("fastv", "FastV, trained with it (preset, scaled)", {"name": "fastv"}),
            Row("pdrop_matched", "PyramidDrop at Tok64's mean tokens",
                {"name": "pdrop", **matched_pdrop(num_layers, n_vision, mean64)}),
            Row("fastv_matched", "FastV at Tok64's mean tokens, trained",
                {"name": "fastv", **matched_fastv(num_layers, n_vision, mean64)}),
            Row("tok80", "HiDrop Tok80 analogue", {"name": "tok80"}),
            Row("tok64", "HiDrop Tok64 analogue", {"name": "tok64"}),
            Row("tok48", "HiDrop Tok48 analogue", {"name": "tok48"}),
            Row("proposal_free", "analyze's proposal for the vanilla model, training-free",
                base="vanilla", evaluate="proposal"),
            Row("proposal", "analyze's proposal for the vanilla model, trained with it",
                base="vanilla", from_proposal=True),
        ]
        return [canonical(r, num_layers, n_vision) for r in out]
    if table == "ablations":
        out = [
            Row("hard", "hard top-k (= methods tok64)", {"name": "tok64"}, ablation="selection"),
            Row("relaxed_t0.1", "relaxed top-k, temperature 0.1",
                {"name": "tok64", "selection": "relaxed", "temperature": 0.1}, ablation="selection"),
            Row("relaxed_t1", "relaxed top-k, temperature 1.0",
                {"name": "tok64", "selection": "relaxed", "temperature": 1.0}, ablation="selection"),
            Row("persistent", "persistent positions (= methods tok64)", {"name": "tok64"},
                ablation="positions"),
            Row("group", "group positions", {"name": "tok64", "positions": "group"}, ablation="positions"),
            Row("compacted", "compacted positions", {"name": "tok64", "positions": "compacted"},
                ablation="positions"),
        ]
        for inj in range(0, t64["exit_layer"] - 1):
            f = moved(t64, num_layers, inject=inj)
            out.append(Row(f"inject{inj}", f"inject at layer {inj} (0-based), exit {f['exit_layer']}",
                           {"name": "tok64", **f}, ablation="inject", x=inj))
        for ex in range(t64["inject_layer"] + 2, num_layers + 1):
            f = moved(t64, num_layers, exit=ex)
            out.append(Row(f"exit{ex}", f"exit at layer {ex} (0-based; {num_layers} = none), inject "
                           f"{f['inject_layer']}", {"name": "tok64", **f}, ablation="exit", x=ex))
        return [canonical(r, num_layers, n_vision) for r in out]
    raise ValueError(f"--table {table!r} is unknown; allowed: methods, ablations")


TABLES = ("methods", "ablations")
DEFAULTS = dict(selection="hard", positions="persistent", temperature=0.1)


def canonical(row: Row, num_layers: int, n_vision: int) -> Row:
    """`row` with the training fields that equal its preset's (resolved for this model) left
    out, so rows that train the same schedule get the same `train_key` and share a run."""
    if row.train is None:
        return row
    from hidrop_jax.hidrop.schedule import preset
    name = row.train["name"]
    base = dataclasses.asdict(preset(name, num_layers, n_vision))
    base["exit_layer"] = preset(name, num_layers, n_vision).exit
    f = {k: v for k, v in row.train.items() if k != "name"}
    f = {k: v for k, v in f.items()
         if (tuple(v) if isinstance(v, (list, tuple)) else v) != base.get(k, DEFAULTS.get(k))}
    return dataclasses.replace(row, train={"name": name, **f})


def train_key(fields: dict) -> str:
    """A short stable directory name for a training schedule (rows that train the same
    schedule share it)."""
    f = dict(fields)
    parts = [f.pop("name")]
    for k in ("selection", "temperature", "positions", "inject_layer", "prune_after", "keep", "exit_layer"):
        if k in f:
            v = f.pop(k)
            v = "-".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
            parts.append(f"{k.split('_')[0]}{v}")
    if f:
        raise ValueError(f"unknown schedule fields {sorted(f)}")
    return "_".join(parts)


def apply_sets(cfg, sets) -> None:
    """`FIELD=VALUE` strings (the runner's --set, passed to training as --config.FIELD=VALUE)
    applied to a ConfigDict, cast to the field's type; tuples as "(1,2)"."""
    import ast
    for item in sets:
        key, sep, val = item.partition("=")
        node = cfg
        *path, last = key.split(".")
        try:
            for p in path:
                node = node[p]
            old = node[last]
        except KeyError:
            raise ValueError(f"--set {item!r}: no config field {key!r}") from None
        if isinstance(old, bool):
            node[last] = val in ("True", "true", "1")
        elif isinstance(old, (int, float, str)) and old is not None:
            node[last] = type(old)(val)
        else:
            node[last] = ast.literal_eval(val)
