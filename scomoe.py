"""SCoMoE: mixtures of experts with structured all-to-all communication.

A reference implementation of Zeng and Xiong, "SCoMoE: Efficient Mixtures of
Experts with Structured Communication" (ICLR 2023), in one file, to be read
beside the paper. NOTES.md maps every element of the method to the code below
and records each choice the paper leaves open.

Sections, in the order of the paper:
  1. Topology and process groups     ranks, nodes, and the local/node/world groups
  2. All-to-all with a link ledger   a differentiable collective that counts bytes per link class
  3. GShard top-2 gating             Algorithm 2 of GShard, dispatch and combine by index
  4. The GShard MoE layer            gate -> all-to-all -> experts -> all-to-all -> combine
  5. SCoMoE-Seq                      tokens split into local / node / global tiers
  6. SCoMoE-Feat                     the model width split into local / node / global slices
  7. Configuration                   one dataclass, validated before any collective runs

What is simplified: experts are plain two-layer FFNs run as one batched matmul;
there is no expert or data parallelism beyond what SCoMoE needs (shared
parameters are replicated and their gradients are the caller's to all-reduce);
capacity is the same for every rank of a group (computed from the group's
largest token count, as fairseq gets by padding every rank to the largest).

Shape letters used in comments:
  t  tokens on this rank (a batch, flattened)    d  model width (or a Feat slice of it)
  f  expert hidden width                         e  experts a gate chooses among
  n  experts on each rank (E / W)                c  capacity: buffer slots per expert
  k  experts per token (2; 1 where a gate has a single expert)
  g  ranks in a communication group              W, G, N  world size, ranks per node, nodes
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

LINK_CLASSES = ("intra_device", "intra_node", "inter_node")
TIERS = ("local", "node", "global")


def _floor(x: float) -> int:
    """floor(x) with float noise removed: 0.29 * 100 = 28.999999999999996 counts as 29."""
    return math.floor(round(x, 9))


def _ceil(x: float) -> int:
    """ceil(x) with float noise removed: 1.1 * 2 * 100 / 4 = 55.00000000000001 counts as 55."""
    return math.ceil(round(x, 9))


# ----------------------------------------------------------------------------
# 1. Topology and process groups (paper: "Topology")


def link_class(src: int, dst: int, ranks_per_node: int) -> str:
    """The link a byte crosses from rank src to rank dst: same device, same node, or another node."""
    if src == dst:
        return "intra_device"
    return "intra_node" if src // ranks_per_node == dst // ranks_per_node else "inter_node"


@dataclass(frozen=True)
class CommGroup:
    """A set of ranks that exchange tokens, with the handle torch.distributed needs."""

    name: str  # "local", "node" or "world"
    ranks: tuple[int, ...]  # global ranks, in the order of group ranks
    group: Optional[dist.ProcessGroup]  # None when the group is this rank alone
    links: tuple[str, ...]  # link class from this rank to each member, one of LINK_CLASSES

    @property
    def size(self) -> int:
        return len(self.ranks)


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
    host_group: Optional[dist.ProcessGroup]  # gloo group for host integers (token counts)

    def link(self, other: int) -> str:
        """The link class a byte crosses from this rank to rank `other`."""
        return link_class(self.rank, other, self.ranks_per_node)

    def gather_counts(self, count: int) -> list[int]:
        """Every rank's `count` (a host integer such as a token count), in rank order.

        Runs over a gloo group on the CPU, so that a GPU stream never waits on it.
        """
        if self.world_size == 1:
            return [count]
        mine = torch.tensor([count], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.host_group)
        return [int(c) for c in every]


def build_topology(ranks_per_node: Optional[int] = None) -> Topology:
    """Derive this rank's place and create its process groups explicitly.

    ranks_per_node: G. Default: LOCAL_WORLD_SIZE as torchrun sets it; without
    torchrun every rank is on one node. Pass it to emulate several nodes on one
    host (4 processes with ranks_per_node=2 are 2 nodes of 2 ranks). Without an
    initialised torch.distributed this is a world of one. Every rank must call
    this, in the same order relative to other group creation: dist.new_group is
    called for every node, on every rank, and each rank keeps its own.
    """
    initialised = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialised else 1
    rank = dist.get_rank() if initialised else 0
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if initialised else 1
    if not isinstance(ranks_per_node, int) or ranks_per_node < 1:
        raise ValueError(f"ranks_per_node={ranks_per_node!r} must be a positive integer (the ranks that share one node)")
    if world_size % ranks_per_node != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by ranks_per_node={ranks_per_node}: "
            f"every node must hold the same number of ranks; choose a divisor of {world_size}"
        )
    G, N = ranks_per_node, world_size // ranks_per_node
    node_rank, local_rank = rank // G, rank % G

    def comm_group(name: str, ranks: list[int], group) -> CommGroup:
        return CommGroup(name, tuple(ranks), group, tuple(link_class(rank, r, G) for r in ranks))

    # every rank creates every node group, in node order, and keeps its own
    node_group = None
    if initialised and 1 < G < world_size:
        for n in range(N):
            created = dist.new_group(list(range(n * G, (n + 1) * G)))
            if n == node_rank:
                node_group = created
    elif initialised and G == world_size > 1:
        node_group = dist.group.WORLD
    world_group = dist.group.WORLD if world_size > 1 else None
    host_group = None
    if world_size > 1:
        host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Topology(
        rank=rank,
        world_size=world_size,
        ranks_per_node=G,
        num_nodes=N,
        node_rank=node_rank,
        local_rank=local_rank,
        local=comm_group("local", [rank], None),
        node=comm_group("node", list(range(node_rank * G, (node_rank + 1) * G)), node_group),
        world=comm_group("world", list(range(world_size)), world_group),
        host_group=host_group,
    )


# ----------------------------------------------------------------------------
# 2. All-to-all with a link ledger (paper: "The problem")


class CommLedger:
    """Bytes this rank handed to each link class, by tag and direction.

    Plain data that a caller reads and resets (each MoE layer owns one); the
    library never prints it. Keys: tag (e.g. the tier), direction ("forward" or
    "backward"), link ("intra_device", "intra_node", "inter_node").
    """

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str, str], int] = {}
        self.calls: dict[tuple[str, str], int] = {}

    def record(self, tag: str, direction: str, sent: Sequence[int], links: Sequence[str]) -> None:
        """Add `sent[j]` bytes handed to group member j, whose link class is links[j]."""
        self.calls[tag, direction] = self.calls.get((tag, direction), 0) + 1
        for nbytes, link in zip(sent, links):
            self.bytes[tag, direction, link] = self.bytes.get((tag, direction, link), 0) + nbytes

    def total(self, link: Optional[str] = None, direction: Optional[str] = None, tag: Optional[str] = None) -> int:
        """Bytes summed over every key that matches the given (non-None) fields."""
        return sum(
            b
            for (t, d, l), b in self.bytes.items()
            if (tag is None or t == tag) and (direction is None or d == direction) and (link is None or l == link)
        )

    def by_link(self, tag: Optional[str] = None) -> dict[str, int]:
        """Forward + backward bytes per link class."""
        return {link: self.total(link=link, tag=tag) for link in LINK_CLASSES}

    def tags(self) -> list[str]:
        return sorted({t for t, _, _ in self.bytes})

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def _all_to_all_single(x: Tensor, group: CommGroup, send: Optional[list[int]], recv: Optional[list[int]],
                       ledger: Optional[CommLedger], tag: str, direction: str) -> Tensor:
    x = x.contiguous()
    rows = x.shape[0] if recv is None else sum(recv)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    if ledger is not None:
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        sent = send if send is not None else [x.shape[0] // group.size] * group.size
        ledger.record(tag, direction, [r * row_bytes for r in sent], group.links)
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group.group)
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


def all_to_all(x: Tensor, group: CommGroup, send_splits: Optional[list[int]] = None,
               recv_splits: Optional[list[int]] = None, *, ledger: Optional[CommLedger] = None,
               tag: str = "") -> Tensor:
    """Differentiable all-to-all along dim 0: rows [sum(send_splits[:j]), ...) go to group member j.

    x: (rows, ...) -> (sum(recv_splits), ...). Without splits, rows are split
    evenly. On a group of one rank it returns x itself and records nothing.
    """
    if group.size == 1:
        return x
    if (send_splits is None) != (recv_splits is None):
        raise ValueError("give both send_splits and recv_splits, or neither for an even split")
    if send_splits is None and x.shape[0] % group.size != 0:
        raise ValueError(f"{x.shape[0]} rows do not split evenly over {group.size} ranks: pass send/recv splits")
    return _AllToAll.apply(x, group, send_splits, recv_splits, ledger, tag)


# ----------------------------------------------------------------------------
# 3. GShard top-2 gating (GShard, Lepikhin et al. 2020, Algorithm 2)


class Routing(NamedTuple):
    """Where each token goes: the result of a gate, as index tensors."""

    expert: Tensor  # (t, k) long: chosen experts, indices into the gate's experts
    slot: Tensor  # (t, k) long: position in that expert's buffer (meaningful where kept)
    weight: Tensor  # (t, k) combine weight; 0 where dropped or padding
    kept: Tensor  # (t, k) bool: the assignment fit into the expert's capacity
    capacity: int  # c: buffer slots per expert
    aux_loss: Tensor  # () load-balancing loss
    load: Tensor  # (e,) assignments each expert accepted
    dropped: Tensor  # () share of real (token, choice) assignments past capacity


def expert_capacity(tokens: int, experts: int, k: int, capacity_factor: float) -> int:
    """Buffer slots per expert: C = ceil(capacity_factor * k * tokens / experts).

    With k = 2 and capacity_factor = 1 this is GShard's C = 2S/E, rounded up.
    """
    return _ceil(capacity_factor * k * tokens / experts)


def top2_gating(logits: Tensor, capacity: int, pad_mask: Optional[Tensor] = None, *,
                second_expert: str = "argmax", normalize_before_drop: bool = False,
                generator: Optional[torch.Generator] = None) -> Routing:
    """GShard's top-2 gating (Algorithm 2), as fairseq's top2gate does it.

    logits: (t, e) router scores; pad_mask: (t,) True for padding tokens, which
    take no slot, get weight 0 and are left out of the auxiliary loss. A gate
    over a single expert routes each token to it (k = 1).
    second_expert: "argmax" takes the second-best expert; "sampling" draws it
    with Gumbel noise on the logits (fairseq's "sampling" policy).
    normalize_before_drop: GShard's paper scales g1, g2 to sum 1 before the
    capacity check; fairseq (default here) renormalises the kept weights after.
    """
    t, e = logits.shape
    k = min(2, e)
    real = torch.ones(t, dtype=torch.bool, device=logits.device) if pad_mask is None else ~pad_mask
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in float32 at least
    gates = logits.softmax(dim=-1)  # (t, e)   g = softmax(x W_g)
    first = gates.argmax(dim=-1)  # (t,)
    if k == 2:
        others = logits.masked_fill(F.one_hot(first, e).bool(), float("-inf"))  # (t, e)
        if second_expert == "sampling":
            uniform = torch.rand(others.shape, generator=generator, device=others.device, dtype=others.dtype)
            others = others - torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
        expert = torch.stack([first, others.argmax(dim=-1)], dim=1)  # (t, k)
    else:
        expert = first[:, None]  # (t, 1)

    # Slots: every token's first choice is placed (in token order) before any
    # token's second choice, so choice-major order is the priority order.
    chosen = F.one_hot(expert.t(), e) * real[None, :, None]  # (k, t, e)
    position = chosen.reshape(k * t, e).cumsum(dim=0).reshape(k, t, e) - 1  # (k, t, e)
    slot = (position * chosen).sum(dim=-1).t()  # (t, k)
    kept = real[:, None] & (slot < capacity)  # (t, k)

    gate = gates.gather(1, expert)  # (t, k)   g_1, g_2
    if normalize_before_drop:
        gate = gate / gate.sum(dim=-1, keepdim=True)  # g_i <- g_i / (g_1 + g_2)
        weight = gate * kept
    else:
        gate = gate * kept
        weight = gate / gate.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gate.dtype).eps)

    n_real = real.sum().clamp_min(1)
    mean_gate = (gates * real[:, None]).sum(dim=0) / n_real  # (e,)  m_e: mean gate value
    first_share = chosen[0].sum(dim=0) / n_real  # (e,)  c_e / S: share of tokens whose first choice is e
    aux_loss = e * (mean_gate * first_share).sum()  # l_aux = E * sum_e m_e * c_e / S   (1 when balanced)

    assigned = chosen.sum()
    load = (chosen * kept.t()[..., None]).sum(dim=(0, 1))  # (e,)
    dropped = 1 - load.sum() / assigned.clamp_min(1)
    return Routing(expert, slot, weight, kept, capacity, aux_loss, load, dropped)


def dispatch(x: Tensor, routing: Routing, num_experts: int) -> Tensor:
    """Gather each expert's tokens into its capacity buffer: (t, d) -> (e, c, d).

    Slot expert * c + slot holds the token that took it. Empty slots copy an
    arbitrary token; their expert outputs are never read by `combine`, so they
    carry no gradient.
    """
    t, d = x.shape
    c = routing.capacity
    if t == 0:
        return x.new_zeros(num_experts, c, d)
    flat = routing.expert * c + routing.slot  # (t, k)
    flat = flat.masked_fill(~routing.kept, num_experts * c)  # dropped -> one spare slot past the end
    token = torch.arange(t, device=x.device)[:, None].expand_as(flat)  # (t, k)
    owner = torch.zeros(num_experts * c + 1, dtype=torch.long, device=x.device)
    owner = owner.scatter(0, flat.reshape(-1), token.reshape(-1))  # (e*c + 1,)
    return x[owner[:-1]].view(num_experts, c, d)  # (e, c, d)


def combine(expert_out: Tensor, routing: Routing) -> Tensor:
    """Weighted sum of each token's expert outputs: (e, c, d) -> (t, d).

    y_t = sum_i w_ti * FFN_{e_ti}(x_t); dropped assignments have w = 0.
    """
    e, c, d = expert_out.shape
    t, k = routing.expert.shape
    flat = (routing.expert * c + routing.slot).masked_fill(~routing.kept, 0)  # (t, k)
    picked = expert_out.reshape(e * c, d)[flat.reshape(-1)].view(t, k, d)  # (t, k, d)
    return torch.bmm(routing.weight.to(picked.dtype).unsqueeze(1), picked).squeeze(1)  # (t, d)


class Experts(nn.Module):
    """n position-wise FFNs, FFN(x) = act(x W1 + b1) W2 + b2, evaluated as one batched matmul."""

    def __init__(self, n: int, d_model: int, d_ffn: int, activation: str = "relu") -> None:
        super().__init__()
        self.n, self.d_model, self.d_ffn = n, d_model, d_ffn
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(n, d_model, d_ffn))
        self.b1 = nn.Parameter(torch.empty(n, 1, d_ffn))
        self.w2 = nn.Parameter(torch.empty(n, d_ffn, d_model))
        self.b2 = nn.Parameter(torch.empty(n, 1, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # as nn.Linear: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
        for w, b, fan_in in ((self.w1, self.b1, self.d_model), (self.w2, self.b2, self.d_ffn)):
            nn.init.uniform_(w, -fan_in**-0.5, fan_in**-0.5)
            nn.init.uniform_(b, -fan_in**-0.5, fan_in**-0.5)

    def forward(self, x: Tensor) -> Tensor:  # (n, c, d) -> (n, c, d)
        h = torch.baddbmm(self.b1, x, self.w1)  # (n, c, f)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return torch.baddbmm(self.b2, h, self.w2)  # (n, c, d)


# ----------------------------------------------------------------------------
# 4. The GShard MoE layer


class TierRouting(NamedTuple):
    """What one tier (or the whole GShard layer) did with its tokens."""

    tokens: Optional[Tensor]  # (t_tier,) positions of the tier's tokens in the layer input; None: all
    first_expert: int  # global id of the tier's expert 0 (its experts are contiguous)
    routing: Routing


class MoEOutput(NamedTuple):
    y: Tensor  # (t, d) layer output
    aux_loss: Tensor  # () load-balancing loss (mean over the non-empty tiers)
    tiers: dict[str, TierRouting]  # "global" for GShard; "local", "node", "global" for SCoMoE


def moe_tier(x: Tensor, logits: Tensor, pad_mask: Optional[Tensor], capacity: int, group: CommGroup,
             experts: Experts, cfg: "MoEConfig", ledger: Optional[CommLedger], tag: str) -> tuple[Tensor, Routing]:
    """One MoE over the experts of `group`: gate -> dispatch -> all-to-all -> experts -> all-to-all -> combine.

    x: (t, d); logits: (t, e) over the e = g * n experts that the g members of
    `group` hold (member j holds experts j*n .. j*n+n-1). Every member calls this
    with the same capacity.
    """
    t, d = x.shape
    g, n = group.size, experts.n
    routing = top2_gating(logits, capacity, pad_mask, second_expert=cfg.second_expert,
                          normalize_before_drop=cfg.normalize_before_drop)
    c = routing.capacity
    send = dispatch(x, routing, g * n)  # (g*n, c, d): member-major, as the experts live
    recv = all_to_all(send.view(g * n * c, d), group, ledger=ledger, tag=tag)  # (g*n*c, d): member j's (n, c, d)
    h = recv.view(g, n, c, d).transpose(0, 1).reshape(n, g * c, d)  # (n, g*c, d): each local expert's tokens
    h = experts(h)  # (n, g*c, d)
    back = h.view(n, g, c, d).transpose(0, 1).reshape(g * n * c, d)  # (g*n*c, d)
    out = all_to_all(back, group, ledger=ledger, tag=tag).view(g * n, c, d)  # (g*n, c, d)
    return combine(out, routing), routing


def _check_experts(cfg: "MoEConfig", topology: Topology) -> int:
    """Experts per rank, E / W; raises before any collective if E is not a multiple of W."""
    if cfg.num_experts % topology.world_size != 0:
        raise ValueError(
            f"num_experts={cfg.num_experts} is not divisible by the world size {topology.world_size}: "
            f"every rank holds E / W experts; use a multiple of {topology.world_size}"
        )
    return cfg.num_experts // topology.world_size


def _expert_ranges(topology: Topology, n: int) -> dict[str, tuple[int, int]]:
    """Global ids [first, last) of the experts each tier routes to: this rank's, this node's, all."""
    G = topology.ranks_per_node
    return {
        "local": (topology.rank * n, (topology.rank + 1) * n),
        "node": (topology.node_rank * G * n, (topology.node_rank + 1) * G * n),
        "global": (0, topology.world_size * n),
    }


def _token_counts(topology: Topology, t: int, exchange: bool = True) -> list[int]:
    """Every rank's token count, in rank order. Without the exchange only this rank's count is
    known and the others read 0: enough for a layer whose tokens all stay on their rank."""
    if exchange:
        return topology.gather_counts(t)
    return [t if r == topology.rank else 0 for r in range(topology.world_size)]


def _mean_aux(losses: list[Tensor], like: Tensor) -> Tensor:
    """The mean of the tiers' auxiliary losses (0 when no tier ran)."""
    return torch.stack(losses).mean() if losses else like.new_zeros((), dtype=torch.float32)


class GShardMoE(nn.Module):
    """The GShard MoE layer: top-2 over all E experts, one all-to-all over the world each way."""

    def __init__(self, cfg: "MoEConfig", topology: Topology) -> None:
        super().__init__()
        n = _check_experts(cfg, topology)
        self.cfg, self.topology = cfg, topology
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)  # W_g
        self.experts = Experts(n, cfg.d_model, cfg.d_ffn, cfg.activation)  # this rank's n experts
        self.ledger = CommLedger()

    def forward(self, x: Tensor, pad_mask: Optional[Tensor] = None) -> MoEOutput:  # x: (t, d)
        counts = _token_counts(self.topology, x.shape[0])  # t of every rank
        if max(counts) == 0:
            return MoEOutput(x.new_zeros(x.shape), _mean_aux([], x), {})
        capacity = expert_capacity(max(counts), self.cfg.num_experts, 2, self.cfg.capacity_factor)
        logits = self.router(x)  # (t, E)
        y, routing = moe_tier(x, logits, pad_mask, capacity, self.topology.world, self.experts,
                              self.cfg, self.ledger, "global")
        return MoEOutput(y, routing.aux_loss, {"global": TierRouting(None, 0, routing)})


