"""SCoMoE: mixtures of experts with structured all-to-all communication.

A reference implementation of Zeng and Xiong, "SCoMoE: Efficient Mixtures of Experts with Structured Communication"
(ICLR 2023), in one file, to be read beside the paper; NOTES.md maps the method to the code and records each choice the
paper leaves open (the why of most docstrings here). Sections: the machinery, then the paper's order, then the auction:
  1. Topology and process groups      ranks, nodes, the local/node/world groups; W ranks as threads of one process
  2. All-to-all with a link ledger    a differentiable collective that counts bytes per link class
  3. Configuration                    one dataclass, validated before any collective runs
  4. GShard top-2 gating              Algorithm 2 of GShard, dispatch and combine by index
  5. The GShard MoE layer             gate -> all-to-all -> experts -> all-to-all -> combine
  6. SCoMoE-Seq                       tokens split into local / node / global tiers
  7. SCoMoE-Feat                      the model width split into local / node / global slices
  8. Node-limited routing             a baseline (not in the paper): top-2 inside one node per token
  9. Token clustering                 a balanced router gathers related tokens on one rank; differentiable sorting
  Appendix. The balanced assignment   the auction algorithm behind the balanced router (its proofs: NOTES.md)

What is simplified: experts are plain two-layer FFNs run as one batched matmul; there is no expert or data parallelism
beyond what SCoMoE needs (shared parameters are replicated; all-reducing their gradients is the caller's job).

Shape letters used in comments:
  t  tokens on this rank (a batch, flattened)    d  model width (or a Feat slice of it)
  f  expert hidden width                         e  experts a gate chooses among
  n  experts on each rank (E / W)                c  capacity: buffer slots per expert
  k  experts per token (2, or 1 for one expert)  g  ranks in a communication group
  W, G, N  world size, ranks per node, nodes     T, C, m  balanced assignment: tokens, clusters, T / C
  U, R, K  an auction round's bidders, clusters that get bids, and most bids on one cluster
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import threading
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

LINK_CLASSES = ("intra_device", "intra_node", "inter_node")
TIERS = ("local", "node", "global")
Splits = Optional[list[int]]  # rows to or from each member of a group; None: an even split

# --- 1. Topology and process groups (paper: "Topology") ---------------------------------------------------------------

def link_class(src: int, dst: int, ranks_per_node: int) -> str:
    """The link a byte crosses from rank src to rank dst: same device, same node, or another node."""
    same_node = src // ranks_per_node == dst // ranks_per_node
    return "intra_device" if src == dst else "intra_node" if same_node else "inter_node"

@dataclass(frozen=True)
class CommGroup:
    """A set of ranks that exchange tokens, with the handle torch.distributed needs."""
    name: str  # "local", "node", "world" or "peers"
    ranks: tuple[int, ...]  # global ranks, in the order of group ranks
    group: Optional[dist.ProcessGroup]  # None when the group is this rank alone
    links: tuple[str, ...]  # link class from this rank to each member, one of LINK_CLASSES
    local_copy: ClassVar[bool] = False  # True for a LocalCopyGroup (timing compute alone)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def exchange(self, out: Tensor, x: Tensor, send: Splits, recv: Splits) -> None:
        """out <- the all-to-all of x over this group."""
        if x.is_cuda and dist.get_backend(self.group) == "gloo":  # gloo moves host memory: stage through it
            host = torch.empty(out.shape, dtype=out.dtype)
            dist.all_to_all_single(host, x.cpu(), output_split_sizes=recv, input_split_sizes=send, group=self.group)
            out.copy_(host)
        else:
            dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=self.group)

class LocalCopyGroup(CommGroup):
    """An all-to-all that sends nothing, the rows staying here in the received shape (Topology.with_local_copies)."""
    local_copy: ClassVar[bool] = True

    def exchange(self, out: Tensor, x: Tensor, send: Splits, recv: Splits) -> None:
        n = min(out.shape[0], x.shape[0])
        out[:n].copy_(x[:n])
        out[n:].zero_()

class Turns:
    """The threads of a VirtualWorld take turns: one runs at a time, keeps the turn until it waits at a meeting or
    ends, and then the lowest rank that can go on takes it. So their work, random draws included, has one order."""

    def __init__(self) -> None:
        self.lock, self.ready, self.holder, self.live = threading.Lock(), set(), None, 0
        self.wakers: dict[int, threading.Condition] = {}  # rank -> what it waits on (under self.lock)
        self.broken: Optional[str] = None  # why the threads stop

    def hand_on(self) -> None:  # with lock held; wakes the new holder only, or everyone when the threads stop
        if self.holder is None and self.ready:
            self.holder = min(self.ready)
            self.ready.discard(self.holder)
        elif self.holder is None and self.live > 0 and not self.broken:  # every live thread waits at a meeting
            self.broken = "the ranks wait at collectives that not every member of the group reached"
        for rank, waker in self.wakers.items():
            if self.broken or rank == self.holder:
                waker.notify()

    def wait_for_turn(self, rank: int, until=lambda: True) -> None:  # with lock held
        waker = self.wakers.get(rank) or self.wakers.setdefault(rank, threading.Condition(self.lock))
        while True:
            if self.broken:
                raise RuntimeError(f"VirtualWorld: {self.broken}")
            if self.holder == rank and until():
                return
            waker.wait()

class Meeting:
    """Where the threads of a VirtualWorld's group hand each other values: each member leaves its own and gives up the
    turn; the last to come takes every member's values, and each member gets them when its turn comes again."""

    def __init__(self, size: int, turns: Turns) -> None:
        self.size, self.turns = size, turns
        self.slots, self.waiting, self.values, self.done = [None] * size, [], None, 0

    def swap(self, index: int, rank: int, value):
        turns = self.turns
        with turns.lock:
            self.slots[index] = value
            if len(self.waiting) + 1 < self.size:  # wait for the others: the turn passes on
                self.waiting.append(rank)
                done, turns.holder = self.done, None
                turns.hand_on()
                turns.wait_for_turn(rank, lambda: self.done > done)
            else:  # the last to come: everyone's values, the waiting members can go on when their turn comes
                self.values, self.slots, self.done = list(self.slots), [None] * self.size, self.done + 1
                turns.ready.update(self.waiting)
                self.waiting = []
            return self.values

@dataclass(frozen=True)
class VirtualGroup(CommGroup):
    """A group of a VirtualWorld: its members are threads of this process, and an all-to-all between them is a
    concatenation of their tensors' slices, an ordinary differentiable operation (see VirtualWorld)."""
    meeting: Meeting  # shared by the group's members
    index: int  # this rank's place in the group

    def all_to_all(self, x: Tensor, send: list[int], recv: list[int], ledger: Optional[CommLedger], tag: str) -> Tensor:
        # every member's rows, cut by destination
        chunks = self.meeting.swap(self.index, self.ranks[self.index], x.split(send))
        out = torch.cat([rows[self.index] for rows in chunks])
        if ledger is not None:
            ledger.record_rows(tag, "forward", send, x, self)
            if out.requires_grad:  # the gradient goes back as a real all-to-all's would: count it when it does
                out.register_hook(lambda g: ledger.record_rows(tag, "backward", recv, g, self))
        return out

@dataclass(frozen=True)
class Topology:
    """Where this rank sits: W = N * G ranks, rank r on node r // G at local slot r % G."""
    rank: int
    world_size: int  # W
    ranks_per_node: int  # G
    num_nodes: int  # N
    node_rank: int  # r // G
    local_rank: int  # r % G
    local: CommGroup  # this rank alone: no collective
    node: CommGroup  # the G ranks of this node
    world: CommGroup  # all W ranks
    peers: CommGroup  # the N ranks at this local slot, one per node: node-limited routing's inter-node hop
    host_group: Optional[dist.ProcessGroup]  # gloo group for host integers (token counts)

    def group(self, tier: str) -> CommGroup:
        """The group a tier exchanges tokens in: "local" (this rank), "node" or "global" (the world)."""
        return {"local": self.local, "node": self.node, "global": self.world}[tier]

    @property
    def local_copy(self) -> bool:
        return self.world.local_copy

    def with_local_copies(self) -> Topology:
        """This topology with every collective a local copy of the same shape (the benchmark's compute-only run)."""
        return emulated_topology(self.world_size, self.ranks_per_node, self.rank)

    def link(self, other: int) -> str:
        """The link class a byte crosses from this rank to rank `other`."""
        return link_class(self.rank, other, self.ranks_per_node)

    def gather_counts(self, count: int) -> list[int]:
        """Every rank's `count` (a host integer such as a token count), in rank order."""
        return [values[0] for values in self.gather_lists([count])]

    def gather_lists(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's list of host integers (as long on every rank), in rank order, over a gloo group on the CPU (or
        between the threads of a VirtualWorld), so that a GPU stream never waits on it. Under local copies every rank
        holds this rank's values."""
        if self.world_size == 1 or self.local_copy:
            return [list(values)] * self.world_size
        if isinstance(self.world, VirtualGroup):  # the world's meeting, as its all-to-alls: one order on every rank
            return [list(v) for v in self.world.meeting.swap(self.world.index, self.rank, list(values))]
        mine = torch.tensor(list(values), dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.host_group)
        return [e.tolist() for e in every]

