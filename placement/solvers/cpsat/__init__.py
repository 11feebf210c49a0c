"""``cpsat``: expert placement with OR-Tools CP-SAT (the product solver).

Notation: L layers, E experts, G GPUs, S slots per GPU, P = G * S slots, K load samples.

The model, per MoE layer (layers are coupled only by the traffic term, see below):

Variables
    ``y[e, r]`` (bool): expert ``e`` gets ``r`` copies, for ``r`` in a candidate set ``R_e``:
    every count ``1 .. min(G, 1 + redundant)`` where ``E * G * min(G, 1 + redundant)`` is at
    most 3000 (then the model is the placement problem itself), else at most 3 values
    (the warm start's count and the floor/ceiling of the proportional rule
    ``r*_e = P * w_e / sum(w)``, clipped to 1..G; the warm start's alone above E * G =
    20000). Exactly one ``y[e, r]`` per expert.
    ``c[e, g, r]`` (bool): ``e`` has ``r`` copies and one of them is on GPU ``g``.
    ``x[e, g] = sum_r c[e, g, r]`` is the copy indicator of the task statement.

Constraints
    ``sum_r y[e, r] == 1`` (every expert has >= 1 copy since every candidate r >= 1);
    ``sum_g c[e, g, r] == r * y[e, r]`` (the copies exist);
    ``sum_r c[e, g, r] <= 1`` (at most one copy of an expert per GPU);
    ``sum_{e, r} c[e, g, r] == S`` (exact slot count per GPU).

GPU load (even-split dispatch, what vLLM and SGLang do)
    ``load[k, g] = sum_{e, r} c[e, g, r] * w[k, e] / r``. The non-linear ``w / r_e`` is
    linearised by the (e, r) booleans: each ``c[e, g, r]`` carries the constant per-copy load
    ``w[k, e] / r``, integer-scaled.

GPU time
    Speed factors: ``time[k, g] = load[k, g] / speed_g`` (linear, coefficients
    ``round(scale * w[k, e] / (r * speed_g))``).
    Latency curves: exact piecewise-linear, one boolean per curve segment (the segment
    ``[t_s, t_{s+1}]`` that contains the load, the first one from 0 and the last one extended
    past the last sample, and one for an idle GPU) with ``time >= curve_s(load)`` enforced
    only for the chosen segment (``OnlyEnforceIf``). Exact for non-convex, non-monotone
    curves; no convex hull. Loads are integers in fractions of a token (a GPU's load up to
    about 10^7 units), each copy's share rounded.

Objective (integer; one unit = ``1 / scale`` of the problem's time unit, i.e. of a token-time
with speed factors or of a µs with curves; ``scale`` is chosen so that the fluid bound of a
layer is about 10^5 units)
    ``sum_layers hedge_k(max_g time[k, g])``: per-sample maximum variables ``T[k] >= time[k, g]``,
    hedged over the K samples (``problem.samples``; the mean ``problem.load`` when none):
    ``hedge="expected"`` minimises the mean of the per-sample maxima, ``"robust"`` the
    maximum over samples (``T >= T[k]``);
    ``+ weights.migration * #(copies (e, g) not in problem.current)``;
    ``+ weights.traffic * tokens that change GPU between consecutive layers`` (MoETuner):
    with even split a token with expert i in layer l and j in l+1 stays on its GPU with
    probability ``sum_g x_l[i, g] x_{l+1}[j, g] / (r_i r_j)``. Only the heaviest transition
    pairs get co-location booleans ``z[i, j, g] <= x_l[i, g], z <= x_{l+1}[j, g]``; in this
    coupled mode the replica counts are fixed to the warm start's, so ``1 / (r_i r_j)`` is a
    constant.

Solving, per layer (without traffic coupling: ``weights.traffic == 0`` or no transitions)
    1. Warm start :func:`placement.solvers.greedy.greedy_table` (its own swap refinement is
       skipped on large latency-curve problems, where it costs seconds).
    2. Local search on the exact float objective (40% of the layer's budget): best-improvement
       swaps of two copies touching a bottleneck GPU, then relocations of a redundant copy to
       another expert (changes replica counts); plateaus are crossed by a sum-of-squares
       tie-break.
    3. CP-SAT on the model above, hinted (``add_hint``) with the polished row, for the rest
       of the budget; stops at a relative gap of 1e-5. Skipped when the polished row already
       meets the lower bound, or when building the model would not fit in the budget.
    The layer keeps the best of greedy's, the polished and CP-SAT's row under the exact (float)
    objective, so ``cpsat`` is never worse than its greedy warm start.
    Layers run in a thread pool, ``threads // 2`` at a time with two CP-SAT workers each
    (``threads`` = ``options.threads``, 0 = all cores; one worker for ``threads == 1``); each
    layer gets an even share of the time still left, so layers that finish early leave time
    to the rest. ``progress`` is called after each layer.
    Reported bound: per layer the largest of CP-SAT's bound less the most the integer model
    can overstate a time by rounding (only where every replica count was open to it: a
    restricted model's bound says nothing about placements with other counts), the fluid
    bound and the copy bound (the heaviest expert has at most ``min(G, 1 + redundant)``
    copies; without redundancy its GPU also holds the S - 1 lightest experts), summed over
    layers; traffic and migration terms count 0 in it. A layer is OPTIMAL when its exact
    objective is within a relative 1e-4 of that bound (never on CP-SAT's word alone: its
    model is rounded). With traffic coupling, one model holds all layers (replica counts
    fixed to greedy's, no local search) and gets the whole budget.

Speed-aware mode (``SolveOptions(dispatch="speed-aware")``; the default is ``"even"``)
    For a speed-aware dispatcher that splits each batch's tokens optimally over an expert's
    copies, the layer time of a sample is ``max_H W(H) / speed(H)`` over GPU sets H, where
    ``W(H)`` is the work of the experts whose copies all lie in H (max-flow min-cut). After
    the even-split pipeline (75% of the budget), a swap local search minimises the hedged
    maximum of that expression over single GPUs and pairs of GPUs (speed factors only), and
    the layer keeps whichever of greedy's, the even-split and this row has the least exact
    best-split time (:func:`placement.dispatch.best_split`) over the samples. Reported bound:
    the fluid/copy bound (valid for any dispatch).

Determinism
    ``threads == 1``: deterministic for a seed and time limit. Every layer gets the fixed
    share ``time_limit_s / L``; the local search is bounded by a cost model of its moves, and
    CP-SAT is built only when a cost model of the build fits the share, then runs one worker
    with ``random_seed = options.seed``, stopped by its deterministic time limit (half a unit
    per second of share; the wall-clock cap, 10x + 1 s, is a safety net). Nothing reads the
    clock, so the answer is reproducible; the price is that the wall time can overrun the
    limit by the warm start's time and the cost models' errors (measured: DeepSeek-V2-Lite on
    32 GPUs, 1 s limit: 0.4 s with speed factors, 2.2 s with latency curves).
    ``threads > 1``: CP-SAT's parallel portfolio (with large-neighbourhood search, which is
    what finds improvements in short budgets; ``interleave_search`` was tried and is much
    weaker) and the local search are stopped by the wall clock: results can differ from run
    to run, never to worse than the greedy start.

Modules: :mod:`.objective` (the exact float objective, from :mod:`placement.evaluate`, and
the bounds), :mod:`.model` (the CP-SAT model and running it), :mod:`.local_search` (the
even-split polish), :mod:`.dispatch_polish` (the speed-aware polish), :mod:`.solve` (budget,
layers, choice; registers the ``cpsat`` strategy).

Stopping
    ``SolveOptions(stop=...)`` (a ``threading.Event`` or a ``Callable[[], bool]``) cancels a
    solve: the local searches check it before every move, a running CP-SAT search is ended by
    ``stop_search()`` from a watcher thread (polling every 20 ms), and layers not started yet
    keep their greedy rows. The result is the best placement found so far, never worse than
    the warm start, with ``details["stopped"] == 1``. The greedy warm start itself is not
    interruptible.
"""

from placement.solvers.cpsat.objective import (
    layer_objective,
    moved_copies,
    objective,
    scenarios,
    traffic_tokens,
)
from placement.solvers.cpsat.solve import solve_cpsat

__all__ = [
    "layer_objective",
    "moved_copies",
    "objective",
    "scenarios",
    "solve_cpsat",
    "traffic_tokens",
]