# ----------------------------------------------------------------------------
# 5. SCoMoE-Seq (paper: "SCoMoE-Seq", slicing the token dimension)


def three_way_split(total: int, ratio1: float, ratio2: float, num_nodes: int) -> tuple[int, int, int]:
    """Split `total` (tokens for Seq, model width for Feat) into local, node and global parts.

    local = int(ratio1 * total), node = int(ratio2 * total), global = the rest.
    With one node there is no global part (the node's experts are all experts),
    and with ratio1 + ratio2 = 1 there is none either: node takes the rest.
    """
    local = _floor(ratio1 * total)
    if num_nodes == 1 or round(ratio1 + ratio2, 9) == 1:
        node = total - local
    else:
        node = _floor(ratio2 * total)
    return local, node, total - local - node


def seq_select(scores: Tensor, sizes: tuple[int, int, int], topology: Topology, n: int,
               pad_mask: Optional[Tensor] = None) -> list[Tensor]:
    """Token positions of the local, node and global tiers (each in token order).

    scores: (t, E) detached router scores, viewed as (t, N, G, n). The local
    tier takes the sizes[0] tokens with the highest mean score over this rank's
    experts, the node tier the sizes[1] of the rest with the highest mean score
    over this node's experts, the global tier the remainder. Padding tokens are
    ranked last; ties go to the earlier token (stable sort).
    """
    t = scores.shape[0]
    view = scores.view(t, topology.num_nodes, topology.ranks_per_node, n)  # (t, N, G, n)
    local_score = view[:, topology.node_rank, topology.local_rank].mean(dim=-1)  # (t,)
    node_score = view[:, topology.node_rank].mean(dim=(-1, -2))  # (t,)
    if pad_mask is not None:
        local_score = local_score.masked_fill(pad_mask, float("-inf"))
        node_score = node_score.masked_fill(pad_mask, float("-inf"))
    by_local = local_score.sort(descending=True, stable=True).indices  # (t,)
    rest = by_local[sizes[0]:]  # (t - t_local,)
    by_node = rest[node_score[rest].sort(descending=True, stable=True).indices]  # (t - t_local,)
    tiers = [by_local[:sizes[0]], by_node[:sizes[1]], by_node[sizes[1]:]]
    return [idx.sort().values for idx in tiers]  # token order: GShard's capacity priority within a tier


