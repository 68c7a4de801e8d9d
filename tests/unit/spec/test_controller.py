"""SpecController: the cost model behind adaptive k, switch-off, caps, and the statistics."""

import torch

from tokenforge.config import SpeculativeConfig
from tokenforge.engine.request import Request
from tokenforge.engine.scheduler import SampledToken, SchedulerOutput
from tokenforge.sampling_params import SamplingParams
from tokenforge.spec.controller import (MIN_TIMED_ROUNDS, PLAIN_STEPS, PROBE_INTERVAL, SpecController,
                                        best_num_drafts, expected_num_tokens)
from tokenforge.spec.proposer import Proposal


class FixedProposer:
    """Proposes 9, 9, ... (as many as asked) and remembers what it was asked."""

    def __init__(self, draft_cost: float = 0.0):
        self.draft_cost = draft_cost
        self.asked: dict[str, int] = {}
        self.live: set[str] = set()
        self.prepared: list[str] = []

    def prepare(self, requests):
        self.prepared += [r.request_id for r in requests]

    def propose(self, requests, num_tokens):
        self.asked = dict(num_tokens)
        return {r.request_id: Proposal([9] * num_tokens[r.request_id]) for r in requests}

    def release(self, live_request_ids):
        self.live = set(live_request_ids)


class RestartingProposer(FixedProposer):
    """Like a draft model: a round right after a round it was not asked for first catches up on
    extra tokens (the prompt, or what was decoded while drafting was off)."""

    def __init__(self):
        super().__init__()
        self.was_asked = False
        self.restarted = False

    def propose(self, requests, num_tokens):
        proposals = super().propose(requests, num_tokens)
        self.restarted = not self.was_asked
        for proposal in proposals.values():
            proposal.num_extra_tokens = 50 if self.restarted else 0
        return proposals


def make_decoding_request(request_id: str = "r", num_output_tokens: int = 1, **params) -> Request:
    """A running request whose tokens are all computed but its last (it is decoding)."""
    params.setdefault("max_tokens", 100)
    request = Request(request_id, [1, 2, 3], SamplingParams(**params))
    request.output_token_ids = [5] * num_output_tokens
    request.num_computed_tokens = request.num_tokens - 1
    return request


def make_controller(proposer=None, **config) -> SpecController:
    config.setdefault("method", "ngram")
    return SpecController(SpeculativeConfig(**config), proposer or FixedProposer(), max_model_len=1000)


def test_expected_tokens_per_verification():
    assert expected_num_tokens(0.5, 0) == 1.0
    assert expected_num_tokens(0.5, 2) == 1.75
    assert expected_num_tokens(1.0, 4) == 5.0


def test_best_k_grows_with_acceptance_and_falls_with_draft_cost():
    assert best_num_drafts(0.95, 4, draft_cost=0.0) == 4
    assert best_num_drafts(0.05, 4, draft_cost=0.0) == 0
    assert best_num_drafts(0.6, 4, draft_cost=1.0) == 0  # a draft as costly as the target never pays
    assert 0 < best_num_drafts(0.6, 8, draft_cost=0.1) < best_num_drafts(0.9, 8, draft_cost=0.1)


def test_a_costly_verification_turns_drafting_off():
    """Where one row runs a faster kernel than several, each verified token costs much more."""
    assert best_num_drafts(0.99, 4, draft_cost=0.2, verify_cost=0.1) == 4
    assert best_num_drafts(0.7, 4, draft_cost=0.2, verify_cost=0.5) == 0
    assert best_num_drafts(0.99, 4, draft_cost=0.0, verify_cost=0.35) > 0  # free drafts still pay


def test_proposals_land_on_the_requests():
    controller = make_controller(adaptive=False, num_speculative_tokens=3)
    request = make_decoding_request()
    controller.propose([request])
    assert request.spec_token_ids == [9, 9, 9]


def test_switches_off_above_max_num_seqs():
    proposer = FixedProposer()
    controller = make_controller(proposer, adaptive=False, max_num_seqs=2)
    requests = [make_decoding_request(f"r{i}") for i in range(3)]
    controller.propose(requests)
    assert all(r.spec_token_ids == [] for r in requests)
    controller.propose(requests[:2])
    assert proposer.asked == {"r0": 4, "r1": 4}


