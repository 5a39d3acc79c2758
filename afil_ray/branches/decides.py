"""Does the next chunk decide the outcome? K chunks x M continuations from restored open states.

The critic's within-state AUROC asks whether Q ranks the chunks of one state by the outcome their branch reached.
Near 0.5 it has two readings: the critic cannot see what a chunk does, or the chunk does not decide the outcome
(the noise of later chunks does). This design tells them apart. From each open state, K first chunks (each from its
own noise) and every chunk continued M times with fresh noise for all later chunks:

- **chunk share**: the part of a state's outcome variance that its first chunk explains, the intraclass
  correlation of a one-way ANOVA within states, Var_c(p_c) / (Var_c(p_c) + E_c[p_c (1 - p_c)]) pooled over states
  (p_c: chunk c's success probability), with a permutation p (outcomes shuffled within each state);
- **oracle gain**: what picking one of the K chunks by its own continuations gains over the average chunk,
  cross-fitted (picked on half the continuations, scored on the other half): the most any sampler that reads
  Q(s, chunk) could gain at these states with that much evidence per chunk;
- **critic gain**: the chunk with the highest Q, scored on all its continuations, against the average chunk: what
  ``rank k=K`` gains there; with the critic's pairwise concordance with the chunks' measured rates.

One record per state, appended to a JSON-lines file as its K x M branches finish, so a stopped run goes on where
it stopped; a truncated last line (a kill mid-write) is dropped and its state run again.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from afil_ray.branches.rollout import BranchJob, BranchRunner
from afil_ray.branches.states import BranchPoint, id_entropy
from afil_ray.config import SamplerConfig
from afil_ray.replay.episode import Episode, branch_group
from afil_ray.rollout import draw_noise

if TYPE_CHECKING:
    from afil_ray.policy.model import DAGPolicy

CHUNK_STREAM = 0xC4C  # tags the first-chunk noise stream apart from branch_noise_seed's


def chunk_noise_seed(parent_id: str, step: int, chunk: int, seed: int = 0) -> int:
    """The noise seed of first chunk ``chunk`` at (``parent_id``, ``step``) (63 bits)."""
    entropy = [int(seed) % 2**64, id_entropy(parent_id), int(step) % 2**64, int(chunk) % 2**64, CHUNK_STREAM]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def decides_jobs(points: Iterable[BranchPoint], chunks: int, continuations: int, seed: int = 0) -> Iterator[BranchJob]:
    """Every state's K x M branches: branch ``c * M + m`` runs chunk c's first chunk, then its own noise."""
    for point in points:
        for c in range(chunks):
            first = chunk_noise_seed(point.parent.episode_id, point.step, c, seed)
            for m in range(continuations):
                yield BranchJob(point, c * continuations + m, first_noise_seed=first)


@dataclass
class StateRecord:
    """One state's K x M outcomes, with the critic's Q of each chunk and V of the state (when scored)."""

    group: str
    task: str
    parent_outcome: str
    step: int
    outcomes: list[list[bool]]  # [K][M]
    q: list[float] | None = None  # [K]
    v: float | None = None


# (state's observation, instruction, first chunks [K, H, A]) -> (Q [K], V)
ChunkScorer = Callable[[BranchPoint, np.ndarray], tuple[Sequence[float], float]]


def read_records(path: Path) -> list[StateRecord]:
    """The records in ``path`` (none when it does not exist); a line that does not parse is dropped (its state is
    run again), any other damage is a one-line error naming the file and line."""
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(StateRecord(**json.loads(line)))
        except json.JSONDecodeError:
            print(f"{path}:{n}: an unfinished record (a stopped run); its state is run again")
        except TypeError as error:
            raise ValueError(f"{path}:{n}: not a chunk-decides record ({error})") from None
    return records


def run_decides(runner: BranchRunner, points: Sequence[BranchPoint], chunks: int, continuations: int, out: Path,
                scorer: ChunkScorer | None = None, seed: int = 0,
                on_branch: Callable[[Episode], None] | None = None) -> list[StateRecord]:
    """Run the K x M branches of every state in ``points`` not yet in ``out`` and append each state's record as
    it completes; returns every record in ``out`` (earlier ones included), in the order of ``points``."""
    done = {r.group: r for r in read_records(out)}
    if out.is_file():  # drop a truncated tail before appending
        out.write_text("".join(json.dumps(asdict(r)) + "\n" for r in done.values()))
    todo = [p for p in points if p.group not in done]
    by_group = {p.group: p for p in todo}
    pending: dict[str, dict[int, Episode]] = defaultdict(dict)
    size = chunks * continuations
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for episode in runner.run(decides_jobs(todo, chunks, continuations, seed)):
            if on_branch is not None:
                on_branch(episode)
            group = branch_group(str(episode.parent_episode_id), int(episode.branch_step))
            pending[group][int(episode.branch_index)] = episode
            if len(pending[group]) < size:
                continue
            record = _record(by_group[group], pending.pop(group), chunks, continuations, scorer)
            f.write(json.dumps(asdict(record)) + "\n")
            f.flush()
            done[group] = record
    return [done[p.group] for p in points if p.group in done]


def _record(point: BranchPoint, branches: dict[int, Episode], chunks: int, continuations: int,
            scorer: ChunkScorer | None) -> StateRecord:
    outcomes = [[bool(branches[c * continuations + m].success) for m in range(continuations)] for c in range(chunks)]
    q = v = None
    if scorer is not None:
        first = np.stack([np.asarray(branches[c * continuations].chunks[0]) for c in range(chunks)])
        q_values, v = scorer(point, first)
        q = [float(x) for x in q_values]
        v = float(v)
    return StateRecord(point.group, point.parent.task, point.parent.outcome, point.step, outcomes, q, v)


def critic_chunk_scorer(policy: DAGPolicy) -> ChunkScorer:
    """Q of each first chunk and V of the state, from ``policy``'s success critic, on what the parent saw there."""
    def score(point: BranchPoint, first: np.ndarray) -> tuple[Sequence[float], float]:
        obs = {k: np.asarray(x)[None] for k, x in point.observation().items()}
        instruction = [point.parent.instruction or ""]
        return policy.q(obs, instruction, first[None])[0], float(policy.v(obs, instruction)[0])
    return score