class SCoMoESeq(nn.Module):
    """SCoMoE-Seq: one router over all experts; each token served by the local, node or global tier.

    Local tier: int(alpha * t) tokens gated over this rank's experts, no
    communication. Node tier: int(beta * t) tokens, top-2 over the node's
    experts, all-to-all inside the node. Global tier: the rest, top-2 over all
    experts, all-to-all over the world. Inter-node bytes fall to about
    (1 - alpha - beta) of GShard's.
    """

    def __init__(self, cfg: "MoEConfig", topology: Topology) -> None:
        super().__init__()
        self.n = _check_experts(cfg, topology)
        self.cfg, self.topology = cfg, topology
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)  # W_g, one router over all E
        self.experts = Experts(self.n, cfg.d_model, cfg.d_ffn, cfg.activation)
        self.ledger = CommLedger()

    def forward(self, x: Tensor, pad_mask: Optional[Tensor] = None) -> MoEOutput:  # x: (t, d)
        topo, cfg = self.topology, self.cfg
        split = lambda t: three_way_split(t, cfg.ratio1, cfg.ratio2, topo.num_nodes)  # noqa: E731
        # every rank's t fixes its tier sizes, hence each tier's capacity; with ratio1 = 1 only the
        # local tier can hold tokens and nothing is exchanged: the layer runs no collective at all
        counts = _token_counts(topo, x.shape[0], exchange=cfg.ratio1 < 1)
        if max(counts) == 0:
            return MoEOutput(x.new_zeros(x.shape), _mean_aux([], x), {})
        sizes_of_rank = [split(t) for t in counts]  # (local, node, global) of every rank
        logits = self.router(x)  # (t, E)
        tokens = seq_select(logits.detach(), sizes_of_rank[topo.rank], topo, self.n, pad_mask)
        groups = {"local": topo.local, "node": topo.node, "global": topo.world}
        ranges = _expert_ranges(topo, self.n)

        outputs, tiers, losses = [], {}, []
        for i, tier in enumerate(TIERS):
            group = groups[tier]
            largest = max(sizes_of_rank[r][i] for r in group.ranks)  # the group's largest tier
            if largest == 0:  # no member has tokens here: the whole group skips the tier
                continue
            first, last = ranges[tier]
            idx = tokens[i]  # (t_tier,)
            capacity = expert_capacity(largest, last - first, min(2, last - first), cfg.capacity_factor)
            y, routing = moe_tier(x[idx], logits[idx, first:last], None if pad_mask is None else pad_mask[idx],
                                  capacity, group, self.experts, cfg, self.ledger, tier)
            outputs.append((idx, y))
            tiers[tier] = TierRouting(idx, first, routing)
            if idx.numel() > 0:
                losses.append(routing.aux_loss)
        # outputs back in token order: y[positions of tier i] = y_i
        order = torch.cat([idx for idx, _ in outputs])  # (t,)
        y = torch.cat([y for _, y in outputs]).index_select(0, order.argsort())  # (t, d)
        return MoEOutput(y, _mean_aux(losses, x), tiers)