def test_requests_are_prepared_once_at_their_prefill_step_while_speculating():
    proposer = FixedProposer()
    controller = make_controller(proposer, max_num_seqs=2)
    fresh, older = make_decoding_request("fresh"), make_decoding_request("older", num_output_tokens=5)
    off = make_decoding_request("off", num_speculative_tokens=0)
    controller.propose([fresh, older, make_decoding_request("third")])  # above max_num_seqs: no speculation
    assert proposer.prepared == []
    controller.propose([fresh, older])
    controller.propose([off])
    fresh.output_token_ids.append(5)
    fresh.num_computed_tokens += 1
    controller.propose([fresh, older])
    assert proposer.prepared == ["fresh"]


class GenerousProposer(FixedProposer):
    """Drafts 6 tokens whatever it is asked, with their q (a lookup drafting past the asked k)."""

    def propose(self, requests, num_tokens):
        self.asked = dict(num_tokens)
        return {r.request_id: Proposal([9] * 6, torch.full((6, 10), 0.1)) for r in requests}


def test_drafts_past_the_cap_are_cut():
    controller = make_controller(GenerousProposer(), num_speculative_tokens=4, max_num_seqs=16)
    room = make_decoding_request("room", max_tokens=100)
    near_end = make_decoding_request("near_end", max_tokens=3)  # one output out: 2 more, the last the target's
    controller.propose([room, near_end])
    assert room.spec_token_ids == [9] * 4 and room.spec_draft_probs.shape == (4, 10)
    assert near_end.spec_token_ids == [9] and near_end.spec_draft_probs.shape == (1, 10)


def test_caps_per_request_and_by_max_tokens_and_context():
    proposer = FixedProposer()
    controller = make_controller(proposer, adaptive=False, num_speculative_tokens=4, max_num_seqs=16)
    capped = make_decoding_request("capped", num_speculative_tokens=2)
    off = make_decoding_request("off", num_speculative_tokens=0)
    near_end = make_decoding_request("near_end", num_output_tokens=7, max_tokens=9)  # one token left after the next
    penalised = make_decoding_request("penalised", presence_penalty=0.5)
    logprobs = make_decoding_request("logprobs", logprobs=1)
    owing = make_decoding_request("owing", min_tokens=5)
    prefilling = make_decoding_request("prefilling")
    prefilling.num_computed_tokens = 1
    controller.propose([capped, off, near_end, penalised, logprobs, owing, prefilling])
    assert proposer.asked == {"capped": 2, "near_end": 1}
    controller.max_model_len = 5  # 4 tokens held: one more position fits
    controller.propose([make_decoding_request("ctx")])
    assert proposer.asked == {"ctx": 1}


def test_record_counts_and_learns_acceptance():
    controller = make_controller()
    output = SchedulerOutput(spec_token_ids={"a": [9, 9, 9, 9], "b": [9, 9]})
    sampled = {"a": [SampledToken(9), SampledToken(4)], "b": [SampledToken(9), SampledToken(9), SampledToken(3)]}
    controller.record(output, sampled)
    stats = controller.stats_dict()
    assert stats["spec_num_drafts"] == 2
    assert stats["spec_num_draft_tokens"] == 6
    assert stats["spec_num_accepted_tokens"] == 3
    assert stats["spec_acceptance_rate"] == 0.5
    assert stats["spec_mean_accepted_length"] == 2.5  # (3 accepted + 2 target tokens) / 2 steps
    assert controller.acceptance["b"] > controller.acceptance["a"]


def test_a_new_request_starts_from_the_engines_recent_acceptance():
    proposer = FixedProposer()
    controller = make_controller(proposer, num_speculative_tokens=8, max_num_seqs=16)
    first = make_decoding_request("first")
    controller.propose([first])
    k_at_prior = proposer.asked["first"]
    for _ in range(40):  # every draft accepted
        controller.propose([first])
        drafts = first.spec_token_ids
        output = SchedulerOutput(num_scheduled_tokens={"first": 1 + len(drafts)}, spec_token_ids={"first": drafts})
        controller.record(output, {"first": [SampledToken(9)] * (len(drafts) + 1)})
    assert controller.prior > 0.95
    controller.propose([make_decoding_request("second")])
    assert proposer.asked["second"] == 8 > k_at_prior


def test_adaptive_switch_off_then_probe():
    proposer = FixedProposer()
    controller = make_controller(proposer, num_speculative_tokens=4)
    request = make_decoding_request("r")
    controller.acceptance["r"] = 0.02  # drafts keep failing
    for _ in range(PROBE_INTERVAL - 1):
        proposer.asked = {}
        controller.propose([request])
        assert proposer.asked == {}
    controller.propose([request])
    assert proposer.asked == {"r": 1}  # one probe
    assert controller.acceptance["r"] > 0.02