def build_topology(ranks_per_node: Optional[int] = None) -> Topology:
    """This rank's place and process groups. ranks_per_node: G; default LOCAL_WORLD_SIZE as torchrun sets it, else one
    node; pass it to emulate nodes on one host (4 processes, ranks_per_node=2: 2 nodes of 2). Without torch.distributed:
    a world of one. Every rank calls this, in one order relative to other group creation: each creates every group."""
    initialised = dist.is_available() and dist.is_initialized()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if initialised else (1, 0)
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if initialised else 1
    if not isinstance(ranks_per_node, int) or ranks_per_node < 1:
        raise ValueError(f"ranks_per_node={ranks_per_node!r} must be a positive integer (the ranks that share a node)")
    if world_size % ranks_per_node != 0:
        raise ValueError(f"world size {world_size} is not divisible by ranks_per_node={ranks_per_node}: every node "
                         f"must hold the same number of ranks; choose a divisor of {world_size}")
    G, N = ranks_per_node, world_size // ranks_per_node
    node_rank, local_rank = rank // G, rank % G
    sets = rank_sets(world_size, G)

    def comm_group(name: str, sets: list[list[int]], mine: int) -> CommGroup:
        """Every rank creates every group of `sets`, in order, and keeps its own (the world's if it is the world)."""
        ranks = sets[mine]
        group = None if not initialised or len(ranks) == 1 else (
            dist.group.WORLD if len(sets) == 1 else [dist.new_group(members) for members in sets][mine])
        return CommGroup(name, tuple(ranks), group, tuple(link_class(rank, r, G) for r in ranks))
    node = comm_group("node", sets["node"], node_rank)  # every rank creates the groups in one order
    peers = comm_group("peers", sets["peers"], local_rank)
    host_group = None if world_size == 1 else (  # a gloo group for host integers, whatever the backend
        dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return Topology(rank, world_size, G, N, node_rank, local_rank, comm_group("local", [[rank]], 0), node,
                    comm_group("world", sets["world"], 0), peers, host_group)

def rank_sets(world_size: int, ranks_per_node: int) -> dict[str, list[list[int]]]:
    """The groups of each kind, as lists of global ranks: each node's ranks, the ranks at each local slot (one per
    node: "peers"), and the world."""
    W, G = world_size, ranks_per_node
    return {"node": [list(range(n, n + G)) for n in range(0, W, G)], "peers": [list(range(s, W, G)) for s in range(G)],
            "world": [list(range(W))]}

def _check_world(world_size: int, ranks_per_node: int, rank: int = 0) -> None:
    if not (isinstance(ranks_per_node, int) and ranks_per_node >= 1 and isinstance(world_size, int)
            and world_size % ranks_per_node == 0 and 0 <= rank < world_size):
        raise ValueError(f"a world of {world_size} ranks, {ranks_per_node} per node, rank {rank}: the world must be a "
                         f"positive multiple of ranks_per_node and 0 <= rank < world_size")

def emulated_topology(world_size: int, ranks_per_node: int, rank: int = 0) -> Topology:
    """Rank `rank` of a world of W ranks, G per node, in this one process, every collective a local copy: the
    benchmark's compute-only run of a cluster it does not have. Shapes and the ledger's bytes are a real run's, every
    rank assumed to hold as many tokens as this one."""
    _check_world(world_size, ranks_per_node, rank)
    G, N = ranks_per_node, world_size // ranks_per_node

    def copy_group(name: str, ranks: Sequence[int]) -> CommGroup:
        return LocalCopyGroup(name, tuple(ranks), None, tuple(link_class(rank, r, G) for r in ranks))
    (node_rank, local_rank), sets = divmod(rank, G), rank_sets(world_size, G)
    return Topology(rank, world_size, G, N, node_rank, local_rank, CommGroup("local", (rank,), None, ("intra_device",)),
                    copy_group("node", sets["node"][node_rank]), copy_group("world", sets["world"][0]),
                    copy_group("peers", sets["peers"][local_rank]), None)

class VirtualWorld:
    """W ranks, G per node, in this one process, one thread per rank: every rank's layers run as they would in their
    own process, and the same model trains on one device (a GPU, or a CPU without extra processes). A collective is a
    meeting of threads, an all-to-all a differentiable concatenation of their tensors, so one backward through the sum
    of every rank's loss gives each parameter the gradient that W processes would (the replicated ones summed).
    The threads take turns (Turns), so that random draws inside them (dropout) come in one order, run after run."""

    def __init__(self, world_size: int, ranks_per_node: int) -> None:
        _check_world(world_size, ranks_per_node)
        self.world_size, self.ranks_per_node = world_size, ranks_per_node
        G, W = ranks_per_node, world_size
        sets, self._turns = rank_sets(W, G), Turns()
        meetings = {name: [Meeting(len(ranks), self._turns) for ranks in groups] for name, groups in sets.items()}

        def group(name: str, rank: int) -> CommGroup:
            j = next(j for j, ranks in enumerate(sets[name]) if rank in ranks)
            ranks = sets[name][j]
            links = tuple(link_class(rank, r, G) for r in ranks)
            if len(ranks) == 1:
                return CommGroup(name, tuple(ranks), None, links)
            return VirtualGroup(name, tuple(ranks), None, links, meetings[name][j], ranks.index(rank))
        self.topologies = [Topology(r, W, G, W // G, r // G, r % G, CommGroup("local", (r,), None, ("intra_device",)),
                                    group("node", r), group("world", r), group("peers", r), None) for r in range(W)]
        self._meetings = [m for ms in meetings.values() for m in ms]

    def run(self, fn: Callable[[int], object]) -> list:
        """fn(rank) for every rank, each in its own thread (with the caller's grad mode and autocast), taking turns in
        rank order; the results in rank order. If a rank raises, the others stop and the first error is raised here."""
        grad, autocast = torch.is_grad_enabled(), torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        results, errors, turns = [None] * self.world_size, [], self._turns
        with turns.lock:  # a fresh start: rank 0 has the turn, the others wait for theirs
            turns.ready, turns.holder, turns.live = set(range(self.world_size)), None, self.world_size
            turns.broken = None
            turns.hand_on()

        def work(rank: int) -> None:
            try:
                with turns.lock:
                    turns.wait_for_turn(rank)
                with torch.set_grad_enabled(grad), torch.autocast("cuda", dtype, enabled=autocast):
                    results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                with turns.lock:
                    turns.broken = turns.broken or "another rank failed"
            with turns.lock:
                turns.live -= 1
                turns.holder = None if turns.holder == rank else turns.holder
                turns.hand_on()
        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.world_size)]
        try:
            for t in threads:
                t.start()
        except BaseException:  # a thread that did not start: the started ones must not wait for it
            with turns.lock:
                turns.broken = "a rank's thread did not start"
                turns.hand_on()
            raise
        finally:
            for t in threads:
                if t.ident is not None:
                    t.join()
            for m in self._meetings:  # hold no tensor (and its graph) after the run
                m.slots, m.waiting, m.values = [None] * m.size, [], None
        if errors:
            raise errors[0]
        return results

# --- 2. All-to-all with a link ledger (paper: "The problem") ----------------------------------------------------------

class CommLedger:
    """Bytes this rank handed to each link class by (tag, direction, link): plain data a caller reads and resets."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str, str], int] = {}  # (tag, direction, link) -> bytes
        self.calls: dict[tuple[str, str], int] = {}
        self.to_rank: dict[int, int] = {}  # global rank -> bytes handed to it (every tag and direction)

    def record(self, tag: str, direction: str, sent: Sequence[int], group: CommGroup) -> None:
        """Add `sent[j]` bytes handed to member j of `group` (rank group.ranks[j], link group.links[j])."""
        self.calls[tag, direction] = self.calls.get((tag, direction), 0) + 1
        for nbytes, link, rank in zip(sent, group.links, group.ranks):
            self.bytes[tag, direction, link] = self.bytes.get((tag, direction, link), 0) + nbytes
            self.to_rank[rank] = self.to_rank.get(rank, 0) + nbytes

    def record_rows(self, tag: str, direction: str, rows: Sequence[int], like: Tensor, group: CommGroup) -> None:
        """As record, for rows[j] rows shaped like those of `like` handed to member j."""
        row_bytes = math.prod(like.shape[1:]) * like.element_size()
        self.record(tag, direction, [r * row_bytes for r in rows], group)

    def total(self, link: Optional[str] = None, direction: Optional[str] = None, tag: Optional[str] = None) -> int:
        """Bytes summed over every key that matches the given (non-None) fields."""
        want = (tag, direction, link)
        return sum(b for key, b in self.bytes.items() if all(w is None or w == k for w, k in zip(want, key)))

    def by_link(self, tag: Optional[str] = None) -> dict[str, int]:
        """Forward + backward bytes per link class."""
        return {link: self.total(link=link, tag=tag) for link in LINK_CLASSES}

    def reset(self) -> None:
        for counts in (self.bytes, self.calls, self.to_rank):
            counts.clear()

def _all_to_all_single(x: Tensor, group: CommGroup, send: Splits, recv: Splits, ledger: Optional[CommLedger],
                       tag: str, direction: str) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] if recv is None else sum(recv),) + tuple(x.shape[1:]))
    if ledger is not None:
        ledger.record_rows(tag, direction, send if send is not None else [x.shape[0] // group.size] * group.size, x,
                           group)
    group.exchange(out, x, send, recv)
    return out

class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all-to-all (send and receive splits swapped)."""

    @staticmethod
    def forward(ctx, x, group, send, recv, ledger, tag):
        ctx.args = group, send, recv, ledger, tag
        return _all_to_all_single(x, group, send, recv, ledger, tag, "forward")

    @staticmethod
    def backward(ctx, grad):
        group, send, recv, ledger, tag = ctx.args
        return _all_to_all_single(grad, group, recv, send, ledger, tag, "backward"), None, None, None, None, None