# ----------------------------------------------------------------------------
# 6. SCoMoE-Feat (paper: "SCoMoE-Feat", slicing the feature dimension)


def feat_widths(cfg: "MoEConfig", num_nodes: int) -> tuple[int, int, int]:
    """Widths (d_local, d_node, d_global) of the three slices; a ratio > 0 must give a slice > 0."""
    widths = three_way_split(cfg.d_model, cfg.ratio1, cfg.ratio2, num_nodes)
    for tier, ratio, width in zip(TIERS[:2], (cfg.ratio1, cfg.ratio2), widths):
        if ratio > 0 and width == 0:
            raise ValueError(
                f"SCoMoE-Feat: the {tier} slice of d_model={cfg.d_model} at ratio {ratio} has width 0; "
                f"raise the ratio to at least 1/{cfg.d_model} or set it to 0"
            )
    return widths


class SCoMoEFeat(nn.Module):
    """SCoMoE-Feat: d_model split into local / node / global slices, each routed within its tier.

    Every expert is three FFNs, one per slice width (each with the full hidden
    size d_ffn). The router reads the full vector; the local slice is gated over
    this rank's experts, the node slice over the node's, the global slice over
    all. The outputs are concatenated back to d_model. Inter-node bytes fall to
    d_global / d_model of GShard's.
    """

    def __init__(self, cfg: "MoEConfig", topology: Topology) -> None:
        super().__init__()
        n = _check_experts(cfg, topology)
        self.cfg, self.topology, self.n = cfg, topology, n
        self.widths = feat_widths(cfg, topology.num_nodes)  # (d_local, d_node, d_global)
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)  # W_g reads the full vector
        self.experts = nn.ModuleDict({
            tier: Experts(n, width, cfg.d_ffn, cfg.activation) for tier, width in zip(TIERS, self.widths) if width > 0
        })
        self.ledger = CommLedger()

    def forward(self, x: Tensor, pad_mask: Optional[Tensor] = None) -> MoEOutput:  # x: (t, d)
        topo, cfg = self.topology, self.cfg
        # the node and global slices need every rank's t for their capacity; the local slice does not
        counts = _token_counts(topo, x.shape[0], exchange=self.widths[1] + self.widths[2] > 0)
        groups = {"local": topo.local, "node": topo.node, "global": topo.world}
        ranges = _expert_ranges(topo, self.n)
        logits = self.router(x)  # (t, E)
        slices = x.split(self.widths, dim=-1)  # (t, d_local), (t, d_node), (t, d_global)

        outputs, tiers, losses = [], {}, []
        for tier, x_slice in zip(TIERS, slices):
            if tier not in self.experts:  # a slice of width 0
                continue
            group = groups[tier]
            largest = max(counts[r] for r in group.ranks)
            first, last = ranges[tier]
            if largest == 0:
                outputs.append(x_slice.new_zeros(x_slice.shape))
                continue
            capacity = expert_capacity(largest, last - first, min(2, last - first), cfg.capacity_factor)
            y, routing = moe_tier(x_slice, logits[:, first:last], pad_mask, capacity, group,
                                  self.experts[tier], cfg, self.ledger, tier)
            outputs.append(y)
            tiers[tier] = TierRouting(None, first, routing)
            if x.shape[0] > 0:
                losses.append(routing.aux_loss)
        return MoEOutput(torch.cat(outputs, dim=-1), _mean_aux(losses, x), tiers)  # (t, d)