def test_failed_probes_back_off():
    proposer = FixedProposer()
    controller = make_controller(proposer, num_speculative_tokens=4)
    request = make_decoding_request("r")
    probe_steps = []
    for step in range(1, 16 + 32 + 64 + 1):
        controller.acceptance["r"] = 0.02  # every probe fails
        proposer.asked = {}
        controller.propose([request])
        if proposer.asked:
            probe_steps.append(step)
    assert probe_steps == [16, 16 + 32, 16 + 32 + 64]
    controller.acceptance["r"] = 0.99  # drafting pays again: the wait starts over
    controller.propose([request])
    assert proposer.asked == {"r": 4} and "r" not in controller.probe_intervals


def test_finished_requests_are_forgotten():
    proposer = FixedProposer()
    controller = make_controller(proposer)
    controller.acceptance["gone"] = 0.5
    controller.propose([make_decoding_request("r")])
    assert "gone" not in controller.acceptance
    assert proposer.live == {"r"}


def run_timed_steps(controller, proposer, request, num_steps, plain_s, spec_s_per_token, accept_all=True,
                    restart_s=0.0, round_s=None, rejected_steps=()):
    """Drives propose/record for one decoding request with synthetic step times (the policy is what
    is tested here; the engine passes real wall times); returns the k asked at each step. A round in
    which a RestartingProposer catches up costs restart_s more. round_s: a drafting round's time
    whatever it yields; rejected_steps: the steps whose drafts are all rejected."""
    asked = []
    for step in range(num_steps):
        proposer.asked = {}
        controller.propose([request])
        k = proposer.asked.get("r", 0)
        asked.append(k)
        if isinstance(proposer, RestartingProposer):
            proposer.was_asked = bool(k)
        drafts = request.spec_token_ids if k else []
        accepted = accept_all and step not in rejected_steps
        tokens = [SampledToken(9)] * ((len(drafts) if accepted else 0) + 1)
        output = SchedulerOutput(num_scheduled_tokens={"r": 1 + len(drafts)},
                                 spec_token_ids={"r": drafts} if drafts else {})
        step_s = (round_s or spec_s_per_token * len(tokens)) if drafts else plain_s
        if drafts and getattr(proposer, "restarted", False):
            step_s += restart_s
        controller.record(output, {"r": tokens}, step_s)
        request.spec_token_ids = []
    return asked


def timed_controller(proposer):
    return SpecController(SpeculativeConfig(method="ngram", num_speculative_tokens=4), proposer,
                          max_model_len=1000, timed=True)


def test_timed_requests_decode_plain_first_and_keep_drafting_that_pays():
    proposer = FixedProposer()
    controller = timed_controller(proposer)
    asked = run_timed_steps(controller, proposer, make_decoding_request("r"), 20, plain_s=0.1, spec_s_per_token=0.05)
    assert asked[:PLAIN_STEPS] == [0] * PLAIN_STEPS
    assert all(k == 4 for k in asked[PLAIN_STEPS:])
    times = controller.step_times["r"]
    assert times.plain.per_token == 0.1 and abs(times.spec.per_token - 0.05) < 1e-12


def test_drafting_measured_slower_than_plain_switches_off_though_every_draft_is_accepted():
    """Acceptance 1.0 makes the model draft; the wall times say it loses: off, then probes."""
    proposer = FixedProposer()
    controller = timed_controller(proposer)
    asked = run_timed_steps(controller, proposer, make_decoding_request("r"), PLAIN_STEPS + MIN_TIMED_ROUNDS + 40,
                            plain_s=0.1, spec_s_per_token=0.12)
    drafting = asked[PLAIN_STEPS:PLAIN_STEPS + MIN_TIMED_ROUNDS]
    assert drafting == [4] * MIN_TIMED_ROUNDS
    after = asked[PLAIN_STEPS + MIN_TIMED_ROUNDS:]
    assert after[:PROBE_INTERVAL - 1] == [0] * (PROBE_INTERVAL - 1)
    assert after[PROBE_INTERVAL - 1] == 1  # a probe: one timed round, still slower, so off again
    assert after[PROBE_INTERVAL:] == [0] * (len(after) - PROBE_INTERVAL)