def first_chunks(policy: DAGPolicy, point: BranchPoint, chunks: int, sampler: SamplerConfig,
                 seed: int = 0) -> np.ndarray:
    """The K first chunks a run sampled at ``point`` [K, H, A], drawn again from their noise seeds (equal to the
    run's up to float rounding of the batch), so a record can be scored by a critic trained after the run."""
    noise = torch.stack([draw_noise(tuple(policy.noise_shape), sampler, torch.Generator().manual_seed(
        chunk_noise_seed(point.parent.episode_id, point.step, c, seed))) for c in range(chunks)])
    obs = {k: np.repeat(np.asarray(x)[None], chunks, axis=0) for k, x in point.observation().items()}
    actions, _ = policy.sample(obs, [point.parent.instruction or ""] * chunks, sampler, noise=noise)
    return np.asarray(actions)


def rescore(records: Sequence[StateRecord], points: Sequence[BranchPoint], sampled_by: DAGPolicy,
            scorer: ChunkScorer, sampler: SamplerConfig, seed: int = 0) -> list[StateRecord]:
    """``records`` with Q and V from ``scorer``, on the first chunks ``sampled_by`` drew at each record's point."""
    by_group = {p.group: p for p in points}
    out = []
    for r in records:
        if r.group not in by_group:
            raise ValueError(f"chunk-decides record {r.group}: its state is not among the points given")
        point = by_group[r.group]
        q, v = scorer(point, first_chunks(sampled_by, point, len(r.outcomes), sampler, seed))
        out.append(dataclasses.replace(r, q=[float(x) for x in q], v=float(v)))
    return out