# ----------------------------------------------------------------------------
# 7. Configuration


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer's settings, shared by GShardMoE, SCoMoESeq and SCoMoEFeat.

    Every value is checked here, at construction, before any collective runs;
    the layers check the rest against the topology (E divisible by W, Feat slices).
    """

    d_model: int  # model width d
    d_ffn: int  # hidden width of each expert's FFN
    num_experts: int  # E: experts in the whole world; each rank holds E / W of them
    capacity_factor: float = 1.0  # slots per expert C = ceil(capacity_factor * k * tokens / experts)
    ratio1: float = 0.0  # alpha: share of tokens (Seq) or width (Feat) served inside the device
    ratio2: float = 0.0  # beta: share served inside the node; the rest, 1 - alpha - beta, is global
    second_expert: str = "argmax"  # "argmax": the second-best expert; "sampling": Gumbel-sampled
    normalize_before_drop: bool = False  # True: GShard's paper; False: fairseq (kept weights renormalised)
    activation: str = "relu"  # expert FFN activation: "relu" or "gelu"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ffn", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0 (1.0 gives GShard's C = 2S/E)")
        for name in ("ratio1", "ratio2"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must lie in [0, 1] (it is a share of the tokens or of d_model)")
        if round(self.ratio1 + self.ratio2, 9) > 1:
            raise ValueError(
                f"ratio1 + ratio2 = {self.ratio1} + {self.ratio2} > 1: the local and node shares "
                f"cannot exceed the whole; lower one of them"
            )
        if self.second_expert not in ("argmax", "sampling"):
            raise ValueError(f"second_expert={self.second_expert!r} must be 'argmax' or 'sampling'")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation={self.activation!r} must be 'relu' or 'gelu'")