def all_to_all(x: Tensor, group: CommGroup, send_splits: Splits = None, recv_splits: Splits = None, *,
               ledger: Optional[CommLedger] = None, tag: str = "") -> Tensor:
    """Differentiable all-to-all along dim 0: rows [sum(send_splits[:j]), ...) go to group member j; (rows, ...) ->
    (sum(recv_splits), ...), split evenly without splits. On a group of one rank: x itself, and nothing recorded."""
    if group.size == 1:
        return x
    if (send_splits is None) != (recv_splits is None):
        raise ValueError("give both send_splits and recv_splits, or neither for an even split")
    if send_splits is None and x.shape[0] % group.size != 0:
        raise ValueError(f"{x.shape[0]} rows do not split evenly over {group.size} ranks: pass send/recv splits")
    if isinstance(group, VirtualGroup):
        send_splits = send_splits or [x.shape[0] // group.size] * group.size
        return group.all_to_all(x, send_splits, recv_splits or send_splits, ledger, tag)
    return _AllToAll.apply(x, group, send_splits, recv_splits, ledger, tag)

# --- 3. Configuration -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer's settings (sections 5 to 8), checked here before any collective runs (the layers check E / W)."""
    d_model: int  # model width d
    d_ffn: int  # hidden width of each expert's FFN
    num_experts: int  # E: experts in the whole world; each rank holds E / W of them
    capacity_factor: float = 1.0  # slots per expert C = ceil(capacity_factor * k * tokens / experts)
    ratio1: float = 0.0  # alpha: share of tokens (Seq) or width (Feat) served inside the device
    ratio2: float = 0.0  # beta: share served inside the node; the rest, 1 - alpha - beta, is global
    second_expert: str = "argmax"  # "argmax": the second-best expert; "sampling": Gumbel-sampled
    normalize_before_drop: bool = False  # True: GShard's paper; False: fairseq (kept weights renormalised)
    activation: str = "relu"  # expert FFN activation: "relu" or "gelu"
    feat_multiple: int = 8  # Feat slice widths are rounded down to a multiple of this (aligned GEMMs); 1: exact
    feat_hidden: str = "full"  # Feat: "full": each slice's FFN has d_ffn hidden units (the paper); "proportional":
    #   d_ffn * d_slice / d_model (not in the paper: GShard's FFN FLOPs split with the width instead of kept per slice)
    # the authors' (fairseq's) options, off by default (NOTES.md, section 2): used by top2_gating and _MoELayer._tier
    batch_prioritized_routing: bool = False
    eval_capacity_token_fraction: Optional[float] = None  # None: the training formula at eval time too
    local_no_capacity: bool = False

    def __post_init__(self) -> None:
        def number(v, kind) -> bool:  # a bool is not a number (True == 1), nor is a string
            return isinstance(v, kind) and not isinstance(v, bool)
        checks = [  # (fields, test, what the value must be), in order
            (("d_model", "d_ffn", "num_experts", "feat_multiple"), lambda v: number(v, numbers.Integral) and v >= 1,
             "be a positive integer"),
            (("capacity_factor", "ratio1", "ratio2"), lambda v: number(v, numbers.Real) and math.isfinite(v),
             "be a finite number (an int or a float)"),
            (("normalize_before_drop", "batch_prioritized_routing", "local_no_capacity"),  # bool('no') is True
             lambda v: isinstance(v, bool), "be True or False"),
            (("capacity_factor",), lambda v: v > 0, "be > 0 (1.0 gives GShard's C = 2S/E)"),
            (("ratio1", "ratio2"), lambda v: 0 <= v <= 1, "lie in [0, 1] (a share of the tokens or of d_model)"),
            (("second_expert",), lambda v: v in ("argmax", "sampling"), "be 'argmax' or 'sampling'"),
            (("activation",), lambda v: v in ("relu", "gelu"), "be 'relu' or 'gelu'"),
            (("feat_hidden",), lambda v: v in ("full", "proportional"), "be 'full' or 'proportional'"),
            (("eval_capacity_token_fraction",), lambda v: v is None or number(v, (int, float)) and 0 < v <= 1,
             "lie in (0, 1] (a share of the tokens), or be None for the training capacity formula at eval time")]
        for names, ok, must in checks:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ValueError(f"{name}={getattr(self, name)!r} must {must}")
        if round(self.ratio1 + self.ratio2, 9) > 1:
            raise ValueError(f"ratio1 + ratio2 = {self.ratio1} + {self.ratio2} > 1: the local and node shares cannot "
                             f"exceed the whole; lower one of them")

def make_moe_layer(kind: str, cfg: MoEConfig, topology: Topology) -> nn.Module:
    """The MoE layer of a kind: "gshard", "seq", "feat" or "node-limited" (sections 5 to 8)."""
    layers = {"gshard": GShardMoE, "seq": SCoMoESeq, "feat": SCoMoEFeat, "node-limited": NodeLimitedMoE}
    if kind not in layers:
        raise ValueError(f"kind={kind!r} must be one of {sorted(layers)}")
    return layers[kind](cfg, topology)

# --- 4. GShard top-2 gating (GShard, Lepikhin et al. 2020, Algorithm 2) -----------------------------------------------

class Routing(NamedTuple):
    """Where each token goes: the result of a gate, as index tensors."""
    expert: Tensor  # (t, k) long: chosen experts, indices into the gate's experts
    slot: Tensor  # (t, k) long: position in that expert's buffer (meaningful where kept)
    place: Tensor  # (t, k) long: the slot's row in the buffer (expert * c + slot); -1 where not kept
    weight: Tensor  # (t, k) combine weight; 0 where dropped or padding
    kept: Tensor  # (t, k) bool: the assignment fit into the expert's capacity
    token: Tensor  # (e * c,) long: the token each slot (buffer row) holds; -1 if empty
    capacity: int | Sequence[int]  # c: buffer slots per expert (or a list, one per expert: then `token` has their sum)
    aux_loss: Tensor  # () load-balancing loss (a gate per segment of experts: (segments,))
    count: Tensor  # (k, e) long: real assignments each expert got, by choice, before capacity

    @property
    def load(self) -> Tensor:  # (e,): assignments each expert accepted
        count = self.count.sum(dim=0)
        if isinstance(self.capacity, int):
            return count.clamp(max=self.capacity)
        return torch.minimum(count, capacity_tensor(self.capacity, count.shape[0], count.device))

    @property
    def assigned(self) -> Tensor:  # (): real (token, choice) assignments: k * real tokens
        return self.count.sum()

    @property
    def dropped(self) -> Tensor:  # (): share of the assigned that did not fit (0 without real tokens)
        return (self.assigned - self.load.sum()) / self.assigned.clamp_min(1)

def expert_capacity(tokens: int, experts: int, k: int, capacity_factor: float) -> int:
    """Buffer slots per expert: C = ceil(capacity_factor * k * tokens / experts) (k = 2, factor 1: GShard's 2S/E)."""
    return math.ceil(round(capacity_factor * k * tokens / experts, 9))  # float noise dropped: 55.00000000000001 is 55

def inverse_permutation(order: Tensor) -> Tensor:
    """The positions p with order[p] = i, i.e. xs == xs[order][inverse_permutation(order)]: (m,) -> (m,)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))

def capacity_tensor(capacity: int | Sequence[int], e: int, device: torch.device) -> Tensor:
    """Slots per expert as an (e,) long tensor, from one int or a host list (filled run by run: no copy to a GPU)."""
    per_expert = [capacity] * e if isinstance(capacity, int) else capacity
    runs = [(c, len(list(same))) for c, same in itertools.groupby(per_expert)]
    return torch.cat([torch.full((n,), c, dtype=torch.long, device=device) for c, n in runs])

def assign_slots(expert: Tensor, real: Optional[Tensor], e: int, capacity: int | Sequence[int],
                 priority: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Slots for the assignments expert (t, k) that `real` allows ((t,) a token's, (t, k) an assignment's; None: all),
    every first choice before any second choice, in token order or in `priority`'s (t,), by GShard's running count
    of one-hot masks: slot, kept, place (t, k) and token (rows,) as in Routing, and count (k, e): assignments each
    expert got, by choice. `capacity`: slots per expert, one int or a host list of e; the rows are the experts'
    slots in expert order."""
    (t, k), device = expert.shape, expert.device
    allowed = None if real is None else real[:, None].expand(t, k) if real.dim() == 1 else real  # (t, k)
    ranked = expert if priority is None else expert.index_select(0, priority)
    key = ranked.t().reshape(-1)  # (k*t,): choice-major
    if allowed is not None:  # padding is counted under an extra expert e, and never kept
        key = key.masked_fill(~(allowed if priority is None else allowed[priority]).t().reshape(-1), e)
    hot = torch.arange(e + 1, device=device)[:, None] == key  # (e+1, k*t) one-hot masks, an expert per row
    # along rows: a GPU scans a tensor's last dimension fast, a long first one slowly
    slot = (hot.cumsum(dim=1).gather(0, key[None]) - 1).view(k, t).t().contiguous()  # (t, k): earlier, same expert
    if priority is not None:
        slot = slot.index_select(0, inverse_permutation(priority))  # rows back to token order
    if isinstance(capacity, int):
        kept, row, rows = slot < capacity, slot.add(expert, alpha=capacity), e * capacity  # row: expert * c + slot
    else:
        cap = capacity_tensor(capacity, e, device)  # (e,)
        start = cap.cumsum(0) - cap  # (e,): each expert's first row
        kept, row, rows = slot < cap[expert], start[expert] + slot, sum(capacity)
    kept = kept if allowed is None else kept & allowed  # (t, k)
    place = torch.where(kept, row, -1)
    spare = torch.where(kept, row, rows)  # the dropped all write one spare slot, cut off below
    token = torch.full((rows + 1,), -1, dtype=torch.long, device=device)
    token = token.scatter_(0, spare.view(-1), torch.arange(t, device=device)[:, None].expand(t, k).reshape(-1))
    return slot, kept, place, token[:-1], hot[:e].view(e, k, t).sum(dim=2).t()

def _load_balancing_loss(gates: Tensor, first_count: Tensor, real: Optional[Tensor],
                         segments: Optional[Sequence[int]] = None) -> Tensor:
    """GShard's l_aux over the real tokens (t,) bool (None: all), from the gates (t, e) and the first choices each
    expert got, first_count (e,): l_aux = E * sum_e m_e c_e / S (1 when balanced), m_e the mean gate, S the tokens.
    `segments`: the experts in runs of these lengths, each run a gate of its own (a token's gates are 0 outside its
    run): one l_aux per run, over its tokens, (segments,); without them one, ()."""
    runs = [gates.shape[1]] if segments is None else list(segments)
    gate_sum = (gates if real is None else gates * real[:, None]).sum(dim=0)  # (e,)  S * m_e within each run
    losses = torch.stack([len(g) * torch.dot(g, c) / c.sum().clamp_min(1) ** 2  # c.sum(): the run's tokens
                          for g, c in zip(gate_sum.split(runs), first_count.to(gates.dtype).split(runs))])
    return losses if segments is not None else losses[0]

def top2_gating(logits: Tensor, capacity: int | Sequence[int], pad_mask: Optional[Tensor] = None, *,
                second_expert: str = "argmax", normalize_before_drop: bool = False,
                generator: Optional[torch.Generator] = None, batch_prioritized: bool = False,
                segments: Optional[Sequence[int]] = None) -> Routing:
    """GShard's top-2 gating (Algorithm 2) as fairseq's top2gate, logits (t, e), pad_mask (t,): NOTES.md, section 2.
    `capacity`: slots per expert (an int, or a host list of e). `segments`: the experts in runs of these lengths, every
    token gated inside one run (its logits -inf outside it; in a run of one expert, top-1), aux_loss one per run."""
    (t, e), device = logits.shape, logits.device
    k = min(2, e)
    real = None if pad_mask is None else ~pad_mask
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in float32 at least
    gates = logits.softmax(dim=-1)  # (t, e)   g = softmax(x W_g)
    first = gates.argmax(dim=-1)  # (t,)
    expert, allowed, has_second = first[:, None], real, None  # (t, 1)
    if k == 2:
        others = logits.scatter(1, first[:, None], float("-inf"))  # (t, e): the first choice removed
        if second_expert == "sampling":  # fairseq's policy: Gumbel noise on the logits
            uniform = torch.rand(others.shape, generator=generator, device=device, dtype=others.dtype)
            others = others - torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
        second = others.argmax(dim=-1)  # (t,)
        expert = torch.stack([first, second], dim=1)  # (t, k)
        if segments is not None and min(segments) == 1:  # a run of one expert has no second choice
            has_second = others.gather(1, second[:, None]).isfinite()  # (t, 1)
            allowed = torch.cat([torch.ones_like(has_second) if real is None else real[:, None],
                                 has_second if real is None else has_second & real[:, None]], dim=1)  # (t, k)
    # batch-prioritized: within each choice, slots by descending first-choice gate value (ties: token order)
    priority = (gates.gather(1, first[:, None]).squeeze(1).sort(descending=True, stable=True).indices
                if batch_prioritized else None)  # (t,)
    slot, kept, place, token, count = assign_slots(expert, allowed, e, capacity, priority)
    gate = gates.gather(1, expert)  # (t, k)   g_1, g_2
    if has_second is not None:  # no second choice: its gate is 0 (what argmax found in an all -inf row is not one)
        gate = gate * torch.cat([torch.ones_like(has_second), has_second], dim=1)
    if normalize_before_drop:  # GShard's paper: g_i <- g_i / (g_1 + g_2) before the capacity check
        weight = gate / gate.sum(dim=-1, keepdim=True) * kept
    else:  # fairseq: the kept weights renormalised
        gate = gate * kept
        weight = gate / gate.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gate.dtype).eps)
    aux_loss = _load_balancing_loss(gates, count[0], real, segments)
    return Routing(expert, slot, place, weight, kept, token, capacity, aux_loss, count)