# ---------------------------------------------------------------------------------------------------- analysis


@dataclass
class Decides:
    """What the records say; gains are in success-rate points per state, [95% bootstrap over states]."""

    states: int
    chunks: int
    continuations: int
    success_rate: float
    chunk_share: float
    chunk_share_ci: tuple[float, float]
    chunk_share_p: float
    chunk_sd: float  # the spread of a chunk's success probability within a state, sqrt of its variance component
    oracle_gain: float
    oracle_ci: tuple[float, float]
    critic_gain: float | None
    critic_ci: tuple[float, float] | None
    critic_concordance: float | None  # P(Q orders two chunks of a state as their measured rates do), ties excluded
    critic_concordance_ci: tuple[float, float] | None = None

    def lines(self) -> list[str]:
        def ci(x: tuple[float, float]) -> str:
            return f"[{x[0]:+.3f}, {x[1]:+.3f}]"
        out = [f"{self.states} states x {self.chunks} chunks x {self.continuations} continuations: success "
               f"{self.success_rate:.3f}",
               f"chunk share of the within-state outcome variance {self.chunk_share:.3f} "
               f"[{self.chunk_share_ci[0]:.3f}, {self.chunk_share_ci[1]:.3f}] (permutation p "
               f"{self.chunk_share_p:.3g}); a chunk's success probability varies by sd {self.chunk_sd:.3f} within a "
               f"state",
               f"oracle pick (cross-fitted) {self.oracle_gain:+.3f} {ci(self.oracle_ci)}"]
        if self.critic_gain is not None and self.critic_ci is not None:
            conc = "-" if self.critic_concordance is None else f"{self.critic_concordance:.3f}"
            if self.critic_concordance_ci is not None:
                conc += f" [{self.critic_concordance_ci[0]:.3f}, {self.critic_concordance_ci[1]:.3f}]"
            out.append(f"critic's pick (rank k={self.chunks}) {self.critic_gain:+.3f} {ci(self.critic_ci)}, "
                       f"concordance with the chunks' rates {conc}")
        return out


def _outcome_array(records: Sequence[StateRecord]) -> np.ndarray:
    shapes = {np.shape(r.outcomes) for r in records}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"chunk-decides records of different K x M shapes: {sorted(shapes)}")
    return np.asarray([r.outcomes for r in records], np.float64)  # [S, K, M]


def _sums_of_squares(y: np.ndarray) -> tuple[float, float]:
    """(between-chunk, within-chunk) sums of squares of outcomes ``y`` [S, K, M], chunks nested in states."""
    chunk_means = y.mean(axis=2)
    ssb = y.shape[2] * ((chunk_means - chunk_means.mean(axis=1, keepdims=True)) ** 2).sum()
    return float(ssb), float(((y - chunk_means[..., None]) ** 2).sum())


def variance_components(y: np.ndarray) -> tuple[float, float]:
    """(between-chunk, within-chunk) variance components of outcomes ``y`` [S, K, M], chunks nested in states,
    pooled over states (one-way ANOVA; the between part is floored at 0)."""
    s, k, m = y.shape
    ssb, ssw = _sums_of_squares(y)
    msb, msw = ssb / (s * (k - 1)), ssw / (s * k * (m - 1))
    return max((msb - msw) / m, 0.0), float(msw)


def chunk_share(y: np.ndarray) -> float:
    """ICC(1): the between-chunk variance component over both (0 when the chunks explain nothing)."""
    between, within = variance_components(y)
    return float(between / (between + within)) if between + within > 0 else 0.0


def permutation_p(y: np.ndarray, rng: np.random.Generator, draws: int = 2000) -> float:
    """P(between-chunk spread as large as observed | outcomes exchangeable within each state)."""
    s, k, m = y.shape
    observed = _sums_of_squares(y)[0]
    flat = y.reshape(s, k * m)
    hits = 0
    for _ in range(draws):
        shuffled = rng.permuted(flat, axis=1).reshape(s, k, m)
        hits += _sums_of_squares(shuffled)[0] >= observed - 1e-12
    return (hits + 1) / (draws + 1)


