"""SpecController: which requests speculate, how many tokens each drafts, and the statistics.

Adaptive k: each request keeps a running estimate a of the chance that a draft token is
accepted, starting from the engine's recent acceptance over all requests (PRIOR_ACCEPTANCE for
the first ones): a code request after code requests starts at a large k instead of ramping up.
With k drafts a verification step yields 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) tokens on
average and costs about 1 + k * (draft_cost + verify_cost) decode steps; k is the best ratio,
and 0 (off, re-tried after PROBE_INTERVAL steps, then twice as long after each probe that fails,
up to MAX_PROBE_INTERVAL) when no k beats plain decoding. The engine times the draft and
verification costs at start (spec.timing).

The model leaves out what a round costs besides the two forward passes (the draft's catch-up
rows, sampling, the engine's Python), so the engine also reports each step's wall time: a
request's first PLAIN_STEPS decode steps run plain to time them, and once it has drafted for
MIN_TIMED_ROUNDS rounds, drafting whose measured seconds per token exceed plain decoding's is
switched off like a low acceptance, whatever the model says; each probe's round joins the drafting
estimate (one round, not MIN_TIMED_ROUNDS more: exploring costs a round per probe), or replaces it when
the probe beat plain decoding (the text changed; merged, a probe could not outweigh the stale rounds:
a from-scratch code prompt, its first drafts rejected, then drafted 21 of 128 tokens). A round that
starts with the draft catching up on more than a round's tokens (what was decoded while drafting
was off, or during the plain steps; the prompt itself at its prefill step, Proposer.prepare:
Proposal.num_extra_tokens) is not timed, the round after it is (a probe
that restarts the draft lasts two rounds): that cost is paid once per (re)start, and timing it as a
round's switched a draft accepted 99% of the time off on its first rounds (Qwen2.5-Coder pair on
the CPU, code prompts: 1.08x before, 1.43x after, 1.59x with drafting forced on).
Above `max_num_seqs` running requests a step is compute-bound and speculation is off for all.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenforge.config import SpeculativeConfig
from tokenforge.spec.proposer import Proposer

if TYPE_CHECKING:
    from tokenforge.engine.request import Request
    from tokenforge.engine.scheduler import SampledToken, SchedulerOutput

# Extra cost of verifying one more token in a step, in decode steps, until the engine measures it
# (spec.timing.measure_verify_cost): small where a step is bound by reading the weights, large where
# one row runs a faster kernel than several.
VERIFY_COST = 0.1
PRIOR_ACCEPTANCE = 0.7  # the first requests' estimate before their first verification
# A new request starts from the acceptance of this engine's recent drafts (requests to one deployment
# resemble each other: code after code), a running estimate over all requests' outcomes with this weight.
PRIOR_EMA_WEIGHT = 0.02
EMA_WEIGHT = 0.2  # weight of each new accept/reject outcome in the estimate
PROBE_INTERVAL = 16  # steps a switched-off request waits before drafting again (first time)
MAX_PROBE_INTERVAL = 256  # each probe that does not turn drafting back on doubles the wait, up to this
PLAIN_STEPS = 3  # decode steps a request runs plain first, timing them (when the engine reports times)
MIN_TIMED_ROUNDS = 4  # drafting rounds timed before measured seconds per token can switch drafting off
TIME_EMA_WEIGHT = 0.3  # weight of each new step in the running seconds and tokens of Rate


@dataclass
class Rate:
    """Seconds per token over recent steps: running averages of a step's seconds and of its tokens,
    divided (not an average of per-step ratios, which one rejected round, one token for a whole
    round's time, would swing past plain decoding)."""
    seconds: float | None = None
    tokens: float | None = None
    count: int = 0

    def add(self, seconds: float, num_tokens: int) -> None:
        self.seconds = running_mean(self.seconds, seconds, TIME_EMA_WEIGHT)
        self.tokens = running_mean(self.tokens, float(num_tokens), TIME_EMA_WEIGHT)
        self.count += 1

    @property
    def per_token(self) -> float | None:
        return None if self.seconds is None else self.seconds / self.tokens


@dataclass
class StepTimes:
    """One request's measured seconds per generated token, decoding plain and drafting."""
    plain: Rate = field(default_factory=Rate)
    spec: Rate = field(default_factory=Rate)

    def add(self, drafted: bool, seconds: float, num_tokens: int) -> None:
        (self.spec if drafted else self.plain).add(seconds, num_tokens)

    @property
    def drafting_loses(self) -> bool:
        plain_s, spec_s = self.plain.per_token, self.spec.per_token
        return (self.spec.count >= MIN_TIMED_ROUNDS and plain_s is not None
                and spec_s is not None and spec_s > plain_s)


def running_mean(old: float | None, new: float, weight: float) -> float:
    """An exponential moving average: new alone at first, then each new value with this weight."""
    return new if old is None else old + weight * (new - old)


@dataclass
class SpecStats:
    num_drafts: int = 0  # verification steps (a request with at least one draft token)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step: the accepted drafts plus the target's own token."""
        return (self.num_accepted_tokens + self.num_drafts) / self.num_drafts if self.num_drafts else 0.0


def expected_num_tokens(acceptance: float, num_drafts: int) -> float:
    """1 + a + a^2 + ... + a^k: tokens per verification step when each draft is accepted with
    probability a given the ones before were."""
    return sum(acceptance**i for i in range(num_drafts + 1))


def best_num_drafts(acceptance: float, max_num_drafts: int, draft_cost: float,
                    verify_cost: float = VERIFY_COST) -> int:
    """The k in [0, max_num_drafts] with the most tokens per unit of cost (0: do not draft)."""
    best, best_rate = 0, 1.0
    for k in range(1, max_num_drafts + 1):
        rate = expected_num_tokens(acceptance, k) / (1.0 + k * (draft_cost + verify_cost))
        if rate > best_rate + 1e-9:
            best, best_rate = k, rate
    return best


def can_speculate(request: "Request") -> bool:
    """Position-dependent sampling (penalties, the min_tokens ban) and logprobs are not verified."""
    params = request.sampling_params
    penalties = (params.repetition_penalty, params.frequency_penalty, params.presence_penalty) != (1.0, 0.0, 0.0)
    return (params.num_speculative_tokens != 0 and params.logprobs is None and not penalties
            and request.num_output_tokens >= params.min_tokens)


class SpecController:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int,
                 verify_cost: float = VERIFY_COST, timed: bool = False):
        """timed: the engine passes each step's wall time to record() (see the module docstring)."""
        self.config = config
        self.timed = timed
        self.step_times: dict[str, StepTimes] = {}
        self.verify_cost = verify_cost
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.stats = SpecStats()
        self.acceptance: dict[str, float] = {}  # request_id -> estimated acceptance per token
        self.prior = PRIOR_ACCEPTANCE  # a new request's estimate: all requests' recent acceptance
        self.num_idle_steps: dict[str, int] = {}  # request_id -> steps since it stopped drafting
        self.probe_intervals: dict[str, int] = {}  # request_id -> steps between its probes now
        self.restarting: set[str] = set()  # requests whose drafting this step began with a catch-up
        self.follow_ups: set[str] = set()  # requests whose last round was a restart, not timed
        self.probing: set[str] = set()  # requests whose drafting this step is a probe (or its timed follow-up)

    def propose(self, running: list["Request"]) -> None:
        """Sets spec_token_ids (and spec_draft_probs) of the running requests for the next step."""
        live = {r.request_id for r in running}
        self.proposer.release(live)
        for request_id in [i for i in self.acceptance if i not in live]:
            del self.acceptance[request_id]
            self.num_idle_steps.pop(request_id, None)
            self.probe_intervals.pop(request_id, None)
        for request_id in [i for i in self.step_times if i not in live]:
            del self.step_times[request_id]
        self.follow_ups &= live
        self.restarting, self.probing = set(), set()
        if len(running) > self.config.max_num_seqs:
            return
        prefilled = [r for r in running if r.num_output_tokens == 1 and self._max_drafts(r)]
        if prefilled:
            self.proposer.prepare(prefilled)
        wanted, caps = {}, {}
        for request in running:
            cap = self._max_drafts(request)
            num_drafts = self._num_drafts(request, cap) if cap else 0
            if num_drafts:
                wanted[request.request_id], caps[request.request_id] = num_drafts, cap
        if not wanted:
            return
        drafting = {r.request_id: r for r in running if r.request_id in wanted}
        for request_id, proposal in self.proposer.propose(list(drafting.values()), wanted).items():
            request, cap = drafting[request_id], caps[request_id]
            # A proposer may draft more than asked where drafting is free (the hybrid's lookup), never past the cap.
            request.spec_token_ids = proposal.token_ids[:cap]
            request.spec_draft_probs = None if proposal.draft_probs is None else proposal.draft_probs[:cap]
            if proposal.num_extra_tokens:
                self.restarting.add(request_id)

    def _max_drafts(self, request: "Request") -> int:
        """The most tokens the request may draft this step (0: none)."""
        if request.num_computed_tokens != request.num_tokens - 1 or not can_speculate(request):
            return 0  # still prefilling, or sampling that verification does not cover
        params = request.sampling_params
        k = self.config.num_speculative_tokens
        if params.num_speculative_tokens is not None:
            k = min(k, params.num_speculative_tokens)
        # Drafts past the context or max_tokens would be dropped after verification anyway.
        k = min(k, self.max_model_len - request.num_tokens)
        if params.max_tokens is not None:
            k = min(k, params.max_tokens - request.num_output_tokens - 1)
        return max(k, 0)

    def _num_drafts(self, request: "Request", k: int) -> int:
        """How many of its k allowed tokens the request drafts: all of them, or the adaptive choice."""
        if not self.config.adaptive:
            return k
        times = self.step_times.setdefault(request.request_id, StepTimes()) if self.timed else None
        if times is not None and times.plain.count < PLAIN_STEPS:
            return 0  # time plain decoding first
        acceptance = self.acceptance.get(request.request_id, self.prior)
        best = best_num_drafts(acceptance, k, self.proposer.draft_cost, self.verify_cost)
        follow_up = request.request_id in self.follow_ups
        self.follow_ups.discard(request.request_id)
        if best and not (times is not None and times.drafting_loses):
            self.probe_intervals.pop(request.request_id, None)  # drafting pays: probe soon if it stops
            return best
        if follow_up:
            self.probing.add(request.request_id)
            return 1  # a probe that restarted the draft was not timed: its next round is
        idle = self.num_idle_steps.get(request.request_id, 0) + 1
        interval = self.probe_intervals.get(request.request_id, PROBE_INTERVAL)
        if idle < interval:
            self.num_idle_steps[request.request_id] = idle
            return 0
        # Probe again: the text may have changed (a code block after prose), from halfway back
        # to the prior so that one good step can turn speculation on again. A probe costs a
        # verification: each one that fails doubles the wait before the next.
        self.num_idle_steps[request.request_id] = 0
        self.probe_intervals[request.request_id] = min(2 * interval, MAX_PROBE_INTERVAL)
        self.acceptance[request.request_id] = (acceptance + self.prior) / 2
        self.probing.add(request.request_id)
        return 1  # timed too: its round joins the drafting estimate, or replaces it if faster than plain

    def record(self, scheduled: "SchedulerOutput", sampled: dict[str, list["SampledToken"]],
               step_s: float | None = None) -> None:
        """Counts drafted and accepted tokens of a step and updates each request's estimate;
        step_s (the step's wall time, its drafting included) times the decoding requests."""
        if self.timed and step_s is not None:
            self._record_times(scheduled, sampled, step_s)
        for request_id, drafts in scheduled.spec_token_ids.items():
            tokens = sampled.get(request_id)
            if not tokens:
                continue
            num_accepted = len(tokens) - 1
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += len(drafts)
            self.stats.num_accepted_tokens += num_accepted
            # Outcomes seen: num_accepted acceptances, then one rejection unless all were accepted.
            outcomes = [1.0] * num_accepted + ([0.0] if num_accepted < len(drafts) else [])
            estimate = self.acceptance.get(request_id, self.prior)
            for outcome in outcomes:
                estimate += EMA_WEIGHT * (outcome - estimate)
                self.prior += PRIOR_EMA_WEIGHT * (outcome - self.prior)
            self.acceptance[request_id] = estimate

    def _record_times(self, scheduled: "SchedulerOutput", sampled: dict[str, list["SampledToken"]],
                      step_s: float) -> None:
        for request_id, times in self.step_times.items():
            tokens = sampled.get(request_id)
            drafts = scheduled.spec_token_ids.get(request_id, ())
            if not tokens or scheduled.num_scheduled_tokens.get(request_id) != 1 + len(drafts):
                continue  # not in this step, or a prompt chunk
            if drafts and request_id in self.restarting:
                self.follow_ups.add(request_id)
                continue  # the draft caught up on a prompt or a pause: paid once, not per round
            plain_s = times.plain.per_token
            if drafts and request_id in self.probing and plain_s is not None and step_s < plain_s * len(tokens):
                # A probe that beats plain decoding: the text changed, drafting's record from before is
                # stale (merged with it, one good probe could not outweigh the rounds that switched it off).
                times.spec = Rate(count=times.spec.count)
            times.add(bool(drafts), step_s, len(tokens))

    def stats_dict(self) -> dict[str, float]:
        stats = self.stats
        return {
            "spec_num_drafts": stats.num_drafts,
            "spec_num_draft_tokens": stats.num_draft_tokens,
            "spec_num_accepted_tokens": stats.num_accepted_tokens,
            "spec_acceptance_rate": stats.acceptance_rate,
            "spec_mean_accepted_length": stats.mean_accepted_length,
        }
