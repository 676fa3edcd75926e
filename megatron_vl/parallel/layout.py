"""RankLayout: the parallel axes as one ordered list of (name, size), and every piece of rank
arithmetic derived from it (world size, a rank's coordinates, the rank of coordinates, the
groups of any axis or set of axes).

Ranks are laid out row-major over the axes, outermost first: the last axis varies fastest.
Our order is ``AXES`` = (pp, dp, tp), DeepSpeed's ``PipeModelDataParallelTopology`` (pipe,
data, model): tensor-parallel peers get neighbouring ranks (one node's fast links), pipeline
stages the farthest ones. A new axis (context parallel, say) is one more name in ``AXES``
plus its size field and group kind on ParallelState (``GROUP_AXES``); its coordinates and
groups follow from here, and what it does with them is its own code.

No processes here: ``ParallelState`` (state.py) turns these rank lists into process groups.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

AXES = ("pp", "dp", "tp")
"""The axes of a training run, outermost first."""

DEEPSPEED_AXIS_NAMES = {"pp": "pipe", "dp": "data", "tp": "model"}
"""Our axis names -> DeepSpeed's ProcessTopology names (its PipelineModule reads these)."""


@dataclass(frozen=True)
class RankLayout:
    """Named axes, outermost first; a rank is its coordinates read as one mixed-radix number."""

    axes: Tuple[Tuple[str, int], ...]
    """(name, size) per axis, outermost first; the last varies fastest over consecutive ranks."""

    def __post_init__(self):
        axes = tuple((str(name), int(size)) for name, size in self.axes)
        object.__setattr__(self, "axes", axes)
        names = [name for name, _ in axes]
        if len(set(names)) != len(names):
            raise ValueError(f"rank layout {names}: an axis is named twice")
        for name, size in axes:
            if size < 1:
                raise ValueError(f"rank layout: axis {name} has size {size} (at least 1)")

    @classmethod
    def of(cls, order: Sequence[str] = AXES, **sizes: int) -> "RankLayout":
        """The axes of `order` with the given sizes; an axis not given has size 1."""
        unknown = set(sizes) - set(order)
        if unknown:
            raise ValueError(f"rank layout: no axis {sorted(unknown)} in {list(order)}")
        return cls(tuple((name, sizes.get(name, 1)) for name in order))

    @classmethod
    def for_world(cls, world_size: int, fill: str = "dp", order: Sequence[str] = AXES,
                  **sizes: int) -> "RankLayout":
        """The layout of world_size ranks where axis `fill` takes the ranks the given sizes
        leave (data parallelism: whatever the model's split does not use)."""
        given = math.prod(sizes.values())
        if world_size % given:
            raise ValueError(f"world size {world_size} is not divisible by "
                             + " x ".join(f"{name} ({size})" for name, size in sizes.items()))
        return cls.of(order, **{**sizes, fill: world_size // given})

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def sizes(self) -> Dict[str, int]:
        return dict(self.axes)

    def size(self, *names: str) -> int:
        """Ranks in one group of these axes (1 for none)."""
        self._check(names)
        return math.prod(self.sizes[name] for name in names)

    @property
    def world_size(self) -> int:
        return math.prod(size for _, size in self.axes)

    def coordinates(self, rank: int) -> Dict[str, int]:
        """Axis name -> this rank's index along it, in layout order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size} ({self})")
        out = {}
        for name, size in reversed(self.axes):
            rank, out[name] = divmod(rank, size)
        return {name: out[name] for name in self.names}

    def rank(self, **coordinates: int) -> int:
        """The global rank at these coordinates; an axis not named is at 0."""
        self._check(coordinates)
        rank = 0
        for name, size in self.axes:
            index = coordinates.get(name, 0)
            if not 0 <= index < size:
                raise ValueError(f"rank layout {self}: {name} index {index} outside [0, {size})")
            rank = rank * size + index
        return rank

    def groups(self, *names: str) -> List[List[int]]:
        """Every group of ranks that differ only along `names`: one per coordinates of the other
        axes (outer axes first), each in rank order. The same on every rank, so every rank can
        create them in one order (new_group is collective)."""
        self._check(names)
        outside = [(n, s) for n, s in self.axes if n not in names]
        return [self._members(dict(zip([n for n, _ in outside], fixed)), names) for fixed in _grid(outside)]

    def group_of(self, rank: int, *names: str) -> List[int]:
        """The ranks that differ from `rank` only along `names` (its group of those axes)."""
        self._check(names)
        return self._members({n: i for n, i in self.coordinates(rank).items() if n not in names}, names)

    def _members(self, fixed: Dict[str, int], names: Sequence[str]) -> List[int]:
        inside = [(n, s) for n, s in self.axes if n in names]
        return [self.rank(**fixed, **dict(zip([n for n, _ in inside], varied))) for varied in _grid(inside)]

    def deepspeed_topology(self):
        """This layout as DeepSpeed's ProcessTopology, for its PipelineModule (which builds its
        own groups from it: both must agree on which ranks share a layer shard)."""
        from deepspeed.runtime.pipe.topology import ProcessTopology
        unknown = [name for name in self.names if name not in DEEPSPEED_AXIS_NAMES]
        if unknown:
            raise ValueError(f"rank layout {self}: DeepSpeed's pipeline grid has no axis for {unknown}")
        return ProcessTopology(axes=[DEEPSPEED_AXIS_NAMES[name] for name in self.names],
                               dims=[size for _, size in self.axes])

    def _check(self, names: Iterable[str]) -> None:
        unknown = [name for name in names if name not in self.sizes]
        if unknown:
            raise ValueError(f"rank layout {self} has no axis {unknown}")

    def __str__(self) -> str:
        return " x ".join(f"{name} {size}" for name, size in self.axes)


def _grid(axes: Sequence[Tuple[str, int]]):
    """Every index tuple over these axes, the last varying fastest."""
    return itertools.product(*(range(size) for _, size in axes))
