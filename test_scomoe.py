"""Tests for scomoe.py: every distributed path against a single-process reference.

Multi-process tests run on a pool of 4 gloo CPU processes that stays up for the
whole session (spawning is the slow part); each test builds the topology it
needs: 2 emulated nodes x 2 ranks (ranks_per_node=2) or 1 node x 4. Ranks hold
different token counts. The references are written independently of the
library's dispatch: GShard's Algorithm 2 token by token, and every expert
applied to every token it serves. Comparisons are in float64.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

import scomoe as sc
import train_toy as toy

WORLD = 4
AUX_WEIGHT = 0.1  # weight of the auxiliary loss in the test loss, so its gradient is checked too
COUNTS = [9, 6, 11, 8]  # tokens per rank: different on every rank

# ----------------------------------------------------------------------------
# A pool of gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world: int, port: int, inbox, outbox) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    while (job := inbox.get()) is not None:
        fn, args = job
        try:  # pickle here, so that a result that cannot cross processes is reported, not lost
            outbox.put((rank, True, pickle.dumps(fn(*args))))
        except BaseException:
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Workers:
    """`world` gloo processes that run module-level functions of this file on request."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.procs = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.inboxes = [ctx.Queue() for _ in range(self.world)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, args=(r, self.world, port, self.inboxes[r], self.outbox),
                                  daemon=True) for r in range(self.world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = 120.0) -> list:
        """fn(*args) on every rank; the per-rank results, or an AssertionError with every rank's traceback."""
        if not self.procs:
            self._start()
        for inbox in self.inboxes:
            inbox.put((fn, args))
        results, errors = {}, {}
        try:
            while len(results) + len(errors) < self.world:
                rank, ok, value = self.outbox.get(timeout=timeout)
                if ok:
                    results[rank] = pickle.loads(value)
                else:
                    errors[rank] = value
        except Exception:  # a rank hung or died: start afresh for the next test
            self.close()
            raise AssertionError(f"workers did not answer within {timeout} s; errors so far: {errors}")
        if errors:
            self.close()  # ranks may be left inside a collective
            raise AssertionError("\n".join(f"--- rank {r}\n{tb}" for r, tb in sorted(errors.items())))
        return [results[r] for r in range(self.world)]

    def close(self) -> None:
        for inbox, p in zip(getattr(self, "inboxes", []), self.procs):
            if p.is_alive():
                inbox.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self.procs = []


@pytest.fixture(scope="session")
def workers():
    pool = Workers(WORLD)
    yield pool
    pool.close()


# ----------------------------------------------------------------------------
# Test data and the single-process reference


class Case(NamedTuple):
    xs: list  # per rank (t_r, d) inputs
    pads: list  # per rank (t_r,) padding masks
    cots: list  # per rank (t_r, d) cotangents of the outputs
    router: torch.Tensor  # (E, d)
    # tier or "all" -> {"w1": (E, d_slice, f), "b1": (E, 1, f), "w2": (E, f, d_slice), "b2": (E, 1, d_slice)}
    experts: dict


def make_case(seed: int, counts: list[int], cfg: sc.MoEConfig, widths: dict[str, int] | None = None,
              pad_every: int = 4) -> Case:
    """Random float64 data for every rank (the same on every rank), with every pad_every-th token padding; a count
    -t: t tokens, all padding."""
    g = torch.Generator().manual_seed(seed)
    d, E, f = cfg.d_model, cfg.num_experts, cfg.d_ffn
    pads = [torch.ones(-t, dtype=torch.bool) if t < 0 else torch.arange(t) % pad_every == pad_every - 1 for t in counts]
    counts = [abs(t) for t in counts]
    xs = [torch.randn(t, d, generator=g, dtype=torch.float64) for t in counts]
    cots = [torch.randn(t, d, generator=g, dtype=torch.float64) for t in counts]
    router = torch.randn(E, d, generator=g, dtype=torch.float64)
    widths = widths or {"all": d}
    hidden = {name: f if cfg.feat_hidden == "full" else max(1, round(f * w / d)) for name, w in widths.items()}
    experts = {
        name: {
            "w1": torch.randn(E, w, hidden[name], generator=g, dtype=torch.float64) / math.sqrt(w),
            "b1": torch.randn(E, 1, hidden[name], generator=g, dtype=torch.float64) * 0.1,
            "w2": torch.randn(E, hidden[name], w, generator=g, dtype=torch.float64) / math.sqrt(hidden[name]),
            "b2": torch.randn(E, 1, w, generator=g, dtype=torch.float64) * 0.1,
        }
        for name, w in widths.items()
    }
    return Case(xs, pads, cots, router, experts)


def load_layer(layer: torch.nn.Module, case: Case, rank: int, n: int) -> None:
    """Copy the router and this rank's n experts (global ids rank*n ..) from the case into the layer."""
    with torch.no_grad():
        layer.router.weight.copy_(case.router)
        modules = layer.experts.items() if isinstance(layer.experts, torch.nn.ModuleDict) else [("all", layer.experts)]
        for name, experts in modules:
            for p in ("w1", "b1", "w2", "b2"):
                getattr(experts, p).copy_(case.experts[name][p][rank * n:(rank + 1) * n])


def naive_top2(logits: torch.Tensor, capacity: float, pad: torch.Tensor, normalize_before_drop: bool = False,
               batch_prioritized: bool = False):
    """GShard Algorithm 2, written token by token: (experts, kept, weights, aux) per token.

    Every token's first choice is served before any second choice, in token
    order, while the expert has room; weights are the kept gate values scaled
    to sum 1 (or scaled before dropping when normalize_before_drop).
    batch_prioritized (fairseq's batch-prioritized routing): both passes visit the
    tokens by descending first-choice gate value (ties: earlier token) instead.
    capacity may be math.inf: no expert ever runs out of room.
    """
    t, e = logits.shape
    k = min(2, e)
    gates = logits.softmax(dim=-1)
    picks = [sorted(range(e), key=lambda j: (-gates[i, j].item(), j))[:k] for i in range(t)]
    visit = sorted(range(t), key=lambda i: (-gates[i, picks[i][0]].item(), i)) if batch_prioritized else range(t)
    fill, kept = [0] * e, [[False] * k for _ in range(t)]
    for choice in range(k):
        for i in visit:
            if not pad[i] and fill[picks[i][choice]] < capacity:
                kept[i][choice] = True
                fill[picks[i][choice]] += 1
    weights = []
    for i in range(t):
        g = [gates[i, j] for j in picks[i]]
        if normalize_before_drop:
            total = sum(g)
            weights.append([g[c] / total if kept[i][c] else None for c in range(k)])
        else:
            total = sum(g[c] for c in range(k) if kept[i][c])
            weights.append([g[c] / total if kept[i][c] else None for c in range(k)])
    real = [i for i in range(t) if not pad[i]]
    if real:
        mean_gate = torch.stack([gates[i] for i in real]).mean(dim=0)
        first_share = torch.tensor([sum(picks[i][0] == j for i in real) / len(real) for j in range(e)],
                                   dtype=gates.dtype)
        aux = e * (mean_gate * first_share).sum()
    else:
        aux = gates.new_zeros(())
    return picks, kept, weights, aux