def dispatch(x: Tensor, routing: Routing, num_experts: int, rows: Optional[Tensor] = None) -> Tensor:
    """Each expert's tokens in its capacity buffer: (t, d) -> (num_experts, c, d), or (slots, d) for a list of
    capacities.
    `rows` (gate positions,): the row of x each position of the gate is (None: the same). An empty slot holds a copy
    of row 0 that `combine` never reads, so its gradient is 0 (the experts map a zero gradient row to zeros)."""
    token = routing.token.clamp(min=0)  # (slots,)
    if routing.expert.shape[0] == 0:  # nothing gated: every slot is empty and reads a zero row (x's, for autograd)
        x, rows = F.pad(x, (0, 0, 0, 1))[-1:], None
    slots = x.index_select(0, token if rows is None else rows.index_select(0, token))  # (slots, d)
    return slots.view(num_experts, routing.capacity, x.shape[1]) if isinstance(routing.capacity, int) else slots

def combine(expert_out: Tensor, routing: Routing) -> Tensor:
    """y_t = sum_i w_ti * FFN_{e_ti}(x_t): (e, c, d) or (slots, d) -> (t, d). A dropped assignment (weight 0) reads
    slot 0. Backward adds into each slot at most once besides those zeros: no atomics race, the same bits each run."""
    d, (t, k) = expert_out.shape[-1], routing.expert.shape
    picked = expert_out.reshape(-1, d).index_select(0, routing.place.clamp(min=0).view(-1))  # (t*k, d)
    return (routing.weight.to(picked.dtype)[..., None] * picked.view(t, k, d)).sum(dim=1)  # (t, d)

# --- 5. The GShard MoE layer ------------------------------------------------------------------------------------------