def _pick_gain(pick_on: np.ndarray, score_on: np.ndarray) -> np.ndarray:
    """Per state: the mean ``score_on`` rate of the chunks with the highest ``pick_on`` (ties averaged) minus the
    mean over all chunks. ``pick_on`` [S, K], ``score_on`` [S, K]."""
    best = pick_on == pick_on.max(axis=1, keepdims=True)
    picked = (score_on * best).sum(axis=1) / best.sum(axis=1)
    return picked - score_on.mean(axis=1)


def oracle_gains(y: np.ndarray) -> np.ndarray:
    """Per state, the cross-fitted oracle's gain: pick on even continuations, score on odd, and the other way."""
    a, b = y[..., 0::2].mean(axis=2), y[..., 1::2].mean(axis=2)
    return (_pick_gain(a, b) + _pick_gain(b, a)) / 2


def concordance(q: np.ndarray, rates: np.ndarray) -> float | None:
    """Of the chunk pairs of one state whose measured rates differ, the share Q orders the same way (Q ties: 1/2)."""
    agree = pairs = 0.0
    for qs, rs in zip(q, rates, strict=True):
        for i in range(len(qs)):
            for j in range(i + 1, len(qs)):
                if rs[i] == rs[j]:
                    continue
                pairs += 1
                dq, dr = qs[i] - qs[j], rs[i] - rs[j]
                agree += 0.5 if dq == 0 else float(dq * dr > 0)
    return agree / pairs if pairs else None


def _bootstrap(per_state: np.ndarray, rng: np.random.Generator, draws: int = 4000) -> tuple[float, float]:
    idx = rng.integers(0, len(per_state), (draws, len(per_state)))
    means = per_state[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _bootstrap_of(statistic: Callable[[np.ndarray], float | None], states: int, rng: np.random.Generator,
                  draws: int = 1000) -> tuple[float, float]:
    """95% interval of ``statistic(state indices)`` over states resampled with replacement."""
    values = [statistic(rng.integers(0, states, states)) for _ in range(draws)]
    kept = np.asarray([v for v in values if v is not None], np.float64)
    return float(np.quantile(kept, 0.025)), float(np.quantile(kept, 0.975))


def analyse(records: Sequence[StateRecord], seed: int = 0) -> Decides:
    """The chunk share, the oracle's and the critic's gains over ``records`` (one K x M shape, M >= 2)."""
    if not records:
        raise ValueError("no chunk-decides records to analyse")
    y = _outcome_array(records)
    s, k, m = y.shape
    if k < 2 or m < 2:
        raise ValueError(f"chunk-decides needs at least 2 chunks and 2 continuations per state, got {k} x {m}")
    rng = np.random.default_rng(seed)
    oracle = oracle_gains(y)
    critic_gain = critic_ci = conc = conc_ci = None
    if all(r.q is not None for r in records):
        q = np.asarray([r.q for r in records], np.float64)
        rates = y.mean(axis=2)
        per_state = _pick_gain(q, rates)
        critic_gain, critic_ci, conc = float(per_state.mean()), _bootstrap(per_state, rng), concordance(q, rates)
        conc_ci = None if conc is None else _bootstrap_of(lambda i: concordance(q[i], rates[i]), s, rng)
    between, _ = variance_components(y)
    return Decides(states=s, chunks=k, continuations=m, success_rate=float(y.mean()), chunk_share=chunk_share(y),
                   chunk_share_ci=_bootstrap_of(lambda i: chunk_share(y[i]), s, rng),
                   chunk_share_p=permutation_p(y, rng), chunk_sd=float(np.sqrt(between)),
                   oracle_gain=float(oracle.mean()), oracle_ci=_bootstrap(oracle, rng), critic_gain=critic_gain,
                   critic_ci=critic_ci, critic_concordance=conc, critic_concordance_ci=conc_ci)