def ffn(p: dict, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `expert` of parameter set p on one token x: relu(x W1 + b1) W2 + b2."""
    return torch.relu(x @ p["w1"][expert] + p["b1"][expert, 0]) @ p["w2"][expert] + p["b2"][expert, 0]


def naive_moe(x, logits, pad, capacity, p, first_expert, normalize_before_drop=False, batch_prioritized=False):
    """Each token's output is the weighted sum of the experts that kept it: (t, d), aux."""
    picks, kept, weights, aux = naive_top2(logits, capacity, pad, normalize_before_drop, batch_prioritized)
    rows = []
    for i in range(x.shape[0]):
        y = x.new_zeros(p["w2"].shape[-1])
        for c, expert in enumerate(picks[i]):
            if kept[i][c]:
                y = y + weights[i][c] * ffn(p, first_expert + expert, x[i])
        rows.append(y)
    return (torch.stack(rows) if rows else x.new_zeros(0, p["w2"].shape[-1])), aux


class Reference(NamedTuple):
    ys: list  # per rank outputs
    auxes: list  # per rank auxiliary losses
    x_grads: list
    router_grad: torch.Tensor
    expert_grads: dict  # like Case.experts


def ref_split(total: int, ratio1: float, ratio2: float, num_nodes: int, multiple: int = 1) -> list[int]:
    """The paper's tier sizes: int(alpha * T), int(beta * T), the rest (node takes the rest on one node or
    when alpha + beta = 1); decimal arithmetic, so that 0.29 * 100 is 29."""
    from fractions import Fraction
    a, b = Fraction(str(ratio1)), Fraction(str(ratio2))
    local = int(a * total / multiple) * multiple
    node = total - local if num_nodes == 1 or a + b == 1 else int(b * total / multiple) * multiple
    return [local, node, total - local - node]


def ref_capacity(tokens: int, experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * k * tokens / experts), k = 2 (1 for a single expert), in decimal arithmetic."""
    from fractions import Fraction
    return math.ceil(Fraction(str(capacity_factor)) * min(2, experts) * tokens / experts)


def ref_capacity_k(tokens: int, experts: int, k: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * k * tokens / experts) in decimal arithmetic."""
    from fractions import Fraction
    return math.ceil(Fraction(str(capacity_factor)) * k * tokens / experts)


def reference_forward(kind: str, xs: list, pads: list, router: torch.Tensor, experts: dict, cfg: sc.MoEConfig,
                      world: int, ranks_per_node: int, training: bool = True) -> tuple[list, list]:
    """Emulate every rank of a `kind` layer in one process, with all experts held here: (ys, auxes) per rank.

    Capacities come from the real (non-padding) token counts of the group's ranks; `training` False is a
    layer in eval mode."""
    G, N = ranks_per_node, world // ranks_per_node
    E = cfg.num_experts
    n = E // world
    real = [int((~pad).sum()) for pad in pads]  # real tokens of every rank
    cf = cfg.capacity_factor
    bpr = cfg.batch_prioritized_routing

    def capacity(tier: str, largest: int, experts: int) -> float:
        if tier == "local" and cfg.local_no_capacity:
            return math.inf  # the local tier never drops a token
        if not training and cfg.eval_capacity_token_fraction is not None:  # eval: a share of the tokens
            from fractions import Fraction
            return math.ceil(Fraction(str(cfg.eval_capacity_token_fraction)) * largest)
        return ref_capacity(largest, experts, cf)
    ys, auxes = [], []
    for r in range(world):
        x, pad = xs[r], pads[r]
        logits = x @ router.t()  # (t, E)
        groups = {"local": [r], "node": range((r // G) * G, (r // G + 1) * G), "global": range(world)}
        ranges = {tier: (min(g) * n, (max(g) + 1) * n) for tier, g in groups.items()}
        if kind == "gshard":
            y, aux = naive_moe(x, logits, pad, capacity("global", max(real), E), experts["all"], 0,
                               cfg.normalize_before_drop, bpr) if max(real) else (x.new_zeros(x.shape), None)
            auxes.append(aux)
        elif kind == "seq":
            split = [ref_split(c, cfg.ratio1, cfg.ratio2, N) for c in real]
            s = logits.detach().view(-1, N, G, n)
            real_tokens = [i for i in range(x.shape[0]) if not pad[i]]
            by_local = sorted(real_tokens, key=lambda i: (-s[i, r // G, r % G].mean().item(), i))
            rest = by_local[split[r][0]:]
            by_node = sorted(rest, key=lambda i: (-s[i, r // G].mean().item(), i))
            padding = [i for i in range(x.shape[0]) if pad[i]]  # padding joins the local tier
            members = {"local": sorted(by_local[:split[r][0]] + padding), "node": sorted(by_node[:split[r][1]]),
                       "global": sorted(by_node[split[r][1]:])}
            y, tier_aux = x.new_zeros(x.shape), []
            for i, tier in enumerate(sc.TIERS):
                idx, largest = members[tier], max(split[q][i] for q in groups[tier])
                if not idx or largest == 0:
                    continue
                first, last = ranges[tier]
                y_tier, aux = naive_moe(x[idx], logits[idx, first:last], pad[idx],
                                        capacity(tier, largest, last - first), experts["all"], first,
                                        cfg.normalize_before_drop, bpr)
                y = y.index_add(0, torch.tensor(idx), y_tier)
                if split[r][i] > 0:  # the aux loss averages the tiers that hold real tokens
                    tier_aux.append(aux)
            auxes.append(torch.stack(tier_aux).mean() if tier_aux else None)
        elif kind == "feat":
            widths = ref_split(cfg.d_model, cfg.ratio1, cfg.ratio2, N, cfg.feat_multiple)
            outs, tier_aux, start = [], [], 0
            for tier, w in zip(sc.TIERS, widths):
                if w == 0:
                    continue
                first, last = ranges[tier]
                largest = max(real[q] for q in groups[tier])
                if largest == 0:
                    outs.append(x.new_zeros(x.shape[0], w))
                else:
                    y_tier, aux = naive_moe(x[:, start:start + w], logits[:, first:last], pad,
                                            capacity(tier, largest, last - first), experts[tier], first,
                                            cfg.normalize_before_drop, bpr)
                    outs.append(y_tier)
                    tier_aux.append(aux)
                start += w
            y = torch.cat(outs, dim=-1)
            auxes.append(torch.stack(tier_aux).mean() if tier_aux and real[r] else None)
        elif kind == "node-limited":
            node_experts = E // N
            t_max = max(real)
            if t_max == 0:
                ys.append(x.new_zeros(x.shape))
                auxes.append(None)
                continue
            c1, c2 = ref_capacity_k(t_max, N, 1, cf), ref_capacity(t_max, node_experts, cf)

            def chosen_node(q):  # each token's node: the highest sum of the node's two best gates, ties lower
                g = (xs[q] @ router.t()).softmax(dim=-1).detach()
                best2 = lambda i, j: sum(sorted(g[i, j * node_experts:(j + 1) * node_experts].tolist())[-2:])  # noqa
                return [max(range(N), key=lambda j: (best2(i, j), -j)) for i in range(xs[q].shape[0])]

            def hop1(q, j):  # the tokens of rank q sent to node j, in token order, at most c1
                nodes = chosen_node(q)
                return [i for i in range(xs[q].shape[0]) if not pads[q][i] and nodes[i] == j][:c1]

            gates = logits.softmax(dim=-1)
            nodes = chosen_node(r)
            real_i = [i for i in range(x.shape[0]) if not pad[i]]
            first = [nodes[i] * node_experts + int(gates[i, nodes[i] * node_experts:(nodes[i] + 1) * node_experts]
                                                   .argmax()) for i in real_i]
            if real_i:
                mean_gate = gates[real_i].mean(dim=0)
                share = torch.tensor([first.count(e) / len(real_i) for e in range(E)], dtype=gates.dtype)
                auxes.append(E * (mean_gate * share).sum())
            else:
                auxes.append(None)
            y = x.new_zeros(x.shape)
            for j in range(N):  # the token's output comes from its peer q on node j
                q = j * G + r % G
                slots, owners = [], []  # q's received buffer: c1 slots from each node's peer, node order
                for j2 in range(N):
                    src = j2 * G + q % G
                    sent = hop1(src, j)
                    slots += [xs[src][i] for i in sent] + [x.new_zeros(x.shape[1])] * (c1 - len(sent))
                    owners += [(src, i) for i in sent] + [None] * (c1 - len(sent))
                x2 = torch.stack(slots)
                empty = torch.tensor([o is None for o in owners])
                y2, _ = naive_moe(x2, (x2 @ router.t())[:, j * node_experts:(j + 1) * node_experts], empty, c2,
                                  experts["all"], j * node_experts, cfg.normalize_before_drop)
                for s_i, o in enumerate(owners):
                    if o is not None and o[0] == r:
                        y = y.index_add(0, torch.tensor([o[1]]), y2[s_i:s_i + 1])
            ys.append(y)
            continue
        ys.append(y)
    zero = router.sum() * 0  # a rank with no tier holding real tokens has aux loss 0
    return ys, [zero if a is None else a for a in auxes]


def run_reference(kind: str, case: Case, cfg: sc.MoEConfig, world: int, ranks_per_node: int,
                  training: bool = True) -> Reference:
    """The reference forward and backward of the test loss, from leaf copies of the case's tensors."""
    xs = [x.clone().requires_grad_() for x in case.xs]
    router = case.router.clone().requires_grad_()
    experts = {name: {k: v.clone().requires_grad_() for k, v in p.items()} for name, p in case.experts.items()}
    ys, auxes = reference_forward(kind, xs, case.pads, router, experts, cfg, world, ranks_per_node, training)
    loss = sum((y * cot).sum() + AUX_WEIGHT * aux for y, cot, aux in zip(ys, case.cots, auxes))
    loss.backward()
    grad = lambda v: torch.zeros_like(v) if v.grad is None else v.grad  # noqa: E731 - unused: gradient 0
    return Reference([y.detach() for y in ys], [a.detach() for a in auxes], [grad(x) for x in xs], grad(router),
                     {name: {k: grad(v) for k, v in p.items()} for name, p in experts.items()})


def run_layer(kind: str, layer: torch.nn.Module, case: Case, rank: int):
    """Forward and backward of this rank's part; returns (output, x.grad, router grad summed over ranks)."""
    x = case.xs[rank].clone().requires_grad_()
    out = layer(x, case.pads[rank])
    ((out.y * case.cots[rank]).sum() + AUX_WEIGHT * out.aux_loss).backward()
    router_grad = layer.router.weight.grad.clone()
    if dist.is_initialized():
        dist.all_reduce(router_grad)  # the router is replicated: its gradient is the sum over ranks
    return out, x.grad, router_grad


def build(kind: str, cfg: sc.MoEConfig, topo: sc.Topology, case: Case) -> torch.nn.Module:
    layer = sc.make_moe_layer(kind, cfg, topo).double()
    load_layer(layer, case, topo.rank, cfg.num_experts // topo.world_size)
    return layer


def widths_of(kind: str, cfg: sc.MoEConfig, num_nodes: int) -> dict[str, int] | None:
    if kind != "feat":
        return None
    return {t: w for t, w in zip(sc.TIERS, sc.feat_widths(cfg, num_nodes)) if w}


def check_against_reference(kind: str, ranks_per_node: int, cfg_args: dict, counts: list[int], seed: int,
                            eval_mode: bool = False):
    """Run on this rank (the layer in eval mode if eval_mode), run the reference, compare outputs, aux and
    every gradient. Returns the ledger bytes and the share dropped in each tier."""
    topo = sc.build_topology(ranks_per_node)
    cfg = sc.MoEConfig(**cfg_args)
    case = make_case(seed, counts, cfg, widths_of(kind, cfg, topo.num_nodes))
    layer = build(kind, cfg, topo, case)
    if eval_mode:
        layer.eval()
    out, x_grad, router_grad = run_layer(kind, layer, case, topo.rank)
    ref = run_reference(kind, case, cfg, topo.world_size, ranks_per_node, training=not eval_mode)
    r, n = topo.rank, cfg.num_experts // topo.world_size
    assert_close(out.y, ref.ys[r])
    assert_close(out.aux_loss.to(torch.float64), ref.auxes[r])
    assert_close(x_grad, ref.x_grads[r])
    assert_close(router_grad, ref.router_grad)
    modules = layer.experts.items() if isinstance(layer.experts, torch.nn.ModuleDict) else [("all", layer.experts)]
    for name, experts in modules:
        for p in ("w1", "b1", "w2", "b2"):
            param = getattr(experts, p)  # an expert that served no token may have no gradient: 0
            assert_close(torch.zeros_like(param) if param.grad is None else param.grad,
                         ref.expert_grads[name][p][r * n:(r + 1) * n], msg=f"{name}.{p}")
    dropped = {tier: float(tr.routing.dropped) for tier, tr in out.tiers.items()}
    return dict(layer.ledger.bytes), dropped


def check_virtual_world(kind: str, ranks_per_node: int, cfg_args: dict, counts: list[int], seed: int):
    """The same check as check_against_reference, every rank a thread of this process (sc.VirtualWorld), the router one
    module shared by the ranks' layers and one backward through the sum of their losses. Returns each rank's ledger."""
    cfg = sc.MoEConfig(**cfg_args)
    world = sc.VirtualWorld(len(counts), ranks_per_node)
    case = make_case(seed, counts, cfg, widths_of(kind, cfg, world.topologies[0].num_nodes))
    layers = [build(kind, cfg, topo, case) for topo in world.topologies]
    for layer in layers[1:]:
        layer.router = layers[0].router  # replicated: one module, its gradient summed over the ranks
    xs = [x.clone().requires_grad_() for x in case.xs]
    outs = world.run(lambda r: layers[r](xs[r], case.pads[r]))
    sum((out.y * cot).sum() + AUX_WEIGHT * out.aux_loss for out, cot in zip(outs, case.cots)).backward()
    ref = run_reference(kind, case, cfg, len(counts), ranks_per_node)
    n = cfg.num_experts // len(counts)
    assert_close(layers[0].router.weight.grad, ref.router_grad)
    for r, (layer, out, x) in enumerate(zip(layers, outs, xs)):
        assert_close(out.y, ref.ys[r])
        assert_close(out.aux_loss.to(torch.float64), ref.auxes[r])
        assert_close(x.grad, ref.x_grads[r])
        modules = layer.experts.items() if isinstance(layer.experts, torch.nn.ModuleDict) else [("all", layer.experts)]
        for name, experts in modules:
            for p in ("w1", "b1", "w2", "b2"):
                param = getattr(experts, p)
                assert_close(torch.zeros_like(param) if param.grad is None else param.grad,
                             ref.expert_grads[name][p][r * n:(r + 1) * n], msg=f"rank {r} {name}.{p}")
    return [dict(layer.ledger.bytes) for layer in layers]


# ----------------------------------------------------------------------------
# 1. Topology and groups


def _topology_facts(ranks_per_node: int):
    topo = sc.build_topology(ranks_per_node)
    # the node group really is the node: a sum over it adds exactly the node's ranks
    total = torch.tensor([float(topo.rank)])
    if topo.node.group is not None:
        dist.all_reduce(total, group=topo.node.group)
    return topo.rank, topo.node_rank, topo.local_rank, topo.num_nodes, topo.node.ranks, topo.world.ranks, \
        topo.node.links, float(total), topo.gather_counts(10 + topo.rank)


@pytest.mark.parametrize("ranks_per_node", [1, 2, 4])
def test_topology_groups_hold_the_right_ranks(workers, ranks_per_node):
    """Rank r sits on node r // G at slot r % G; its node group holds exactly the G ranks of its node
    (an all-reduce over it sums only those), the world group all W, and links are classified by node."""
    G = ranks_per_node
    for r, (rank, node, local, N, node_ranks, world_ranks, links, total, counts) in enumerate(
            workers.run(_topology_facts, G)):
        assert (rank, node, local, N) == (r, r // G, r % G, WORLD // G)
        assert node_ranks == tuple(range(node * G, node * G + G))
        assert world_ranks == tuple(range(WORLD))
        assert links == tuple("intra_device" if q == r else "intra_node" for q in node_ranks)
        assert total == sum(node_ranks)
        assert counts == [10 + q for q in range(WORLD)]


def test_topology_without_distributed_is_a_world_of_one():
    """Without torch.distributed initialised, the topology is one rank on one node and every group is it."""
    topo = sc.build_topology()
    assert (topo.rank, topo.world_size, topo.num_nodes, topo.ranks_per_node) == (0, 1, 1, 1)
    assert topo.local.ranks == topo.node.ranks == topo.world.ranks == (0,)
    assert topo.gather_counts(7) == [7]
    assert sc.link_class(0, 1, 2) == "intra_node" and sc.link_class(1, 2, 2) == "inter_node"


def _topology_error(ranks_per_node):
    with pytest.raises(ValueError, match=f"ranks_per_node={ranks_per_node}"):
        sc.build_topology(ranks_per_node)


@pytest.mark.parametrize("ranks_per_node", [3, 0])
def test_topology_errors(workers, ranks_per_node):
    """A world size not divisible by ranks_per_node, or a non-positive one, is a ValueError raised
    before any group is created (every rank raises, none hangs)."""
    workers.run(_topology_error, ranks_per_node)


# ----------------------------------------------------------------------------
# 2. All-to-all


def _all_to_all_vs_torch(ranks_per_node: int, variable: bool):
    from torch.distributed.nn.functional import all_to_all_single as reference_a2a

    topo = sc.build_topology(ranks_per_node)
    W, r = topo.world_size, topo.rank
    # rank r sends (2r + j) % 3 + 1 rows of width 5 to rank j (variable, not symmetric), or 2 rows (even)
    send = [((2 * r + j) % 3 + 1) if variable else 2 for j in range(W)]
    recv = [((2 * j + r) % 3 + 1) if variable else 2 for j in range(W)]
    assert not variable or send != recv
    g = torch.Generator().manual_seed(r)
    x = torch.randn(sum(send), 5, generator=g, dtype=torch.float64)
    cot = torch.randn(sum(recv), 5, generator=g, dtype=torch.float64)
    ledger = sc.CommLedger()
    x1 = x.clone().requires_grad_()
    y1 = sc.all_to_all(x1, topo.world, send if variable else None, recv if variable else None, ledger=ledger, tag="t")
    (y1 * cot).sum().backward()
    x2 = x.clone().requires_grad_()
    y2 = reference_a2a(torch.empty(sum(recv), 5, dtype=torch.float64), x2, recv if variable else None,
                       send if variable else None)
    (y2 * cot).sum().backward()
    assert_close(y1, y2, rtol=0, atol=0)
    assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    # the ledger holds the bytes handed to each link class: forward by send splits, backward by recv splits
    for direction, splits in (("forward", send), ("backward", recv)):
        for link in sc.LINK_CLASSES:
            expect = sum(s * 5 * 8 for j, s in enumerate(splits) if topo.link(j) == link)
            assert ledger.total(link=link, direction=direction, tag="t") == expect
    assert ledger.calls == {("t", "forward"): 1, ("t", "backward"): 1}
    ledger.reset()
    assert ledger.total() == 0 and not ledger.calls


@pytest.mark.parametrize("variable", [False, True])
def test_all_to_all_matches_torch(workers, variable):
    """The all-to-all Function's forward and backward equal torch.distributed.nn's all_to_all_single
    bit for bit, with even and variable splits, and the ledger counts each destination's bytes by link."""
    workers.run(_all_to_all_vs_torch, 2, variable)


def test_all_to_all_single_rank_returns_input():
    """On a group of one rank the all-to-all is the identity (the same tensor) and records nothing."""
    topo = sc.build_topology()
    x = torch.randn(4, 3)
    ledger = sc.CommLedger()
    assert sc.all_to_all(x, topo.world, ledger=ledger) is x
    assert ledger.total() == 0


# ----------------------------------------------------------------------------
# 3. Gating


def assert_routing_is(routing, reference, capacity: int) -> None:
    """The gate's experts, kept set, weights and aux loss are the reference's, and each expert's kept
    assignments occupy slots 0 .. load-1, once each, load being what the gate reports."""
    picks, kept, weights, aux = reference
    t, experts = len(picks), routing.load.shape[0]
    assert routing.expert.tolist() == picks
    assert routing.kept.tolist() == kept
    for i in range(t):
        for c in range(min(2, experts)):
            expect = weights[i][c] if kept[i][c] else 0.0
            assert_close(routing.weight[i, c], torch.as_tensor(expect, dtype=torch.float64))
    assert_close(routing.aux_loss, aux)
    for e in range(experts):
        slots = sorted(routing.slot[routing.kept & (routing.expert == e)].tolist())
        assert slots == list(range(len(slots))) and len(slots) <= capacity and routing.load[e] == len(slots)


@pytest.mark.parametrize("capacity", [1, 2, 3, 100])
@pytest.mark.parametrize("normalize_before_drop", [False, True])
@pytest.mark.parametrize("experts", [1, 2, 5])
def test_top2_gating_is_gshard_algorithm_2(capacity, normalize_before_drop, experts):
    """top2_gating takes the same experts, slots, kept set, weights and aux loss as GShard's Algorithm 2
    run token by token: first choices before second choices, padding takes no slot."""
    torch.manual_seed(capacity + 10 * experts)
    t = 13
    logits = torch.randn(t, experts, dtype=torch.float64)
    pad = torch.rand(t) < 0.25
    routing = sc.top2_gating(logits, capacity, pad, normalize_before_drop=normalize_before_drop)
    assert_routing_is(routing, naive_top2(logits, capacity, pad, normalize_before_drop), capacity)
    assigned = sum(1 for i in range(t) if not pad[i]) * min(2, experts)
    assert_close(routing.dropped, torch.tensor(1 - routing.kept.sum().item() / assigned, dtype=routing.dropped.dtype))


def test_top2_gating_balanced_aux_is_one_and_sampling_differs():
    """The auxiliary loss is 1 when the gates and the first choices are uniform; "sampling" draws
    the second expert at random (not always the argmax) and never repeats the first."""
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 4] = 1e-6  # first choices spread evenly
    assert_close(sc.top2_gating(logits, 100).aux_loss, torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    logits = torch.randn(400, 6)
    det = sc.top2_gating(logits, 1000)
    gen = torch.Generator().manual_seed(1)
    sam = sc.top2_gating(logits, 1000, second_expert="sampling", generator=gen)
    assert torch.equal(det.expert[:, 0], sam.expert[:, 0])
    assert (sam.expert[:, 1] != det.expert[:, 1]).any()
    assert (sam.expert[:, 1] != sam.expert[:, 0]).all()


def test_gating_of_padding_only():
    """A gate whose tokens are all padding assigns nothing: no slot, weight 0, aux loss 0, dropped 0."""
    routing = sc.top2_gating(torch.randn(6, 4), 3, torch.ones(6, dtype=torch.bool))
    assert not routing.kept.any() and float(routing.weight.abs().sum()) == 0.0
    assert float(routing.aux_loss) == 0.0 and float(routing.dropped) == 0.0 and int(routing.assigned) == 0
    assert (routing.token == -1).all()


def test_second_expert_sampling_follows_the_softmax():
    """With Gumbel sampling the second expert is drawn from the softmax over the other experts,
    reproducibly for the same generator; the first stays the argmax."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    draw = lambda seed: sc.top2_gating(logits, 10**6, second_expert="sampling",  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed)).expert
    a, b = draw(0), draw(0)
    assert torch.equal(a, b) and (a[:, 0] == 0).all()
    share = torch.bincount(a[:, 1], minlength=4).double() / len(a)
    expect = torch.softmax(torch.tensor([-float("inf"), 1.0, 0.0, -1.0], dtype=torch.float64), dim=0)
    assert_close(share, expect, atol=0.015, rtol=0)


def test_seq_tiers_count_real_tokens():
    """SCoMoE-Seq sizes its tiers by real tokens: with a third of the tokens padding, the local, node
    and global tiers hold int(alpha n), int(beta n) and the rest of the n real tokens; padding joins the
    local tier (no communication) and gets output 0."""
    topo = sc.build_topology()
    cfg = sc.MoEConfig(d_model=8, d_ffn=8, num_experts=4, ratio1=0.2, ratio2=0.5)
    layer = sc.SCoMoESeq(cfg, topo)
    x, pad = torch.randn(30, 8), torch.arange(30) % 3 == 0  # 20 real tokens
    out = layer(x, pad)
    real = {tier: int((~pad[tr.tokens]).sum()) for tier, tr in out.tiers.items()}
    assert real == {"local": 4, "node": 16} and bool(pad[out.tiers["local"].tokens].sum() == 10)
    assert (out.y[pad] == 0).all()
    two_nodes = sc.three_way_split(20, 0.2, 0.5, 2)
    assert two_nodes == (4, 10, 6)


def test_dispatch_and_combine_by_index():
    """dispatch puts each kept token at (expert, slot) of the buffer, and `token` names the token in
    each slot (-1: empty); combine returns sum_i w_i * buffer rows, and with an identity expert it returns
    the input scaled by the kept weight (dropped -> 0)."""
    torch.manual_seed(3)
    t, e, d = 10, 3, 4
    x = torch.randn(t, d, dtype=torch.float64)
    routing = sc.top2_gating(torch.randn(t, e, dtype=torch.float64), 3)
    buf = sc.dispatch(x, routing, e)
    assert buf.shape == (e, 3, d)
    filled = torch.zeros(e, 3, dtype=torch.bool)
    for i in range(t):
        for c in range(2):
            if routing.kept[i, c]:
                assert torch.equal(buf[routing.expert[i, c], routing.slot[i, c]], x[i])
                assert routing.token.view(e, 3)[routing.expert[i, c], routing.slot[i, c]] == i
                filled[routing.expert[i, c], routing.slot[i, c]] = True
    assert routing.token.view(e, 3)[~filled].eq(-1).all() and routing.token.view(e, 3)[filled].ge(0).all()
    assert (routing.place == torch.where(routing.kept, routing.expert * 3 + routing.slot, -1)).all()
    y = sc.combine(buf, routing)
    assert_close(y, x * routing.weight.sum(dim=1, keepdim=True))


def test_capacity_formula_and_three_way_split():
    """C = ceil(cf * k * t / e) without float noise; the split gives int(ratio * total) to local and node
    and the rest to global, with node taking the rest on one node or when the ratios sum to 1."""
    assert sc.expert_capacity(10, 4, 2, 1.0) == 5
    assert sc.expert_capacity(100, 4, 2, 1.1) == 55  # 1.1 * 200 / 4 = 55.00000000000001 in floats
    assert sc.expert_capacity(7, 4, 2, 1.25) == 5
    assert sc.three_way_split(100, 0.29, 0.5, 2) == (29, 50, 21)  # 0.29 * 100 = 28.999999999999996
    assert sc.three_way_split(10, 0.2, 0.5, 2) == (2, 5, 3)
    assert sc.three_way_split(10, 0.2, 0.5, 1) == (2, 8, 0)
    assert sc.three_way_split(10, 0.25, 0.75, 2) == (2, 8, 0)
    assert sc.three_way_split(9, 0.0, 0.0, 2) == (0, 0, 9)
    assert sc.three_way_split(2048, 0.2, 0.5, 2, multiple=8) == (408, 1024, 616)  # Feat: aligned widths
    assert sc.three_way_split(2048, 0.2, 0.5, 1, multiple=8) == (408, 1640, 0)


def test_gating_with_no_tokens():
    """A gate over zero tokens returns empty routing, zero aux loss, all-empty slots and an empty output."""
    routing = sc.top2_gating(torch.zeros(0, 4), 3)
    assert routing.expert.shape == (0, 2) and float(routing.aux_loss) == 0.0
    assert routing.token.shape == (12,) and (routing.token == -1).all()
    x = torch.zeros(0, 5, requires_grad=True)
    y = sc.combine(sc.dispatch(x, routing, 4), routing)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 5)


@pytest.mark.parametrize("capacity", [1, 2, 3, 100])
@pytest.mark.parametrize("experts", [1, 2, 5])
def test_batch_prioritized_gating_is_the_reference(capacity, experts):
    """With batch_prioritized, top2_gating keeps the same assignments, weights and aux loss as the token-by-token
    reference that serves first choices, then second choices, each by descending first-choice gate value."""
    torch.manual_seed(capacity + 10 * experts + 1)
    t = 13
    logits = torch.randn(t, experts, dtype=torch.float64)
    pad = torch.rand(t) < 0.25
    routing = sc.top2_gating(logits, capacity, pad, batch_prioritized=True)
    assert_routing_is(routing, naive_top2(logits, capacity, pad, batch_prioritized=True), capacity)


def test_batch_prioritized_orders_second_choices_by_the_first_gate():
    """As fairseq: first choices go first, by descending first gate; the second choices are ordered by the
    first-choice gate as well, not by their own gate and not by token order. One slot per expert:
    token 2 (first gate 0.8) takes expert 0 from token 0 (0.4); for expert 2's slot, token 1's second choice
    (first gate 0.6, own 0.3) beats token 0's (first gate 0.4, own 0.35), which token order and the own
    second gate would both have kept."""
    gates = torch.tensor([[0.40, 0.25, 0.35], [0.10, 0.60, 0.30], [0.80, 0.15, 0.05]], dtype=torch.float64)
    logits = gates.log()
    by_token = sc.top2_gating(logits, 1)
    by_gate = sc.top2_gating(logits, 1, batch_prioritized=True)
    assert by_token.expert.tolist() == by_gate.expert.tolist() == [[0, 2], [1, 2], [0, 1]]
    assert by_token.kept.tolist() == [[True, True], [True, False], [False, False]]
    assert by_gate.kept.tolist() == [[False, False], [True, True], [True, False]]
    assert_close(by_gate.weight[1], torch.tensor([0.6, 0.3], dtype=torch.float64) / 0.9)


def test_authors_option_errors():
    """A non-boolean flag, or an eval capacity fraction outside (0, 1], is a ValueError that names the value."""
    base = dict(d_model=8, d_ffn=8, num_experts=4)
    for kwargs, match in [(dict(batch_prioritized_routing=1), "batch_prioritized_routing=1"),
                          (dict(feat_hidden="half"), "feat_hidden='half' must be 'full' or 'proportional'"),
                          (dict(local_no_capacity="yes"), "local_no_capacity='yes'"),
                          (dict(eval_capacity_token_fraction=0.0), "eval_capacity_token_fraction=0.0"),
                          (dict(eval_capacity_token_fraction=-1.0), "or be None"),
                          (dict(eval_capacity_token_fraction=1.5), "must lie in \\(0, 1\\]"),
                          (dict(eval_capacity_token_fraction=True), "eval_capacity_token_fraction=True")]:
        with pytest.raises(ValueError, match=match):
            sc.MoEConfig(**base, **kwargs)
    assert sc.MoEConfig(**base, eval_capacity_token_fraction=1).eval_capacity_token_fraction == 1


def test_eval_and_local_capacities_on_one_process():
    """Capacities per tier, from the tier's real tokens t: in training ceil(cf * k * t / e); in eval mode with a
    fraction, ceil(fraction * t) whatever e, k and cf; with local_no_capacity the local tier gets t slots (the
    least that cannot bind) in both modes, and drops nothing where the training formula drops."""
    torch.manual_seed(0)
    x, pad = torch.randn(40, 8), torch.arange(40) % 5 == 4  # 32 real tokens
    base = dict(d_model=8, d_ffn=8, num_experts=4, capacity_factor=0.5, feat_multiple=1)
    for kind, ratios, local_t, other_t in [("seq", dict(ratio1=0.25), 8, 24), ("feat", dict(ratio1=0.5), 32, 32)]:
        for flags in [{}, dict(eval_capacity_token_fraction=0.3), dict(eval_capacity_token_fraction=0.3,
                                                                      local_no_capacity=True)]:
            cfg = sc.MoEConfig(**base, **ratios, **flags)
            layer = sc.make_moe_layer(kind, cfg, sc.build_topology())
            for training in (True, False):
                layer.train(training)
                tiers = layer(x, pad).tiers
                fraction = flags.get("eval_capacity_token_fraction")
                for tier, t in (("local", local_t), ("node", other_t)):
                    expect = math.ceil(fraction * t) if fraction and not training else math.ceil(0.5 * 2 * t / 4)
                    if tier == "local" and flags.get("local_no_capacity"):
                        expect = t
                    assert tiers[tier].routing.capacity == expect, (kind, flags, training, tier)
                local = tiers["local"].routing
                assert (float(local.dropped) == 0) == bool(flags.get("local_no_capacity")), (kind, flags, training)
    gshard = sc.GShardMoE(sc.MoEConfig(**base, eval_capacity_token_fraction=0.25), sc.build_topology()).eval()
    assert gshard(x, pad).tiers["global"].routing.capacity == 8
    assert gshard.train()(x, pad).tiers["global"].routing.capacity == 8  # ceil(0.5 * 2 * 32 / 4)
    assert gshard.eval()(x[:30], pad[:30]).tiers["global"].routing.capacity == 6  # ceil(0.25 * 24)


# ----------------------------------------------------------------------------
# 4-6. The layers against the single-process reference

GSHARD = dict(d_model=6, d_ffn=10, num_experts=8)


@pytest.mark.parametrize("kind, cfg", [
    ("gshard", dict(GSHARD, capacity_factor=1.0)),
    ("seq", dict(GSHARD, ratio1=0.2, ratio2=0.5, capacity_factor=1.0)),
    ("feat", dict(d_model=8, d_ffn=10, num_experts=8, ratio1=0.25, ratio2=0.5, feat_multiple=1)),
])
def test_layers_with_an_empty_rank_match_reference(workers, kind, cfg):
    """With one rank holding no tokens and one holding a single token, every layer still equals the
    reference: the empty rank takes part in every collective of the tiers the others run."""
    workers.run(check_against_reference, kind, 2, cfg, [1, 9, 0, 7], 12)


@pytest.mark.parametrize("ranks_per_node", [2, 4])
@pytest.mark.parametrize("capacity_factor", [0.5, 8.0])
def test_gshard_matches_reference(workers, ranks_per_node, capacity_factor):
    """GShard expert-parallel on 4 ranks (2 experts each) equals a single process holding all 8 experts
    that gates every rank's tokens alike: outputs, aux loss, and gradients of the inputs, the router
    and every expert weight; with capacity binding (tokens dropped) and not binding."""
    cfg = dict(GSHARD, capacity_factor=capacity_factor)
    results = workers.run(check_against_reference, "gshard", ranks_per_node, cfg, COUNTS, 1)
    dropped = [d["global"] for _, d in results]
    assert (max(dropped) > 0) == (capacity_factor < 1)  # the two cases really differ


@pytest.mark.parametrize("ranks_per_node", [2, 4])
@pytest.mark.parametrize("ratios", [(0.2, 0.5), (0.5, 0.3), (0.0, 0.6), (0.4, 0.0)])
@pytest.mark.parametrize("experts_per_rank", [1, 2])
def test_seq_matches_reference(workers, ranks_per_node, ratios, experts_per_rank):
    """SCoMoE-Seq equals a single process that emulates every rank: the local/node/global selection
    by mean scores, top-2 within each tier's experts, capacities from each group's largest tier,
    outputs and every gradient (with padding, capacity binding in some tiers)."""
    cfg = dict(d_model=6, d_ffn=10, num_experts=WORLD * experts_per_rank, ratio1=ratios[0], ratio2=ratios[1],
               capacity_factor=1.0)
    workers.run(check_against_reference, "seq", ranks_per_node, cfg, COUNTS, 2)


@pytest.mark.parametrize("kind", ["gshard", "seq", "feat", "node-limited"])
def test_a_rank_of_only_padding_matches_reference(workers, kind):
    """A rank whose tokens are all padding, beside one with no token, still takes part in every tier its groups
    run (Seq: its local tier, all padding, is skipped); outputs and gradients equal the reference."""
    cfg = dict(d_model=8, d_ffn=10, num_experts=8, ratio1=0.25, ratio2=0.5, capacity_factor=1.0, feat_multiple=1)
    workers.run(check_against_reference, kind, 2, cfg, [9, -5, 0, 8], 3)


@pytest.mark.parametrize("kind", ["gshard", "seq", "feat", "node-limited"])
@pytest.mark.parametrize("ranks_per_node", [2, 4])
def test_virtual_world_equals_processes(workers, kind, ranks_per_node):
    """Each layer on a VirtualWorld of 4 ranks (threads of one process) equals the reference, outputs and every
    gradient, and its ledger counts on every rank the bytes, forward and backward, that 4 gloo processes count."""
    cfg = dict(d_model=8, d_ffn=10, num_experts=8, ratio1=0.25, ratio2=0.5, capacity_factor=1.0, feat_multiple=1)
    counts = [9, -5, 0, 8]
    virtual = check_virtual_world(kind, ranks_per_node, cfg, counts, 4)
    real = [ledger for ledger, _ in workers.run(check_against_reference, kind, ranks_per_node, cfg, counts, 4)]
    assert virtual == real and any(virtual)


def test_virtual_world_releases_every_rank_on_an_error():
    """A rank that raises inside VirtualWorld.run does not leave the others waiting at a collective: the error
    reaches the caller, and the world runs again afterwards; ranks that wait at a collective one member never
    reaches raise instead of hanging."""
    world = sc.VirtualWorld(4, 2)

    def fn(rank: int):
        if rank == 2:
            raise ValueError("rank 2 failed")
        return world.topologies[rank].gather_counts(rank)
    with pytest.raises(ValueError, match="rank 2 failed"):
        world.run(fn)
    assert world.run(lambda r: world.topologies[r].gather_counts(r)) == [[0, 1, 2, 3]] * 4
    with pytest.raises(RuntimeError, match="not every member"):  # a collective that rank 0 skips: an error, no hang
        world.run(lambda r: world.topologies[r].gather_counts(r) if r else None)


def test_seq_with_one_expert_per_rank_and_normalize_before_drop_matches_reference(workers):
    """A tier of one expert (the local tier with one expert per rank) gets no second choice, also when the weights
    are normalised before dropping (GShard's paper): its one expert's weight stays 1; the tier's routing has k = 1."""
    cfg = dict(d_model=6, d_ffn=10, num_experts=4, ratio1=0.4, ratio2=0.3, capacity_factor=1.0,
               normalize_before_drop=True)
    workers.run(check_against_reference, "seq", 2, cfg, COUNTS, 7)
    layer = sc.SCoMoESeq(sc.MoEConfig(**cfg), sc.build_topology())  # one rank: 4 experts local and in the node
    one = sc.SCoMoESeq(sc.MoEConfig(**{**cfg, "num_experts": 1}), sc.build_topology())
    assert layer(torch.randn(10, 6)).tiers["local"].routing.expert.shape == (4, 2)  # int(0.4 * 10) tokens
    assert one(torch.randn(10, 6)).tiers["local"].routing.expert.shape == (4, 1)


def test_seq_with_binding_capacity_matches_reference(workers):
    """SCoMoE-Seq with capacity factor 0.5 drops assignments in its tiers and still equals the reference."""
    cfg = dict(d_model=6, d_ffn=10, num_experts=8, ratio1=0.2, ratio2=0.5, capacity_factor=0.5)
    results = workers.run(check_against_reference, "seq", 2, cfg, COUNTS, 13)
    assert max(max(dropped.values()) for _, dropped in results) > 0


@pytest.mark.parametrize("ranks_per_node", [2, 4])
@pytest.mark.parametrize("capacity_factor", [0.5, 8.0])
def test_node_limited_matches_reference(workers, ranks_per_node, capacity_factor):
    """Node-limited routing equals a single process that emulates every rank: each token's node by the
    sum of its two best gates there, hop 1 to the peer on that node (c1 = ceil(cf * t / N) slots per
    node, token order), top-2 over that node's experts in the received slots' order; outputs, aux and
    every gradient, with capacity binding (0.5) and not (8.0); on 1 node it is GShard."""
    cfg = dict(GSHARD, capacity_factor=capacity_factor)
    results = workers.run(check_against_reference, "node-limited", ranks_per_node, cfg, COUNTS, 5)
    dropped = [max(d.values()) for _, d in results]
    assert (max(dropped) > 0) == (capacity_factor < 1)


def test_node_limited_with_an_empty_rank_matches_reference(workers):
    """A rank with no tokens still takes part in both hops; the others equal the reference."""
    workers.run(check_against_reference, "node-limited", 2, dict(GSHARD, capacity_factor=1.0), [1, 9, 0, 7], 12)


def _node_limited_vs_gshard():
    topo = sc.build_topology(4)
    cfg = sc.MoEConfig(**GSHARD, capacity_factor=1.0)
    case = make_case(6, COUNTS, cfg)
    out_g, xg_g, rg_g = run_layer("gshard", build("gshard", cfg, topo, case), case, topo.rank)
    out_n, xg_n, rg_n = run_layer("node-limited", build("node-limited", cfg, topo, case), case, topo.rank)
    assert_close(out_n.y, out_g.y)
    assert_close(out_n.aux_loss, out_g.aux_loss)
    assert_close(xg_n, xg_g)
    assert_close(rg_n, rg_g)


def test_node_limited_on_one_node_is_gshard(workers):
    """On one node (1 x 4) every token's node is its own: hop 1 is a copy and node-limited routing is
    GShard, output, aux and gradients."""
    workers.run(_node_limited_vs_gshard)


def _seq_vs_gshard(ranks_per_node: int, capacity_factor: float):
    topo = sc.build_topology(ranks_per_node)
    cfg_g = sc.MoEConfig(**GSHARD, capacity_factor=capacity_factor)
    cfg_s = sc.MoEConfig(**GSHARD, capacity_factor=capacity_factor, ratio1=0.0, ratio2=0.0)
    case = make_case(4, COUNTS, cfg_g)
    out_g, xg_g, rg_g = run_layer("gshard", build("gshard", cfg_g, topo, case), case, topo.rank)
    seq = build("seq", cfg_s, topo, case)
    out_s, xg_s, rg_s = run_layer("seq", seq, case, topo.rank)
    assert_close(out_s.y, out_g.y, rtol=0, atol=0)
    # padding sits in the (skipped) local tier, so the global tier's sums run over fewer terms: rounding
    assert_close(out_s.aux_loss, out_g.aux_loss)
    assert_close(xg_s, xg_g)
    assert_close(rg_s, rg_g)
    assert set(out_s.tiers) == {"global"}


@pytest.mark.parametrize("capacity_factor", [0.5, 2.0])
def test_seq_with_zero_ratios_is_gshard(workers, capacity_factor):
    """On 2 nodes, SCoMoE-Seq with alpha = beta = 0 sends every real token to the global tier and equals
    GShard: outputs bit for bit, the aux loss and gradients to float64 rounding, capacity binding or not."""
    workers.run(_seq_vs_gshard, 2, capacity_factor)


def _seq_all_local(ranks_per_node: int):
    topo = sc.build_topology(ranks_per_node)
    cfg = sc.MoEConfig(**GSHARD, ratio1=1.0, ratio2=0.0)
    case = make_case(5, COUNTS, cfg)
    layer = build("seq", cfg, topo, case)
    calls = []
    originals = {name: getattr(dist, name) for name in ("all_to_all_single", "all_gather", "all_reduce")}
    for name, fn in originals.items():
        setattr(dist, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    try:
        x = case.xs[topo.rank].clone().requires_grad_()
        out = layer(x, case.pads[topo.rank])
        (out.y * case.cots[topo.rank]).sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert calls == [] and layer.ledger.total() == 0 and not layer.ledger.calls
    assert set(out.tiers) == {"local"}


@pytest.mark.parametrize("ranks_per_node", [2, 4])
def test_seq_all_local_runs_no_collective(workers, ranks_per_node):
    """SCoMoE-Seq with alpha = 1 keeps every token on its rank: no collective runs at all, forward
    or backward, and the ledger shows zero bytes."""
    workers.run(_seq_all_local, ranks_per_node)


@pytest.mark.parametrize("ranks_per_node", [2, 4])
@pytest.mark.parametrize("ratios", [(0.25, 0.5), (0.5, 0.25), (0.0, 0.5), (0.5, 0.0)])
def test_feat_matches_reference(workers, ranks_per_node, ratios):
    """SCoMoE-Feat equals a single process that emulates every rank: each slice of d_model gated within
    its tier's experts (their FFN of that slice's width), outputs concatenated; outputs and gradients."""
    cfg = dict(d_model=8, d_ffn=10, num_experts=8, ratio1=ratios[0], ratio2=ratios[1], capacity_factor=1.0,
               feat_multiple=1)
    workers.run(check_against_reference, "feat", ranks_per_node, cfg, COUNTS, 6)


def test_feat_with_proportional_hidden_matches_reference(workers):
    """With feat_hidden="proportional" each slice's FFN has d_ffn x d_slice / d_model hidden units (20 x 2 / 8,
    20 x 4 / 8, 20 x 2 / 8 here) and the layer still equals the single-process reference."""
    cfg = dict(d_model=8, d_ffn=20, num_experts=8, ratio1=0.25, ratio2=0.5, capacity_factor=1.0, feat_multiple=1,
               feat_hidden="proportional")
    layer = sc.SCoMoEFeat(sc.MoEConfig(**cfg), sc.build_topology())
    assert {tier: e.d_ffn for tier, e in layer.experts.items()} == {"local": 5, "node": 15}  # one node: no global
    workers.run(check_against_reference, "feat", 2, cfg, COUNTS, 6)


def _feat_global_vs_gshard(ranks_per_node: int):
    topo = sc.build_topology(ranks_per_node)
    cfg_g = sc.MoEConfig(**GSHARD, capacity_factor=0.75)
    cfg_f = sc.MoEConfig(**GSHARD, capacity_factor=0.75, ratio1=0.0, ratio2=0.0)
    case = make_case(7, COUNTS, cfg_g)
    out_g, xg_g, rg_g = run_layer("gshard", build("gshard", cfg_g, topo, case), case, topo.rank)
    feat = sc.SCoMoEFeat(cfg_f, topo).double()
    assert feat.widths == (0, 0, cfg_f.d_model) and set(feat.experts) == {"global"}
    case_f = case._replace(experts={"global": case.experts["all"]})
    load_layer(feat, case_f, topo.rank, cfg_f.num_experts // topo.world_size)
    out_f, xg_f, rg_f = run_layer("feat", feat, case_f, topo.rank)
    assert_close(out_f.y, out_g.y, rtol=0, atol=0)
    assert_close(xg_f, xg_g, rtol=0, atol=0)
    assert_close(rg_f, rg_g, rtol=0, atol=0)


def test_feat_with_the_whole_width_global_is_gshard(workers):
    """On 2 nodes, SCoMoE-Feat with alpha = beta = 0 (the whole width in the global slice) equals GShard
    with the same weights, bit for bit."""
    workers.run(_feat_global_vs_gshard, 2)


# The authors' options: batch-prioritized routing, an eval capacity, a local tier without capacity

AUTHORS = {
    "gshard": dict(GSHARD, capacity_factor=0.5),
    "seq": dict(d_model=6, d_ffn=10, num_experts=8, ratio1=0.5, ratio2=0.3, capacity_factor=0.5),
    "feat": dict(d_model=8, d_ffn=10, num_experts=8, ratio1=0.25, ratio2=0.5, capacity_factor=0.5, feat_multiple=1),
}


@pytest.mark.parametrize("kind", ["gshard", "seq", "feat"])
def test_batch_prioritized_layers_match_reference(workers, kind):
    """With batch-prioritized routing and capacity binding, every layer equals the reference whose gate serves
    tokens by descending first-choice gate value: outputs, aux loss and every gradient."""
    results = workers.run(check_against_reference, kind, 2, AUTHORS[kind] | dict(batch_prioritized_routing=True),
                          COUNTS, 21)
    assert max(max(dropped.values()) for _, dropped in results) > 0


@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("kind", ["gshard", "seq", "feat"])
def test_eval_capacity_matches_reference(workers, kind, eval_mode):
    """With eval_capacity_token_fraction = 0.1 and capacity_factor 8, a layer in eval mode gives each expert
    ceil(0.1 * t) slots, t the group's largest real-token count of the tier, and drops tokens; in training
    mode the fraction is ignored and nothing is dropped. Both equal the reference, gradients included."""
    cfg = AUTHORS[kind] | dict(capacity_factor=8.0, eval_capacity_token_fraction=0.1)
    results = workers.run(check_against_reference, kind, 2, cfg, COUNTS, 22, eval_mode)
    assert (max(max(dropped.values()) for _, dropped in results) > 0) == eval_mode


@pytest.mark.parametrize("kind", ["seq", "feat"])
def test_local_tier_without_capacity_matches_reference(workers, kind):
    """With local_no_capacity the local tier drops nothing while the node and global tiers drop under
    capacity factor 0.5; the layer equals the reference whose local tier has unlimited room."""
    results = workers.run(check_against_reference, kind, 2, AUTHORS[kind] | dict(local_no_capacity=True), COUNTS, 23)
    assert all(dropped.get("local", 0.0) == 0 for _, dropped in results)
    assert max(max(dropped.values()) for _, dropped in results) > 0


def test_authors_options_together_match_reference(workers):
    """SCoMoE-Seq in eval mode with all three options at once (the authors' evaluation setting) equals the reference."""
    cfg = AUTHORS["seq"] | dict(batch_prioritized_routing=True, eval_capacity_token_fraction=0.2,
                                local_no_capacity=True)
    workers.run(check_against_reference, "seq", 2, cfg, COUNTS, 24, True)


# ----------------------------------------------------------------------------
# The ledger


def _ledger_bytes(kind: str, cfg_args: dict, tokens: int):
    topo = sc.build_topology(2)
    cfg = sc.MoEConfig(**cfg_args)
    case = make_case(8, [tokens] * WORLD, cfg, widths_of(kind, cfg, topo.num_nodes), pad_every=10**9)  # no padding
    layer = build(kind, cfg, topo, case)
    run_layer(kind, layer, case, topo.rank)
    return {(link, dirn): layer.ledger.total(link=link, direction=dirn) for link in sc.LINK_CLASSES
            for dirn in ("forward", "backward")} | {"inter_node": layer.ledger.total(link="inter_node")}


def test_ledger_matches_closed_forms(workers):
    """Per rank and direction (two all-to-alls each: to the experts and back), GShard hands
    2 * (W - G) * n * C * d * 8 bytes to other nodes, with C = ceil(2 * t / E); Seq's inter-node bytes
    are (1 - alpha - beta) of GShard's up to token rounding, Feat's are d_global / d of GShard's, and
    node-limited routing's are (2d + 1) / 4d of GShard's (one copy per token, plus a flag column)."""
    W, G, n, d, t = WORLD, 2, 2, 8, 40
    base = dict(d_model=d, d_ffn=6, num_experts=W * n)
    gshard = workers.run(_ledger_bytes, "gshard", base, t)
    C = math.ceil(2 * t / (W * n))
    for rank_bytes in gshard:
        for dirn in ("forward", "backward"):
            assert rank_bytes["inter_node", dirn] == 2 * (W - G) * n * C * d * 8
            assert rank_bytes["intra_node", dirn] == 2 * (G - 1) * n * C * d * 8
            assert rank_bytes["intra_device", dirn] == 2 * n * C * d * 8
    alpha, beta = 0.2, 0.5
    seq = workers.run(_ledger_bytes, "seq", base | dict(ratio1=alpha, ratio2=beta), t)
    t_global = t - int(alpha * t) - int(beta * t)
    C_global = math.ceil(2 * t_global / (W * n))
    for s, g in zip(seq, gshard):
        assert s["inter_node"] == 4 * (W - G) * n * C_global * d * 8
        # rounding: C and C_global each round up by < 1 slot
        assert abs(s["inter_node"] / g["inter_node"] - (1 - alpha - beta)) <= 1 / C + (1 - alpha - beta) / C
    feat = workers.run(_ledger_bytes, "feat", base | dict(ratio1=0.25, ratio2=0.25, feat_multiple=1), t)
    for f, g in zip(feat, gshard):
        assert f["inter_node"] * d == g["inter_node"] * (d - 2 - 2)
    # node-limited: one copy of each token to its node's peer (d + 1 columns with the filled-slot flag) and
    # its output back (d columns), c1 = ceil(t / N) slots per node; nothing else leaves the node
    limited = workers.run(_ledger_bytes, "node-limited", base, t)
    c1 = math.ceil(t / (W // G))
    for lim, g in zip(limited, gshard):
        for dirn in ("forward", "backward"):
            assert lim["inter_node", dirn] == (W // G - 1) * c1 * (2 * d + 1) * 8
        assert lim["inter_node"] / g["inter_node"] == (2 * d + 1) / (4 * d)  # about half of GShard's


def _gshard_world_output(seed: int):
    topo = sc.build_topology(2)
    cfg = sc.MoEConfig(**GSHARD, capacity_factor=16.0)
    case = make_case(seed, COUNTS, cfg)
    out, _, _ = run_layer("gshard", build("gshard", cfg, topo, case), case, topo.rank)
    return out.y.detach(), float(out.tiers["global"].routing.dropped)


def test_same_global_batch_same_output_on_1_and_4_processes(workers):
    """With capacity not binding, GShard gives every token the same output whether the global batch is
    split over 4 ranks (2 experts each) or held by one process with all 8 experts."""
    results = workers.run(_gshard_world_output, 9)
    cfg = sc.MoEConfig(**GSHARD, capacity_factor=16.0)
    case = make_case(9, COUNTS, cfg)
    one = sc.GShardMoE(cfg, sc.build_topology()).double()
    load_layer(one, case, 0, cfg.num_experts)
    single = one(torch.cat(case.xs), torch.cat(case.pads)).y
    assert max(dropped for _, dropped in results) == 0
    assert_close(torch.cat([y for y, _ in results]), single)


# ----------------------------------------------------------------------------
# 7. Configuration errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio1=-0.1), "ratio1=-0.1 must lie in"),
    (dict(ratio2=1.5), "ratio2=1.5 must lie in"),
    (dict(ratio1=0.6, ratio2=0.5), "ratio1 \\+ ratio2"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
    (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
    (dict(num_experts=0), "num_experts=0"),
    (dict(d_model=0), "d_model=0"),
    (dict(second_expert="random"), "second_expert='random'"),
    (dict(activation="tanh"), "activation='tanh'"),
    (dict(feat_multiple=0), "feat_multiple=0"),
])
def test_config_errors(kwargs, match):
    """Every bad MoEConfig value is a ValueError at construction that names the value."""
    with pytest.raises(ValueError, match=match):
        sc.MoEConfig(**(dict(d_model=8, d_ffn=8, num_experts=4) | kwargs))


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=True), "d_model=True must be a positive integer"),
    (dict(num_experts=False), "num_experts=False"),
    (dict(d_ffn=8.0), "d_ffn=8.0 must be a positive integer"),
    (dict(feat_multiple="8"), "feat_multiple='8'"),
    (dict(capacity_factor="1.0"), "capacity_factor='1.0' must be a finite number"),
    (dict(capacity_factor=True), "capacity_factor=True must be a finite number"),
    (dict(capacity_factor=float("inf")), "capacity_factor=inf must be a finite number"),
    (dict(capacity_factor=float("nan")), "capacity_factor=nan must be a finite number"),
    (dict(ratio1=float("nan")), "ratio1=nan must be a finite number"),
    (dict(ratio2=float("-inf")), "ratio2=-inf must be a finite number"),
    (dict(ratio1=None), "ratio1=None must be a finite number"),
    (dict(normalize_before_drop="no"), "normalize_before_drop='no' must be True or False"),
    (dict(normalize_before_drop=1), "normalize_before_drop=1 must be True or False"),
    (dict(second_expert=None), "second_expert=None"),
])
def test_config_type_errors(kwargs, match):
    """A value of the wrong type is a ValueError naming the field: a bool is not an int (True == 1), a string
    is neither a number nor a bool (bool('no') is True), and a float must be finite."""
    with pytest.raises(ValueError, match=match):
        sc.MoEConfig(**(dict(d_model=8, d_ffn=8, num_experts=4) | kwargs))


def test_config_accepts_ints_for_floats():
    """An int where a float is meant is fine (capacity_factor=2, ratio1=0), and numpy numbers pass as well."""
    cfg = sc.MoEConfig(8, 8, 4, capacity_factor=2, ratio1=0, ratio2=1)
    assert sc.expert_capacity(10, 4, 2, cfg.capacity_factor) == 10
    sc.MoEConfig(np.int64(8), 8, 4, capacity_factor=np.float32(1.5), ratio1=np.float64(0.25))


def _layer_errors():
    topo = sc.build_topology(2)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the world size 4"):
        sc.GShardMoE(sc.MoEConfig(d_model=8, d_ffn=8, num_experts=6), topo)
    with pytest.raises(ValueError, match="the local slice of d_model=8 at ratio 0.1 has width 0"):
        sc.SCoMoEFeat(sc.MoEConfig(d_model=8, d_ffn=8, num_experts=4, ratio1=0.1, ratio2=0.5, feat_multiple=1), topo)
    with pytest.raises(ValueError, match="the node slice of d_model=8 at ratio 0.05 has width 0"):
        sc.SCoMoEFeat(sc.MoEConfig(d_model=8, d_ffn=8, num_experts=4, ratio1=0.5, ratio2=0.05, feat_multiple=1), topo)
    with pytest.raises(ValueError, match="multiples of feat_multiple=8"):
        sc.SCoMoEFeat(sc.MoEConfig(d_model=64, d_ffn=8, num_experts=4, ratio1=0.1, ratio2=0.5), topo)


def test_layer_errors(workers):
    """Experts not divisible by the world size, and a Feat slice of width 0 while its ratio is > 0, are
    ValueErrors raised at layer construction on every rank, before any collective."""
    workers.run(_layer_errors)


BAD_INPUTS = [  # (x, pad_mask, message) for layers of d_model = 8, x of 20 tokens unless stated
    (torch.randn(2, 10, 8), None, r"x must be a \(tokens, d_model=8\) tensor, got shape \(2, 10, 8\).*reshape"),
    (torch.randn(20), None, r"got shape \(20,\)"),
    (torch.randn(20, 6), None, r"d_model=8\) tensor, got shape \(20, 6\)"),
    (torch.randn(20, 8), torch.zeros(18, dtype=torch.bool), r"pad_mask must be a bool tensor of shape \(20,\).*"
                                                             r"got torch.bool of shape \(18,\)"),
    (torch.randn(20, 8), torch.zeros(2, 10, dtype=torch.bool), r"shape \(20,\).*got torch.bool of shape \(2, 10\)"),
    (torch.randn(20, 8), torch.zeros(20), r"pad_mask must be a bool tensor.*got torch.float32 of shape \(20,\)"),
    (torch.randn(20, 8), [False] * 20, r"pad_mask must be a bool tensor.*got list"),
]


@pytest.mark.parametrize("kind", ["gshard", "seq", "feat", "cluster"])
@pytest.mark.parametrize("x, pad_mask, match", BAD_INPUTS)
def test_layer_input_errors(kind, x, pad_mask, match):
    """Every layer checks its input at the start of forward: x must be (t, d_model) and pad_mask a (t,) bool
    tensor; otherwise a ValueError names the layer, what it got and what it needs."""
    topo = sc.build_topology()
    cfg = sc.MoEConfig(8, 16, 4, ratio1=0.5, ratio2=0.5, feat_multiple=1)
    layer = sc.TokenClustering(8, 16, topo) if kind == "cluster" else sc.make_moe_layer(kind, cfg, topo)
    name = {"gshard": "GShardMoE", "seq": "SCoMoESeq", "feat": "SCoMoEFeat", "cluster": "TokenClustering"}[kind]
    with pytest.raises(ValueError, match=f"{name}: .*{match}"):
        layer(x, pad_mask)
    layer(torch.randn(20, 8), torch.arange(20) % 3 == 0)  # a good input passes


def test_input_check_reads_no_data():
    """The input check reads shapes and dtypes only (no device-to-host copy): it passes and fails on meta
    tensors, which have no data to read."""
    x, pad = torch.empty(20, 8, device="meta"), torch.empty(20, dtype=torch.bool, device="meta")
    sc._check_input(x, pad, 8, "layer")
    with pytest.raises(ValueError, match="pad_mask must be a bool tensor"):
        sc._check_input(x, pad[:18], 8, "layer")



# ----------------------------------------------------------------------------
# 8. Balanced assignment (the auction algorithm)

def total(scores, cluster):
    s = scores.double()
    return float(s[torch.arange(s.shape[0]), cluster].sum())


def default_eps(scores):
    """balanced_assignment's default final eps: 1e-7 x the standard deviation of the finite scores rounded
    down to a power of two (a large eps if std is 0), but at least 2e-13 x their range, times T + 2 with -inf
    scores (float64's limit)."""
    s = scores.double()
    f = s[torch.isfinite(s)]
    span = float(f.max() - f.min()) if float(f.max()) > float(f.min()) else 1.0
    std = float(f.std(unbiased=False))
    eps = 2.0 ** math.floor(math.log2(1e-7 * std)) if std > 0 else span  # rounded down to a power of two
    return max(eps, 2e-13 * span * (s.shape[0] + 2 if bool(torch.isneginf(s).any()) else 1))


def assert_balanced(cluster, T, C):
    assert cluster.dtype == torch.long
    assert cluster.shape == (T,)
    assert int(cluster.min()) >= 0 and int(cluster.max()) < C
    assert torch.equal(torch.bincount(cluster, minlength=C), torch.full((C,), T // C))


def brute_force_opt(scores):
    """Best total over all balanced assignments (T <= 8)."""
    s = scores.double().numpy()
    T, C = s.shape
    labels = [c for c in range(C) for _ in range(T // C)]
    assigns = np.array(sorted(set(itertools.permutations(labels))))      # [N, T]
    totals = s[np.arange(T)[None, :], assigns].sum(axis=1)
    return totals.max()


def linear_sum_assignment(*args, **kwargs):
    """scipy's exact solver, the reference; without scipy the test skips here (after its other checks)."""
    scipy_optimize = pytest.importorskip("scipy.optimize", reason="scipy is the exact reference: pip install scipy")
    return scipy_optimize.linear_sum_assignment(*args, **kwargs)


def scipy_opt(scores, forbidden_value=None):
    """Optimum via linear_sum_assignment on the T x T matrix whose columns are
    the clusters, each repeated T // C times."""
    s = scores.double().numpy()
    T, C = s.shape
    if forbidden_value is not None:
        s = np.where(np.isneginf(s), forbidden_value, s)
    expanded = np.repeat(s, T // C, axis=1)                                # [T, T]
    r, c = linear_sum_assignment(expanded, maximize=True)
    return expanded[r, c].sum()


def greedy(scores):
    """Each token in index order takes its best cluster that still has room."""
    T, C = scores.shape
    m = T // C
    room = [m] * C
    out = []
    for t in range(T):
        for c in torch.argsort(scores[t], descending=True, stable=True).tolist():
            if room[c]:
                room[c] -= 1
                out.append(c)
                break
    return torch.tensor(out)


# balance
SHAPES = [(1, 1), (5, 1), (2, 2), (6, 3), (8, 8), (12, 4), (16, 2), (32, 32),
          (60, 6), (64, 16), (100, 5), (128, 128), (256, 8), (384, 3), (1000, 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,C", SHAPES)
def test_balance_random_shapes(T, C, dtype):
    """Output is a [T] long tensor in 0..C-1 and every cluster gets exactly T // C
    tokens, for C = 1, C = T and everything in between, in float32 and float64."""
    g = torch.Generator().manual_seed(T * 1000 + C)
    scores = torch.randn(T, C, generator=g, dtype=dtype)
    assert_balanced(sc.balanced_assignment(scores), T, C)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_balance_half_precision(dtype):
    """Half-precision inputs (with many exact ties) are balanced and near-optimal."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(128, 8, generator=g).to(dtype)
    cluster = sc.balanced_assignment(scores)
    assert_balanced(cluster, 128, 8)
    assert total(scores, cluster) >= scipy_opt(scores) - 128 * default_eps(scores) - 1e-9


def test_balance_constant_scores():
    """All-equal scores (every assignment optimal, all bids tie) still give an
    exactly balanced result."""
    for T, C in [(12, 3), (64, 8), (256, 32)]:
        assert_balanced(sc.balanced_assignment(torch.zeros(T, C)), T, C)


# optimality
TINY_SHAPES = [(T, C) for T in range(1, 9) for C in range(1, T + 1) if T % C == 0]


@pytest.mark.parametrize("T,C", TINY_SHAPES)
def test_brute_force_tiny(T, C):
    """Total score >= brute-force optimum - T*eps (default eps), T <= 8."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(T, C, generator=g, dtype=torch.float64)
        got = total(scores, sc.balanced_assignment(scores))
        opt = brute_force_opt(scores)
        assert got <= opt + 1e-9
        assert got >= opt - T * default_eps(scores) - 1e-9


@pytest.mark.parametrize("T,C", [(6, 2), (6, 3), (8, 2), (8, 4), (8, 8)])
def test_integer_scores_exact(T, C):
    """Integer scores with eps < 1/T: the result is exactly optimal."""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randint(-3, 4, (T, C), generator=g).float()
        got = total(scores, sc.balanced_assignment(scores, eps=0.99 / T))
        assert got == brute_force_opt(scores)


@pytest.mark.parametrize("T,C", [(64, 4), (96, 8), (128, 32), (256, 16), (512, 8), (512, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vs_scipy_medium(T, C, dtype):
    """Total >= scipy optimum (expanded T x T matrix) - T*eps, and never above it."""
    g = torch.Generator().manual_seed(T + C)
    scores = (torch.randn(T, C, generator=g) + torch.randn(C, generator=g)).to(dtype)
    got = total(scores, sc.balanced_assignment(scores))
    opt = scipy_opt(scores)
    assert got <= opt + 1e-6
    assert got >= opt - T * default_eps(scores) - 1e-6


@pytest.mark.parametrize("T,C,seeds", [(12, 3, 60), (64, 4, 20), (256, 8, 5), (1024, 8, 2), (1024, 32, 1)])
def test_default_eps_gap_vs_scipy(T, C, seeds):
    """With the default eps the total is within 1e-6 x T x (standard deviation of the scores) of the exact
    optimum (scipy), on float scores with and without cluster biases and rounded to 0.1 (many ties); the
    old default (max - min) / (T + 1) left gaps of up to 6e-2 x T x std at T = 12, C = 3."""
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(T, C, generator=g, dtype=torch.float64)
        for s in (scores, scores + 3 * torch.randn(C, generator=g, dtype=torch.float64), (scores * 10).round() / 10,
                  scores.float()):
            gap = scipy_opt(s) - total(s, sc.balanced_assignment(s))
            assert -1e-9 <= gap <= 1e-6 * T * float(s.double().std(unbiased=False)), (seed, gap)


def test_vs_scipy_small_eps_integer():
    """Medium integer case, eps < 1/T: exactly the scipy optimum."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 20, (240, 12), generator=g).double()
    got = total(scores, sc.balanced_assignment(scores, eps=0.5 / 240))
    assert got == scipy_opt(scores)


def test_strictly_better_than_greedy():
    """On a case built to fool greedy argmax-with-capacity, the auction is
    strictly better (and optimal)."""
    # token 0 is happy anywhere; tokens 1, 2 only like cluster 0.  Greedy puts
    # token 0 in cluster 0 first, forcing token 2 into cluster 1 (score 0).
    scores = torch.tensor([[10.0, 9.0], [10.0, 0.0], [10.0, 0.0], [0.0, 0.0]])
    ours = total(scores, sc.balanced_assignment(scores))
    greedy_total = total(scores, greedy(scores))
    assert greedy_total == 20.0
    assert ours == 29.0 == brute_force_opt(scores)
    # and on random data greedy is never better than the auction
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(256, 8, generator=g, dtype=torch.float64)
    assert total(scores, sc.balanced_assignment(scores)) > total(scores, greedy(scores))


# -inf (forbidden pairs)
def test_neg_inf_never_used_when_feasible():
    """With -inf pairs and a feasible finite assignment, no token gets a -inf
    cluster, and the total is within T*eps of the optimum."""
    T, C = 256, 16
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(T, C, generator=g, dtype=torch.float64)
    # token t may only use the 3 clusters t, t+1, t+2 (mod C): feasible
    allowed = torch.zeros(T, C, dtype=torch.bool)
    for k in range(3):
        allowed[torch.arange(T), (torch.arange(T) + k) % C] = True
    scores[~allowed] = float("-inf")
    cluster = sc.balanced_assignment(scores)
    assert_balanced(cluster, T, C)
    assert bool(allowed[torch.arange(T), cluster].all())
    opt = scipy_opt(scores, forbidden_value=-1e6)
    assert total(scores, cluster) >= opt - T * default_eps(scores) - 1e-9


def test_neg_inf_tight():
    """A -inf pattern with exactly one feasible assignment is solved exactly."""
    T, C = 12, 3
    scores = torch.full((T, C), float("-inf"))
    want = torch.arange(T) % C
    scores[torch.arange(T), want] = torch.randn(T)
    assert torch.equal(sc.balanced_assignment(scores), want)


def test_neg_inf_infeasible_raises():
    """Infeasible -inf patterns raise ValueError saying 'infeasible'."""
    scores = torch.randn(8, 2)
    scores[:5, 1] = float("-inf")            # 5 tokens need cluster 0, which holds 4
    with pytest.raises(ValueError, match="infeasible"):
        sc.balanced_assignment(scores)
    scores = torch.randn(8, 2)
    scores[3] = float("-inf")                # a token with no allowed cluster
    with pytest.raises(ValueError, match="infeasible"):
        sc.balanced_assignment(scores)
    scores = torch.zeros(4, 1)
    scores[2, 0] = float("-inf")             # C = 1
    with pytest.raises(ValueError, match="infeasible"):
        sc.balanced_assignment(scores)


def hall_feasible(allowed, m):
    """Hall's condition by brute force: every set S of clusters is allowed to at least m |S| tokens
    (then, and only then, some assignment of m tokens per cluster uses allowed pairs only)."""
    a = allowed.numpy()
    return all(a[:, list(S)].any(axis=1).sum() >= m * len(S)
               for r in range(1, a.shape[1] + 1) for S in itertools.combinations(range(a.shape[1]), r))


def random_allowed(T, C, density, g):
    """A random (T, C) allowed pattern with no row all False."""
    allowed = torch.rand(T, C, generator=g) < density
    allowed[torch.arange(T), torch.randint(0, C, (T,), generator=g)] |= ~allowed.any(dim=1)
    return allowed


def test_feasibility_check_is_exact():
    """The check run before the auction says feasible exactly when Hall's condition holds (brute force over
    every set of clusters), on random patterns near the boundary and on block patterns with m |S| +- 1
    tokens; balanced_assignment then raises 'infeasible' exactly on the infeasible ones and otherwise uses
    no -inf pair."""
    g = torch.Generator().manual_seed(0)
    cases = [random_allowed(T, C, density, g) for T, C in [(4, 2), (6, 3), (8, 4), (12, 3), (12, 4), (24, 6),
                                                          (32, 8), (60, 5)]
             for density in (0.15, 0.3, 0.45, 0.6) for _ in range(6)]
    for m, extra in itertools.product((1, 3), (-1, 0, 1)):  # tokens of block 0 allowed only in clusters {0, 1}
        allowed = torch.ones(4 * m, 4, dtype=torch.bool)
        allowed[:2 * m + extra, 2:] = False
        allowed[2 * m + extra:, :2] = extra < 0  # the rest may not enter {0, 1} unless block 0 is short
        cases.append(allowed)
    verdicts = []
    for allowed in cases:
        T, C = allowed.shape
        want = hall_feasible(allowed, T // C)
        assert sc._feasible(allowed, T // C) == want
        scores = torch.randn(T, C, generator=g, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
        if want:
            assert bool(allowed[torch.arange(T), sc.balanced_assignment(scores)].all())
        else:
            with pytest.raises(ValueError, match="infeasible"):
                sc.balanced_assignment(scores)
        verdicts.append(want)
    assert 0.25 < sum(verdicts) / len(verdicts) < 0.75  # both answers are well represented


@pytest.mark.parametrize("pattern", ["dead cluster", "confined tokens", "starved clusters"])
def test_infeasible_is_fast(pattern):
    """An infeasible -inf pattern at T = 16384, C = 8 raises 'infeasible' in well under a second of CPU time
    (the auction alone took minutes to find out): a cluster no token may enter, 2m + 1 tokens allowed only in
    two clusters, or three clusters that only 3m - 1 tokens may enter."""
    T, C = 16384, 8
    m = T // C
    scores = torch.randn(T, C, generator=torch.Generator().manual_seed(0))
    if pattern == "dead cluster":
        scores[:, 3] = float("-inf")
    elif pattern == "confined tokens":
        scores[:2 * m + 1, 2:] = float("-inf")
    else:
        scores[3 * m - 1:, 5:] = float("-inf")
    start = time.process_time()  # CPU time: a busy machine slows the wall clock, not this
    with pytest.raises(ValueError, match="infeasible"):
        sc.balanced_assignment(scores)
    assert time.process_time() - start < 2.0  # about 0.1 s here, minutes before the check


def test_huge_scores():
    """Scores near the float64 limit (a span of 2e308 overflows) give the same assignment as the same scores
    scaled down by a power of two (an exact scaling), with and without -inf pairs; no eps error."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(64, 4, generator=g, dtype=torch.float64).clamp(-3.5, 3.5)
    scores[:8, 0] = float("-inf")
    for s in (scores, scores[:, 1:].repeat(1, 2)[:60, :3]):
        huge = s * 2.0**1022  # up to 1.6e308
        assert math.isinf(float(huge[huge.isfinite()].max() - huge[huge.isfinite()].min()))
        assert torch.equal(sc.balanced_assignment(huge), sc.balanced_assignment(s))
    extreme = torch.tensor([[1e308, -1e308], [-1e308, 1e308]], dtype=torch.float64)
    assert sc.balanced_assignment(extreme).tolist() == [0, 1]


# padding
def pad_scores(real):
    """real (n, C) followed by padding rows up to a multiple of C (and >= C), set by padding_scores."""
    n, C = real.shape
    T = max(C, -(-n // C) * C)
    is_pad = torch.arange(T) >= n
    return sc.padding_scores(torch.cat([real, real.new_zeros(T - n, C)]), is_pad), n


def _padded_case(n, C, seed, bias=0.0):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, C, generator=g, dtype=torch.float64) + bias * torch.randn(C, generator=g)
    padded, n_real = pad_scores(real)
    return real, padded, n_real


def test_padding_scores():
    """padding_scores sets every padding row to one constant below every real score and leaves
    the real rows alone."""
    real, padded, n = _padded_case(13, 4, 0)
    assert n == 13 and padded.shape == (16, 4)
    assert torch.equal(padded[:13], real)
    pad = padded[13:]
    assert bool((pad == pad[0, 0]).all()) and float(pad[0, 0]) < float(real.min())
    assert pad_scores(torch.zeros(2, 4))[0].shape == (4, 4)


@pytest.mark.parametrize("n,C,bias", [(10, 4, 0.0), (13, 4, 2.0), (61, 8, 2.0), (250, 16, 1.0),
                                      (97, 32, 0.0)])
def test_padding_never_displaces_real_tokens(n, C, bias):
    """Padding is assigned last: a real token t in cluster a never prefers a
    cluster b holding padding by more than 2*eps (s[t,b] <= s[t,a] + 2 eps), and
    the real tokens' total is the optimum of the relaxed problem 'at most m
    real tokens per cluster' (scipy on the n x T expanded matrix) within T*eps."""
    real, padded, n_real = _padded_case(n, C, n + C, bias)
    T = padded.shape[0]
    eps = default_eps(padded)
    cluster = sc.balanced_assignment(padded)
    assert_balanced(cluster, T, C)
    c_real = cluster[:n_real]
    has_pad = torch.zeros(C, dtype=torch.bool)
    has_pad[cluster[n_real:]] = True
    own = real[torch.arange(n_real), c_real]                               # [n]
    gain = (real[:, has_pad] - own[:, None]).max() if has_pad.any() else -1.0
    assert float(gain) <= 2 * eps + 1e-12
    expanded = np.repeat(real.numpy(), T // C, axis=1)                      # [n, T]
    r, c = linear_sum_assignment(expanded, maximize=True)
    relaxed_opt = expanded[r, c].sum()
    got = float(own.sum())
    assert got <= relaxed_opt + 1e-9
    assert got >= relaxed_opt - T * eps - 1e-9


def test_padding_keeps_argmax_when_capacity_allows():
    """When every real token's favourite cluster has room for all who want it,
    each real token gets its favourite, i.e. padding pushes no one out."""
    g = torch.Generator().manual_seed(7)
    C = 8
    fav = torch.arange(50) % C                                  # 6 or 7 real tokens per cluster
    real = torch.rand(50, C, generator=g)
    real[torch.arange(50), fav] += 2.0                          # clear favourite, margin > 1
    padded, n_real = pad_scores(real)
    assert padded.shape == (56, C)                              # m = 7: room for every favourite
    cluster = sc.balanced_assignment(padded)
    assert torch.equal(cluster[:n_real], fav)


# determinism and ties
def test_deterministic():
    """Same input gives the same output (twice, and for a copy), also with
    heavy ties (scores in {0, 1, 2})."""
    g = torch.Generator().manual_seed(11)
    for scores in [torch.randn(512, 16, generator=g),
                   torch.randint(0, 3, (512, 16), generator=g).float(),
                   torch.zeros(64, 8)]:
        a = sc.balanced_assignment(scores)
        b = sc.balanced_assignment(scores)
        c = sc.balanced_assignment(scores.clone())
        assert torch.equal(a, b) and torch.equal(a, c)


def test_tie_break_lower_index_first():
    """Documented ties: two identical tokens wanting the same single-slot
    cluster, the lower token index gets it (among equal bids, lower index wins)."""
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sc.balanced_assignment(scores).tolist() == [0, 1]


def test_input_not_modified():
    """The input tensor is left unchanged."""
    scores = torch.randn(32, 4)
    scores[0, 1] = float("-inf")
    before = scores.clone()
    sc.balanced_assignment(scores)
    assert torch.equal(scores, before)


# errors
def test_error_not_2d():
    """Non-2-D input -> ValueError naming the shape."""
    for bad in [torch.randn(8), torch.randn(2, 4, 2), torch.tensor(1.0)]:
        with pytest.raises(ValueError, match="2-D"):
            sc.balanced_assignment(bad)


def test_error_not_divisible():
    """T % C != 0 -> ValueError naming T and C and telling how to pad."""
    with pytest.raises(ValueError, match=r"T=10 .*C=4.*pad the tokens to T' = 12"):
        sc.balanced_assignment(torch.randn(10, 4))


def test_error_fewer_tokens_than_clusters():
    """T < C -> ValueError naming T and C and telling how to pad."""
    with pytest.raises(ValueError, match=r"T=3 .*C=8.*pad the tokens to T' = 8"):
        sc.balanced_assignment(torch.randn(3, 8))
    with pytest.raises(ValueError, match="C=0"):
        sc.balanced_assignment(torch.randn(3, 0))


def test_error_nan():
    """NaN -> ValueError that suggests nan_to_num."""
    scores = torch.randn(8, 2)
    scores[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN.*nan_to_num"):
        sc.balanced_assignment(scores)


def test_error_pos_inf_and_dtype_and_eps():
    """+inf scores, integer dtype, and a non-positive or too small eps -> ValueError."""
    scores = torch.randn(8, 2)
    scores[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\+inf"):
        sc.balanced_assignment(scores)
    with pytest.raises(ValueError, match="floating point"):
        sc.balanced_assignment(torch.ones(8, 2, dtype=torch.long))
    for bad_eps in [0.0, -1.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="eps"):
            sc.balanced_assignment(torch.randn(8, 2), eps=bad_eps)
    with pytest.raises(ValueError, match="too small"):
        sc.balanced_assignment(torch.randn(8, 2), eps=1e-300)
    with pytest.raises(ValueError, match="torch.Tensor"):
        sc.balanced_assignment(np.zeros((4, 2)))


# ----------------------------------------------------------------------------
# 8. Differentiable sorting


def explicit_sort_matrix(scores, order, tau, pad=None):
    """M = P + S - stopgrad(S) as an explicit (t, t) matrix: the definition, for small t."""
    t, C = scores.shape
    m = t // C
    P = torch.zeros(t, t, dtype=scores.dtype)
    P[torch.arange(t), order] = 1.0  # slot i holds token order[i]
    logits = scores / tau
    if pad is not None:
        logits = logits.masked_fill(pad[:, None], torch.finfo(logits.dtype).min)
    soft = logits.softmax(dim=0)  # (t, C)
    S_rows = torch.stack([soft[:, i // m] / m for i in range(t)])  # (t, t): slot i owned by cluster i // m
    return P + S_rows - S_rows.detach(), S_rows


def _sort_case(t=12, C=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(t, C, generator=g, dtype=torch.float64)
    x = torch.randn(t, d, generator=g, dtype=torch.float64)
    pad = torch.arange(t) % 5 == 4
    order = sc.balanced_assignment(sc.padding_scores(scores, pad)).sort(stable=True).indices
    return scores, x, pad, order


def test_sort_tokens_forward_is_the_hard_sort():
    """The forward value of M X is exactly the sort P X (bit for bit): slot i holds token order[i]."""
    scores, x, pad, order = _sort_case()
    out = sc.sort_tokens(x, scores.requires_grad_(), order, 0.5, pad)
    assert_close(out, x[order], rtol=0, atol=0)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_sort_tokens_gradient_equals_explicit_matrix(tau):
    """The gradients of M X with respect to the scores and the inputs equal those obtained by
    autograd through the explicit (t, t) matrix M = P + S - stopgrad(S)."""
    scores, x, pad, order = _sort_case(seed=1)
    cot = torch.randn(x.shape, dtype=torch.float64)
    s1, x1 = scores.clone().requires_grad_(), x.clone().requires_grad_()
    (sc.sort_tokens(x1, s1, order, tau, pad) * cot).sum().backward()
    s2, x2 = scores.clone().requires_grad_(), x.clone().requires_grad_()
    M, _ = explicit_sort_matrix(s2, order, tau, pad)
    ((M @ x2) * cot).sum().backward()
    assert_close(s1.grad, s2.grad)
    assert_close(x1.grad, x2.grad)
    assert s1.grad.abs().sum() > 0  # the gradient reaches the router


def test_sort_tokens_gradcheck():
    """gradcheck in float64: the straight-through gradient of M X is the true derivative of the
    soft relaxation P X + S X (checked by finite differences, adding stopgrad(S) X so that the
    forward value is that relaxation)."""
    scores, x, pad, order = _sort_case(t=8, C=2, d=3, seed=2)

    def relaxed(s, x):
        _, S_rows = explicit_sort_matrix(s, order, 0.5, pad)
        return sc.sort_tokens(x, s, order, 0.5, pad) + S_rows.detach() @ x  # value P X + S X

    assert torch.autograd.gradcheck(relaxed, (scores.requires_grad_(), x.requires_grad_()))


def test_sort_tokens_is_linear_in_t():
    """No (t, t) matrix is ever built: sorting 200k tokens (a (t, t) float64 matrix would need
    320 GB) runs forward and backward in a fraction of a second."""
    t, C, d = 200_000, 4, 8
    scores = torch.randn(t, C, dtype=torch.float64, requires_grad=True)
    x = torch.randn(t, d, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(t)
    sc.sort_tokens(x, scores, order, 0.5).sum().backward()
    assert scores.grad.shape == (t, C) and x.grad.shape == (t, d)


# ----------------------------------------------------------------------------
# 9. Token clustering


def reference_cluster(xs, pads, router, ffn_p, world, ranks_per_node, route_to, gate, tau, detach=False,
                      balanced=True):
    """Emulate the clustering layer of every rank with explicit (t, t) sort matrices and explicit
    chunk exchange: per rank, the tokens that arrive (after x + FFN(x) or the sigmoid gate), their
    padding mask, and what uncluster needs (order, split sizes, token counts)."""
    W, G = world, ranks_per_node
    chunks, orders, splits, counts = {}, [], [], []
    for r in range(W):
        x, t = xs[r], xs[r].shape[0]
        pad_n = (-t) % W if balanced else 0
        xp = torch.cat([x, x.new_zeros(pad_n, x.shape[1])])
        is_pad = torch.cat([pads[r], torch.ones(pad_n, dtype=torch.bool)])
        scores = (xp.detach() if detach else xp) @ router.t()  # (t_pad, C)
        if balanced:
            cluster = sc.balanced_assignment(sc.padding_scores(scores.detach(), is_pad)).tolist()
        else:  # each token to its best cluster; padding stays on its rank's cluster
            home = r if route_to == "rank" else r // G
            cluster = [home if is_pad[i] else int(scores[i].argmax()) for i in range(len(xp))]
        order = sorted(range(len(xp)), key=lambda i: (cluster[i], i))
        if gate == "softmax" and balanced:
            M, _ = explicit_sort_matrix(scores, torch.tensor(order), tau, is_pad)
            sent = M @ xp
        else:
            sent = xp[order]
        if balanced:
            split = [len(xp) // W] * W
        elif route_to == "rank":
            split = [cluster.count(j) for j in range(W)]
        else:  # a node's tokens spread over its G ranks, the first ones taking one more
            per_node = [cluster.count(n) for n in range(W // G)]
            split = [per_node[j // G] // G + (j % G < per_node[j // G] % G) for j in range(W)]
        starts = [sum(split[:j]) for j in range(W)]
        for j in range(W):
            rows = slice(starts[j], starts[j] + split[j])
            chunks[r, j] = (sent[rows], is_pad[order][rows])
        orders.append(order)
        splits.append(split)
        counts.append(t)
    ys, moved_pads = [], []
    for j in range(W):
        moved = torch.cat([chunks[r, j][0] for r in range(W)])
        moved_pads.append(torch.cat([chunks[r, j][1] for r in range(W)]))
        h = torch.stack([ffn(ffn_p, j, row) for row in moved]) if len(moved) else moved
        if gate == "softmax":
            ys.append(moved + h)
        else:
            w_c = router[j if route_to == "rank" else j // G]
            g = torch.sigmoid((moved.detach() if detach else moved) @ w_c)[:, None]
            ys.append(g * h + (1 - g) * moved)
    return ys, moved_pads, (orders, splits, counts)


def reference_uncluster(ys, how):
    """Send every rank's chunks back to their source and undo each source's sort."""
    orders, splits, counts = how
    W = len(ys)
    outs = []
    for r in range(W):
        back = []
        for j in range(W):  # on rank j, rank r's rows sit after those of ranks 0 .. r-1
            start = sum(splits[q][j] for q in range(r))
            back.append(ys[j][start:start + splits[r][j]])
        back = torch.cat(back)
        inverse = torch.empty(len(orders[r]), dtype=torch.long)
        inverse[torch.tensor(orders[r], dtype=torch.long)] = torch.arange(len(orders[r]))
        outs.append(back[inverse][:counts[r]])
    return outs


def make_cluster_params(seed, d, f, C, world):
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(C, d, generator=g, dtype=torch.float64)
    ffn_p = {"w1": torch.randn(world, d, f, generator=g, dtype=torch.float64) / math.sqrt(d),
             "b1": torch.randn(world, 1, f, generator=g, dtype=torch.float64) * 0.1,
             "w2": torch.randn(world, f, d, generator=g, dtype=torch.float64) / math.sqrt(f),
             "b2": torch.randn(world, 1, d, generator=g, dtype=torch.float64) * 0.1}
    return router, ffn_p


def build_clustering(topo, d, f, route_to, gate, router, ffn_p):
    layer = sc.TokenClustering(d, f, topo, route_to=route_to, gate=gate, tau=0.5).double()
    with torch.no_grad():
        layer.router.weight.copy_(router)
        for p in ("w1", "b1", "w2", "b2"):
            getattr(layer.ffn, p).copy_(ffn_p[p][topo.rank:topo.rank + 1])
    return layer


def _cluster_roundtrip(route_to: str, gate: str, balanced: bool = True):
    topo = sc.build_topology(2)
    d, f = 6, 8
    C = topo.world_size if route_to == "rank" else topo.num_nodes
    router, ffn_p = make_cluster_params(10, d, f, C, topo.world_size)
    case = make_case(11, COUNTS, sc.MoEConfig(d_model=d, d_ffn=f, num_experts=4))
    layer = build_clustering(topo, d, f, route_to, gate, router, ffn_p)
    x = case.xs[topo.rank].clone().requires_grad_()
    moved, plan = layer.cluster(x, case.pads[topo.rank], balanced=balanced)
    every_send = [sends for sends in topo.gather_lists(plan.send_splits)]
    assert plan.recv_splits == [sends[topo.rank] for sends in every_send]  # what each rank sent us
    if balanced:  # every rank receives t_pad / W tokens from every rank
        padded = [t + (-t) % WORLD for t in COUNTS]
        assert plan.recv_splits == [t // WORLD for t in padded]
        assert plan.send_splits == [padded[topo.rank] // WORLD] * WORLD
    else:
        assert sum(plan.send_splits) == COUNTS[topo.rank]
    back = sc.uncluster(moved, plan, layer.ledger)
    assert_close(back, x.detach(), rtol=0, atol=0)
    # the ledger: the clustering all-to-all (rows of d float64 and a 1-byte mask per token) and its way back
    rows = d * 8
    for link in sc.LINK_CLASSES:
        out_rows = sum(s for j, s in enumerate(plan.send_splits) if topo.link(j) == link)
        in_rows = sum(s for j, s in enumerate(plan.recv_splits) if topo.link(j) == link)
        assert layer.ledger.total(link=link, direction="forward") == out_rows * (rows + 1) + in_rows * rows
    (back * case.cots[topo.rank]).sum().backward()
    for link in sc.LINK_CLASSES:
        out_rows = sum(s for j, s in enumerate(plan.send_splits) if topo.link(j) == link)
        in_rows = sum(s for j, s in enumerate(plan.recv_splits) if topo.link(j) == link)
        assert layer.ledger.total(link=link, direction="backward") == in_rows * rows + out_rows * rows
    if gate == "sigmoid" or not balanced:  # the hard sort: the round trip's gradient is the identity
        assert_close(x.grad, case.cots[topo.rank], rtol=0, atol=0)
    else:  # differentiable sorting: the identity plus the path through the router's softmax
        assert not torch.equal(x.grad, case.cots[topo.rank])


@pytest.mark.parametrize("route_to", ["rank", "node"])
@pytest.mark.parametrize("gate, balanced", [("softmax", True), ("sigmoid", True), ("softmax", False)])
def test_cluster_then_uncluster_restores_every_token(workers, route_to, gate, balanced):
    """Clustering then un-clustering returns every token to its rank and place exactly (padding
    removed), with gradient the identity for the hard sort (the sigmoid gate, or argmax routing);
    balanced, every rank receives t_pad / W tokens from each rank; argmax routing (balanced=False) sends
    variable splits that the receivers learn exactly; the ledger counts the split sizes' bytes (data and
    padding mask) by link, forward and backward."""
    workers.run(_cluster_roundtrip, route_to, gate, balanced)


def _cluster_stack(route_to: str, gate: str, detach: bool, balanced: bool = True, virtual: bool = False):
    """Clustering -> Seq -> Seq -> uncluster on 2 x 2 gloo ranks (this process one of them), or with virtual=True on
    all 4 ranks of a VirtualWorld in this process, against the single-process reference."""
    world = sc.VirtualWorld(4, 2) if virtual else None
    topos = world.topologies if virtual else [sc.build_topology(2)]
    W, G, d, f = topos[0].world_size, topos[0].ranks_per_node, 6, 8
    C = W if route_to == "rank" else topos[0].num_nodes
    router, ffn_p = make_cluster_params(20, d, f, C, W)
    cfg = sc.MoEConfig(d_model=d, d_ffn=f, num_experts=2 * W, ratio1=0.25, ratio2=0.5)
    case1, case2 = make_case(21, COUNTS, cfg), make_case(22, COUNTS, cfg)
    layers = [(build_clustering(topo, d, f, route_to, gate, router, ffn_p), build("seq", cfg, topo, case1),
               build("seq", cfg, topo, case2)) for topo in topos]
    for clustering, seq1, seq2 in layers[1:]:  # a virtual world: each replicated router is one module
        clustering.router, seq1.router, seq2.router = (m.router for m in layers[0])
    xs_run = [case1.xs[topo.rank].clone().requires_grad_() for topo in topos]

    def stack(i: int):
        (clustering, seq1, seq2), rank = layers[i], topos[i].rank
        h, plan = clustering(xs_run[i], case1.pads[rank], detach_router_input=detach, balanced=balanced)
        out1 = seq1(h, plan.pad_mask)
        h = h + out1.y
        out2 = seq2(h, plan.pad_mask)
        y = sc.uncluster(h + out2.y, plan, clustering.ledger)
        return y, (y * case1.cots[rank]).sum() + AUX_WEIGHT * (out1.aux_loss + out2.aux_loss)
    results = world.run(stack) if virtual else [stack(0)]
    sum(loss for _, loss in results).backward()
    # argmax routing with the softmax gate has no soft sort: the clustering router gets no gradient
    routers = [m.router.weight for m in layers[0]]
    grads = [torch.zeros_like(w) if w.grad is None else w.grad.clone() for w in routers]
    for grad in grads if not virtual else []:
        dist.all_reduce(grad)

    # the reference: every rank emulated in one process
    xs = [xx.clone().requires_grad_() for xx in case1.xs]
    leaves = {"router": router.clone().requires_grad_(), **{k: v.clone().requires_grad_() for k, v in ffn_p.items()}}
    p1 = {"router": case1.router.clone().requires_grad_(),
          "all": {k: v.clone().requires_grad_() for k, v in case1.experts["all"].items()}}
    p2 = {"router": case2.router.clone().requires_grad_(),
          "all": {k: v.clone().requires_grad_() for k, v in case2.experts["all"].items()}}
    hs, moved_pads, how = reference_cluster(xs, case1.pads, leaves["router"], leaves, W, G, route_to, gate, 0.5, detach,
                                            balanced)
    ys1, aux1 = reference_forward("seq", hs, moved_pads, p1["router"], {"all": p1["all"]}, cfg, W, G)
    hs = [a + b for a, b in zip(hs, ys1)]
    ys2, aux2 = reference_forward("seq", hs, moved_pads, p2["router"], {"all": p2["all"]}, cfg, W, G)
    outs = reference_uncluster([a + b for a, b in zip(hs, ys2)], how)
    loss = sum((o * cot).sum() for o, cot in zip(outs, case1.cots)) + AUX_WEIGHT * (sum(aux1) + sum(aux2))
    loss.backward()

    if leaves["router"].grad is not None:  # None only with argmax routing (checked below)
        assert_close(grads[0], leaves["router"].grad)
    assert_close(grads[1], p1["router"].grad)
    assert_close(grads[2], p2["router"].grad)
    n = cfg.num_experts // W
    for (y, _), x, topo, (clustering, seq1, seq2) in zip(results, xs_run, topos, layers):
        r = topo.rank
        assert_close(y, outs[r].detach())
        assert_close(x.grad, xs[r].grad)
        for p in ("w1", "b1", "w2", "b2"):
            assert_close(getattr(clustering.ffn, p).grad, leaves[p].grad[r:r + 1])
            assert_close(getattr(seq1.experts, p).grad, p1["all"][p].grad[r * n:(r + 1) * n])
            assert_close(getattr(seq2.experts, p).grad, p2["all"][p].grad[r * n:(r + 1) * n])
    if balanced or gate == "sigmoid":
        assert grads[0].abs().sum() > 0  # the gradient reaches the clustering router
    else:
        assert grads[0].abs().sum() == 0 and leaves["router"].grad is None  # hard argmax: no path, in both
    return float(grads[0].abs().sum())


@pytest.mark.parametrize("balanced", [True, False])
def test_virtual_world_clustering_stack_matches_reference(balanced):
    """Clustering -> Seq -> Seq -> uncluster with every rank a thread of one process (sc.VirtualWorld) equals the
    single-process reference: outputs and the gradients of inputs, routers and experts on every rank."""
    _cluster_stack("node", "softmax", False, balanced, virtual=True)


@pytest.mark.parametrize("route_to, gate, detach", [("rank", "softmax", False), ("node", "softmax", False),
                                                    ("node", "sigmoid", False),
                                                    ("rank", "sigmoid", False), ("node", "softmax", True)])
def test_cluster_seq_seq_uncluster_matches_reference(workers, route_to, gate, detach):
    """A stack clustering -> Seq -> Seq -> uncluster on 2 nodes x 2 ranks equals a single process
    emulating every rank (explicit sort matrices, explicit chunk exchange): outputs and gradients of
    the inputs, the clustering router and FFN, both Seq routers and their experts. The gradient
    reaches the clustering router (through the softmax of the differentiable sort, or the sigmoid
    gate), also with the router reading detached inputs (the decoder's setting)."""
    workers.run(_cluster_stack, route_to, gate, detach)


@pytest.mark.parametrize("route_to", ["rank", "node"])
def test_argmax_clustering_stack_matches_reference(workers, route_to):
    """With argmax routing (the decoder's greedy option at inference) the stack clustering -> Seq -> Seq ->
    uncluster, with variable split sizes, still equals the single-process reference."""
    workers.run(_cluster_stack, route_to, "softmax", True, False)


def test_clustering_errors():
    """Bad clustering settings are ValueErrors that name the value."""
    topo = sc.build_topology()
    with pytest.raises(ValueError, match="route_to='device'"):
        sc.TokenClustering(4, 4, topo, route_to="device")
    with pytest.raises(ValueError, match="gate='relu'"):
        sc.TokenClustering(4, 4, topo, gate="relu")
    with pytest.raises(ValueError, match="tau=0"):
        sc.TokenClustering(4, 4, topo, tau=0)


def test_clustering_on_one_rank_is_the_identity_move():
    """On a world of one, clustering moves nothing (the plan is the identity sort over one cluster)
    and uncluster returns the layer's output rows in token order."""
    topo = sc.build_topology()
    layer = sc.TokenClustering(4, 8, topo).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    moved, plan = layer.cluster(x)
    assert_close(moved, x, rtol=0, atol=0)
    assert_close(sc.uncluster(moved, plan), x, rtol=0, atol=0)
    assert layer.ledger.total() == 0


# ----------------------------------------------------------------------------
# train_toy.py: the trainer

HERE = Path(__file__).resolve().parent
TINY = ["--d-model", "16", "--d-ffn", "32", "--layers", "2", "--batch", "32", "--eval-sentences", "16",
        "--log-every", "5", "--warmup", "5", "--feat-multiple", "1", "--languages", "4", "--train-pairs", "2000"]
RESULT_KEYS = {"moe", "token_cluster", "ratio1", "ratio2", "world_size", "ranks_per_node", "steps", "final_loss",
               "bleu", "step_time_s", "bytes_per_step"}


def run_trainer(out: Path, command: str, *args: str, env: dict | None = None) -> tuple[list[dict], str]:
    """Run `train_toy.py command` as a user would (4 spawned CPU processes by default); results.json, stdout."""
    proc = subprocess.run([sys.executable, "train_toy.py", command, *TINY, *args, "--out", str(out)], cwd=HERE,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


def test_training_on_4_processes_lowers_the_loss(tmp_path):
    """Seq with token clustering, trained on 4 CPU processes as 2 nodes x 2, lowers the loss; results.json
    holds the contract's keys, with bytes per link class summed over ranks (inter-node > 0 on 2 nodes)."""
    [result], stdout = run_trainer(tmp_path, "train", "--moe", "seq", "--token-cluster", "--layers", "4",
                                   "--steps", "40")
    losses = result["losses"]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert RESULT_KEYS <= set(result) and set(result["bytes_per_step"]) == {"intra_device", "intra_node", "inter_node"}
    assert result["world_size"] == 4 and result["ranks_per_node"] == 2 and result["token_cluster"]
    assert result["bytes_per_step"]["inter_node"] > 0 and 0 <= result["bleu"] <= 100
    assert "step 40/40" in stdout and "MB/step" in stdout and "ETA" in stdout


def test_argmax_clustering_with_the_sigmoid_gate_trains(tmp_path):
    """Clustering without the balance constraint (each token to its best cluster, variable splits; the
    sigmoid gate trains the router) runs on 4 processes, lowers the loss, and says so in results.json."""
    [result], _ = run_trainer(tmp_path, "train", "--moe", "seq", "--token-cluster", "--cluster-gate", "sigmoid",
                              "--cluster-assign", "argmax", "--layers", "4", "--steps", "20")
    losses = result["losses"]
    assert result["variant"] == "seq+cluster(sigmoid,argmax)" and result["cluster_assign"] == "argmax"
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2


def test_demo_trains_its_variants_and_predicts_a_cluster_step(tmp_path):
    """The demo trains GShard, Seq, Feat and Seq + clustering (its ranks threads of one process), prints the table
    and each variant's rank-by-rank bytes, and writes one results.json entry per variant; Seq and Feat send fewer
    bytes across nodes than GShard. The predicted cluster step is a rank's compute-only step plus the step's bytes
    over the stated links. As processes (--no-threads), with node-limited routing, too."""
    results, stdout = run_trainer(tmp_path / "threads", "demo", "--steps", "3", "--eval-sentences", "4", "--layers",
                                  "4")
    assert [r["variant"] for r in results] == ["gshard", "seq", "feat", "seq+cluster"]
    args = toy.parse_args(["demo", "--out", str(tmp_path / "args")])  # the cost model's link rates
    names = {r["variant"] for r in results}
    rows = {cols[0]: cols for cols in map(str.split, stdout.splitlines()) if cols[:1] and cols[0] in names and
            "x" in cols[-1]}  # the table's rows: variant first, a speed-up last
    for r in results:
        assert RESULT_KEYS <= set(r) and r["steps"] == 3 and r["threads"]
        matrix = r["byte_matrix"]  # (src, dst) bytes of the last step; the off-node blocks are inter-node
        assert sum(matrix[s][d] for s in range(4) for d in range(4) if s // 2 != d // 2) == \
            pytest.approx(r["bytes_per_step"]["inter_node"], rel=0.35)
        assert r["compute_s"] > 0
        cluster = toy.predict(r["compute_s"], toy.link_bytes(matrix, 2), 2, args)
        assert float(rows[r["variant"]][8]) == round(r["compute_s"], 3)
        assert float(rows[r["variant"]][9]) == pytest.approx(cluster, abs=6e-4)
    inter = {r["variant"]: r["bytes_per_step"]["inter_node"] for r in results}
    assert max(inter["seq"], inter["feat"]) < inter["gshard"]
    assert "speed-up" in stdout and "1.00x" in stdout and "node boundaries" in stdout
    assert "BLEU and valid loss after 3 steps per variant" in stdout  # the budget is said beside the qualities
    results, _ = run_trainer(tmp_path / "processes", "demo", "--no-threads", "--variants", "gshard,node-limited",
                             "--steps", "3", "--eval-sentences", "4")
    assert [r["variant"] for r in results] == ["gshard", "node-limited"] and not results[0]["threads"]
    assert all(r["compute_s"] > 0 for r in results)
    assert results[1]["bytes_per_step"]["inter_node"] < results[0]["bytes_per_step"]["inter_node"]


def test_the_authors_options_reach_the_layers(tmp_path):
    """train --batch-prioritized-routing --local-no-capacity --eval-capacity-token-fraction 0.5 builds every
    MoE layer with those settings and trains (4 processes, Seq)."""
    args = toy.parse_args(["train", "--moe", "seq", "--batch-prioritized-routing", "--local-no-capacity",
                           "--eval-capacity-token-fraction", "0.5"])
    cfg = toy.moe_config(args)
    assert cfg.batch_prioritized_routing and cfg.local_no_capacity and cfg.eval_capacity_token_fraction == 0.5
    [result], _ = run_trainer(tmp_path, "train", "--moe", "seq", "--batch-prioritized-routing", "--local-no-capacity",
                              "--eval-capacity-token-fraction", "0.5", "--steps", "3")
    assert result["steps"] == 3 and 0 <= result["bleu"] <= 100


def test_resume_gives_the_uninterrupted_loss_sequence(tmp_path):
    """A run stopped at a checkpoint and resumed produces exactly the loss sequence and the evaluations (the one
    at the checkpoint's step too) of a run that was never interrupted (same data, optimizer state, RNG); shared
    parameters are saved once, each rank's experts, optimizer and RNG in its own file."""
    args = ["--moe", "seq", "--token-cluster", "--layers", "4", "--ckpt-every", "4", "--eval-every", "2"]
    [straight], _ = run_trainer(tmp_path / "a", "train", *args, "--steps", "8")
    run_trainer(tmp_path / "b", "train", *args, "--steps", "4")
    [resumed], stdout = run_trainer(tmp_path / "b", "train", *args, "--steps", "8", "--resume")
    assert "resumed from step 4" in stdout
    assert resumed["losses"] == straight["losses"] and resumed["devices"] == straight["devices"] == [[0, "cpu"]]
    assert [e["step"] for e in straight["evals"]] == [2, 4, 6, 8] and resumed["evals"] == straight["evals"]
    run_trainer(tmp_path / "c", "train", *args, "--steps", "6")  # its newest checkpoint (4) holds step 4's evaluation
    [again], _ = run_trainer(tmp_path / "c", "train", *args, "--steps", "8", "--resume")
    assert again["evals"] == straight["evals"] and again["losses"] == straight["losses"]  # none done twice
    files = sorted(p.name for p in (tmp_path / "b" / "ckpt" / "seq+cluster" / "step000008").iterdir())
    assert files == ["rank0.pt", "rank1.pt", "rank2.pt", "rank3.pt", "shared.pt"]


def test_checkpoints_are_whole_verified_units_and_resume_checks_them_first(tmp_path, capsys):
    """Each checkpoint step is a whole, verifiable unit: rank 0 writes its manifest last, holding the run's
    fingerprint and each file's sha256. Before any process starts, --resume refuses other settings (naming
    each differing flag with both values), --steps below the checkpoint's step, and a folder without a
    complete checkpoint unless --resume-or-start; it skips, naming the file, a step whose manifest is
    missing (a crash mid-save) or whose file fails its checksum, and resumes from the newest complete step,
    giving the uninterrupted loss sequence. A fresh run into a folder with checkpoints is refused unless
    --overwrite, which deletes them first. Every run's results are kept: results-NNNN.json, and
    results.json is the newest."""
    flags = ["--moe", "seq", "--nproc", "2", "--ckpt-every", "2", "--steps", "4", "--eval-sentences", "4"]
    out = tmp_path / "run"
    [first], _ = run_trainer(out, "train", *flags)
    root = out / "ckpt" / "seq"
    manifest = json.loads((root / "step000004.manifest.json").read_text())
    assert set(manifest["sha256"]) == {"shared.pt", "rank0.pt", "rank1.pt"}
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((root / "step000004" / name).read_bytes()).hexdigest() == digest
    fp = manifest["fingerprint"]
    assert fp["variant"] == "seq" and fp["ranks"] == 2 and fp["--seed"] == 0 and fp["--lr"] == 5e-3
    assert fp["--d-model"] == 16 and fp["--ratio1"] == 0.25 and "--steps" not in fp

    def parse(*a: str, at: Path = out):
        return toy.parse_args(["train", *TINY, *flags, "--out", str(at), *a])

    def refused(*a: str, at: Path = out) -> str:
        with pytest.raises(SystemExit):
            parse(*a, at=at)
        return capsys.readouterr().err

    assert "holds checkpoints of an earlier run: add --resume to continue it, or --overwrite" in refused()
    parse("--overwrite")  # accepted: the launcher deletes them before any rank starts
    err = refused("--resume", "--lr", "0.01", "--seed", "1").strip().splitlines()[-1]
    assert "was written with other settings" in err and "--lr 0.01 (checkpoint: 0.005)" in err \
        and "--seed 1 (checkpoint: 0)" in err, err
    assert "ranks 4 (checkpoint: 2)" in refused("--resume", "--nproc", "4")
    assert "--steps 3 is below the checkpoint's step 4" in refused("--resume", "--steps", "3")
    assert "--resume: no complete checkpoint in" in refused("--resume", at=tmp_path / "empty")
    assert parse("--resume-or-start", at=tmp_path / "empty").resume_from == {}
    capsys.readouterr()

    (root / "step000004.manifest.json").unlink()  # as if the launcher died while step 4 was being saved
    assert parse("--resume").resume_from == {str(root): str(root / "step000002")}
    assert "step000004.manifest.json" in capsys.readouterr().err
    shutil.copytree(out, tmp_path / "corrupt")
    with open(tmp_path / "corrupt" / "ckpt" / "seq" / "step000002" / "rank1.pt", "ab") as f:
        f.write(b"x")
    err = refused("--resume", at=tmp_path / "corrupt")
    assert "step000002/rank1.pt missing or not matching its sha256" in err and "no complete checkpoint" in err

    [resumed], stdout = run_trainer(out, "train", *flags, "--resume")
    assert "resumed from step 2" in stdout and resumed["losses"] == first["losses"]
    assert json.loads((out / "results-0001.json").read_text()) == [first]
    assert json.loads((out / "results-0002.json").read_text()) == [resumed]
    run_trainer(out, "train", *flags, "--overwrite", "--steps", "2")  # no step of the earlier runs is left
    assert sorted(p.name for p in root.iterdir()) == ["step000002", "step000002.manifest.json"]
    assert (out / "results-0003.json").read_text() == (out / "results.json").read_text()


def test_every_train_flag_is_fingerprinted_or_may_differ_on_resume():
    """A checkpoint resumes only with the settings it was written with: each flag of `train` is in the fingerprint,
    part of the variant's name, or one that may differ on resume (where and how long the run goes on, and how often
    it logs, evaluates and saves). A new flag must be placed in one of these."""
    train = toy.build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train._actions if a.option_strings and a.dest != "help"}
    variant = {"moe", "token_cluster", "cluster_gate", "cluster_assign", "reorder_layers"}
    ranks = {"nproc", "ranks_per_node", "threads"}  # the fingerprint's "ranks", "--ranks-per-node", "--threads"
    may_differ = {"steps", "eval_every", "log_every", "ckpt_every", "resume", "resume_or_start", "overwrite", "out",
                  "compile", "device", "backend", "timeout", "gbps_intra_node", "gbps_inter_node", "fail_at_step",
                  "nan_at_step"}
    assert flags == set(toy.FINGERPRINT_FLAGS) | variant | ranks | may_differ


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc/*/stat)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_spawned_workers_end_when_the_launcher_is_killed(tmp_path):
    """No orphans: once the launcher has spawned its workers and they train, killing it with SIGKILL ends
    every one of them within seconds. The launcher starts with SIGINT ignored, as a background job of a
    shell script does, which disables torch's own parent-death signal (SIGINT)."""
    proc = subprocess.Popen([sys.executable, "train_toy.py", "train", *TINY, "--nproc", "2", "--steps", "100000",
                             "--log-every", "1", "--out", str(tmp_path)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    workers = []
    try:
        for line in proc.stdout:
            if "step 1/" in line:  # the workers are training
                break
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # the two ranks (and multiprocessing's resource tracker)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _running(w)]
    finally:
        proc.kill()
        for w in workers:  # whatever the outcome, leave nothing running
            if _running(w):
                os.kill(w, signal.SIGKILL)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """A non-finite loss (here forced on one rank by the testing hook --nan-at-step 3) stops every rank at
    that step: rank 0 prints one line naming the step, the run exits non-zero without a traceback or
    results, and no checkpoint is saved after it: the newest is still the last good one (step 2). With
    clustering too, whose auction refuses NaN scores: no step runs on the non-finite weights."""
    proc = subprocess.run([sys.executable, "train_toy.py", "train", *TINY, "--moe", "seq", "--token-cluster",
                           "--layers", "4", "--nproc", "2", "--steps", "6", "--ckpt-every", "2", "--nan-at-step", "3",
                           "--out", str(tmp_path)], cwd=HERE, capture_output=True, text=True, timeout=600)
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "not finite" in line]
    assert proc.returncode != 0 and len(said) == 1 and "step 3: the loss is not finite" in said[0], \
        proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "newest checkpoint is step 2" in said[0]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "seq+cluster").iterdir()) == ["step000002",
                                                                                      "step000002.manifest.json"]
    assert not list(tmp_path.glob("results*.json"))


def test_bench_runs_and_writes_bench_json(tmp_path):
    """A small `bench` on 4 processes (2 nodes x 2) writes bench.json with the contract's keys; the ledger's
    bytes put Seq's and node-limited's inter-node traffic below GShard's, and the prediction adds bytes over
    bandwidth."""
    proc = subprocess.run([sys.executable, "train_toy.py", "bench", "--bench-tokens", "64", "--d-model", "16",
                           "--d-ffn", "16", "--reps", "2", "--feat-multiple", "1", "--out", str(tmp_path)],
                          cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["moe"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert set(rows) == {"gshard", "node-limited", "seq", "feat", "cluster", "experts"}
    keys = {"moe", "ratio1", "ratio2", "tokens_per_rank", "d_model", "median_s", "min_s", "compute_only_s", "reps",
            "bytes_per_step", "speedup_vs_gshard", "predicted_s", "predicted_speedup_vs_gshard"}
    for kind in ("gshard", "node-limited", "seq", "feat", "cluster"):
        assert keys <= set(rows[kind]) and rows[kind]["reps"] == 2
        assert rows[kind]["predicted_s"] > rows[kind]["compute_only_s"]
    for kind in ("seq", "node-limited"):
        assert rows[kind]["bytes_per_step"]["inter_node"] < rows["gshard"]["bytes_per_step"]["inter_node"]
        b = rows[kind]["break_even_gbps_inter_node"]
        assert b in ("any", "never") or b > 0
    assert rows["gshard"]["break_even_gbps_inter_node"] is None
    assert "speed-up" in proc.stdout and "wins below" in proc.stdout


def test_bench_emulates_a_cluster_in_one_process(tmp_path):
    """`bench --nproc 1 --emulate 2x2` times rank 0 of 2 nodes x 2 in one process (compute only) and counts the
    bytes a real run sends: the same inter-node bytes as the 4-process run of the same sizes."""
    args = ["--bench-tokens", "64", "--d-model", "16", "--d-ffn", "16", "--reps", "2", "--feat-multiple", "1"]
    run = lambda *a: subprocess.run([sys.executable, "train_toy.py", "bench", *args, *a],  # noqa: E731
                                    cwd=HERE, capture_output=True, text=True, timeout=300)
    proc = run("--nproc", "1", "--emulate", "2x2", "--out", str(tmp_path / "one"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0 of 2 x 2 emulated" in proc.stdout
    one = {r["moe"]: r for r in json.loads((tmp_path / "one" / "bench.json").read_text())}
    assert proc.returncode == 0 and run("--out", str(tmp_path / "four")).returncode == 0
    four = {r["moe"]: r for r in json.loads((tmp_path / "four" / "bench.json").read_text())}
    for kind in ("gshard", "seq", "feat", "node-limited"):
        assert one[kind]["emulated"] and one[kind]["median_s"] == one[kind]["compute_only_s"]
        assert one[kind]["bytes_per_step"]["inter_node"] == four[kind]["bytes_per_step"]["inter_node"], kind
    refused = run("--nproc", "2", "--emulate", "2x2")
    assert refused.returncode == 2 and "--emulate 2x2 runs in one process" in refused.stderr
    assert "give nodes x ranks per node" in run("--nproc", "1", "--emulate", "2by2").stderr


def test_break_even_bandwidth():
    """The rate below which a variant beats GShard: saved inter-node bits over its extra seconds; "any" when it
    costs no extra time, "never" when it saves nothing."""
    rank = lambda intra, inter: {"intra_node": intra, "inter_node": inter}  # noqa: E731
    gshard, saver = [rank(0, 1e9)] * 2, [rank(0, 0.25e9)] * 2  # one node of 2 ranks: the node sends 2x
    # it saves 1.5e9 bytes per node link = 12e9 bits and costs 1 ms more: even at 12e12 bit/s
    assert toy.break_even_gbps((2e-3, 1e-3), (saver, gshard), 2, 1e3) == pytest.approx(12e3)
    assert toy.break_even_gbps((1e-3, 1e-3), (saver, gshard), 2, 1e3) == "any"
    assert toy.break_even_gbps((2e-3, 1e-3), (gshard, gshard), 2, 1e3) == "never"
    # extra intra-node bytes count at the intra-node rate: 1e9 bytes at 8e12 bit/s is 1 ms more
    assert toy.break_even_gbps((1e-3, 1e-3), ([rank(1e9, 0.25e9)] * 2, gshard), 2, 8e3) == pytest.approx(12e3)


def test_emulated_topology():
    """emulated_topology: rank r's groups in a world it does not have, every collective a local copy."""
    topo = sc.emulated_topology(8, 4, rank=5)
    assert (topo.node_rank, topo.local_rank, topo.num_nodes) == (1, 1, 2)
    assert topo.node.ranks == (4, 5, 6, 7) and topo.peers.ranks == (1, 5) and topo.world.size == 8
    assert topo.local_copy and topo.gather_counts(3) == [3] * 8
    assert topo.peers.links == ("inter_node", "intra_device") and topo.node.links[0] == "intra_node"
    for bad in [(6, 4, 0), (8, 4, 8), (8, 0, 0)]:
        with pytest.raises(ValueError, match="a world of .* ranks"):
            sc.emulated_topology(*bad)


def test_trace_prints_every_token_and_the_bytes():
    """`trace` on 4 processes prints a row for each of the 40 tokens (tier, experts, ranks) and the bytes
    of each tier; with alpha = 1 every token is local and no byte moves."""
    run = lambda *a: subprocess.run([sys.executable, "train_toy.py", "trace", *a], cwd=HERE,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    proc = run()
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 40 and {"local", "node", "global"} <= {line.split()[2] for line in rows}
    local = run("--ratio1", "1.0", "--ratio2", "0.0").stdout
    assert all(line.split()[2] == "local" for line in local.splitlines() if line[:4].strip().isdigit())
    assert all(set(line.split()[2:]) == {"0"} for line in local.splitlines() if line.startswith(("node ", "global")))


def test_bench_assign_reports_the_gap_to_scipy():
    """`bench-assign` prints, per size, our time, scipy's, the ratio and the optimality gap."""
    pytest.importorskip("scipy.optimize", reason="bench-assign compares against scipy: pip install scipy")
    proc = subprocess.run([sys.executable, "train_toy.py", "bench-assign", "--assign-tokens", "64,128",
                           "--assign-clusters", "4", "--reps", "1"], cwd=HERE, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 64 ") or line.startswith("| 128 ")]
    assert len(rows) == 2 and all(line.count("|") == 8 for line in rows)


def test_corpus_bleu_matches_sacrebleu():
    """corpus_bleu equals sacrebleu's corpus BLEU (tokenize="none", exp smoothing and none) on random
    corpora, a perfect match, no overlap, short hypotheses (brevity penalty) and ones without 4-gram matches."""
    import sacrebleu  # the trusted reference; installed for the tests only
    g = np.random.default_rng(0)
    corpora = []
    for _ in range(8):
        refs = [[f"w{x}" for x in g.integers(0, 6, g.integers(1, 12))] for _ in range(20)]
        hyps = [[w if g.random() < 0.7 else f"w{g.integers(0, 6)}" for w in r][:g.integers(1, len(r) + 2)]
                for r in refs]
        corpora.append((hyps, refs))
    refs = [["a", "b", "c", "d", "e"], ["f", "g", "h", "i"]]
    corpora += [(refs, refs), ([["x", "y"], ["z"]], refs), ([["a", "b"], ["f"]], refs),
                ([["a", "c", "b", "e", "d"], ["f", "h", "g", "i"]], refs)]
    for hyps, refs in corpora:
        for smooth in ("exp", "none"):
            expect = sacrebleu.corpus_bleu([" ".join(h) for h in hyps], [[" ".join(r) for r in refs]],
                                           tokenize="none", smooth_method=smooth).score
            assert abs(toy.corpus_bleu(hyps, refs, smooth) - expect) < 1e-6, (smooth, hyps, refs)


def test_task_is_deterministic_and_follows_its_rules():
    """The task is a function of its seed; train and valid share no source sentence; every target is
    the source reordered by its language's rule and substituted word by word."""
    a, b = toy.make_task(toy.TaskConfig(seed=3)), toy.make_task(toy.TaskConfig(seed=3))
    assert a.train == b.train and a.valid == b.valid and a.train != toy.make_task(toy.TaskConfig(seed=4)).train
    assert not {s for s, _ in a.train} & {s for s, _ in a.valid}
    src0 = 3 + a.cfg.languages
    for src, tgt in a.train[:200] + a.valid[:50]:
        lang = src[0] - 3
        words = [w - src0 for w in src[1:]]
        assert tgt == tuple(t for w in toy.reorder(a.orders[lang], words) for t in a.subst[lang][w])
    assert toy.reorder("swap_pairs", [1, 2, 3, 4, 5]) == [2, 1, 4, 3, 5]
    assert toy.reorder("swap_halves", [1, 2, 3, 4, 5]) == [3, 4, 5, 1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_rejects_cuda_without_a_gpu(capsys):
    """--device cuda on a machine without CUDA stops with a message before any process starts."""
    with pytest.raises(SystemExit):
        toy.parse_args(["--device", "cuda"])
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ratio1", "0.7", "--ratio2", "0.5"], "ratio1 \\+ ratio2"),
    (["--nproc", "4", "--ranks-per-node", "3"], "--ranks-per-node 3 does not divide the 4 ranks"),
    (["--capacity-factor", "0"], "capacity_factor=0.0 must be > 0"),
    (["--experts", "0"], "--experts 0"),
    (["--experts", "6"], "--experts 6 is not a multiple of the 4 ranks"),
    (["train", "--moe", "dense", "--token-cluster"], "--token-cluster needs --layers >= 4 .* and an MoE variant"),
    (["train", "--moe", "feat", "--ratio1", "0.01"], "the local slice of d_model=64"),
    (["--batch", "30"], "--batch 30 does not split evenly over 4 ranks"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--aux-weight", "inf"], "--aux-weight inf: must be a finite number"),
    (["--lr", "-0.001"], "--lr > 0"),
    (["train", "--capacity-factor", "inf"], "--capacity-factor inf: must be a finite number"),
    (["--timeout", "nan"], "--timeout nan: must be a finite number"),
    (["--seed", "-1"], "--seed -1: must be at least 0"),
    (["sweep", "--points", "0.2-0.5"], "--points '0.2-0.5': write ratio1:ratio2 pairs"),
    (["sweep", "--variants", "gshard,moe"], "--variants: unknown moe"),
    (["--steps", "0"], "--steps 0"),
    (["--d-model", "0"], "--d-model 0"),
    (["--eval-sentences", "0"], "--eval-sentences 0"),
    (["--ranks-per-node", "0"], "--ranks-per-node 0"),
    (["--timeout", "0"], "--timeout 0"),
    (["train", "--moe", "seq", "--token-cluster", "--layers", "3"], "--token-cluster needs --layers >= 4"),
    (["train", "--moe", "seq", "--token-cluster", "--cluster-assign", "argmax"],
     "--cluster-assign argmax needs .* sigmoid"),
    (["train", "--moe", "dense", "--reorder-layers"], "--reorder-layers needs an MoE variant"),
    (["train", "--eval-capacity-token-fraction", "2"], "eval_capacity_token_fraction"),
])
def test_cli_errors(argv, message, capsys):
    """Bad command-line values stop the program with a message naming the value, before any process starts."""
    with pytest.raises(SystemExit):
        toy.parse_args(argv)
    assert __import__("re").search(message, capsys.readouterr().err)


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only", "checkpoint folder is a file"])
def test_cli_proves_the_output_folder_writable(tmp_path, case, capsys):
    """Before any process starts, --out (and with --ckpt-every its checkpoint folder) is created and proven
    writable: an existing file, a path under a file, a read-only folder, or a checkpoint folder that is a
    file stop the program with a one-line message naming the flag and the folder."""
    if case == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    out, flags = tmp_path / "out", ["--ckpt-every", "5"]
    if case == "a file":
        out.write_text("x")
    elif case == "under a file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "sub"
    elif case == "read-only":
        out.mkdir()
        out.chmod(0o500)
    else:
        (out / "ckpt").parent.mkdir()
        (out / "ckpt").write_text("x")
    with pytest.raises(SystemExit):
        toy.parse_args(["train", *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    what = "--ckpt-every 5: the checkpoint folder" if case == "checkpoint folder is a file" else "--out"
    assert what in err and "choose another --out" in err and "Traceback" not in err, err


def test_cli_creates_the_output_folder_and_leaves_no_probe(tmp_path):
    """A good --out that does not exist yet is created (with its checkpoint folder) by the check, which
    leaves nothing behind."""
    out = tmp_path / "a" / "b"
    toy.parse_args(["train", "--ckpt-every", "5", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["ckpt"] and not list((out / "ckpt").iterdir())


def test_every_accepted_moe_variant_holds_an_moe_layer(tmp_path, monkeypatch, capsys):
    """A command line is accepted exactly when every MoE variant it trains holds an MoE layer in both
    stacks (with clustering, one after the clustering layer), as layer_plan places them: `train --moe seq
    --layers 1` or `demo --layers 3` (its Seq + clustering) is refused with a message, a dense model of one
    layer is accepted."""
    monkeypatch.chdir(tmp_path)  # the check creates --out
    lines = [["train", "--moe", m, *extra] for m in toy.MOE_KINDS
             for extra in ([], ["--token-cluster"], ["--reorder-layers"]) if not (m == "dense" and extra)]
    lines += [["demo"], ["sweep", "--variants", "seq+cluster,dense"], ["sweep", "--variants", "gshard"]]
    for line in lines:
        for layers in range(1, 6):
            argv = [*line, "--layers", str(layers)]
            try:
                args = toy.parse_args(argv)
            except SystemExit:
                err = capsys.readouterr().err
                assert "would hold no MoE layer" in err or "--token-cluster needs --layers >= 4" in err, (argv, err)
                accepted = False
            else:
                accepted = True
            plans = {v.name: [toy.layer_plan(layers, v.moe, v.token_cluster, dec, v.reorder) for dec in (False, True)]
                     for v in toy.variants(toy.build_parser().parse_args(argv))}
            holds = all("moe" in plan[plan.index("cluster") + 1:] if "cluster" in plan else "moe" in plan
                        for name, stacks in plans.items() if not name.startswith("dense") for plan in stacks)
            assert accepted == holds, (argv, plans)
    toy.parse_args(["train", "--moe", "dense", "--layers", "1"])


def test_every_command_has_help_and_every_readme_command_parses(tmp_path, monkeypatch):
    """`--help` of the program and of every command exits 0 and names the command's own flags; every
    `python train_toy.py ...` and `torchrun ... train_toy.py ...` line in README.md parses."""
    monkeypatch.chdir(tmp_path)  # parsing creates each command's --out
    for command, flag in [(None, "sweep"), ("demo", "--gbps-inter-node"), ("train", "--moe"), ("sweep", "--points"),
                          ("trace", "--moe"), ("bench", "--bench-tokens"), ("bench-assign", "--assign-tokens")]:
        proc = subprocess.run([sys.executable, "train_toy.py", *([command] if command else []), "--help"], cwd=HERE,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and flag in proc.stdout, (command, proc.stderr)
    readme = (HERE / "README.md").read_text()
    lines = [line.split("#")[0].split("train_toy.py", 1)[1] for line in readme.splitlines()
             if line.startswith("    ") and "train_toy.py" in line]  # the indented command blocks
    assert len(lines) >= 5
    for line in lines:
        args = line.split()
        if "--device" in args and "cuda" in args and not torch.cuda.is_available():
            continue  # a GPU command: checked on GPU machines only
        toy.parse_args(args)


def _losses(out: Path) -> list[float]:
    return json.loads((out / "results.json").read_text())[0]["losses"]


@pytest.mark.parametrize("moe", ["dense", "gshard"])
def test_the_global_batch_trains_the_same_model_on_1_and_4_processes(tmp_path, moe):
    """--batch is the global batch: one process and 4 processes (2 nodes x 2) train the same model on the
    same data, so their losses agree to float tolerance (dropout 0; GShard with a capacity that never binds
    and aux weight 0, its aux loss being a per-rank statistic)."""
    flags = ["--moe", moe, "--steps", "4", "--dropout", "0", "--aux-weight", "0", "--capacity-factor", "8",
             "--eval-sentences", "8"]
    run_trainer(tmp_path / "one", "train", *flags, "--nproc", "1")
    run_trainer(tmp_path / "four", "train", *flags, "--nproc", "4")
    one, four = _losses(tmp_path / "one"), _losses(tmp_path / "four")
    assert len(one) == 4 and one[-1] < one[0]
    torch.testing.assert_close(torch.tensor(four), torch.tensor(one), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [["--moe", "seq", "--token-cluster", "--layers", "4"], ["--moe", "node-limited"]])
def test_threads_train_the_model_that_4_processes_train(tmp_path, variant):
    """--threads runs the 4 ranks (2 nodes x 2) as threads of one process: Seq with token clustering (capacity
    binding, the aux loss on) and node-limited routing give the losses, the aux losses, the bytes every rank sends
    to every rank, and the validation scores of 4 processes (dropout 0, float tolerance)."""
    flags = [*variant, "--steps", "6", "--dropout", "0", "--eval-sentences", "16", "--eval-every", "3"]
    [threads], _ = run_trainer(tmp_path / "threads", "train", *flags, "--threads")
    [procs], _ = run_trainer(tmp_path / "procs", "train", *flags)
    assert threads["threads"] and not procs["threads"] and threads["world_size"] == procs["world_size"] == 4
    for key in ("losses", "aux_losses"):
        torch.testing.assert_close(torch.tensor(threads[key]), torch.tensor(procs[key]), rtol=1e-4, atol=1e-5)
    assert threads["byte_matrix"] == procs["byte_matrix"] and threads["bytes_per_step"] == procs["bytes_per_step"]
    for a, b in zip(threads["evals"], procs["evals"]):
        assert a["bleu"] == pytest.approx(b["bleu"], abs=1e-6) and a["valid_loss"] == pytest.approx(b["valid_loss"])
    assert procs["preferred_expert"] is not None
    assert threads["preferred_expert"] == pytest.approx(procs["preferred_expert"])


def test_threads_with_dropout_repeat_and_resume_bit_for_bit(tmp_path):
    """The threads of --threads take turns in a fixed order, so their dropout draws come in one order: two runs of
    Seq with clustering and dropout give the same losses bit for bit, and so does a run resumed from step 3."""
    flags = ["--moe", "seq", "--token-cluster", "--layers", "4", "--eval-sentences", "8", "--threads"]
    [first], _ = run_trainer(tmp_path / "a", "train", *flags, "--steps", "6")
    [again], _ = run_trainer(tmp_path / "b", "train", *flags, "--steps", "6")
    run_trainer(tmp_path / "c", "train", *flags, "--steps", "3", "--ckpt-every", "3")
    [resumed], _ = run_trainer(tmp_path / "c", "train", *flags, "--steps", "6", "--resume")
    assert first["losses"] == again["losses"] == resumed["losses"] and len(first["losses"]) == 6


def test_gap_table_compares_seed_means_with_twice_the_pooled_seed_sd():
    """The verdict's arithmetic: a difference to GShard beyond 2 pooled seed sds is marked, and clustering's
    share of Seq's gap at the same point is (Seq's gap - its own) / Seq's gap, only for a gap beyond 2 sd."""
    def row(variant, bleu, bleu_sd, loss, loss_sd):
        return {"variant": variant, "family": toy.family({"variant": variant}), "seeds": [0, 1, 2], "bleu": bleu,
                "bleu_sd": bleu_sd, "loss": loss, "loss_sd": loss_sd}
    rows = [row("gshard", 90.0, 0.3, 0.20, 0.004), row("seq@0.5,0.375", 88.0, 0.4, 0.26, 0.003),
            row("seq+cluster@0.5,0.375", 89.5, 0.5, 0.23, 0.005), row("feat@0.5,0.375", 89.8, 0.4, 0.201, 0.01)]
    lines = toy.gap_table(rows)
    seq, cluster, feat = (next(l for l in lines if l.startswith(f"| {v}@")) for v in ("seq", "seq+cluster", "feat"))
    two_sd = 2 * math.sqrt((0.4 ** 2 + 0.3 ** 2) / 2)
    assert f"| -2.0 * | {two_sd:.1f} | +0.060 * |" in seq
    assert cluster.endswith("| 75%, 50% |")  # BLEU gap 2.0 -> 0.5, loss gap 0.06 -> 0.03
    assert "| -0.2 | " in feat and "| +0.001 | " in feat and feat.endswith("|  |")
    rows[1] = row("seq@0.5,0.375", 89.8, 0.4, 0.201, 0.003)  # Seq within noise: nothing to close
    assert toy.gap_table(rows)[3].endswith("| Seq within 2 sd, Seq within 2 sd |")
    rows[1] = row("seq@0.5,0.375", 92.0, 0.4, 0.15, 0.003)  # Seq better than GShard beyond 2 sd
    assert toy.gap_table(rows)[3].endswith("| Seq ahead, Seq ahead |")
    assert toy.gap_table(rows[1:]) == ["(no gaps to GShard: they need GShard with at least 2 seeds)"]
    rows.append({**row("node-limited", 89.0, 0.0, 0.2, 0.0), "seeds": [0]})
    assert toy.gap_table(rows)[-1] == "(one seed, not compared: node-limited)"


@pytest.mark.parametrize("kind", ["gshard", "seq", "feat", "node-limited"])
def test_preferred_experts_are_counted_by_the_rank_and_node_of_the_top1_expert(kind):
    """counting_preferred_experts counts, for each real token an MoE layer routes, whether the router's top-1 expert
    is on the token's rank and whether it is in the token's node; padding is not counted, nor anything once closed."""
    moe_cfg = sc.MoEConfig(d_model=24, d_ffn=4, num_experts=24, ratio1=0.25, ratio2=0.25, feat_multiple=1)
    topo = sc.emulated_topology(8, 2, rank=5)  # n = 3 experts a rank, 4 nodes of 2: local rank 1, node 2
    layer = toy.MoEFFN(toy.ModelConfig(vocab=8, d_model=24, moe=kind, moe_cfg=moe_cfg), topo)
    with torch.no_grad():
        layer.moe.router.weight.copy_(torch.eye(24))  # logits = LN(x): a one-hot token prefers its hot expert
    top1 = torch.tensor([15, 17, 12, 14, 3, 23, 16])  # rank 5 holds experts 15-17; node 2 (ranks 4, 5) 12-17
    x, pad = torch.eye(24)[top1], torch.tensor([False] * 6 + [True])  # (7, 24)
    with toy.counting_preferred_experts(layer, [0, 0, 0]) as counts:
        layer(x, pad)
    assert counts == [2, 4, 6]  # on the rank: 15, 17; in the node: 15, 17, 12, 14; the padded token not counted
    layer(x, pad)
    assert counts == [2, 4, 6]


def test_sweep_runs_every_point_and_resumes(tmp_path):
    """A tiny sweep trains each (variant, point, seed) once, writes one file per run, the table and the
    per-point means; run again, it skips every finished run and trains only what was added."""
    flags = ["--steps", "2", "--eval-every", "1", "--eval-sentences", "4", "--seeds", "0",
             "--variants", "gshard,seq,feat", "--points", "0.25:0.5,0.5:0.25"]
    run = lambda *a: subprocess.run([sys.executable, "train_toy.py", "sweep", *TINY, *flags, *a,  # noqa: E731
                                     "--out", str(tmp_path)], cwd=HERE, capture_output=True, text=True, timeout=600)
    first = run()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["feat@0.25,0.5_seed0.json", "feat@0.5,0.25_seed0.json", "gshard_seed0.json",
                     "seq@0.25,0.5_seed0.json", "seq@0.5,0.25_seed0.json"]
    table = (tmp_path / "table.md").read_text()
    assert "| seq@0.25,0.5 | 0 |" in table and "1: " in table and "2: " in table
    assert "no gaps to GShard" in table  # one seed: no spread to compare with
    assert re.search(r"\| seq@0\.25,0\.5 \| 0 \|[^\n]* \| \d+% / \d+% \| 1: ", table)  # where tokens would go
    again = run("--variants", "gshard,dense")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("parameters,") == 1  # only dense was trained
    assert len(list((tmp_path / "runs").iterdir())) == 6
    assert re.search(r"\| dense \| 0 \|[^\n]* \|  \| 1: ", (tmp_path / "table.md").read_text())  # no experts
    older = json.loads((tmp_path / "runs" / "gshard_seed0.json").read_text())  # a run of a version without the count
    (tmp_path / "runs" / "gshard_seed1.json").write_text(json.dumps({**older, "seed": 1, "preferred_expert": None}))
    assert run("--report-only").returncode == 0
    assert re.search(r"\| gshard \| 0,1 \|[^\n]* \| \d+% / \d+% \(seed 0\) \| 1: ", (tmp_path / "table.md").read_text())


def _timeout_worker(rank: int, port: int, report, release, out: str) -> None:
    args = toy.parse_args(["--nproc", "2", "--timeout", "3", "--out", out])
    topo, _ = toy.init_distributed(args, rank, 2, port)
    if rank == 0:
        start = time.perf_counter()
        try:
            sc.all_to_all(torch.zeros(2, 3), topo.world)
            report.put(("completed", time.perf_counter() - start))
        except Exception as e:  # noqa: BLE001 - the point is that something is raised
            report.put((f"{type(e).__name__}: {e}", time.perf_counter() - start))
    else:
        release.wait(60)  # never joins the collective


def test_a_collective_that_cannot_complete_fails_after_the_timeout(tmp_path):
    """With --timeout 3, an all-to-all that a rank never joins raises an error on the other rank after
    about the timeout, instead of hanging."""
    ctx = mp.get_context("spawn")
    report, release = ctx.Queue(), ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_timeout_worker, args=(r, port, report, release, str(tmp_path)),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    outcome, elapsed = report.get(timeout=90)
    release.set()
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert outcome != "completed" and 2.5 < elapsed < 30, (outcome, elapsed)


# ----------------------------------------------------------------------------
# CUDA (skipped on machines without a GPU; CI has none)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("kind", ["gshard", "seq", "feat", "node-limited"])
def test_layers_on_cuda_equal_cpu(kind):
    """On a GPU, each layer (world of one, float64) gives the CPU's outputs and gradients."""
    cfg = sc.MoEConfig(d_model=8, d_ffn=12, num_experts=4, ratio1=0.25, ratio2=0.5, capacity_factor=1.0,
                      feat_multiple=1)
    topo = sc.build_topology()
    case = make_case(30, [40], cfg, widths_of(kind, cfg, 1))
    results = []
    for device in ("cpu", "cuda"):
        layer = build(kind, cfg, topo, case).to(device)
        x = case.xs[0].detach().clone().to(device).requires_grad_()
        out = layer(x, case.pads[0].to(device))
        ((out.y * case.cots[0].to(device)).sum() + out.aux_loss).backward()
        results.append([t.cpu() for t in (out.y, x.grad, layer.router.weight.grad)])
    for a, b in zip(*results):
        assert_close(b, a)


@cuda
@pytest.mark.parametrize("kind", ["gshard", "seq", "feat", "node-limited"])
def test_layers_never_wait_on_the_gpu_in_a_world_of_one(kind):
    """Without a padding mask, a layer's forward and backward in a world of one make no device-to-host sync
    (torch's sync debug mode raises at the first): the host can queue the whole step ahead of the GPU."""
    cfg = sc.MoEConfig(d_model=64, d_ffn=64, num_experts=8, ratio1=0.2, ratio2=0.5, feat_multiple=1)
    layer = sc.make_moe_layer(kind, cfg, sc.build_topology()).cuda()
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    layer(x).y.square().mean().backward()  # warm-up: first calls may initialise libraries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.y.square().mean() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_balanced_assignment_on_cuda_equals_cpu():
    """The auction gives the same assignment on the GPU as on the CPU (float64 inside, stable sorts)."""
    g = torch.Generator().manual_seed(5)
    for T, C in [(256, 8), (4096, 8), (1000, 10)]:
        scores = torch.randn(T, C, generator=g)
        assert torch.equal(sc.balanced_assignment(scores.cuda()).cpu(), sc.balanced_assignment(scores))


@cuda
@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_clustering_on_cuda(gate):
    """On a GPU, clustering then un-clustering on one rank restores the tokens, and the sort's
    gradient equals the CPU's."""
    topo = sc.build_topology()
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        layer = sc.TokenClustering(6, 8, topo, gate=gate).double().to(device)
        x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
        x.requires_grad_()
        y, plan = layer(x)
        out = sc.uncluster(y, plan)
        out.square().sum().backward()
        results.append((out.detach().cpu(), x.grad.cpu(), layer.router.weight.grad.cpu()))
    for a, b in zip(*results):
        assert_close(b, a)


@cuda
def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path):
    """A checkpoint written by a GPU run (the ranks as threads, its CUDA random state saved) resumes on a machine
    without a GPU (here: none visible) and trains on to the end; the result names both stretches' devices."""
    flags = ["--moe", "seq", "--threads", "--ckpt-every", "2"]
    run_trainer(tmp_path, "train", *flags, "--steps", "4", "--device", "cuda")
    [result], stdout = run_trainer(tmp_path, "train", *flags, "--steps", "6", "--device", "cpu", "--resume",
                                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert "resumed from step 4" in stdout and result["steps"] == 6
    assert result["devices"] == [[0, "cuda"], [4, "cpu"]]  # where each stretch of the run trained