def test_a_probe_that_runs_faster_turns_timed_drafting_back_on():
    proposer = FixedProposer()
    controller = timed_controller(proposer)
    request = make_decoding_request("r")
    run_timed_steps(controller, proposer, request, PLAIN_STEPS + MIN_TIMED_ROUNDS, plain_s=0.1, spec_s_per_token=0.11)
    assert controller.step_times["r"].drafting_loses
    asked = run_timed_steps(controller, proposer, request, 3 * PROBE_INTERVAL, plain_s=0.1, spec_s_per_token=0.01)
    assert asked[PROBE_INTERVAL - 1] == 1 and not controller.step_times["r"].drafting_loses
    assert asked[-1] == 4  # the text became predictable: drafting is on again


def test_a_probe_that_beats_plain_replaces_the_stale_record():
    """Drafting lost by a wide margin (0.15 s a token against 0.1 plain); the text then turns
    predictable (0.07 s a token): merged into the old record one probe would still lose and the next
    probe come 32 steps later; it replaces the record, and drafting goes on at once."""
    proposer = FixedProposer()
    controller = timed_controller(proposer)
    request = make_decoding_request("r")
    run_timed_steps(controller, proposer, request, PLAIN_STEPS + MIN_TIMED_ROUNDS, plain_s=0.1, spec_s_per_token=0.15)
    assert controller.step_times["r"].drafting_loses
    asked = run_timed_steps(controller, proposer, request, PROBE_INTERVAL + 3, plain_s=0.1, spec_s_per_token=0.07)
    assert asked[PROBE_INTERVAL - 1] == 1 and all(k > 0 for k in asked[PROBE_INTERVAL:])
    assert abs(controller.step_times["r"].spec.per_token - 0.07) < 1e-12



def test_a_draft_catching_up_on_the_prompt_is_not_timed_as_a_round():
    """The first drafting round also runs the draft over the prompt (here 10 plain steps' time):
    timed as a round it would switch a draft that pays off; it is left out, later rounds count."""
    proposer = RestartingProposer()
    controller = timed_controller(proposer)
    asked = run_timed_steps(controller, proposer, make_decoding_request("r"), 30, plain_s=0.1,
                            spec_s_per_token=0.05, restart_s=1.0)
    assert asked[:PLAIN_STEPS] == [0] * PLAIN_STEPS
    assert all(k == 4 for k in asked[PLAIN_STEPS:])
    times = controller.step_times["r"]
    assert times.spec.count == len(asked) - PLAIN_STEPS - 1 and abs(times.spec.per_token - 0.05) < 1e-12


def test_a_probe_that_restarts_the_draft_times_its_second_round():
    """Switched off by measured times, a probe catches the draft up (not timed) and drafts one more
    round, timed: faster now, so drafting is back on; still slower, it stays off."""
    for spec_s, back_on in ((0.01, True), (0.2, False)):
        proposer = RestartingProposer()
        controller = timed_controller(proposer)
        request = make_decoding_request("r")
        run_timed_steps(controller, proposer, request, PLAIN_STEPS + MIN_TIMED_ROUNDS + 1, plain_s=0.1,
                        spec_s_per_token=0.11)
        assert controller.step_times["r"].drafting_loses
        asked = run_timed_steps(controller, proposer, request, 2 * PROBE_INTERVAL, plain_s=0.1,
                                spec_s_per_token=spec_s, restart_s=1.0)
        probe = asked.index(1)
        assert asked[probe:probe + 2] == [1, 1]  # the restart, then the timed round
        assert controller.step_times["r"].drafting_loses is not back_on
        assert (asked[probe + 2] > 0) is back_on


def test_one_rejected_round_does_not_switch_drafting_off():
    """Rounds of 0.25 s give 5 tokens (0.05 s each, plain 0.1 s); one gives 1 token. Measured as
    seconds over tokens of recent rounds drafting still wins (an average of per-round ratios would
    have jumped to 0.11 s a token and switched it off)."""
    proposer = FixedProposer()
    controller = timed_controller(proposer)
    rejected = PLAIN_STEPS + MIN_TIMED_ROUNDS + 2
    asked = run_timed_steps(controller, proposer, make_decoding_request("r"), rejected + 10, plain_s=0.1,
                            spec_s_per_token=None, round_s=0.25, rejected_steps={rejected})
    assert all(k > 0 for k in asked[PLAIN_STEPS:])
    times = controller.step_times["r"]
    assert 0.05 < times.spec.per_token < 0.1 and not times.drafting_loses