class Experts(nn.Module):
    """n position-wise FFNs, FFN(x) = act(x W1 + b1) W2 + b2, evaluated as one batched matmul."""

    def __init__(self, n: int, d_model: int, d_ffn: int, activation: str = "relu") -> None:
        super().__init__()
        self.n, self.d_model, self.d_ffn, self.activation = n, d_model, d_ffn, activation
        self.w1, self.b1 = nn.Parameter(torch.empty(n, d_model, d_ffn)), nn.Parameter(torch.empty(n, 1, d_ffn))
        self.w2, self.b2 = nn.Parameter(torch.empty(n, d_ffn, d_model)), nn.Parameter(torch.empty(n, 1, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:  # as nn.Linear: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases
        for p, fan_in in zip((self.w1, self.b1, self.w2, self.b2), (self.d_model,) * 2 + (self.d_ffn,) * 2):
            nn.init.uniform_(p, -fan_in**-0.5, fan_in**-0.5)

    def forward(self, x: Tensor) -> Tensor:  # (n, c, d) -> (n, c, d)
        h = torch.baddbmm(self.b1, x, self.w1)  # (n, c, f)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return torch.baddbmm(self.b2, h, self.w2)  # (n, c, d)

class Tier(NamedTuple):
    """Where a gate sends its tokens: the experts of `group` (member j holds experts j*n .. j*n+n-1)."""
    name: str  # "local", "node", "global" (or "peers"): the ledger's tag
    group: CommGroup
    capacity: int  # c: slots per expert, the same on every member
    ledger: Optional[CommLedger] = None  # where the bytes are counted

class TierRouting(NamedTuple):
    """What one tier (or the whole GShard layer) did with its tokens."""
    tokens: Optional[Tensor]  # (t_tier,) positions of the tier's tokens in the layer input; None: all
    first_expert: int  # global id of the tier's expert 0 (its experts are contiguous)
    routing: Routing

class MoEOutput(NamedTuple):
    y: Tensor  # (t, d) layer output; 0 for padding
    aux_loss: Tensor  # () load-balancing loss (mean over the tiers that hold real tokens)
    tiers: dict[str, TierRouting]  # "global" for GShard; "local", "node", "global" for SCoMoE

def to_experts(send: Tensor, tier: Tier, n: int) -> Tensor:
    """Send the slots (g * n * c, d), member-major as the experts live, over the tier's group of g: this rank's expert
    input (n, g * c, d), its n experts' slots from every member."""
    g, d = tier.group.size, send.shape[-1]
    recv = all_to_all(send.reshape(-1, d), tier.group, ledger=tier.ledger, tag=tier.name)  # member j's (n, c, d)
    return recv.view(g, n, -1, d).transpose(0, 1).reshape(n, -1, d)  # (n, g*c, d)

def from_experts(h: Tensor, tier: Tier) -> Tensor:
    """The reverse of to_experts: the experts' outputs (n, g * c, d) back to the ranks that sent the slots:
    (g * n * c, d)."""
    n, d, g = h.shape[0], h.shape[2], tier.group.size
    back = h.view(n, g, -1, d).transpose(0, 1).reshape(-1, d)  # member j's slots together
    return all_to_all(back, tier.group, ledger=tier.ledger, tag=tier.name)

def send_to_experts(x: Tensor, logits: Tensor, pad_mask: Optional[Tensor], tier: Tier,
                    cfg: MoEConfig) -> tuple[Routing, Tensor]:
    """Gate x (t, d) over the e = g * n experts of the tier's g members (logits (t, e); one capacity on every member),
    dispatch, and send: the routing, and this rank's expert input (n, g * c, d), its slots from every member."""
    e = logits.shape[1]
    routing = top2_gating(logits, tier.capacity, pad_mask, second_expert=cfg.second_expert,
                          normalize_before_drop=cfg.normalize_before_drop,
                          batch_prioritized=cfg.batch_prioritized_routing)
    return routing, to_experts(dispatch(x, routing, e), tier, e // tier.group.size)

def return_from_experts(h: Tensor, routing: Routing, tier: Tier) -> Tensor:
    """Send the experts' outputs (n, g * c, d) back to their tokens' ranks and combine: (t, d)."""
    return combine(from_experts(h, tier), routing)  # (t, d)

def moe_tier(x: Tensor, logits: Tensor, pad_mask: Optional[Tensor], tier: Tier, experts: Experts,
             cfg: MoEConfig) -> tuple[Tensor, Routing]:
    """One MoE over the tier's experts: gate -> dispatch -> all-to-all -> experts -> all-to-all -> combine."""
    routing, h = send_to_experts(x, logits, pad_mask, tier, cfg)
    return return_from_experts(experts(h), routing, tier), routing

def _check_input(x: Tensor, pad_mask: Optional[Tensor], d_model: int, layer: str) -> None:
    """x must be (t, d_model) and pad_mask, if given, a (t,) bool tensor; shapes and dtypes only, no host sync."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != d_model:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{layer}: x must be a (tokens, d_model={d_model}) tensor, got {got}; "
                         f"flatten batch and sequence first, e.g. x.reshape(-1, {d_model})")
    is_mask = isinstance(pad_mask, Tensor)
    if pad_mask is not None and not (is_mask and pad_mask.dtype == torch.bool and pad_mask.shape == x.shape[:1]):
        got = f"{pad_mask.dtype} of shape {tuple(pad_mask.shape)}" if is_mask else type(pad_mask).__name__
        raise ValueError(f"{layer}: pad_mask must be a bool tensor of shape ({x.shape[0]},), one flag per token "
                         f"of x, got {got}; e.g. pad_mask.reshape(-1).bool()")

def _real_tokens(t: int, pad_mask: Optional[Tensor]) -> int:
    """Real tokens as a host integer: the layers' one device-to-host copy, only with a mask (capacities are shapes)."""
    return t if pad_mask is None else t - int(pad_mask.sum())

def _mean_aux(losses: list[Tensor], like: Tensor) -> Tensor:
    """The mean of the tiers' auxiliary losses (0 when no tier ran)."""
    return torch.stack(losses).mean() if losses else like.new_zeros((), dtype=torch.float32)

class _MoELayer(nn.Module):
    """Every MoE layer's config, topology, n = E / W experts per rank, router W_g over all E, experts, and ledger."""

    def __init__(self, cfg: MoEConfig, topology: Topology) -> None:
        super().__init__()
        if cfg.num_experts % topology.world_size != 0:
            raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the world size {topology.world_size}: "
                             f"every rank holds E / W experts; use a multiple of {topology.world_size}")
        self.cfg, self.topology, self.n = cfg, topology, cfg.num_experts // topology.world_size
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)  # W_g
        self.experts = self._experts()
        self.ledger = CommLedger()

    def _experts(self) -> nn.Module:
        return Experts(self.n, self.cfg.d_model, self.cfg.d_ffn, self.cfg.activation)  # this rank's n experts

    def _tier(self, name: str, largest: int) -> tuple[Tier, int, int]:
        """Tier `name` (capacity for the group's largest real-token count) and its experts' ids [first, last)."""
        group, cfg = self.topology.group(name), self.cfg
        first, last = group.ranks[0] * self.n, (group.ranks[-1] + 1) * self.n  # rank r holds experts r*n .. r*n+n-1
        if name == "local" and cfg.local_no_capacity:  # the least that cannot bind: an expert takes one slot per token
            capacity = largest
        elif not self.training and cfg.eval_capacity_token_fraction is not None:  # whatever the experts, k or factor
            capacity = expert_capacity(largest, 1, 1, cfg.eval_capacity_token_fraction)  # ceil(fraction * largest)
        else:
            capacity = expert_capacity(largest, last - first, min(2, last - first), cfg.capacity_factor)
        return Tier(name, group, capacity, self.ledger), first, last

    def _no_output(self, x: Tensor) -> MoEOutput:
        """The output when no rank of the group holds a real token: 0 everywhere, no tier ran."""
        return MoEOutput(x.new_zeros(x.shape), _mean_aux([], x), {})

class GShardMoE(_MoELayer):
    """The GShard MoE layer: top-2 over all E experts, one all-to-all over the world each way."""

    def forward(self, x: Tensor, pad_mask: Optional[Tensor] = None) -> MoEOutput:  # x: (t, d)
        _check_input(x, pad_mask, self.cfg.d_model, "GShardMoE")
        counts = self.topology.gather_counts(_real_tokens(x.shape[0], pad_mask))  # real tokens of every rank
        if max(counts) == 0:
            return self._no_output(x)
        tier, _, _ = self._tier("global", max(counts))
        y, routing = moe_tier(x, self.router(x), pad_mask, tier, self.experts, self.cfg)  # router: (t, E)
        return MoEOutput(y, routing.aux_loss, {"global": TierRouting(None, 0, routing)})

# --- 6. SCoMoE-Seq (paper: "SCoMoE-Seq", slicing the token dimension) -------------------------------------------------

def three_way_split(total: int, ratio1: float, ratio2: float, num_nodes: int,
                    multiple: int = 1) -> tuple[int, int, int]:
    """`total` (tokens for Seq, width for Feat) into local = int(ratio1 * total), node = int(ratio2 * total), both
    rounded down to a multiple of `multiple`, and global = the rest; one node, or ratio1 + ratio2 = 1: no global."""
    # round(., 9) removes float noise before the floor: 0.29 * 100 = 28.999999999999996 counts as 29
    local, node = (math.floor(round(r * total / multiple, 9)) * multiple for r in (ratio1, ratio2))
    if num_nodes == 1 or round(ratio1 + ratio2, 9) == 1:
        return local, total - local, 0
    return local, node, total - local - node

def seq_select(scores: Tensor, sizes: tuple[int, int, int], topology: Topology, n: int,
               pad_mask: Optional[Tensor] = None) -> list[Tensor]:
    """Token positions of the local, node and global tiers, each in token order, from detached scores (t, E) and the
    tiers' real-token counts: the best by mean score over this rank's experts, then over this node's, then the rest."""
    t, n_real = scores.shape[0], sum(sizes)
    view = scores.view(t, topology.num_nodes, topology.ranks_per_node, n)  # (t, N, G, n)
    local_score = view[:, topology.node_rank, topology.local_rank].mean(dim=-1)  # (t,)
    node_score = view[:, topology.node_rank].mean(dim=(-1, -2))  # (t,)
    if pad_mask is not None:  # padding sorts after every real token and joins the local tier, where it costs nothing
        local_score = local_score.masked_fill(pad_mask, float("-inf"))
    by_local = local_score.sort(descending=True, stable=True).indices  # (t,): by score, ties to the earlier token
    rest = by_local[sizes[0]:n_real]  # (t_node + t_global,)
    by_node = rest[node_score[rest].sort(descending=True, stable=True).indices]
    tiers = [torch.cat([by_local[:sizes[0]], by_local[n_real:]]), by_node[:sizes[1]], by_node[sizes[1]:]]
    return [idx.sort().values for idx in tiers]  # token order: GShard's capacity priority within a tier

class SCoMoESeq(_MoELayer):
    """SCoMoE-Seq: of the t real tokens, int(alpha t) are gated over this rank's experts (no communication), int(beta t)
    over the node's, the rest over all, sharing the experts: about 1 - alpha - beta of GShard's inter-node bytes.
    One gate for all tiers: its experts are the tiers' experts side by side, a token's logits -inf outside its tier."""

    def forward(self, x: Tensor, pad_mask: Optional[Tensor] = None) -> MoEOutput:  # x: (t, d)
        _check_input(x, pad_mask, self.cfg.d_model, "SCoMoESeq")
        topo, cfg = self.topology, self.cfg
        mine = three_way_split(_real_tokens(x.shape[0], pad_mask), cfg.ratio1, cfg.ratio2, topo.num_nodes)
        # every rank's tier sizes fix the tiers' capacities; ratio1 = 1: all local on every rank, no collective at all
        everyone = None if cfg.ratio1 == 1 else [
            three_way_split(c, cfg.ratio1, cfg.ratio2, topo.num_nodes) for c in topo.gather_counts(sum(mine))]
        logits = self.router(x)  # (t, E)
        runs = []  # the tiers that run: (tier, its token positions, its first expert, its number of experts)
        for i, (name, idx) in enumerate(zip(TIERS, seq_select(logits.detach(), mine, topo, self.n, pad_mask))):
            largest = mine[i] if everyone is None else max(everyone[r][i] for r in topo.group(name).ranks)
            if largest > 0:  # else no member has real tokens here: the whole group skips the tier
                tier, first, last = self._tier(name, largest)
                runs.append((tier, idx, first, last - first))
        if not runs:  # no real token on any rank
            return self._no_output(x)
        order = torch.cat([idx for _, idx, _, _ in runs])  # (t_run,): the tokens tier by tier, each in token order
        # one gate for all tiers: a tier's rows hold its experts' logits in its own columns, -inf elsewhere
        widths = [e for *_, e in runs]
        lefts = itertools.accumulate(widths[:-1], initial=0)  # each tier's first column
        tier_logits = logits.index_select(0, order).split([idx.shape[0] for _, idx, _, _ in runs])
        gate_logits = torch.cat([F.pad(lg[:, first:first + e], (left, sum(widths) - left - e), value=float("-inf"))
                                 for lg, (_, _, first, e), left in zip(tier_logits, runs, lefts)])  # (t_run, columns)
        routing = top2_gating(gate_logits, [tier.capacity for tier, *_, e in runs for _ in range(e)],
                              None if pad_mask is None else pad_mask.index_select(0, order),
                              second_expert=cfg.second_expert, normalize_before_drop=cfg.normalize_before_drop,
                              batch_prioritized=cfg.batch_prioritized_routing, segments=widths)
        send = dispatch(x, routing, sum(widths), rows=order).split([e * tier.capacity for tier, *_, e in runs])
        hs = [to_experts(chunk, tier, self.n) for chunk, (tier, *_) in zip(send, runs)]  # (n, g*c, d) each
        # the tiers share the experts: one batched FFN over every tier's slots
        outs = self.experts(torch.cat(hs, dim=1)).split([h.shape[1] for h in hs], dim=1)
        back = torch.cat([from_experts(h, tier) for h, (tier, *_) in zip(outs, runs)])  # (slots, d) as `send`
        y = x.new_zeros(x.shape).index_copy(0, order, combine(back, routing))  # (t, d); a skipped tier's padding: 0
        tiers = tier_routings(routing, runs)
        losses = [tiers[name].routing.aux_loss for i, name in enumerate(TIERS) if name in tiers and mine[i] > 0]
        return MoEOutput(y, _mean_aux(losses, x), tiers)

def tier_routings(routing: Routing, runs: list[tuple[Tier, Tensor, int, int]]) -> dict[str, TierRouting]:
    """Each tier's share of Seq's one gate, in the tier's own numbering (its tokens, experts and buffer rows; a tier of
    one expert has one choice per token, as its own gate would)."""
    out, top, left, row = {}, 0, 0, 0
    for j, (tier, idx, first, e) in enumerate(runs):
        (t, c), k = (idx.shape[0], tier.capacity), min(2, e)
        rows = slice(top, top + t)
        kept, token = routing.kept[rows, :k], routing.token[row:row + e * c]
        part = Routing(routing.expert[rows, :k] - left, routing.slot[rows, :k],
                       torch.where(kept, routing.place[rows, :k] - row, -1), routing.weight[rows, :k], kept,
                       torch.where(token >= 0, token - top, -1), c, routing.aux_loss[j],
                       routing.count[:k, left:left + e])
        out[tier.name] = TierRouting(idx, first, part)
        top, left, row = top + t, left + e, row + e * c
    return out

# --- 7. SCoMoE-Feat (paper: "SCoMoE-Feat", slicing the feature dimension) ---------------------------------------------

def feat_widths(cfg: MoEConfig, num_nodes: int) -> tuple[int, int, int]:
    """Widths (d_local, d_node, d_global) of the slices, multiples of cfg.feat_multiple; a ratio > 0: a slice > 0."""
    widths = three_way_split(cfg.d_model, cfg.ratio1, cfg.ratio2, num_nodes, cfg.feat_multiple)
    for tier, ratio, width in zip(TIERS[:2], (cfg.ratio1, cfg.ratio2), widths):
        if ratio > 0 and width == 0:
            raise ValueError(f"SCoMoE-Feat: the {tier} slice of d_model={cfg.d_model} at ratio {ratio} has width 0 "
                             f"(widths are multiples of feat_multiple={cfg.feat_multiple}); raise the ratio to at "
                             f"least {cfg.feat_multiple}/{cfg.d_model}, lower feat_multiple, or set the ratio to 0")
    return widths

class SCoMoEFeat(_MoELayer):
    """SCoMoE-Feat: d_model split into local / node / global slices, gated over this rank's, the node's and all
    experts, the outputs concatenated back to d_model. Inter-node bytes: d_global / d_model of GShard's."""

    def _experts(self) -> nn.Module:  # every expert is three FFNs, one per slice width (hidden: cfg.feat_hidden)
        cfg = self.cfg
        self.widths = feat_widths(cfg, self.topology.num_nodes)  # (d_local, d_node, d_global)
        hidden = [cfg.d_ffn if cfg.feat_hidden == "full" else max(1, round(cfg.d_ffn * w / cfg.d_model))
                  for w in self.widths]
        return nn.ModuleDict({tier: Experts(self.n, width, f, cfg.activation)
                              for tier, width, f in zip(TIERS, self.widths, hidden) if width > 0})

    def forward(self, x: Tensor, pad_mask: Optional[Tensor] = None) -> MoEOutput:  # x: (t, d)
        _check_input(x, pad_mask, self.cfg.d_model, "SCoMoEFeat")
        topo, cfg = self.topology, self.cfg
        n_real = _real_tokens(x.shape[0], pad_mask)
        # the node and global slices need every rank's count for their capacity; the local slice does not
        counts = topo.gather_counts(n_real) if self.widths[1] + self.widths[2] > 0 else None
        logits = self.router(x)  # (t, E): the router reads the full vector
        outputs, tiers = [], {}
        for name, x_slice in zip(TIERS, x.split(self.widths, dim=-1)):  # (t, d_local), (t, d_node), (t, d_global)
            if name not in self.experts:  # a slice of width 0
                continue
            largest = n_real if counts is None or name == "local" else max(counts[r] for r in topo.group(name).ranks)
            if largest == 0:  # no member has real tokens: the slice's output is 0
                outputs.append(x_slice.new_zeros(x_slice.shape))
                continue
            tier, first, last = self._tier(name, largest)
            y, routing = moe_tier(x_slice, logits[:, first:last], pad_mask, tier, self.experts[name], cfg)
            outputs.append(y)
            tiers[name] = TierRouting(None, first, routing)
        losses = [tr.routing.aux_loss for tr in tiers.values()] if n_real > 0 else []
        return MoEOutput(torch.cat(outputs, dim=-1), _mean_aux(losses, x), tiers)  # (t, d)

# --- 8. Node-limited routing (a baseline beside SCoMoE, not in the paper) ---------------------------------------------

def node_choice(gates: Tensor, num_nodes: int) -> Tensor:
    """The node each token is restricted to (M = 1): (t, E) -> (t,), its 2 best gates sum highest; ties to the lower."""
    t, E = gates.shape
    per_node = gates.view(t, num_nodes, E // num_nodes)  # (t, N, G*n)
    return per_node.topk(min(2, E // num_nodes), dim=-1).values.sum(dim=-1).argmax(dim=-1)  # (t,)

class NodeLimitedMoE(_MoELayer):
    """Top-2 inside one node per token (node_choice): hop 1 to its peer on that node, hop 2 top-2 there (NOTES.md)."""

    def forward(self, x: Tensor, pad_mask: Optional[Tensor] = None) -> MoEOutput:  # x: (t, d)
        topo, cfg, (t, d) = self.topology, self.cfg, x.shape
        N, node_experts = topo.num_nodes, cfg.num_experts // topo.num_nodes
        largest = max(topo.gather_counts(_real_tokens(t, pad_mask)))
        if largest == 0:
            return self._no_output(x)
        real = None if pad_mask is None else ~pad_mask
        logits = self.router(x)  # (t, E)
        gates = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # (t, E)
        node = node_choice(gates.detach(), N)  # (t,)
        first = gates.detach().view(t, N, node_experts)[torch.arange(t, device=x.device), node].argmax(dim=-1)  # (t,)
        # hop 1: each token once to its peer on the chosen node; slots in token order, c1 per node
        c1 = expert_capacity(largest, N, 1, cfg.capacity_factor)
        slot, kept, place, token, count = assign_slots(node[:, None], real, N, c1)  # (t, 1), token: (N*c1,)
        first_count = gates.new_zeros(cfg.num_experts).scatter_add_(  # first choices inside the node
            0, node * node_experts + first, gates.new_ones(t) if real is None else real.to(gates.dtype))
        aux_loss = _load_balancing_loss(gates, first_count, real)
        hop1 = Routing(node[:, None], slot, place, kept.to(x.dtype), kept, token, c1, aux_loss, count)  # weight: kept
        filled = (token >= 0)[:, None].to(x.dtype)  # (N*c1, 1): 1 in a filled slot, 0 in an empty one
        send = torch.cat([dispatch(x, hop1, N).view(N * c1, d), filled], dim=1)  # (N*c1, d+1): node-major
        recv = all_to_all(send, topo.peers, ledger=self.ledger, tag="peers")  # (N*c1, d+1): from every node
        # hop 2: top-2 over this node's experts inside the node, scored here by the (replicated) router
        x2, empty = recv[:, :d], recv[:, d] < 0.5  # (N*c1, d), (N*c1,)
        lo = topo.node_rank * node_experts
        c2 = expert_capacity(largest, node_experts, min(2, node_experts), cfg.capacity_factor)
        tier = Tier("node", topo.node, c2, self.ledger)
        y2, routing = moe_tier(x2, self.router(x2)[:, lo:lo + node_experts], empty, tier, self.experts, cfg)
        back = all_to_all(y2, topo.peers, ledger=self.ledger, tag="peers")  # (N*c1, d): each token's output
        y = combine(back.view(N, c1, d), hop1)  # (t, d): 0 for a token hop 1 dropped
        return MoEOutput(y, aux_loss, {"peers": TierRouting(None, 0, hop1), "node": TierRouting(None, lo, routing)})

# --- 9. Token clustering (paper: "Token clustering": a balanced router, differentiable sorting) -----------------------

def padding_scores(scores: Tensor, pad_mask: Tensor) -> Tensor:
    """scores (t, C) with the padding rows set to lo - (hi - lo) (lo - 1 if all real scores are equal): NOTES.md."""
    real = scores.masked_fill(pad_mask[:, None], float("nan"))  # (t, C)
    finite = real[real.isfinite()]
    if finite.numel() == 0:
        return scores.masked_fill(pad_mask[:, None], 0.0)
    lo, hi = finite.min(), finite.max()
    return scores.masked_fill(pad_mask[:, None], lo - torch.where(hi > lo, hi - lo, torch.ones_like(lo)))

def sort_tokens(x: Tensor, scores: Tensor, order: Tensor, tau: float, pad_mask: Optional[Tensor] = None) -> Tensor:
    """Differentiable sorting M X, M = P + S - stopgrad(S), without a (t, t) matrix: x (t, d), scores (t, C), order (t,)
    the hard sort P; S's rows in NOTES.md. The value is exactly P X; the gradient reaches the scores via S."""
    t, C = scores.shape
    m = t // C  # slots per cluster
    logits = scores.to(torch.promote_types(scores.dtype, torch.float32)) / tau  # softmax in float32 at least
    if pad_mask is not None:
        logits = logits.masked_fill(pad_mask[:, None], torch.finfo(logits.dtype).min)
    soft = logits.softmax(dim=0)  # (t, C): column e = softmax over tokens of s[:, e] / tau
    zero = (soft - soft.detach()) / m  # (t, C): S - stopgrad(S), transposed; exactly 0 in value
    mix = zero.t().to(x.dtype) @ x  # (C, d): (S - stopgrad(S)) X, equal for the rows of one cluster
    return x[order] + mix.repeat_interleave(m, dim=0)  # (t, d): P X + (S - stopgrad(S)) X

class ClusterPlan(NamedTuple):
    """How the clustering layer moved the tokens: carried by the layers after it, used to send them back."""
    order: Tensor  # (t_pad,) this rank's token positions in the order they were sent
    send_splits: list[int]  # tokens sent to each rank
    recv_splits: list[int]  # tokens received from each rank
    pad_mask: Tensor  # (t_recv,) True for padding among the tokens now on this rank
    num_tokens: int  # t: this rank's tokens before padding
    group: CommGroup  # the world

class TokenClustering(nn.Module):
    """The first MoE layer with clustering: router W_c, one cluster per rank (route_to="rank") or node, the balanced
    assignment, an all-to-all, then x + FFN(x) (pre_norm: FFN(LN(x))) or BASE's sigmoid gate. Undo: uncluster."""

    def __init__(self, d_model: int, d_ffn: int, topology: Topology, *, route_to: str = "rank",
                 gate: str = "softmax", tau: float = 0.5, activation: str = "relu", pre_norm: bool = False) -> None:
        super().__init__()
        if route_to not in ("rank", "node"):
            raise ValueError(f"route_to={route_to!r} must be 'rank' (one cluster per rank) or 'node'")
        if gate not in ("softmax", "sigmoid"):
            raise ValueError(f"gate={gate!r} must be 'softmax' (differentiable sorting) or 'sigmoid' (BASE layers)")
        if not tau > 0:
            raise ValueError(f"tau={tau} must be > 0 (the authors use 0.5)")
        self.topology, self.route_to, self.gate, self.tau = topology, route_to, gate, tau
        self.num_clusters = topology.world_size if route_to == "rank" else topology.num_nodes
        self.router = nn.Linear(d_model, self.num_clusters, bias=False)  # W_c: one column per cluster
        self.ffn = Experts(1, d_model, d_ffn, activation)  # this rank's FFN
        self.norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self.ledger = CommLedger()

    @property
    def own_cluster(self) -> int:
        """The cluster this rank serves: its rank, or its node."""
        return self.topology.rank if self.route_to == "rank" else self.topology.node_rank

    def cluster(self, x: Tensor, pad_mask: Optional[Tensor] = None, detach_router_input: bool = False,
                balanced: bool = True) -> tuple[Tensor, ClusterPlan]:
        """Each token to its cluster's rank: (t, d) -> (t_recv, d), and the plan; balanced=False: argmax (NOTES.md)."""
        _check_input(x, pad_mask, self.router.in_features, "TokenClustering")
        topo, (t, d) = self.topology, x.shape
        W, G = topo.world_size, topo.ranks_per_node
        pad = (-t) % W if balanced else 0  # balanced: t_pad a multiple of W, the same share to every rank
        x = torch.cat([x, x.new_zeros(pad, d)])  # (t_pad, d)
        is_pad = torch.arange(t + pad, device=x.device) >= t  # (t_pad,)
        if pad_mask is not None:
            is_pad[:t] = pad_mask
        scores = self.router(self.norm(x.detach() if detach_router_input else x))  # (t_pad, C)
        if t + pad == 0:
            cluster = torch.zeros(0, dtype=torch.long, device=x.device)
        elif balanced:  # padding scores lie below every real token's, so padding is assigned last
            cluster = balanced_assignment(padding_scores(scores.detach(), is_pad))  # (t_pad,)
        else:  # each token to its best cluster; padding stays home
            cluster = scores.detach().argmax(dim=-1).masked_fill(is_pad, self.own_cluster)  # (t,)
        order = cluster.sort(stable=True).indices  # (t_pad,): slots by cluster, token order within
        if balanced:  # cluster c's slots go to rank c (rank) or over ranks c*G .. (node): slot i to rank i // share
            send = [(t + pad) // W] * W
        else:  # a node's tokens are spread over its ranks as evenly as they go, in slot order
            count = torch.bincount(cluster, minlength=self.num_clusters).tolist()  # tokens per cluster (host sync)
            send = count if self.route_to == "rank" else [
                count[r // G] // G + (r % G < count[r // G] % G) for r in range(W)]
        soft = self.gate == "softmax" and balanced and t + pad > 0
        sent = sort_tokens(x, scores, order, self.tau, is_pad) if soft else x[order]  # (t_pad, d)
        recv = [sends[topo.rank] for sends in topo.gather_lists(send)]  # what every rank sends us
        moved = all_to_all(sent, topo.world, send, recv, ledger=self.ledger, tag="cluster")  # (t_recv, d)
        moved_pad = all_to_all(is_pad[order].to(torch.uint8), topo.world, send, recv, ledger=self.ledger,
                               tag="cluster").bool()  # (t_recv,)
        return moved, ClusterPlan(order, send, recv, moved_pad, t, topo.world)

    def forward(self, x: Tensor, pad_mask: Optional[Tensor] = None, detach_router_input: bool = False,
                balanced: bool = True) -> tuple[Tensor, ClusterPlan]:
        moved, plan = self.cluster(x, pad_mask, detach_router_input, balanced)  # (t_recv, d)
        z = self.norm(moved)  # (t_recv, d)
        h = self.ffn(z[None])[0]  # (t_recv, d)
        if self.gate == "softmax":
            return moved + h, plan  # x + FFN(x), or x + FFN(LN(x)) with pre_norm
        w_c = self.router.weight[self.own_cluster]  # (d,): this rank's cluster
        g = torch.sigmoid((z.detach() if detach_router_input else z) @ w_c)[:, None]  # (t_recv, 1)
        return g * h + (1 - g) * moved, plan  # sigmoid(x.w_c) FFN(x) + (1 - sigmoid(x.w_c)) x

def uncluster(y: Tensor, plan: ClusterPlan, ledger: Optional[CommLedger] = None) -> Tensor:
    """Send the tokens back to their ranks and undo the sort: (t_recv, d) -> (t, d), padding removed."""
    back = all_to_all(y, plan.group, plan.recv_splits, plan.send_splits, ledger=ledger, tag="cluster")  # (t_pad, d)
    return back.index_select(0, inverse_permutation(plan.order))[:plan.num_tokens]  # (t, d) in token order

# --- Appendix. The balanced assignment (why the auction is right: NOTES.md) -----------------------------------------

# T tokens to C clusters, m = T / C each, maximal total score s(t, c), by Bertsekas' auction as in BASE layers: cluster
# c's price p(c) is its lowest bid on record, and every holder t of c keeps eps-complementary slackness (NOTES.md):
#   s(t, c) - p(c) >= max_k (s(t, k) - p(k)) - eps                        (CS)
_NEG_INF = float("-inf")
_START_FRACTION = 0.25  # eps scaling: the first phase's eps, in score ranges (without scaling, ties make price wars)
_EPS_FACTOR = 6.0  # each later phase divides eps by this, down to the final eps
_MIN_EPS_REL = 1e-13  # eps must stay well above float64 rounding of prices of size `scale`
_EPS_PER_STD = 1e-7  # the default final eps in standard deviations of the scores: gap <= T * eps = 1e-7 * T * std
_MAX_ROUNDS_PER_PHASE = 1_000_000  # a safety net so that a bug cannot loop forever (a phase always ends)

def _score_facts(s: Tensor) -> tuple[bool, bool, bool, bool, float, float, float]:
    """(NaN?, +inf?, -inf?, a row all -inf?, least, greatest and std of the finite scores) of s (T, C): one sync."""
    forbidden, finite = torch.isneginf(s), s.isfinite()  # (T, C)
    facts = torch.stack([s.isnan().any(), s.isposinf().any(), forbidden.any(), forbidden.all(dim=1).any()]).to(s.dtype)
    lo, hi = torch.where(finite, s, torch.inf).amin().reshape(1), torch.where(finite, s, -torch.inf).amax().reshape(1)
    count = finite.sum().clamp(min=1)
    big = torch.where(finite, s, 0).abs().amax().clamp(min=torch.finfo(s.dtype).tiny)  # divided out: no overflow
    z = torch.where(finite, s / big, 0)  # (T, C) in [-1, 1]
    std = (torch.where(finite, z - z.sum() / count, 0).square().sum() / count).sqrt().mul(big).reshape(1)
    nan, posinf, neginf, dead_row, lo, hi, std = torch.cat([facts, lo, hi, std]).tolist()
    return bool(nan), bool(posinf), bool(neginf), bool(dead_row), lo, hi, std

def _feasible(allowed: Tensor, m: int) -> bool:
    """Whether m tokens can go to every cluster by allowed (T, C) pairs only (no row all False): NOTES.md's max flow."""
    pattern, n = allowed.cpu().unique(dim=0, return_counts=True)       # (P, C), (P,)
    pat, C = pattern.long(), allowed.shape[1]                             # (P, C)
    k = pat.sum(dim=1)                                                    # (P,) clusters each pattern allows
    # pattern p's n % k extra tokens go to its clusters from the (p mod k)-th on: one-token patterns do not pile up
    turn = (pat.cumsum(dim=1) - 1 - torch.arange(len(n))[:, None]) % k[:, None]   # (P, C)
    x = (pat * (n // k)[:, None] + (pattern & (turn < (n % k)[:, None])).long()).t().contiguous()  # (C, P)
    patt = pat.t().contiguous()                                           # (C, P)
    load = x.sum(dim=1)                                                   # (C) tokens in each cluster
    edge = x @ pat                                                        # (C, C) tokens in a allowed in b
    for _ in range(int(allowed.shape[0]) + 1):                            # each pass moves >= 1 token home
        over = load > m                                                   # (C)
        if not bool(over.any()):
            return True
        parent = torch.full((C,), -1, dtype=torch.long)                   # (C) the cluster a move comes from
        seen, frontier, end = over.clone(), over.nonzero().squeeze(1), -1
        while frontier.numel() > 0 and end < 0:                           # breadth first: shortest chains
            step = edge[frontier] > 0                                     # (F, C)
            new = step.any(dim=0) & ~seen                                 # (C)
            parent[new] = frontier[step[:, new].long().argmax(dim=0)]
            seen |= new
            frontier = new.nonzero().squeeze(1)
            short = frontier[load[frontier] < m]
            end = int(short[0]) if short.numel() > 0 else -1
        if end < 0:  # the clusters reachable from the overfull ones break Hall's condition
            return False
        chain = [end]
        while parent[chain[-1]] >= 0:
            chain.append(int(parent[chain[-1]]))                          # z, ..., a
        amount = min(int(load[chain[-1]]) - m, m - int(load[end]), *(int(edge[a, b]) for b, a in zip(chain, chain[1:])))
        for b, a in zip(chain, chain[1:]):                                # from z back: a's tokens are its own
            avail = x[a] * patt[b]                                        # (P) tokens in a allowed in b
            take = (amount - (avail.cumsum(0) - avail)).clamp(min=0).minimum(avail)  # (P)
            x[a], x[b] = x[a] - take, x[b] + take
            some = take.nonzero().squeeze(1)
            moved = take[some] @ pat[some]                                # (C) their allowed clusters
            edge[a], edge[b] = edge[a] - moved, edge[b] + moved
        load[chain[-1]], load[end] = load[chain[-1]] - amount, load[end] + amount
    raise RuntimeError("feasibility check did not terminate; this is a bug, please report the input")

def _bid_for(s_rows: Tensor, price: Tensor, c: Tensor, eps: float) -> Tensor:
    """Bids for clusters c: s[t, c] - max_{k != c} (s[t, k] - p[k]) + eps, the highest price keeping (CS) for t in c."""
    c = c.unsqueeze(-1)                                           # (..., 1)
    w = (s_rows - price).scatter(-1, c, _NEG_INF).amax(dim=-1)    # (...) best value elsewhere
    return s_rows.gather(-1, c).squeeze(-1) - w + eps             # (...)

def _run_rounds(s, price, slot_bid, slot_tok, bidders, eps, m) -> None:
    """Jacobi rounds at a fixed eps until every token holds a cluster; slot_bid, slot_tok, price change in place."""
    T, C, dev = s.shape[0], price.numel(), s.device
    for _ in range(_MAX_ROUNDS_PER_PHASE):
        U = bidders.numel()
        if U == 0:
            return
        bidders = torch.sort(bidders).values                      # (U) ascending token index
        s_bid = s[bidders]                                        # (U, C)
        best = (s_bid - price).argmax(dim=1)                      # (U) c1; ties: the lowest index (first maximum)
        bid = _bid_for(s_bid, price, best, eps)                   # (U) p[c1] + (v1 - v2) + eps
        # group the new bids by cluster, highest first; equal bids keep ascending token index (stable sorts)
        order = torch.sort(bid, descending=True, stable=True).indices
        order = order[torch.sort(best[order], stable=True).indices]
        b_c, b_bid, b_tok = best[order], bid[order], bidders[order]      # (U)
        n_new = torch.bincount(b_c, minlength=C)                         # (C) bids per cluster
        rank = torch.arange(U, device=dev) - (torch.cumsum(n_new, 0) - n_new)[b_c]  # (U) rank in its cluster
        rows = n_new.nonzero().squeeze(1)                                # (R) clusters with bids
        R, K = rows.numel(), int(n_new.max())                            # (host sync)
        row_of = torch.empty(C, dtype=torch.long, device=dev).index_put_((rows,), torch.arange(R, device=dev))
        at = (row_of[b_c], rank)                                         # each new bid's place in (R, K)
        new_bid = torch.full((R, K), _NEG_INF, dtype=s.dtype, device=dev).index_put_(at, b_bid)  # (R, K)
        new_tok = torch.full((R, K), T, dtype=torch.long, device=dev).index_put_(at, b_tok)      # (R, K)
        # holders bid again at today's prices ("refresh", NOTES.md): still (CS), >= the bid on record
        held_tok = slot_tok[rows]                                        # (R, m)
        s_held = s[held_tok.clamp(max=T - 1)]                            # (R, m, C)
        held_bid = torch.where(held_tok < T, _bid_for(s_held, price, rows[:, None].expand(R, m), eps), slot_bid[rows])
        # each cluster keeps the m highest bids; a holder wins a tie (stable sort); empty slots fill first
        cand_bid, pos = torch.sort(torch.cat([held_bid, new_bid], dim=1), dim=1, descending=True, stable=True)
        cand_tok = torch.cat([held_tok, new_tok], dim=1).gather(1, pos)  # (R, m+K)
        slot_bid[rows], slot_tok[rows] = cand_bid[:, :m], cand_tok[:, :m]
        price[rows] = cand_bid[:, m - 1]         # p(c) = lowest bid kept (or the floor)
        losers = cand_tok[:, m:].reshape(-1)     # (R*K) holders pushed out and rejected newcomers bid next round
        bidders = losers[losers < T]                                     # (U') (host sync)
    raise RuntimeError("auction did not terminate; this is a bug, please report the input")

def _start_phase(s, price, owner, eps, m):
    """A new eps phase: prices, and tokens still in (CS) with renewed bids, kept; the rest bid (floor: old price)."""
    T, C = s.shape
    bid = _bid_for(s, price, owner, eps)                          # (T) renewed bid at the new eps
    keep = bid >= price[owner]                                    # (T) (CS) at the new eps
    bid = bid.masked_fill(~keep, _NEG_INF)                        # (T)
    # cluster by cluster (each holds exactly m at the end of a phase): kept tokens first, by descending bid
    order = torch.sort(bid, descending=True, stable=True).indices
    order = order[torch.sort(owner[order], stable=True).indices].view(C, m)  # (C, m)
    kept = keep[order]                                            # (C, m)
    slot_bid = torch.where(kept, bid[order], price[:, None])      # (C, m) floor = old price
    slot_tok = torch.where(kept, order, T)                        # (C, m)
    return slot_bid, slot_tok, slot_bid[:, m - 1].clone(), (~keep).nonzero().squeeze(1)  # price >= old price

def _n_violators(s, price, owner, eps) -> int:
    """How many tokens break (CS) at these prices: their bid at eps is below their cluster's price."""
    return int((_bid_for(s, price, owner, eps) < price[owner]).sum())  # (host sync)

def _repair_prices(s, price, owner, eps):
    """Prices that keep more of the assignment: Bellman-Ford on (CS) as p[a] - p[b] <= D[a, b] (NOTES.md)."""
    T, C = s.shape
    diff = s.gather(1, owner[:, None]) - s                        # (T, C) s(t,a) - s(t,b)
    D = torch.full((C, C), float("inf"), dtype=s.dtype, device=s.device)
    # the margin eps/2 absorbs float rounding: prices that meet the constraints at eps/2 meet (CS) at eps
    D = D.scatter_reduce(0, owner[:, None].expand(T, C), diff, "amin") + eps / 2   # (C, C)
    p = price
    for _ in range(C):                                            # Bellman-Ford
        p_next = torch.minimum(p, (p[None, :] + D).amin(dim=1))   # p(a) <- min_b (p(b) + D(a, b))
        if torch.equal(p_next, p):                                # (host sync) all constraints hold
            return p
        p = p_next
    # a negative cycle: keep whichever prices leave fewer violators (a phase starts from any prices)
    return p if _n_violators(s, p, owner, eps) < _n_violators(s, price, owner, eps) else price

def _eps_schedule(span: float, eps_final: float) -> list[float]:
    eps, schedule = max(_START_FRACTION * span, eps_final), []
    while eps > eps_final:
        schedule, eps = schedule + [eps], eps / _EPS_FACTOR
    return schedule + [eps_final]

def balanced_assignment(scores: Tensor, eps: float | None = None) -> Tensor:
    """Assign T tokens to C clusters, exactly T // C each, maximising sum_t scores[t, cluster[t]]: (T, C) -> (T,) int64,
    within T * eps of OPT; -inf: a forbidden pair; T: a multiple of C (else pad: padding_scores); eps: the final slack.
    Contract, defaults, errors, algorithm and proofs: the appendix of NOTES.md."""
    if not isinstance(scores, Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (T tokens, C clusters), got shape {tuple(scores.shape)}; "
                         "flatten the batch and sequence dims into T first, e.g. scores.reshape(-1, C)")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating point tensor, got dtype {scores.dtype}")
    T, C = scores.shape
    if C < 1 or T < C or T % C != 0:
        fix = (f"pad the tokens to T' = {max(C, -(-T // C) * C)} rows with masked padding tokens whose score row is "
               "constant and below every real token's score (padding_scores does this), then drop the padding rows "
               "from the result" if C >= 1 else "give at least one cluster")
        raise ValueError(f"balanced assignment needs T to be a positive multiple of C (every cluster gets exactly "
                         f"T // C tokens), got T={T} tokens and C={C} clusters; {fix}")
    m, dev, s = T // C, scores.device, scores.detach().to(torch.float64)  # s: (T, C)
    nan, posinf, has_forbidden, dead_row, lo, hi, std = _score_facts(s)
    if nan:
        raise ValueError("scores contain NaN; replace them before calling, e.g. with scores.nan_to_num(nan="
                         "float('-inf')) to forbid those token/cluster pairs, or with a finite low value to only "
                         "discourage them")
    if posinf:
        raise ValueError("scores contain +inf; use large finite values instead (only -inf is supported, meaning "
                         "'forbidden token/cluster pair')")
    forbidden = torch.isneginf(s)                                 # (T, C)
    if dead_row:  # (with C = 1, any -inf is such a row)
        raise ValueError(f"infeasible: token {int(forbidden.all(dim=1).nonzero()[0])} has score -inf for every "
                         "cluster; give it at least one finite score (padding rows must be finite)")
    if has_forbidden and not _feasible(~forbidden, m):           # before the auction, which would take long
        raise ValueError("infeasible: no balanced assignment (T // C tokens per cluster) avoids the -inf scores; "
                         "allow more token/cluster pairs or relax the balance constraint")
    eps = None if eps is None else float(eps)
    if eps is not None and not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    # in units of a power of two 2^e >= max |score|: exact, and no overflow however large the scores (1e308)
    unit = math.ldexp(1.0, -max(math.frexp(max(-lo, hi))[1], 0))
    s, lo, hi, std = s * unit, lo * unit, hi * unit, std * unit
    span = hi - lo if hi > lo else 1.0                            # the score range
    if eps is None:  # a power of two: the std's last bits (a sum, rounded differently per device) cannot matter
        eps = math.ldexp(1.0, math.frexp(_EPS_PER_STD * std)[1] - 1) if std > 0 else span
        # but not below what float64 resolves next to the prices: about span, or T * span with -inf penalties
        eps = max(eps, 2 * _MIN_EPS_REL * span * (T + 2 if has_forbidden else 1))
    else:
        eps *= unit
    if C == 1:                                                    # nothing to decide (and no -inf: dead_row)
        return torch.zeros(T, dtype=torch.long, device=dev)
    s, scale = s - lo, span                                       # finite scores in [0, span]
    if has_forbidden:  # a penalty > (T-1)*span + T*eps: a -inf pair costs more than any finite assignment gains
        penalty = (T + 1) * (span + eps)
        s, scale = torch.where(forbidden, torch.full_like(s, -penalty), s), span + penalty
    if eps < _MIN_EPS_REL * scale:  # prices stay within a few `scale` of 0, and eps must not vanish next to them
        raise ValueError(f"eps={eps / unit:g} is too small for float64 arithmetic at score scale {scale / unit:g}; "
                         f"use eps >= {_MIN_EPS_REL * scale / unit:g}")
    price, slot_bid = s.new_zeros(C), s.new_zeros(C, m)          # (C), (C, m) phase 0: zero prices, every slot empty
    slot_tok, bidders, cluster = torch.full((C, m), T, dtype=torch.long, device=dev), torch.arange(T, device=dev), None
    repair = C * C <= max(T, 1 << 14)  # Bellman-Ford's O(C^3) is small next to a phase's O(T * C) or its rounds
    for phase, eps_k in enumerate(_eps_schedule(span, eps)):     # eps decreasing
        if phase > 0:
            # prices that let every token satisfy (CS) at the final eps end the search: within T * eps already
            if repair and _n_violators(s, _repair_prices(s, price, cluster, eps), cluster, eps) == 0:
                break
            if repair:
                price = _repair_prices(s, price, cluster, eps_k)
            slot_bid, slot_tok, price, bidders = _start_phase(s, price, cluster, eps_k, m)
        _run_rounds(s, price, slot_bid, slot_tok, bidders, eps_k, m)   # until all assigned
        owner = torch.full((T + 1,), -1, dtype=torch.long, device=dev)  # every slot is full: each token's cluster
        owner[slot_tok.reshape(-1)] = torch.arange(C, device=dev).repeat_interleave(m)
        cluster = owner[:T]                                                 # (T)
    # every token holds a cluster, every cluster is full, and (CS) holds at the final eps: within T * eps of OPT
    if has_forbidden and bool(forbidden.gather(1, cluster[:, None]).any()):  # _feasible said one avoids them
        raise RuntimeError("the auction used a -inf pair of a feasible input; this is a bug, please report the input")
    return cluster
